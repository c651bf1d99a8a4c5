"""The ``personajudge`` command line: one module per command group.

User mistakes (a :class:`PersonaJudgeError` or a bad flag) and a standard
output that cannot be written (closed, full disk) print one line to stderr and
exit with status 2; warnings print one line each; anything else is a bug and
keeps its traceback. Standard error only ever carries such lines (and the
progress bar): when it is closed, full or broken they are dropped, and the run
goes on (:class:`~personajudge.core.files.QuietStream`).

A standard output that cannot encode every character (``PYTHONIOENCODING=ascii``, a ``C`` locale,
a Windows console) never loses the result: JSON is written with ``\\uXXXX`` escapes (still valid JSON,
the same object), and text that does not fit is written with backslash escapes plus one warning line
(:class:`EncodableStdout`). A reader that closes the pipe early (``personajudge preferences | head -1``)
ends the command quietly with status 141, as a Unix tool killed by SIGPIPE does; ``generate``, whose
generated text is then lost, says so in one line and exits 2. A second Ctrl-C, once the first has begun
a clean stop, ends the process at once with status 130 (:func:`_on_sigint`).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from personajudge import __version__
from personajudge.batch import writes_unicode
from personajudge.core.errors import PersonaJudgeError
from personajudge.core.files import (
    OutputError,
    QuietStream,
    discard_fresh_files,
    note,
    os_error_text,
    reopen_closed_stderr,
    silence_stdout,
)

from . import bench, eval, generate, info, serve
from .options import EXIT_USAGE, _Parser

#: Modules that add subcommands; each has ``register(subparsers)``.
COMMANDS = (generate, info, bench, eval, serve)


def build_parser() -> _Parser:
    parser = _Parser(prog="personajudge", description="Personalize LLM output at decoding time (Persona-judge).")
    parser.add_argument("--version", action="version", version=f"personajudge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        module.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    note(f"personajudge: warning: {message}")  # never on standard output, even with stderr closed


class ClosedStdout:
    """Stands in for a standard output that was closed before the process started (``>&-``).

    Python then sets ``sys.stdout`` to None, and ``print`` drops every line without a word; this
    makes the first write a one-line error instead. ``closed`` lets a command refuse up front,
    before a model loads (``generate``)."""

    closed = True

    def write(self, text: str) -> int:
        raise OutputError("standard output is closed; the output could not be written")

    def flush(self) -> None:
        pass


class EncodableStdout:
    """Standard output whose encoding cannot hold every character (``ascii``, ``latin-1``, ``cp1252``).

    A plain write would raise ``UnicodeEncodeError`` after the whole generation had run, and the
    result would be lost. Here text the encoding holds is written as it is; text it does not hold is
    written with backslash escapes (``\\u732b``), and the first time that happens one warning line on
    stderr says so and how to get the characters themselves. JSON never needs it: it is written with
    ``ensure_ascii`` on such a stream (:func:`~personajudge.batch.stdout_json`), which is lossless.
    Every other attribute is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.replaced = False

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except UnicodeEncodeError:
            encoding = self.stream.encoding
            if not self.replaced:
                self.replaced = True
                note(
                    f"personajudge: warning: standard output's encoding ({encoding}) cannot hold some of the "
                    "text; those characters are written as backslash escapes (set PYTHONIOENCODING=utf-8 to "
                    "get them as they are)"
                )
            return self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


#: write errors of a standard output redirected to a full or failing device (``> /dev/full``)
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}

#: the status of a command whose reader closed the pipe: a Unix tool killed by SIGPIPE shows 128 + 13
EXIT_PIPE = 128 + 13
#: Ctrl-C: a process ended by SIGINT shows 128 + 2
EXIT_INTERRUPTED = 130


class _Interrupts:
    """How many SIGINTs this process has had (see :func:`_on_sigint`)."""

    count = 0


def _on_sigint(signum: int, frame: Any) -> None:
    """The first Ctrl-C raises ``KeyboardInterrupt`` as Python's own handler does: the command stops
    cleanly (a batch says which rows are kept, the model's engine finishes its step and the model is
    freed). A second one, while that clean stop runs, ends the process at once with status 130.

    Not a second ``KeyboardInterrupt``: raised inside the wait for the engine's thread, it skipped
    freeing the model, the interpreter then shut down while that thread was still inside llama.cpp,
    and the model was torn down under it (a segmentation fault). ``os._exit`` runs no finalizer, so
    nothing is freed under a running thread; what a batch wrote is already on disk (each chunk is
    flushed and fsynced, and a resume drops a torn last line)."""
    _Interrupts.count += 1
    if _Interrupts.count == 1:
        raise KeyboardInterrupt
    try:  # no ``finally`` runs after os._exit: a batch that has written no row leaves no partial file
        discard_fresh_files()
    except Exception:  # the process ends anyway
        pass
    try:
        os.write(2, b"personajudge: interrupted\n")
    except OSError:
        pass
    os._exit(EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warning
    previous_stderr = sys.stderr
    if sys.stderr is None:  # `2>&-`
        reopen_closed_stderr()
    sys.stderr = QuietStream(sys.stderr)  # type: ignore[assignment]
    previous_stdout = sys.stdout
    if sys.stdout is None and getattr(args, "uses_stdout", True):  # `serve` logs to stderr only
        sys.stdout = ClosedStdout()
    elif sys.stdout is not None and not writes_unicode(sys.stdout):
        sys.stdout = EncodableStdout(sys.stdout)  # type: ignore[assignment]
    previous_sigint = _install_sigint()
    try:
        status = args.func(args)
        sys.stdout.flush()  # a full disk shows here, not as an "Exception ignored" at exit
        return status
    except PersonaJudgeError as err:
        print(f"personajudge: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `personajudge preferences | head -1`: the reader left. Keep the interpreter from failing
        # again when it flushes stdout at exit; a listing ends quietly, as Unix tools do there.
        silence_stdout()
        if args.command == "generate":  # the text generated so far is lost: say so
            print("personajudge: error: the output pipe was closed; generation stopped", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_PIPE
    except OSError as err:
        # `... > /dev/full`: the project's own files report this as OutputError, so an unhandled
        # write error of this kind is standard output's.
        if err.errno not in _OUTPUT_ERRNOS or err.filename is not None:
            raise
        silence_stdout()
        print(
            f"personajudge: error: could not write to standard output ({os_error_text(err)}); the output is incomplete",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("personajudge: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        warnings.showwarning = previous
        sys.stderr = previous_stderr
        if isinstance(sys.stdout, (ClosedStdout, EncodableStdout)):
            sys.stdout = previous_stdout
        if previous_sigint is not None and not _Interrupts.count:
            # after an interrupt the handler stays: a second Ctrl-C while the interpreter shuts down
            # must not raise into its teardown either
            signal.signal(signal.SIGINT, previous_sigint)


def _install_sigint() -> Any:
    """Put :func:`_on_sigint` in place of Python's own SIGINT handler; returns the one it replaced
    (None when nothing changed: not the main thread, or SIGINT ignored or handled by someone else)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    current = signal.getsignal(signal.SIGINT)
    if current is _on_sigint:  # left in place by an earlier, interrupted call in this process
        current = signal.default_int_handler
    elif current is not signal.default_int_handler:
        return None
    _Interrupts.count = 0
    signal.signal(signal.SIGINT, _on_sigint)
    return current


if __name__ == "__main__":
    sys.exit(main())
