"""Path arguments that cannot name what their flag wants, an input file given as the output, and a
closed, full or broken standard error (audit of the command line, findings A, D, E, F and I)."""

import errno
import io
import json
import os
import subprocess
import sys

import pytest
from cli_lines import one_line, run_main

from personajudge.batch import JsonlBatch, read_records
from personajudge.cli import main
from personajudge.cli.options import dir_path_arg, file_path_arg
from personajudge.core.config import build_config, load_config_file
from personajudge.core.errors import ConfigError
from personajudge.core.files import OutputError, path_problem

TOY = ["--backend", "toy", "--max-new-tokens", "4", "--seed", "1"]
PREFS = ["--prefer", "concise", "--prefer", "humor"]
CLI = [sys.executable, "-m", "personajudge"]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    return path


# -- A, F: empty and folder-looking paths ------------------------------------------------------------


FOLDERISH = ["", "  ", ".", "./", "/", "..", "sub/", "sub/.."]


@pytest.mark.parametrize("value", FOLDERISH)
def test_output_that_can_only_be_a_folder_is_one_line_naming_the_flag(value, prompts, tmp_path, monkeypatch, capsys):
    """Was a ValueError traceback (``Path('.').with_name``) for '', '.', '/', and a file named ``sub`` for ``sub/``."""
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(tmp_path))
    code, out, err = run_main(["generate", "--input", str(prompts), "--output", value, *TOY, *PREFS], capsys)
    one_line(code, err, "--output")
    assert out == "" and sorted(os.listdir(tmp_path)) == before  # nothing written into the current folder


