"""A Python subprocess bounded in time: a hang is a test failure, not a stuck test run."""

import os
import signal
import subprocess
import sys

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
