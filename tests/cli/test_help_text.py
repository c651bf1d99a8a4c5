"""The help of ``eval`` and ``bench`` says what the commands do (seed defaults, which methods)."""

import json
import re

import pytest

from personajudge.cli import main


def flag_help(capsys, command: str, flag: str) -> str:
    """The entry of ``flag`` (flag, metavar, help) in ``personajudge COMMAND --help``, on one line."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"  {re.escape(flag)}\b", ln))
    entry = [lines[start]]
    for ln in lines[start + 1 :]:  # argparse indents an entry's continuation lines past the flags
        if not ln.startswith("   ") or ln.lstrip().startswith("-"):
            break
        entry.append(ln)
    return " ".join(" ".join(entry).split())


def test_eval_seed_help_says_0_as_eval_does(tmp_path, capsys):
    text = flag_help(capsys, "eval", "--seed")
    assert "decoding.seed, else 0" in text and "fresh" not in text
    pytest.importorskip("textstat")
    pytest.importorskip("vaderSentiment")
    pytest.importorskip("matplotlib")
    d = tmp_path / "run"
    argv = ["eval", "--backend", "toy", "--limit", "1", "--max-new-tokens", "2", "--samples", "2"]
    assert main([*argv, "--scorers", "length", "--no-progress", "--no-report", "-q", "--run-dir", str(d)]) == 0
    assert json.loads((d / "run.json").read_text())["spec"]["seeds"] == [0, 1]  # no --seed: 0, then 0 + 1


def test_generate_seed_help_still_says_fresh(capsys):
    assert "fresh" in flag_help(capsys, "generate", "--seed")


def test_bench_seed_help_matches_the_seeds_it_runs(capsys):
    text = flag_help(capsys, "bench", "--seed")
    assert "default 0" in text and "seed + r" in text
    quick = ["--no-memory", "--no-steps", "--json", "--max-new-tokens", "2"]
    assert main(["bench", "--backend", "toy", "--repeats", "2", "--methods", "plain", *quick]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["settings"]["seed"] == 0 and [x["seed"] for x in rep["results"][0]["runs"]] == [1, 2]


def test_bench_methods_help_lists_the_extra_methods_and_they_run(capsys):
    text = flag_help(capsys, "bench", "--methods")
    for m in ("plain", "persona-judge", "reference", "prompt", "mod", "pad", "each once"):
        assert m in text
    quick = ["--no-memory", "--no-steps", "--json", "--max-new-tokens", "2"]
    assert main(["bench", "--backend", "toy", "--repeats", "1", "--methods", "prompt,mod,pad", *quick]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rep["results"]] == ["prompt", "mod", "pad"]


def test_the_server_limits_help_gives_each_command_its_own_default(capsys):
    """serve's limits default to fixed numbers; bench-serve raises them to what its levels need
    (cmd_bench_serve), and said serve's numbers before."""
    from personajudge.cli.serve import SERVE_MAX_BATCH, SERVE_MAX_QUEUE

    assert f"(default {SERVE_MAX_BATCH})" in flag_help(capsys, "serve", "--max-batch")
    assert f"(default {SERVE_MAX_QUEUE})" in flag_help(capsys, "serve", "--max-queue")
    assert f"(default max({SERVE_MAX_BATCH}, the largest --concurrency))" in flag_help(
        capsys, "bench-serve", "--max-batch"
    )
    assert f"(default max({SERVE_MAX_QUEUE}, --requests))" in flag_help(capsys, "bench-serve", "--max-queue")


def test_bench_no_steps_help_names_the_ceiling_run_it_skips(capsys):
    assert "measured ceiling run" in flag_help(capsys, "bench", "--no-steps")
    assert "Why is the sky blue?" in flag_help(capsys, "bench", "--prompt")
