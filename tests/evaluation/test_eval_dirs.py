"""Run directories that cannot be written, `report --no-plots`, and run.json files that are not records.

Unwritable places are made without root tricks (the tests may run as root, where permissions do not
stop writes): a path under a regular file, and a directory standing where a file must be written,
fail at the same calls as a read-only file system does.
"""

import json
import shutil
from pathlib import Path

import pytest

from personajudge.cli import main
from personajudge.evaluation import EvalSpec, pair_experiment, run_eval, write_report
from personajudge.evaluation.errors import EvalError

pytest.importorskip("matplotlib")

BASE = ["--backend", "toy", "--limit", "2", "--max-new-tokens", "8", "--scorers", "length", "--no-progress", "-q"]


def spec() -> EvalSpec:
    """The spec of ``eval BASE`` (the default pairs and methods)."""
    return EvalSpec(
        limit=2,
        methods=["prompt", "persona-judge"],
        experiments=[pair_experiment("concise,informative"), pair_experiment("friendly,unfriendly")],
        scorers=[{"name": "length"}],
        run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 8}},
    )


def one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("personajudge: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval") / "run"
    assert main(["eval", *BASE, "--run-dir", str(d)]) == 0
    assert (d / "winrate.png").is_file() and (d / "scores.png").is_file()
    return d


def copy_of(finished: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


# -- E: places that cannot be written --------------------------------------------------------------


def test_run_dir_naming_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine\n")
    assert main(["eval", *BASE, "--run-dir", str(f)]) == 2
    one_error_line(capsys, str(f), "is a file")
    with pytest.raises(EvalError, match="is a file"):
        run_eval(spec(), f, progress=False)
    assert f.read_text() == "mine\n"


def test_run_dir_that_cannot_be_created(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine\n")
    d = f / "run"  # its parent is a file: mkdir fails (ENOTDIR), as it would on a read-only file system
    assert main(["eval", *BASE, "--run-dir", str(d)]) == 2
    one_error_line(capsys, "cannot create the run directory", str(d))
    with pytest.raises(EvalError, match="cannot create the run directory"):
        run_eval(spec(), d, progress=False)


def test_run_dir_whose_lock_cannot_be_written(finished, tmp_path, capsys):
    d = copy_of(finished, tmp_path)
    (d / ".lock").unlink()
    (d / ".lock").mkdir()  # open(".lock", "a") fails, as in a read-only directory
    assert main(["eval", *BASE, "--run-dir", str(d)]) == 2
    one_error_line(capsys, "cannot write to the run directory", str(d))
    with pytest.raises(EvalError, match="cannot write to the run directory"):
        run_eval(spec(), d, progress=False)


@pytest.mark.parametrize("blocked", ["winrate.png", "report.md"])
def test_report_files_that_cannot_be_written(blocked, finished, tmp_path, capsys):
    d = copy_of(finished, tmp_path)
    (d / blocked).unlink()
    (d / blocked).mkdir()
    assert main(["report", str(d), "-q"]) == 2
    one_error_line(capsys, str(d / blocked))
    with pytest.raises(EvalError, match=blocked):
        write_report(d)
    with pytest.raises(EvalError, match=blocked):  # the report at the end of a run
        run_eval(spec(), d, progress=False)


# -- F: --no-plots leaves the plots alone ----------------------------------------------------------


def test_no_plots_keeps_the_plots_of_an_earlier_report(finished, tmp_path, capsys):
    d = copy_of(finished, tmp_path)
    pngs = {p.name: p.read_bytes() for p in d.glob("*.png")}
    assert set(pngs) == {"winrate.png", "scores.png"}
    assert main(["report", str(d), "-q", "--no-plots"]) == 0
    assert {p.name: p.read_bytes() for p in d.glob("*.png")} == pngs  # untouched
    rep = json.loads((d / "report.json").read_text())
    assert rep["plots"] == {}  # drawn by this report: none
    assert rep["plots_kept"] == {"win rates": "winrate.png", "score distributions": "scores.png"}
    md = (d / "report.md").read_text()
    assert "![" not in md and "`winrate.png`" in md and "--no-plots" in md  # named as older, not shown
    # twice in a row: still kept, still known to be ours
    assert main(["report", str(d), "-q", "--no-plots"]) == 0
    assert json.loads((d / "report.json").read_text())["plots_kept"] == rep["plots_kept"]
    assert main(["report", str(d), "-q"]) == 0
    rep = json.loads((d / "report.json").read_text())
    assert rep["plots"] == {"win rates": "winrate.png", "score distributions": "scores.png"}
    assert "plots_kept" not in rep and "![win rates](winrate.png)" in (d / "report.md").read_text()


def test_a_kept_plot_that_no_longer_applies_is_removed_by_the_next_full_report(finished, tmp_path):
    d = copy_of(finished, tmp_path)
    # an earlier report of this run drew a lambda sweep (say the run had --lambdas then)
    (d / "lambda_sweep.png").write_bytes(b"old plot")
    (d / "mine.png").write_bytes(b"the user's")
    rep = json.loads((d / "report.json").read_text())
    rep["plots"]["lambda sweep"] = "lambda_sweep.png"
    (d / "report.json").write_text(json.dumps(rep))
    write_report(d, plots=False)
    assert (d / "lambda_sweep.png").read_bytes() == b"old plot"
    assert json.loads((d / "report.json").read_text())["plots_kept"]["lambda sweep"] == "lambda_sweep.png"
    write_report(d)
    assert not (d / "lambda_sweep.png").exists()  # ours, and it no longer applies
    assert (d / "mine.png").read_bytes() == b"the user's"  # never listed by a report: not ours


# -- H: a run.json that is not a run record --------------------------------------------------------


@pytest.mark.parametrize("content", ["[1]", '"text"', "not json", '{"previous": 3, "created": 5, "spec": 1}'])
def test_force_replaces_a_run_file_that_is_not_a_record(content, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "run.json").write_text(content)
    argv = ["eval", *BASE, "--run-dir", str(d)]
    if not content.startswith("{"):
        assert main(argv) == 2
        one_error_line(capsys, "run.json", "--force")
        assert (d / "run.json").read_text() == content  # refused: untouched
    else:
        assert main(argv) == 2  # an object whose spec differs: the mismatch names --force
        one_error_line(capsys, "different configuration", "--force")
    assert main([*argv, "--force"]) == 0
    run = json.loads((d / "run.json").read_text())
    assert run["spec"]["limit"] == 2 and isinstance(run["previous"], list)
    assert json.loads((d / "report.json").read_text())["generations"]["done"] == 8