@pytest.mark.parametrize("flag", ["--input", "--config", "--preferences-file"])
@pytest.mark.parametrize("value", ["", ".", "/", "sub/"])
def test_every_file_flag_refuses_empty_and_folder_paths(flag, value, tmp_path, monkeypatch, capsys):
    """``--preferences-file ''`` ran with no preference at all; ``--input ''`` said "cannot read input file .";
    each is now refused the same way, by the one shared check, naming its flag."""
    monkeypatch.chdir(tmp_path)
    argv = ["generate", *TOY] + ([] if flag == "--input" else ["hi"]) + [flag, value]
    code, out, err = run_main(argv, capsys)
    one_line(code, err, flag)
    assert out == ""


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["eval", "--backend", "toy", "--limit", "1", "--dataset", ""], "--dataset"),
        (["eval", "--backend", "toy", "--limit", "1", "--dataset", "sub/"], "--dataset"),
        (["eval", "--backend", "toy", "--limit", "1", "--run-dir", ""], "--run-dir"),
        (["report", ""], "RUN_DIR"),
    ],
)
def test_eval_path_flags_refuse_empty_paths(argv, flag, tmp_path, monkeypatch, capsys):
    """``eval --dataset ''`` silently ran the default 50 prompts and ``--run-dir ''`` wrote the run into the
    current folder; the same shared check refuses them, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv, capsys)
    one_line(code, err, flag)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_the_shared_check_keeps_real_paths_and_dash():
    for ok in ["-", "out.jsonl", "./out.jsonl", "/tmp/x/out.jsonl", "a b.jsonl", ".hidden"]:
        assert path_problem(ok) is None and file_path_arg(ok) == ok
    assert dir_path_arg("runs/x/") == "runs/x/" and dir_path_arg(".") == "."  # a folder flag may end with a slash
    assert path_problem("", "dir") == "the path is empty"


def test_the_api_refuses_them_too(prompts):
    recs = read_records(prompts)
    for value in ["", ".", "/", "sub/"]:
        with pytest.raises(OutputError, match="output file: "):
            JsonlBatch(recs, build_config({"backend": {"name": "toy"}}), output=value)
    with pytest.raises(ConfigError, match="input file: the path is empty"):
        read_records("")
    with pytest.raises(ConfigError, match="config file: '.' names a folder"):
        load_config_file(".")


# -- D: the input file is never the output ---------------------------------------------------------


def test_overwrite_never_replaces_the_input_with_the_results(prompts, capsys):
    text = prompts.read_text()
    code, _, err = run_main(["generate", "--input", str(prompts), "--output", str(prompts), *TOY, *PREFS], capsys)
    one_line(code, err, "is the output file")
    code, _, err = run_main(
        ["generate", "--input", str(prompts), "--output", str(prompts), "--overwrite", *TOY, *PREFS], capsys
    )
    one_line(code, err, "is the output file")
    assert prompts.read_text() == text


def test_the_same_file_by_another_name_is_caught(prompts, tmp_path, monkeypatch, capsys):
    text = prompts.read_text()
    os.link(prompts, tmp_path / "hard.jsonl")
    os.symlink(prompts, tmp_path / "link.jsonl")
    monkeypatch.chdir(tmp_path)
    for inp, out in [("./p.jsonl", "p.jsonl"), ("hard.jsonl", "p.jsonl"), ("link.jsonl", str(prompts))]:
        code, _, err = run_main(["generate", "--input", inp, "--output", out, "--overwrite", *TOY, *PREFS], capsys)
        one_line(code, err, "is the output file")
    assert prompts.read_text() == text


def test_force_never_deletes_an_input_named_like_the_partial_file(tmp_path, capsys):
    """``--input q.jsonl.partial --output q.jsonl --force`` rewrote the input as a partial file and then
    deleted it."""
    inp = tmp_path / "q.jsonl.partial"
    inp.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    text = inp.read_text()
    for extra in [[], ["--force"]]:
        argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "q.jsonl"), *extra, *TOY, *PREFS]
        code, _, err = run_main(argv, capsys)
        one_line(code, err, "partial results file")
    assert inp.read_text() == text and not (tmp_path / "q.jsonl").exists()


# -- E: standard error closed, full or broken --------------------------------------------------------


def run_cli(args, stderr_redirect):
    """The CLI through sh, with fd 2 redirected as a shell user would (``2>&-``, ``2>/dev/full``)."""
    cmd = ["sh", "-c", f'exec "$@" {stderr_redirect}', "sh", *CLI, *args]
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=ENV)


STDERR_BROKEN = ["2>&-", pytest.param("2>/dev/full", marks=needs_dev_full)]
#: ``base`` with preferences warns ("method 'base' ignores preferences"): a line for stderr in every mode
WARNS = ["--method", "base", *PREFS]


@pytest.mark.parametrize("redirect", STDERR_BROKEN)
def test_a_batch_finishes_when_stderr_is_closed_or_full(redirect, prompts, tmp_path):
    """Was exit 1 with no output: the bar's write (tqdm on a None or full stderr), or the warning's."""
    out = tmp_path / "o.jsonl"
    proc = run_cli(["generate", "--input", str(prompts), "--output", str(out), *TOY, *WARNS], redirect)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "b"] and not (tmp_path / "o.jsonl.partial").exists()


@pytest.mark.parametrize("redirect", STDERR_BROKEN)
@pytest.mark.parametrize("mode", [["--json"], []])
def test_a_single_prompt_keeps_its_stdout_clean_when_stderr_is_closed_or_full(redirect, mode):
    """With stderr closed, ``print(..., file=sys.stderr)`` printed the warning into the ``--json`` output."""
    proc = run_cli(["generate", "hi", *TOY, *WARNS, *mode], redirect)
    assert proc.returncode == 0, proc.stdout
    assert "warning" not in proc.stdout and "personajudge:" not in proc.stdout
    if mode:
        assert json.loads(proc.stdout)["stats"]["method"] == "base"  # the one object, nothing else
    else:
        assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1


@needs_dev_full
def test_errors_still_exit_2_when_stderr_is_full(tmp_path):
    proc = run_cli(["generate", "--input", str(tmp_path / "missing.jsonl"), *TOY], "2>/dev/full")
    assert proc.returncode == 2 and proc.stdout == ""


class _BrokenTerminal(io.StringIO):
    """A terminal whose every write fails. ENOSPC (a terminal logged to a full disk): tqdm itself absorbs
    only EIO, and the CLI took any other error for standard output's."""

    def isatty(self):
        return True

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_progress_bar_that_cannot_be_drawn_loses_no_row(prompts, tmp_path, monkeypatch):
    out = tmp_path / "o.jsonl"
    monkeypatch.setattr(sys, "stderr", _BrokenTerminal())
    assert main(["generate", "--input", str(prompts), "--output", str(out), *TOY, *PREFS]) == 0
    assert len(out.read_text().splitlines()) == 2


# -- I: the bar only on a terminal; -q says what it hides ---------------------------------------------


def test_quiet_help_says_what_it_hides(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    quiet = text.split("-q, --quiet")[1].split(" --")[0]
    assert "stats line" in quiet and "progress bar" in quiet and "resuming" in quiet
