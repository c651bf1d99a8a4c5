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
from personajudge.evaluation.store import ROW_TYPES, well_typed

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


# -- audit 20: a folder that is not a run, a dataset among the run's files, rows of the wrong type --------


@pytest.mark.parametrize(
    "name, content",
    [
        ("generations.jsonl", b"note 1\nnote 2 (no newline)"),
        ("scores.jsonl", b'{"mine": true}\n'),
        ("report.md", b"# my own report\n"),
        ("winrate.png", b"not a plot"),
    ],
)
def test_a_folder_without_run_json_holding_a_runs_files_is_refused_untouched(tmp_path, capsys, name, content):
    """Before, eval took such a folder for a new run: it cut the last line of a generations.jsonl as a torn
    row, appended its rows to the user's file and replaced report.md and the plots, with exit 0."""
    d = tmp_path / "mydir"
    d.mkdir()
    (d / name).write_bytes(content)
    assert main(["eval", *BASE, "--run-dir", str(d)]) == 2
    one_error_line(capsys, f"holds {name} but no run.json", "--force")
    assert (d / name).read_bytes() == content and not (d / "run.json").exists()
    assert main(["eval", *BASE, "--run-dir", str(d), "--force"]) == 0  # as the message says
    assert (d / "run.json").is_file()


@pytest.mark.parametrize("name", ["report.json", "generations.jsonl", "run.json"])
def test_a_dataset_that_is_one_of_the_runs_own_files_is_refused_even_with_force(tmp_path, capsys, name):
    d = tmp_path / "col"
    d.mkdir()
    dataset = d / name
    dataset.write_text('[{"prompt": "What is 2+2?"}, {"prompt": "Name a colour."}]\n')
    before = dataset.read_bytes()
    for extra in ([], ["--force"]):
        assert main(["eval", *BASE, "--dataset", str(dataset), "--run-dir", str(d), *extra]) == 2
        one_error_line(capsys, f"is this run's own {name}", "move it out of")
    assert dataset.read_bytes() == before


@pytest.mark.parametrize(
    "field, value",
    [("wall_time_s", "x"), ("acceptance_rate", "a"), ("text", None), ("n_tokens", 1.5), ("prompt_tokens", ["7"])],
)
def test_a_row_with_a_field_of_the_wrong_type_is_skipped_and_written_again(finished, tmp_path, capsys, field, value):
    """A hand-edited generation row whose fields no longer have their types crashed report (a string time
    in a mean) and eval (a null text given to a scorer). It is skipped with a warning, like an unreadable
    line: report leaves it out; eval generates it again, and the report counts the new row."""
    d = copy_of(finished, tmp_path)
    gens = d / "generations.jsonl"
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    rows[1][field] = value
    gens.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["report", str(d), "-q", "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 row(s) with a field of the wrong type" in err and "Traceback" not in err
    assert main(["eval", *BASE, "--run-dir", str(d)]) == 0
    again = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(again) == len(rows) + 1 and again[-1]["key"] == rows[1]["key"]
    assert well_typed(again[-1], ROW_TYPES["generations.jsonl"])


def test_changed_prompts_are_not_told_to_resume(tmp_path, capsys):
    """--resume reruns the stored configuration over the dataset file as it is now, so when the prompts
    changed it failed with the same message that suggested it."""
    data = tmp_path / "ds.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n")
    d = tmp_path / "run"
    argv = ["eval", *BASE, "--dataset", str(data), "--run-dir", str(d)]
    assert main(argv) == 0
    data.write_text(json.dumps({"prompt": "What is 5+5?"}) + "\n")
    capsys.readouterr()
    assert main(argv) == 2
    err = one_error_line(capsys, "changed: prompts", f"restore the dataset file {data} as it was", "--force")
    assert "--resume" not in err
