"""Reading user-supplied files and writing outputs safely, with errors that say which file and what
went wrong (see :func:`atomic_write`, :func:`check_output_path` and :class:`JsonlAppendFile`)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

from .errors import PersonaJudgeError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, no O_NONBLOCK to clear
    fcntl = None  # type: ignore[assignment]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


#: the largest input file or stream read into memory (a prompt set, a config, a preferences file)
MAX_INPUT_BYTES = 256 << 20


def read_text(
    path: str | os.PathLike[str], what: str, error: type[PersonaJudgeError], max_bytes: int = MAX_INPUT_BYTES
) -> str:
    """The UTF-8 text of ``path``; ``error("<what> not found: ...")`` and the like otherwise.

    Invalid UTF-8 is ``error`` naming the file and the byte offset; more than ``max_bytes`` (a
    device such as ``/dev/zero`` never ends) is refused rather than read into memory.
    """
    data = read_bytes(path, what, error, max_bytes)
    assert data is not None  # only missing_ok=True gives None
    return decode_utf8(data, f"{what} {Path(path)}", error)


def read_bytes(
    path: str | os.PathLike[str],
    what: str,
    error: type[PersonaJudgeError],
    max_bytes: int = MAX_INPUT_BYTES,
    *,
    missing_ok: bool = False,
) -> bytes | None:
    """The bytes of ``path``, at most ``max_bytes``; every failure one ``error`` naming ``what`` and the path
    (a folder, a file it may not read, a device that never ends), a missing file too unless ``missing_ok``
    (then None): read in one place, so that no reader of a user's file crashes where another refuses."""
    p = Path(path)
    try:
        first, f = _open_for_reading(p)
        with f:
            data = first[: max_bytes + 1] + f.read(max(0, max_bytes + 1 - len(first)))
    except _NoWriter:
        raise error(
            f"cannot read {what} {p}: it is a named pipe (FIFO) that nothing writes to; start its writer first, "
            "or give a regular file"
        ) from None
    except ValueError:  # open() refuses a path with a NUL byte in it
        raise error(f"cannot read {what} {str(p)!r}: a path holds no NUL byte") from None
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what} not found: {p}") from None
    except OSError as err:
        raise error(f"cannot read {what} {p}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > max_bytes:
        raise error(f"{what} {p} is larger than {max_bytes >> 20} MiB; split it")
    return data


class _NoWriter(Exception):
    """A FIFO without a writer: reading it would wait for one for ever."""


def _open_for_reading(p: Path) -> tuple[bytes, IO[bytes]]:
    """``open(p, "rb")`` and the bytes already read from it, except that a named pipe nothing writes to is
    :class:`_NoWriter`, not a wait for ever: the open does not wait (``O_NONBLOCK``), and a first
    non-blocking read tells a pipe with a writer (data, or ``EAGAIN``: the writer has written nothing yet)
    from one without (end of file). Shell process substitution (``--config <(...)``) is a pipe with a
    writer, and keeps working."""
    if fcntl is None:
        return b"", open(p, "rb")
    fd = os.open(p, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    try:
        first = b""
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            try:
                first = os.read(fd, 1 << 16)
            except BlockingIOError:  # a writer, with nothing written yet
                pass
            else:
                if not first:
                    raise _NoWriter
        os.set_blocking(fd, True)
        return first, os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_whole(stream: Any, text: str) -> None:
    """All of ``text`` to ``stream`` (standard output), flushed.

    Through the stream's file descriptor, ``os.write`` in a loop that takes each partial count: when a
    signal interrupts a large write to a pipe part-way (its reader is slow; a Ctrl-C held by
    :func:`~personajudge.core.processes.whole_lines`), CPython's buffered writer reports the write done
    and drops the rest (measured: 64 KiB of 200 KiB reached the pipe). A stream without a descriptor
    (a test's capture) is written as usual."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both an OSError and a ValueError
        stream.write(text)
        stream.flush()
        return
    stream.flush()  # what the stream holds goes first
    data = memoryview(text.encode(getattr(stream, "encoding", None) or "utf-8"))
    while data:
        data = data[os.write(fd, data) :]


def path_problem(value: str, kind: Literal["file", "dir"] = "file") -> str | None:
    """Why ``value``, a path the user typed, cannot name the ``kind`` it is given for; None when it can.

    pathlib reads ``""`` as ``"."`` and drops a trailing slash (``Path("sub/")`` is ``sub``), so an
    empty argument would silently become the current folder and ``--output sub/`` a file named
    ``sub``. Refused here, once for every path flag (the CLI's argparse types and the API's paths):
    an empty (or blank) path, and for a file a path that can only name a folder (``.``, ``..``,
    ``/``, anything ending in a slash or in ``.``/``..``). A folder path (``kind="dir"``) may end
    with a slash. Whether the path exists is the caller's question.
    """
    if not value.strip():
        return "the path is empty"
    if kind == "file":
        if value.endswith("/") or value.endswith(os.sep):
            return f"{value!r} names a folder (it ends with a slash); give a file path"
        if Path(value).name in ("", ".", ".."):  # ".", "..", "/", "a/..": pathlib has no file name for them
            return f"{value!r} names a folder; give a file path"
    return None


def check_path(
    value: str | os.PathLike[str],
    what: str,
    error: type[PersonaJudgeError],
    kind: Literal["file", "dir"] = "file",
) -> str:
    """``value`` as a string, or ``error("<what>: <why>")`` when :func:`path_problem` refuses it
    or it is no path at all (``None``, a number: ``os.fspath``'s bare ``TypeError`` otherwise)."""
    try:
        text = os.fspath(value)
    except TypeError:
        raise error(f"{what}: expected a path (str or os.PathLike), got {type(value).__name__}") from None
    problem = path_problem(text, kind)
    if problem is not None:
        raise error(f"{what}: {problem}")
    return text


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSONL ``text``: split on ``"\\n"`` only, one trailing ``"\\r"`` dropped (CRLF files).

    ``str.splitlines`` also splits on U+2028, U+2029, U+0085 and other separators, which JSON allows
    unescaped inside a string (and which ``json.dumps(..., ensure_ascii=False)`` writes raw): it would
    cut a valid line in two and shift every later line number.
    """
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def path_kind(
    path: str | os.PathLike[str], what: str, error: type[PersonaJudgeError], named: str | os.PathLike[str] | None = None
) -> Literal["file", "dir", "other"] | None:
    """What is at ``path``: a regular file, a folder, something else (a FIFO, device or socket) or nothing.

    One ``stat``, following links. ``Path.exists()``/``is_file()`` raise ``PermissionError`` on
    Python 3.11 inside a folder the user cannot enter, and call a FIFO "not a file"; opening one
    would block for good. A path that cannot be examined is ``error`` naming ``named`` (default
    ``path``: the path the user gave) as ``what``.
    """
    shown = path if named is None else named
    try:
        mode = Path(path).stat().st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL in the name
        return None
    except PermissionError:
        raise error(
            f"cannot access {what} {shown}: permission denied; check the permissions of it and of the folders above it"
        ) from None
    except OSError as err:  # a link loop, a name too long, an I/O error
        raise error(f"cannot access {what} {shown}: {os_error_text(err)}") from None
    if stat.S_ISREG(mode):
        return "file"
    return "dir" if stat.S_ISDIR(mode) else "other"


def read_stream(stream: IO[bytes], what: str, error: type[PersonaJudgeError], max_bytes: int = MAX_INPUT_BYTES) -> str:
    """All of a binary stream (standard input) as UTF-8 text, with the same checks as :func:`read_text`."""
    try:
        data = stream.read(max_bytes + 1)
    except OSError as err:
        raise error(f"cannot read {what}: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > max_bytes:
        raise error(f"{what} is larger than {max_bytes >> 20} MiB")
    return decode_utf8(data, what, error)


def decode_utf8(data: bytes, what: str, error: type[PersonaJudgeError]) -> str:
    """``data`` as UTF-8 (a leading BOM dropped), or ``error`` naming ``what`` and the first bad byte's offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 1].hex()
        line = data.count(b"\n", 0, err.start) + 1
        raise error(
            f"{what} is not valid UTF-8: byte 0x{bad} at offset {err.start} (line {line}) {err.reason}; "
            "save it as UTF-8"
        ) from None


def check_text(text: str, what: str, error: type[PersonaJudgeError]) -> str:
    """``text`` unchanged, or ``error`` when it cannot be encoded as UTF-8.

    Python strings may hold lone surrogates (``"\\ud800"`` in JSON, undecodable bytes read with
    ``surrogateescape``); tokenizers fail on them deep inside (``UnicodeEncodeError``, a
    ``TypeError`` from a Rust tokenizer), so they are refused where the text comes in.
    """
    problem = unicode_problem(text)
    if problem is not None:
        raise error(f"{what} {problem}")
    return text


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (``"is not valid Unicode: ..."``), or None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"is not valid Unicode: a lone surrogate U+{ord(text[err.start]):04X} at character "
            f"{err.start} (invalid UTF-8 in the input, or a \\ud800-style JSON escape)"
        )
    return None


# -- writing outputs safely ---------------------------------------------------------------------------
#
# Every output the project writes goes through these helpers, so that a result file is never half
# written (temporary file in the same directory, fsync, atomic rename), is never written *through* a
# symbolic link or *onto* a FIFO or a device (a FIFO with no reader would block forever, a device is
# not a file the user meant), and a full disk or a closed pipe is one line, not a traceback.


class OutputError(PersonaJudgeError):
    """An output cannot be written safely (symbolic link, FIFO or device at the path, disk full, closed pipe)."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def silence_stdout() -> None:
    """Point fd 1 at /dev/null, after standard output failed (a closed pipe, a full disk): the
    interpreter flushes ``sys.stdout`` at exit, and would fail again with a second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # AttributeError: no stdout at all (None)
        pass


class QuietStream:
    """A text stream for what is not the result (progress bar, stats and warning lines, notes):
    writes that fail are dropped, never raised.

    Wraps ``sys.stderr`` (or None, when the process started with it closed: Python then prints
    ``print(..., file=None)`` to *standard output*, into the results). A closed, full or broken
    standard error must not lose or abort a run whose results go elsewhere; after the first failed
    write the descriptor is pointed at ``/dev/null``, so the interpreter's own flush at exit does
    not fail again. Every other attribute (``isatty``, ``fileno``, ``encoding``) is the wrapped
    stream's, so tqdm still asks the real stream whether it is a terminal.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # ValueError: a closed file object
                self._give_up()
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self._give_up()

    def isatty(self) -> bool:
        try:
            return self.stream is not None and bool(self.stream.isatty())
        except (OSError, ValueError):
            return False

    def _give_up(self) -> None:
        stream, self.stream = self.stream, None
        try:
            fd = stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
            stream.flush()  # what the failed write left in its buffer goes to /dev/null now
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:
        if self.stream is None:
            raise AttributeError(name)
        return getattr(self.stream, name)


def note(line: str) -> None:
    """One line on standard error (``personajudge: resuming: ...``): never on standard output, never
    an exception (see :class:`QuietStream`)."""
    stream = sys.stderr if isinstance(sys.stderr, QuietStream) else QuietStream(sys.stderr)
    stream.write(line + "\n")
    stream.flush()


def reopen_closed_stderr() -> None:
    """A process started with standard error closed (``2>&-``): put ``/dev/null`` on descriptor 2.

    Otherwise the next file opened (a results file) gets descriptor 2, and whatever writes to it at
    the C level (a native library's log) writes into that file. ``sys.stderr`` stays None; callers
    write through :class:`QuietStream`.
    """
    try:
        os.fstat(2)
        return
    except OSError:
        pass
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:
            os.dup2(fd, 2)
            os.close(fd)
    except OSError:
        pass


def os_error_text(err: OSError) -> str:
    """``"No space left on device"`` and the like: the OS's words without the errno and path noise."""
    return err.strerror or str(err)


def check_output_path(
    path: str | os.PathLike[str], what: str = "output file", error: type[PersonaJudgeError] = OutputError
) -> Path:
    """Refuse a path that is a symbolic link, a directory or any non-regular file (FIFO, device, socket).

    A missing path or a regular file passes. This is checked before anything is written *and* again
    just before the final rename (:func:`atomic_write`), so an ``--overwrite`` never replaces a link
    or a device with a regular file. Standard output is named ``-`` by the caller and never gets here.
    """
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return p
    except OSError as err:
        raise error(f"cannot use {what} {p}: {os_error_text(err)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{what} {p} is a symbolic link; refusing to write through it (name the file it points to)")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        hint = "" if stat.S_ISDIR(st.st_mode) else "; name '-' to write to standard output"
        raise error(f"{what} {p} is {kind}; refusing to write to it{hint}")
    return p


def open_regular(
    path: str | os.PathLike[str],
    flags: int,
    what: str = "output file",
    error: type[PersonaJudgeError] = OutputError,
    mode: int = 0o666,
) -> int:
    """``os.open`` that never follows a symbolic link and never opens a FIFO or a device.

    ``O_NOFOLLOW`` refuses a link at the last component, ``O_NONBLOCK`` keeps a FIFO without a reader
    from blocking the open, and ``fstat`` on the opened descriptor (not on the name, which could be
    swapped in between) makes sure it is a regular file. Returns a blocking descriptor.
    """
    p = Path(path)
    try:
        fd = os.open(p, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            check_output_path(p, what, error)  # the precise message (link, FIFO, directory)
        raise error(f"cannot open {what} {p}: {os_error_text(err)}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} {p} is not a regular file; refusing to write to it")
        if fcntl is not None:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_write(
    path: str | os.PathLike[str],
    mode: str = "w",
    *,
    what: str = "output file",
    overwrite: bool = True,
    error: type[PersonaJudgeError] = OutputError,
    encoding: str | None = "utf-8",
) -> Iterator[IO[Any]]:
    """Write ``path`` all at once or not at all.

    Yields a file object on a temporary file in the same directory; when the block ends without an
    exception the file is flushed, fsynced and renamed over ``path`` (readers see the old file or the
    new one, never a part), and the directory entry is fsynced. On an exception the temporary file is
    removed and ``path`` is untouched. ``path`` must not be a link or a non-regular file (checked
    before and just before the rename); an existing file is refused unless ``overwrite``. An
    ``OSError`` while writing (a full disk) becomes ``error`` with the OS's words.
    """
    p = check_output_path(path, what, error)
    if not overwrite and p.exists():
        raise error(f"{what} {p} already exists")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    except OSError as err:
        raise error(f"cannot write {what} {p}: {os_error_text(err)}") from None
    try:
        try:
            old_mode = stat.S_IMODE(os.stat(p).st_mode)
        except OSError:
            old_mode = _default_mode()
        if hasattr(os, "fchmod"):
            os.fchmod(fd, old_mode)
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        check_output_path(p, what, error)
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except OSError as err:
        _unlink_quietly(tmp)
        raise error(f"cannot write {what} {p}: {os_error_text(err)}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_text_atomic(path: str | os.PathLike[str], text: str, **kwargs: Any) -> None:
    """:func:`atomic_write` of one string."""
    with atomic_write(path, "w", **kwargs) as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any, **kwargs: Any) -> None:
    """:func:`atomic_write` of one JSON document (indented, UTF-8, trailing newline)."""
    with atomic_write(path, "w", **kwargs) as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def complete_lines_end(data: bytes) -> int:
    """Where the complete lines of JSONL ``data`` end: bytes after the last newline are a torn write."""
    return data.rfind(b"\n") + 1


def parse_jsonl(data: bytes) -> tuple[list[Any], int]:
    """The objects of the complete lines of ``data`` and how many lines could not be read.

    A torn last line (no newline) is neither returned nor counted; blank lines are skipped. A line is
    unreadable when it is not JSON, not UTF-8, holds an integer past ``int()``'s digit limit or nests
    past the recursion limit (the last two are ``ValueError`` / ``RecursionError``, not decode errors).
    """
    out: list[Any] = []
    bad = 0
    for line in data[: complete_lines_end(data)].splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (ValueError, RecursionError):
            bad += 1
    return out, bad


def read_jsonl(path: str | os.PathLike[str], what: str, error: type[PersonaJudgeError]) -> tuple[list[Any], int]:
    """:func:`parse_jsonl` of a file, read-only (a torn tail is ignored, not cut); a missing file has none.
    One that cannot be read (a folder, a device) is ``error`` naming ``what`` (:func:`read_bytes`)."""
    data = read_bytes(path, what, error, missing_ok=True)
    return parse_jsonl(data) if data is not None else ([], 0)


#: Files this process made that hold nothing worth keeping yet (a JSONL batch's partial file with only its
#: settings line: a row would make it a run to resume), each with its size then: what
#: :func:`discard_fresh_files` removes.
_FRESH: dict[str, int] = {}


def mark_fresh(path: str) -> None:
    """Note ``path`` (absolute), just made, as holding nothing worth keeping until :func:`unmark_fresh`."""
    with contextlib.suppress(OSError):
        _FRESH[path] = os.stat(path).st_size


def unmark_fresh(path: str) -> None:
    """``path`` holds something now (a row), or its owner's own ending decides about it."""
    _FRESH.pop(path, None)


def discard_fresh_files() -> None:
    """Remove the files :func:`mark_fresh` noted that have not grown, for a process about to end with
    ``os._exit`` (a second Ctrl-C: the CLI's, or while Ray starts): no ``finally`` runs then, so the
    batch's rule (a run that stops before its first row leaves no partial file, which would look like a
    run to resume) is applied here. A file that has grown since (a row got in) is kept, and so is one
    the run found there. Callable from another thread or a signal handler: no lock (the main thread may
    hold it when the signal lands), a snapshot of the dict."""
    for path, size in list(_FRESH.items()):
        with contextlib.suppress(OSError):
            if os.stat(path).st_size == size:
                os.unlink(path)


class JsonlAppendFile:
    """An append-only JSONL file that survives being killed at any instant.

    Opened with :func:`open_regular` (no links, FIFOs or devices) and an exclusive ``flock`` (two
    processes never append to one file). A kill during a write leaves a last line without its
    newline: :meth:`open` cuts that torn tail off before anything new is written and returns the
    objects of the complete lines (:func:`parse_jsonl`: unreadable lines are counted in ``skipped``,
    not returned). The JSONL batch (``personajudge.batch``) and the evaluation store
    (``personajudge.evaluation.store``) both append through it.
    :meth:`append` writes whole lines in one ``write``, then flush + fsync: what it returned from is
    on disk.
    """

    def __init__(
        self, path: str | os.PathLike[str], what: str = "output file", error: type[PersonaJudgeError] = OutputError
    ):
        self.path = Path(path)
        self.what = what
        self.error = error
        self.skipped = 0
        self._f: IO[bytes] | None = None

    def open(self, check: Callable[[list[Any], int, bytes], None] | None = None) -> list[Any]:
        """Lock the file and return the objects of its complete lines (see the class).

        ``check(objs, skipped, tail)``, when given, sees the file as it is (``tail``: the bytes after its
        last newline) before the torn tail is cut, and raises to leave it alone: a file the caller did
        not write (a user's own, at the path a partial file takes) is refused, not cut."""
        check_output_path(self.path, self.what, self.error)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self.error(f"cannot write {self.what} {self.path}: {os_error_text(err)}") from None
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, self.what, self.error)
        f = os.fdopen(fd, "a+b")
        try:
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise self.error(
                    f"another process is writing {self.path}; wait for it to finish or choose another output"
                ) from None
            f.seek(0)
            data = f.read()
            end = complete_lines_end(data)
            out, skipped = parse_jsonl(data)
            if check is not None:
                check(out, skipped, data[end:])
            if end < len(data):
                f.truncate(end)
                f.flush()
                os.fsync(fd)
        except OSError as err:
            f.close()
            raise self.error(f"cannot read {self.what} {self.path}: {os_error_text(err)}") from None
        except BaseException:
            f.close()
            raise
        self._f = f
        self.skipped = skipped
        return out

    def append(self, objs: Sequence[Any]) -> None:
        if self._f is None:
            raise RuntimeError(f"{self.path} is not open")
        data = b"".join(json.dumps(o, ensure_ascii=False).encode("utf-8") + b"\n" for o in objs)
        try:
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as err:
            raise self.error(f"cannot write {self.what} {self.path}: {os_error_text(err)}") from None

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()  # closing releases the lock
            except OSError:
                pass
            self._f = None

    def __enter__(self) -> JsonlAppendFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
