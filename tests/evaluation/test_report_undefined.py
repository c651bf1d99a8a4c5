"""Undefined (NaN) scores and the n beside a mean; messages and docs of the harness.

Toy responses are cut to nothing by stop strings, so Flesch (undefined for an empty text) is NaN for
most of them while length (0 words) is always defined: the two columns of one row have different n.
"""

import importlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import personajudge.evaluation
from personajudge.cli import main
from personajudge.evaluation.report import _with_ci
from personajudge.evaluation.store import read_rows

pytest.importorskip("textstat")

STOPS = [x for s in (".", "h", "a", "x", "?", "s", "n", "t") for x in ("--stop", s)]


def strict_json(line: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval") / "run"
    argv = ["eval", "--backend", "toy", "--limit", "5", "--max-new-tokens", "8", "--scorers", "flesch,length"]
    assert main([*argv, *STOPS, "--no-progress", "-q", "--run-dir", str(d)]) == 0
    return d


def mean_scores_rows(md: str) -> list[list[str]]:
    part = md[md.index("## Mean scores") : md.index("## Cost")]
    rows = [ln for ln in part.splitlines() if ln.startswith("| `")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows]


def test_scores_file_is_standard_json_with_null_for_undefined(nan_run):
    lines = (nan_run / "scores.jsonl").read_text().splitlines()
    rows = [strict_json(ln) for ln in lines]  # no bare NaN token
    flesch = [r["value"] for r in rows if r["scorer"] == "flesch"]
    assert 0 < flesch.count(None) < len(flesch)  # the setup: some undefined, some not


def test_the_n_beside_a_mean_is_its_own_and_undefined_scores_are_counted(nan_run):
    rep = json.loads((nan_run / "report.json").read_text())
    md = (nan_run / "report.md").read_text()
    rows = mean_scores_rows(md)
    header = [ln for ln in md[md.index("## Mean scores") :].splitlines() if ln.startswith("| experiment")][0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["experiment", "method", "n", "`flesch`", "`length`"]
    scores, _ = read_rows(nan_run / "scores.jsonl")
    value = {(r["gen"], r["scorer"]): r["value"] for r in scores}
    gens, _ = read_rows(nan_run / "generations.jsonl")
    assert len(rows) == len(rep["methods"]) == 4
    for row, m in zip(rows, rep["methods"]):
        keys = [g["key"] for g in gens if g["experiment"] == m["experiment"] and g["variant"] == m["method"]]
        defined = [k for k in keys if value[(k, "flesch")] is not None]
        fl = m["scores"]["flesch"]
        # one seed: the prompts with a defined score are the responses with one
        assert fl["n"] == len(defined) and fl["scored"] == len(keys) and fl["undefined"] == len(keys) - len(defined)
        assert row[2] == str(m["n_prompts"]) == str(len(keys))
        if fl["n"] and fl["n"] != m["n_prompts"]:
            assert row[3].endswith(f"[n = {fl['n']}]")
        else:
            assert "[n =" not in row[3]
        assert "[n =" not in row[4]  # length is defined for every response
    undefined = sum(v is None for (g, s), v in value.items() if s == "flesch")
    total = sum(1 for (g, s) in value if s == "flesch")
    assert f"`flesch`: {undefined} of {total} scored responses have no defined score" in md


def test_older_scores_files_with_nan_tokens_read_the_same(nan_run, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(nan_run, d)
    path = d / "scores.jsonl"
    old = "".join(
        json.dumps({**r, "value": math.nan if r["value"] is None else r["value"]}) + "\n"
        for r in (json.loads(ln) for ln in path.read_text().splitlines())
    )
    assert "NaN" in old
    path.write_text(old)
    before = json.loads((nan_run / "report.json").read_text())
    assert main(["report", str(d), "-q", "--no-plots"]) == 0
    after = json.loads((d / "report.json").read_text())
    assert after["methods"] == before["methods"] and after["win_rates"] == before["win_rates"]


def test_intervals_with_a_minus_sign_are_readable():
    assert _with_ci({"mean": -3.4, "ci": (-3.4, -1.25)}) == "-3.40 (-3.40 to -1.25)"
    assert _with_ci({"mean": 3.02, "ci": (-2.62, 8.79)}) == "3.02 (-2.62 to 8.79)"
    assert _with_ci({"mean": 0.2, "ci": (0.0, 0.6)}) == "0.20 (0.00–0.60)"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--methods", "prompt,prompt"], "invalid evaluation: methods: method 'prompt' is listed twice"),
        (["--scorers", "length,length"], "invalid evaluation: scorers: the scorer alias 'length' is used twice"),
        (["--lambdas", "0,2"], "invalid evaluation: lambdas: give distinct positive window lengths"),
    ],
)
def test_spec_errors_name_the_field_without_a_value_prefix(flags, message, tmp_path, capsys):
    assert main(["eval", "--backend", "toy", *flags, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"personajudge: error: {message}\n"


def test_module_references_in_the_package_docstring_exist():
    refs = re.findall(r":mod:`([^`]+)`", personajudge.evaluation.__doc__)
    assert refs
    for ref in refs:
        importlib.import_module(ref, package="personajudge.evaluation")


def test_the_example_docstring_names_every_scorer_it_runs(tmp_path):
    root = Path(__file__).resolve().parents[2]
    example = root / "examples" / "evaluate_small.py"
    code = (
        "import runpy, sys, personajudge.evaluation as ev\n"
        "seen = []\n"
        "ev.run_eval = lambda spec, *a, **k: (seen.append(spec), sys.exit(0))\n"
        "sys.argv = ['x', '--backend', 'toy']\n"
        "try:\n"
        f"    runpy.run_path({str(example)!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    print(' '.join(s.name for s in seen[0].scorers))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scorers = proc.stdout.split()
    assert scorers  # the example ran up to its run_eval call
    text = example.read_text()
    docstring = text[text.index('"""') + 3 : text.index('"""', text.index('"""') + 3)].lower()
    for name in scorers:
        assert name in docstring, name
