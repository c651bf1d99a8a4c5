"""A closed or full standard stream, and flags whose empty or NaN value used to pass, are one line and exit 2.

The stream cases run the real CLI in a subprocess: a closed descriptor (``<&-``, ``>&-``) makes Python
start with ``sys.stdin``/``sys.stdout`` set to None, and ``/dev/full`` fails every write with ENOSPC,
which only a real process with that descriptor shows (including the interpreter's flush at exit).
"""

import json
import os
import subprocess
import sys

import pytest

from personajudge.cli import main
from personajudge.core.config import build_config
from personajudge.core.errors import ConfigError

TOY = ["--backend", "toy", "-q", "--max-new-tokens", "4", "--prefer", "concise", "--prefer", "humor"]
CLI = [sys.executable, "-m", "personajudge"]
#: stdout block-buffered as for a user (any PYTHONUNBUFFERED value turns that off), so a short output fails
#: only when it is flushed at the end
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")


def run_cli(args, *, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close=None, cwd=None):
    """Run the CLI; ``close`` is ``"<&-"`` or ``">&-"`` to start it with that descriptor closed (through sh)."""
    cmd = CLI + list(args)
    if close is not None:
        cmd = ["sh", "-c", f'exec "$@" {close}', "sh", *cmd]
    return subprocess.run(
        cmd, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, env=ENV, cwd=cwd
    )


def one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("personajudge: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": p}) + "\n" for i, p in enumerate("abc")))
    return path


def test_closed_stdin_with_dash_prompt():
    one_error_line(run_cli(["generate", "-", *TOY], stdin=None, close="<&-"), "standard input is closed")


def test_closed_stdout_single_prompt():
    one_error_line(run_cli(["generate", "hi", *TOY], close=">&-"), "standard output is closed")


def test_closed_stdout_batch(prompts, tmp_path):
    """Refused up front when the results would go to stdout; a batch with --output FILE does not need it."""
    one_error_line(run_cli(["generate", "--input", str(prompts), *TOY], close=">&-"), "standard output is closed")
    out = tmp_path / "out.jsonl"
    proc = run_cli(["generate", "--input", str(prompts), "--output", str(out), *TOY], close=">&-")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["r0", "r1", "r2"]


@pytest.mark.parametrize("command", [["plugins"], ["preferences", "--json"]])
def test_closed_stdout_listing(command):
    """``print`` to a None stdout drops every line silently; it must say so instead."""
    one_error_line(run_cli(command, close=">&-"), "standard output is closed")


@needs_dev_full
@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_full_stdout_single_prompt(extra):
    with open("/dev/full", "w") as full:
        proc = run_cli(["generate", "hi", *TOY, *extra], stdout=full)
    one_error_line(proc, "could not write to standard output", os.strerror(28))


@needs_dev_full
def test_full_stdout_batch_says_results_were_not_written(prompts):
    with open("/dev/full", "w") as full:
        proc = run_cli(["generate", "--input", str(prompts), *TOY, "--batch-size", "1"], stdout=full)
    one_error_line(proc, "could not write to standard output", os.strerror(28), "after 0 of 3 results")


@needs_dev_full
@pytest.mark.parametrize("command", [["plugins"], ["plugins", "--json"], ["preferences"]])
def test_full_stdout_listing(command):
    """Long listings fail in ``print``, short ones only when the buffer is flushed: both are one line."""
    with open("/dev/full", "w") as full:
        proc = run_cli(command, stdout=full)
    one_error_line(proc, "could not write to standard output", os.strerror(28))


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--model", ""], "backend.model: must not be empty"),
        (["--model", "  "], "backend.model: must not be empty"),
        (["--temperature", "nan"], "decoding.temperature: Input should be a finite number"),
        (["--top-p", "nan"], "decoding.top_p: Input should be a finite number"),
        (["--temperature", "inf"], "decoding.temperature: Input should be a finite number"),
    ],
)
def test_empty_and_nan_flag_values_are_refused(flags, needle, capsys):
    code = main(["generate", "hello", *TOY, *flags])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert needle in err and err.count("\n") == 1, err


def test_empty_model_is_refused_in_config_files_and_the_api():
    """The check is the config's, not the CLI's: a TOML file or a dict gets it too."""
    with pytest.raises(ConfigError, match="backend.model: must not be empty"):
        build_config({"backend": {"name": "toy", "model": ""}})
    assert build_config({"backend": {"name": "toy"}}).backend.model is None
