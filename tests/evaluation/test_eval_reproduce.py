"""The report's "reproduce" command reproduces the run, whatever flags (or config file) made it.

Each case runs ``personajudge eval`` (toy backend, 1 prompt, 4 tokens), takes the command from the
report's ``reproduce`` row, runs it in the same run directory and checks that it is accepted as the
same run (no "different configuration" error, no --force needed) with nothing generated or scored
again.
"""

import json
import shlex
from pathlib import Path

import pytest

from personajudge.cli import main
from personajudge.evaluation import EvalSpec, pair_experiment
from personajudge.evaluation.spec import command_from_spec

pytestmark = pytest.mark.filterwarnings("ignore:views 1 and 2 carry the same preferences")

BASE = ["--backend", "toy", "--limit", "1", "--max-new-tokens", "4", "--scorers", "length", "--no-progress", "-q"]
SEED_CONFIG = '[backend]\nname = "toy"\n[decoding]\nseed = 7\nmax_new_tokens = 4\n'
#: decoding.repeat_lines has no flag: only `--resume` can repeat such a run
NO_FLAG_CONFIG = '[backend]\nname = "toy"\n[decoding]\nrepeat_lines = 2\nmax_new_tokens = 4\n'

CASES = {
    "prefer": ["--prefer", "concise"],
    "prefer-twice": ["--prefer", "concise", "--prefer", "friendly"],
    "view": ["--view", "concise,friendly"],
    "views": ["--view", "concise,friendly", "--view", "informative"],
    "pair-and-objectives-overlap": ["--pair", "concise,friendly", "--objectives", "concise,friendly"],
    "two-objectives-lists": ["--objectives", "concise,informative", "--objectives", "concise,friendly"],
    "objectives-list-and-its-prefix": ["--objectives", "concise,informative,friendly", "--objectives", "concise"],
    "every-kind": [
        "--pair",
        "friendly,unfriendly",
        "--prefer",
        "concise",
        "--view",
        "informative,friendly",
        "--objectives",
        "vivid,creative",
    ],
    "slug-collision": ["--pair", "请 用 简单 的话,concise", "--pair", "请 用 正式 的 语气,concise"],
    "options": [
        "--pair",
        "concise+friendly,informative",
        "--backend-option",
        "seed=1",
        "--system",
        "be kind",
        "--stop",
        "xyz",
        "--lambdas",
        "2,3",
        "--methods",
        "prompt,persona-judge-base",
        "--baseline",
        "persona-judge-base",
        "--samples",
        "2",
        "--seed",
        "4",
        "--scorers",
        "len=length",
        "--dimension",
        "concise=len:lower",
    ],
    "config-seed": ["--config", "{SEED_CONFIG}"],
    "config-seed-samples": ["--config", "{SEED_CONFIG}", "--samples", "2"],
    "config-seed-and-seed-flag": ["--config", "{SEED_CONFIG}", "--seed", "3"],
    "config-without-flags": ["--config", "{NO_FLAG_CONFIG}"],
}


def reproduce_line(run_dir: Path) -> list[str]:
    """The argv of the command in report.md's ``reproduce`` row (what a user copies)."""
    rows = [ln for ln in (run_dir / "report.md").read_text().splitlines() if ln.startswith("| reproduce |")]
    assert len(rows) == 1
    cell = rows[0].removeprefix("| reproduce |").removesuffix("|").strip()
    assert cell.startswith("`") and cell.endswith("`")
    return shlex.split(cell[1:-1])


@pytest.mark.parametrize("case", list(CASES))
def test_the_reproduce_command_is_the_same_run(case, tmp_path, capsys):
    configs = {"{SEED_CONFIG}": SEED_CONFIG, "{NO_FLAG_CONFIG}": NO_FLAG_CONFIG}
    flags = []
    for f in CASES[case]:
        if f in configs:
            (tmp_path / "cfg.toml").write_text(configs[f])
            f = str(tmp_path / "cfg.toml")
        flags.append(f)
    d = tmp_path / "run"
    assert main(["eval", *BASE, *flags, "--run-dir", str(d)]) == 0, capsys.readouterr().err
    first = json.loads((d / "run.json").read_text())
    cmd = reproduce_line(d)
    assert cmd[:2] == ["personajudge", "eval"] and cmd == first["command"]
    assert ("--resume" in cmd) == (case == "config-without-flags")  # flags wherever flags can say it
    capsys.readouterr()
    assert main([*cmd[1:], "--no-progress", "-q"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"0 generated, {first['planned_generations']} reused, 0 failed, 0 scores" in err
    again = json.loads((d / "run.json").read_text())
    assert again["spec"] == first["spec"] and not again["previous"]


def test_an_api_spec_that_no_flags_give_is_reproduced_by_resume(tmp_path):
    """An experiment list the command line never builds (an objectives step before a pair)."""
    from personajudge.evaluation import objective_experiments

    spec = EvalSpec(
        methods=["prompt"],
        experiments=[*objective_experiments("concise,friendly"), pair_experiment("friendly,unfriendly")],
    )
    assert command_from_spec(spec, "r") == ["personajudge", "eval", "--resume", "--run-dir", "r"]
    spec = EvalSpec(methods=["prompt"], experiments=[pair_experiment("concise,friendly")], seeds=[3, 9])
    assert command_from_spec(spec, "r")[2] == "--resume"  # seeds --samples cannot give
    spec = EvalSpec(methods=["prompt"], experiments=[pair_experiment("concise,friendly")])
    assert command_from_spec(spec, "r") == [
        "personajudge",
        "eval",
        "--methods",
        "prompt",
        "--pair",
        "concise,friendly",
        "--scorers",
        "none",
        "--seed",
        "0",
        "--run-dir",
        "r",
    ]
