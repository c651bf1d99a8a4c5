"""Fixes of the fourth command-line audit (hostile values, toy backend).

A: ``bench --prompt`` that is empty, blank or not valid Unicode is refused before the model loads.
B: ``bench`` with a closed standard output (``>&-``) is refused before it runs, not after.
C: a ``--view`` that names no preference (``--view=``, ``--view=,``) is refused, not run as plain sampling.
D: a seed above 2**64 - 1 (what torch.manual_seed and numpy take) is refused where it is given.
"""

from __future__ import annotations

import sys

import pytest
from cli_lines import one_line, run_main
from refuse import refuse_calls

import personajudge.cli.bench as bench_cli
from personajudge.core.config import build_config
from personajudge.core.errors import ConfigError

TOY = ["--backend", "toy"]
MAX_SEED = 2**64 - 1  # core.config.MAX_SEED, spelled out: the largest unsigned 64-bit integer
BENCH = ["bench", *TOY, "--max-new-tokens", "4", "--repeats", "1", "--no-memory", "--no-steps"]
GENERATE = ["generate", *TOY, "--max-new-tokens", "4", "-q"]


@pytest.fixture
def no_bench_run(monkeypatch):
    """The bench must be refused before it runs: running it fails the test."""

    refuse_calls(monkeypatch, bench_cli, "run_bench", "the bench ran before the bad input was refused")


# -- A: bench --prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", " ", "\t\n", "caf\udce9"], ids=["empty", "blank", "whitespace", "non-utf8"])
def test_a_bad_bench_prompt_is_refused_before_the_bench(prompt, no_bench_run, capsys):
    one_line(*run_main([*BENCH, f"--prompt={prompt}"], capsys)[::2], "--prompt")


# -- B: bench >&- -----------------------------------------------------------------------------------


def test_b_bench_with_closed_stdout_is_refused_before_it_runs(no_bench_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", None)  # what Python sets for `>&-`
    one_line(*run_main(BENCH, capsys)[::2], "standard output is closed")


# -- C: empty --view ----------------------------------------------------------------------------------


@pytest.mark.parametrize("views", [["--view="], ["--view=,"], ["--view= "], ["--view", "pirate", "--view", ", ,"]])
@pytest.mark.parametrize("command", [GENERATE, BENCH])
def test_c_a_view_of_no_preference_is_refused(command, views, capsys):
    argv = [*command, *views] + (["hi"] if command is GENERATE else [])
    one_line(*run_main(argv, capsys)[::2], "--view", "is empty")


def test_c_a_view_with_a_trailing_comma_still_runs(capsys):
    code, out, err = run_main([*GENERATE, "--view=pirate,", "--view=concise", "hi"], capsys)
    assert code == 0, err


# -- D: seeds above 2**64 - 1 -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 2**70, 10**30])
@pytest.mark.parametrize("command", [GENERATE, BENCH])
def test_d_a_seed_past_uint64_is_refused_naming_the_flag(command, seed, capsys):
    argv = [*command, f"--seed={seed}"] + (["hi"] if command is GENERATE else [])
    one_line(*run_main(argv, capsys)[::2], "--seed", str(MAX_SEED))


def test_d_the_largest_seed_runs(capsys):
    code, out, err = run_main([*GENERATE, f"--seed={MAX_SEED}", "hi"], capsys)
    assert code == 0, err
    code, out, err = run_main([*BENCH, f"--seed={MAX_SEED - 1}"], capsys)
    assert code == 0, err


def test_d_a_config_file_seed_past_uint64_is_refused(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[decoding]\nseed = {2**64}\n")
    code, _, err = run_main([*GENERATE, "--config", str(cfg), "hi"], capsys)
    one_line(code, err)
    with pytest.raises(ConfigError, match="decoding.seed"):
        build_config({"decoding": {"seed": 2**64}})


def test_d_bench_seeds_past_uint64_are_refused_before_the_bench(no_bench_run, capsys):
    one_line(*run_main([*BENCH, f"--seed={MAX_SEED}"], capsys)[::2], "--seed", "--repeats")  # run 1: seed + 1


@pytest.mark.parametrize(("seed", "samples"), [(MAX_SEED, 2), (2**64, 1)])
def test_d_eval_seeds_past_uint64_are_refused_before_the_run(tmp_path, seed, samples, capsys):
    argv = ["eval", *TOY, "--limit", "1", "--max-new-tokens", "2", "--no-progress", "--no-report", "-q"]
    argv += ["--run-dir", str(tmp_path / "run"), f"--seed={seed}", f"--samples={samples}"]
    one_line(*run_main(argv, capsys)[::2], "--seed")
    assert not (tmp_path / "run").exists()


# -- E: bench-serve refuses before any work and before its notes -------------------------------------


@pytest.fixture
def no_bench_serve_run(monkeypatch):
    """bench-serve must refuse before it runs (the direct baseline, the server): running it fails the test."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import personajudge.cli.serve as serve_cli

    refuse_calls(monkeypatch, serve_cli, "run_bench_serve", "bench-serve ran before the bad input was refused")


BENCH_SERVE = ["bench-serve", *TOY, "--requests", "20", "--concurrency", "1,16"]  # both limits raised: notes due


@pytest.mark.parametrize(
    ("flag", "says"),
    [("--nope", "unrecognized arguments: --nope"), ("--n-ctx=abc", "--n-ctx"), ("", "unrecognized arguments")],
    ids=["unknown", "bad-value", "empty"],
)
def test_e_a_server_flag_serve_would_refuse_is_refused_before_the_run(flag, says, no_bench_serve_run, capsys):
    """A --server-flag was found only when the started server refused it, after the direct baseline."""
    one_line(*run_main([*BENCH_SERVE, f"--server-flag={flag}"], capsys)[::2], "--server-flag", says)


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("--max-batch=1", "--max-batch"),
        ("--max-queue=2", "--max-queue"),
        ("--port=1", "--port"),
        ("--host=0.0.0.0", "--host"),
        ("--n-ctx=1024", "--n-ctx"),
        ("--max-b=1", "--max-batch"),  # an abbreviation argparse takes
    ],
)
def test_e_a_server_flag_bench_serve_has_itself_is_refused(flag, name, no_bench_serve_run, capsys):
    """It came after bench-serve's own flags, so the server ran with it while the direct row and the
    report's settings recorded bench-serve's value (--server-flag=--max-batch=1 reported max_batch 8)."""
    one_line(*run_main([*BENCH_SERVE, f"--server-flag={flag}"], capsys)[::2], f"{name} is a flag of bench-serve")


def test_e_a_flag_only_serve_has_passes(monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import personajudge.cli.serve as serve_cli

    seen = {}
    monkeypatch.setattr(serve_cli, "run_bench_serve", lambda cfg, **kw: seen.update(kw) or {})
    code, _, err = run_main(
        [*BENCH_SERVE, "--json", "--server-flag=--log-level=info", "--server-flag=--access-log"], capsys
    )
    assert code == 0, err
    assert seen["server_flags"][-2:] == ["--log-level=info", "--access-log"]


@pytest.mark.parametrize(
    "bad",
    [["--requests", "0"], ["--max-tokens", "0"], ["--config", "missing.toml"]],
    ids=["requests", "tokens", "config"],
)
def test_e_bench_serve_refusals_come_alone_without_the_limits_note(bad, no_bench_serve_run, capsys):
    """The "the server runs with --max-batch 16" note came before the refusal: two lines, not one."""
    one_line(*run_main([*BENCH_SERVE, *bad], capsys)[::2])
