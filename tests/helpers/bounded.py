"""A Python subprocess bounded in time: a hang is a test failure, not a stuck test run."""

import os
import signal
import subprocess
import sys
import time

import pytest


def run_bounded(args, timeout=90, env=None):
    """``python *args`` in its own session, killed with everything it started if it outlives ``timeout``;
    returns (exit status, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"still running after {timeout}s: {args}")
    return proc.returncode, out, err


def sigint_as_at_a_terminal() -> None:
    """``preexec_fn`` of a child a test interrupts with SIGINT: SIGINT at its default, as a command started
    at a terminal has it. A test run started in the background by a non-interactive shell (a CI runner,
    ``nohup ... &``) ignores SIGINT; its children inherit that, Python then installs no KeyboardInterrupt
    handler, and the CLI rightly leaves an ignored SIGINT ignored: the Ctrl-C would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def until(cond, timeout=20.0, what="the condition"):
    """Poll ``cond()`` every 20 ms until it is true; an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what} did not happen within {timeout}s")
