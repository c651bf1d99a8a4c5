"""`personajudge generate ... | head -c 5`: one line and exit 2 when the reader leaves, no traceback."""

import subprocess
import sys


def test_a_closed_pipe_is_one_line_and_exit_2():
    cmd = [
        sys.executable,
        "-m",
        "personajudge",
        "generate",
        "hello there",
        "--backend",
        "toy",
        "--encoder",
        "plain",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--max-new-tokens",
        "3000",
        "--seed",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(5)  # the reader takes a little, then leaves
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 2
    assert len(first) == 5
    assert err.strip().splitlines() == ["personajudge: error: the output pipe was closed; generation stopped"], err
