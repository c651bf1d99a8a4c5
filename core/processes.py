"""Child processes the benches start (memory probes, ``bench-serve``'s server): none outlives its bench.

A bench stopped by a signal sent to it alone (``kill PID``, a CI job that stops the main process,
``Popen.terminate()``) must not leave its child holding the model and a port. The bench stops the
child on every exit path it sees (:func:`stop_process` in ``finally`` blocks); for the paths it
cannot see (SIGKILL, a second Ctrl-C that ends it at once) the kernel sends the child SIGTERM when
the bench dies (:func:`dies_with_parent`, Linux). A ``kill PID`` of the bench itself is turned into
an exit that runs those blocks (:func:`terminate_as_exit`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator
from threading import Thread, current_thread, main_thread
from typing import IO, Any

#: ``prctl`` option: the signal a process gets when its parent (the thread that started it) dies
PR_SET_PDEATHSIG = 1


def dies_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to send the child SIGTERM when this process dies; None elsewhere.

    ``prctl`` is looked up here, in the parent: the child only calls it (no library loading between fork
    and exec). The signal follows the *thread* that started the child, so start it from a thread that
    lives as long as the child should (the benches start theirs from the main thread). A parent that died
    before the call is caught by comparing ``getppid``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # gone already: nobody will send it
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` (the status a process killed by it shows) instead of ending
    the process on the spot, so ``finally`` blocks run: ``bench-serve`` stops the server it started,
    a Ray run shuts down its replicas and says how many rows its partial file keeps. Installed over
    whatever handler was there (Ray's driver sets one that exits with 15) and put back after. Only in
    the main thread, where Python runs signal handlers."""
    if current_thread() is not main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while stopping ends it at once
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def whole_lines() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during the block is held until it ends, then handed to the handler that was in
    place (Python's, or the CLI's): a write of whole lines to a pipe that blocks (its reader is slow)
    would otherwise stop part-way and leave a half line that no JSONL reader takes. A second Ctrl-C
    goes to that handler at once (a reader that never reads must not hold the process). Only in the
    main thread, where Python runs signal handlers, and only over a Python handler (not one ignored)."""
    previous = signal.getsignal(signal.SIGINT) if current_thread() is main_thread() else None
    if not callable(previous):
        yield
        return
    held: list[tuple[int, Any]] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            previous(signum, frame)
        held.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        previous(*held[0])


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """SIGTERM ``proc`` and wait up to ``timeout`` seconds for it (then SIGKILL); its exit status.

    An interrupt while waiting (a second Ctrl-C) kills it at once and goes on: no child is left behind
    by a caller that stops waiting."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
    except BaseException:
        proc.kill()
        raise


class StderrTail:
    """The last lines a child wrote to its standard error, read by a thread so the pipe never fills
    (a server logs for as long as it runs): what a child that failed said, for the error message."""

    def __init__(self, stream: IO[bytes], lines: int = 20, *, watch: re.Pattern[str] | None = None) -> None:
        self._lines: deque[str] = deque(maxlen=lines)
        self._watch = watch
        #: the first match of ``watch`` in a line, once one came (a server's line naming the port it bound)
        self.matched: re.Match[str] | None = None
        self._thread = Thread(target=self._read, args=(stream,), name="personajudge-child-stderr", daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    self._lines.append(line)
                    if self._watch is not None and self.matched is None:
                        self.matched = self._watch.search(line)

    def last(self, wait: float = 5.0) -> str | None:
        """The last non-empty line, once the child has closed its end (at most ``wait`` seconds)."""
        self._thread.join(wait)
        return self._lines[-1] if self._lines else None
