"""Rerunning a finished eval keeps the model in run.json and the report header.

A rerun that reuses every row loads no model, so the record of the model that produced the rows has
to come from the previous run.json; a run switched to another model must describe the new one.
"""

import json
from pathlib import Path

import pytest

from personajudge.cli import main

pytest.importorskip("textstat")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

ARGV = ["eval", "--backend", "toy", "--limit", "1", "--max-new-tokens", "4", "--seed", "0", "--no-progress", "-q"]


def model_of(run_dir: Path) -> tuple[dict | None, dict | None, str]:
    """run.json's model, report.json's model, and the report.md header's model row."""
    run = json.loads((run_dir / "run.json").read_text())
    rep = json.loads((run_dir / "report.json").read_text())
    rows = [ln for ln in (run_dir / "report.md").read_text().splitlines() if ln.startswith("| model |")]
    assert len(rows) == 1
    return run.get("model"), rep.get("model"), rows[0]


def test_rerun_and_resume_keep_the_model(tmp_path, capsys):
    d = tmp_path / "run"
    argv = [*ARGV, "--run-dir", str(d)]
    assert main(argv) == 0
    first = model_of(d)
    # what the toy backend says about itself (backend.options.seed 0 is its default bigram table)
    assert first[0] == {"backend": "toy", "model": "toy(seed=0)", "device": "cpu"} == first[1]
    assert first[2] == "| model | toy(seed=0) (backend toy, cpu) |"
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 generated, 4 reused" in capsys.readouterr().err  # nothing generated: no model was loaded
    assert model_of(d) == first
    assert main(["eval", "--resume", "--run-dir", str(d), "--no-progress", "-q"]) == 0
    assert model_of(d) == first
    # --force to settings that keep every generation (scorers): still the same model, still described
    assert main([*argv, "--scorers", "length", "--force"]) == 0
    assert "0 generated" in capsys.readouterr().err
    assert model_of(d) == first


def test_a_changed_model_is_still_a_change_and_is_described_anew(tmp_path, capsys):
    d = tmp_path / "run"
    argv = [*ARGV, "--run-dir", str(d)]
    assert main(argv) == 0
    capsys.readouterr()
    other = [*argv, "--backend-option", "seed=1"]  # another toy model (another bigram table)
    assert main(other) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.backend.options" in err
    assert model_of(d)[0]["model"] == "toy(seed=0)"  # refused: nothing changed
    assert main([*other, "--force"]) == 0
    run_model, rep_model, header = model_of(d)
    assert run_model == {"backend": "toy", "model": "toy(seed=1)", "device": "cpu"} == rep_model
    assert header == "| model | toy(seed=1) (backend toy, cpu) |"
    # and back: the first model's rows are all still valid, so nothing loads a model; the record of
    # the first model comes from the replaced configuration it was stored with
    capsys.readouterr()
    assert main([*argv, "--force"]) == 0
    assert "0 generated, 4 reused" in capsys.readouterr().err
    run_model, rep_model, header = model_of(d)
    assert run_model == {"backend": "toy", "model": "toy(seed=0)", "device": "cpu"} == rep_model
    assert header == "| model | toy(seed=0) (backend toy, cpu) |"
