"""`personajudge serve` refuses what it cannot serve before it says "serving": one line, exit 2.

Flags with a bad value, a port that is taken, and default preferences, method or encoder that
`generate` would refuse (the server used to start and answer every request with a 400 blaming
the client). Each case runs the CLI as a subprocess with a timeout: without the check it would serve.
"""

import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

CLI = [sys.executable, "-m", "personajudge"]
TOY = ["--backend", "toy"]
PREFS = ["--prefer", "concise", "--prefer", "humor"]


def run_cli(args):
    """The CLI as a subprocess; a server that starts anyway is killed at the timeout (the test fails)."""
    return subprocess.run(CLI + list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--port=70000"], "--port must be at most 65535, got 70000"),
        (["--port=-1"], "--port must be at least 0, got -1"),
        (["--request-timeout", "nan"], "--request-timeout must be a positive number of seconds, got nan"),
        (["--request-timeout", "inf"], "--request-timeout must be a positive number of seconds, got inf"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number of seconds, got 0.0"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout must be a non-negative number of seconds, got nan"),
        (["--shutdown-timeout", "-1"], "--shutdown-timeout must be a non-negative number of seconds, got -1.0"),
    ],
)
def test_bad_server_flags(flags, needle):
    proc = run_cli(["serve", *TOY, "--host", "127.0.0.1", "--port", "0", *flags])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"personajudge: error: {needle}\n"


def test_port_in_use_is_one_line_before_serving():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run_cli(["serve", *TOY, *PREFS, "--host", "127.0.0.1", "--port", str(port)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "serving" not in proc.stderr, proc.stderr
    assert f"cannot serve on 127.0.0.1:{port}: Address already in use" in proc.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--prefer", "concize", "--prefer", "humor"],
        [*PREFS, "--method", "nope"],
        [*PREFS, "--encoder", "nope"],
    ],
    ids=["preference", "method", "encoder"],
)
def test_invalid_defaults_stop_the_server_with_generates_message(flags):
    served = run_cli(["serve", *TOY, *flags, "--host", "127.0.0.1", "--port", "0"])
    generated = run_cli(["generate", "hi", *TOY, "-q", "--max-new-tokens", "4", *flags])
    assert generated.returncode == 2 and generated.stderr.startswith("personajudge: error: "), generated.stderr
    assert served.returncode == 2, served.stderr
    assert served.stderr == generated.stderr
