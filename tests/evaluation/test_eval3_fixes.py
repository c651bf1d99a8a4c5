"""The fixes of the third evaluation audit (notes/audit_eval3.md, items A-K), one test (or a few) per item.

Each test fails on the harness as the audit found it: reused rows of another preference (A), a
description cut at its comma (B), batches regrouped on resume (D), method options given to every
method (E), tracebacks for bad flags and plugin scorers (F, H), silently ignored config
preferences and dimensions (G, I), numpy seeds changed (J), and the report's smaller gaps (K).
(C, the recorded pairwise judge, is tested in test_eval_scorers.py, next to its local server.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from personajudge import PersonaJudge
from personajudge.cli import main
from personajudge.core.errors import PersonaJudgeWarning, PluginError
from personajudge.evaluation import EvalError, EvalSpec, Experiment, build_experiments, pair_experiment, run_eval
from personajudge.evaluation.dataset import read_prompts
from personajudge.evaluation.errors import DatasetError, RunMismatchError
from personajudge.evaluation.report import write_report
from personajudge.evaluation.scorers import PointwiseScorer
from personajudge.evaluation.store import read_rows
from personajudge.plugins import register_plugin, unregister_plugin
from personajudge.plugins.hookspecs import hookimpl

pytest.importorskip("textstat")
pytest.importorskip("vaderSentiment")
pytest.importorskip("matplotlib")

TOY = {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 6}}


def spec(pair: str = "concise,informative", **kw) -> EvalSpec:
    base = dict(
        limit=3,
        methods=["prompt", "persona-judge"],
        experiments=[pair_experiment(pair)],
        scorers=[{"name": "length"}],
        run=TOY,
    )
    return EvalSpec.model_validate({**base, **kw})


def texts(d: Path) -> dict[str, str]:
    gens, _ = read_rows(d / "generations.jsonl")
    run = json.loads((d / "run.json").read_text())
    out = {}
    for r in gens:  # the rows of the run's current fingerprints: those the report reads
        if r["fp"].split(":")[2:3] == [run["row_fingerprints"][r["experiment"]][r["method"]]]:
            out.setdefault(r["key"], r["text"])
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- A: rows are reused only for the preferences they were made with --------------------------------


def test_a_force_to_a_reworded_preference_regenerates_its_rows(tmp_path):
    d, fresh = tmp_path / "run", tmp_path / "fresh"
    run_eval(spec("answer like a pirate,concise"), d, progress=False, report=False)
    # same slug and experiment name, other text: nothing of the old preference may be reused
    res = run_eval(spec("Answer like a pirate!,concise"), d, progress=False, force=True, report=False)
    assert res.reused == 0 and res.generated == 6
    run_eval(spec("Answer like a pirate!,concise"), fresh, progress=False, report=False)
    assert texts(d) == texts(fresh)
    # unchanged, it is all reused (resume stays exact)
    again = run_eval(spec("Answer like a pirate!,concise"), d, progress=False, report=False)
    assert (again.generated, again.reused, again.scored) == (0, 6, 0)


def test_a_a_description_is_never_named_like_a_builtin_preference():
    (free,) = build_experiments(pairs=["Concise :),informative"])
    (named,) = build_experiments(pairs=["concise,informative"])
    assert free.name != named.name and free.name.startswith("concise-")


def test_a_a_run_directory_from_before_the_fingerprints_is_refused_then_regenerated(tmp_path, capsys):
    d = tmp_path / "run"
    run_eval(spec(), d, progress=False, report=False)
    # as an earlier version wrote it: no fingerprint version, rows fingerprinted GEN_HASH:PROMPT_SHA
    record = json.loads((d / "run.json").read_text())
    del record["fingerprint"], record["row_fingerprints"]
    (d / "run.json").write_text(json.dumps(record))
    for name, cut in (("generations.jsonl", 2), ("scores.jsonl", None)):
        rows, _ = read_rows(d / name)
        for r in rows:
            parts = r["fp"].split(":")
            r["fp"] = ":".join(parts[:2] if cut else [*parts[:2], parts[-1]])
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(d, plots=False)  # its report still reads the stored rows
    rep = json.loads((d / "report.json").read_text())
    assert rep["generations"]["done"] == 6 and all(w["n_prompts"] == 3 for w in rep["win_rates"])
    with pytest.raises(RunMismatchError, match="earlier persona-judge"):
        run_eval(spec(), d, progress=False, report=False)
    res = run_eval(spec(), d, progress=False, report=False, force=True)
    assert res.reused == 0 and res.generated == 6


# -- B: eval --view splits as generate --view does ------------------------------------------------


def test_b_view_keeps_a_description_with_a_comma_whole():
    (e,) = build_experiments(view=["answer briefly, with humour", "concise,friendly"])
    assert e.views == [["answer briefly, with humour"], ["concise", "friendly"]]


# -- D: a resumed batched run batches as the uninterrupted one -------------------------------------


class Recording:
    """A loaded model that records the prompts of every batched call (the composition of each batch)."""

    def __init__(self, pj):
        self.pj, self.batches = pj, []

    def generate_batch(self, prompts, **kw):
        self.batches.append(tuple(prompts))
        return self.pj.generate_batch(prompts, **kw)

    def __getattr__(self, name):
        return getattr(self.pj, name)


def test_d_resume_batches_as_the_uninterrupted_run(tmp_path):
    s = spec(limit=5, batch_size=3, methods=["persona-judge"], baseline=None, scorers=[])
    with PersonaJudge(TOY) as pj:
        whole = Recording(pj)
        run_eval(s, tmp_path / "whole", pj=whole, progress=False, report=False)

        def stop(row):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_eval(s, tmp_path / "cut", pj=pj, progress=False, report=False, on_generation=stop)
        resumed = Recording(pj)
        res = run_eval(s, tmp_path / "cut", pj=resumed, progress=False, report=False)
    assert res.generated == 4 and res.reused == 1
    assert resumed.batches and set(resumed.batches) <= set(whole.batches)
    assert texts(tmp_path / "cut") == texts(tmp_path / "whole")


def test_d_a_batched_row_is_reused_only_with_the_same_batch(tmp_path):
    d = tmp_path / "run"
    s = dict(batch_size=3, methods=["persona-judge"], baseline=None, scorers=[])
    run_eval(spec(limit=4, **s), d, progress=False, report=False)  # batches: prompts 0-2, 3
    res = run_eval(spec(limit=5, **s), d, progress=False, report=False, force=True)  # 0-2, 3-4
    assert (res.reused, res.generated) == (3, 2)  # prompt 3 has another batch now


# -- E: method options belong to one method --------------------------------------------------------


def test_e_method_option_of_one_method(tmp_path, capsys):
    d = tmp_path / "run"
    argv = ["eval", "--backend", "toy", "--no-progress", "-q", "--max-new-tokens", "6", "--limit", "2"]
    argv += ["--scorers", "length", "--methods", "prompt,persona-judge,mod", "--run-dir", str(d)]
    assert main([*argv, "--method-option", "mod.weights=[1.0,0.0]"]) == 0, capsys.readouterr().err
    record = json.loads((d / "run.json").read_text())
    assert record["spec"]["method_options"] == {"mod": {"weights": [1.0, 0.0]}}
    gens, _ = read_rows(d / "generations.jsonl")
    mod = sorted((r["prompt_id"], r["text"]) for r in gens if r["method"] == "mod" and r["experiment"][:7] == "concise")
    # what generate makes with those options, on the same views and seed
    from personajudge.evaluation.dataset import load_prompts

    cfg = {**TOY, "method": "mod", "method_options": {"weights": [1.0, 0.0]}}
    with PersonaJudge(cfg) as pj:
        want = [
            (p.id, pj.generate(p.prompt, views=[["concise"], ["informative"]], seed=0).text)
            for p in load_prompts(None, 2)
        ]
    assert mod == sorted(want)
    # the reproduce command carries the option, and gives this spec
    assert "mod.weights=[1.0, 0.0]" in record["command"]
    capsys.readouterr()
    assert main([*argv, "--method-option", "weights=[1.0,0.0]"]) == 2
    assert "METHOD.weights" in one_line_error(capsys)
    assert main([*argv, "--method-option", "pad.weight=2"]) == 2
    assert "'pad' is not one of this run's methods" in one_line_error(capsys)


def test_e_a_spec_with_run_method_options_still_gives_them_to_its_methods(tmp_path):
    s = EvalSpec.model_validate(
        {
            **spec().model_dump(),
            "methods": ["mod"],
            "baseline": None,
            "run": {**TOY, "method_options": {"weights": [1, 0]}},
        }
    )
    assert s.method_options == {"mod": {"weights": [1, 0]}} and s.run.method_options == {}
    assert run_eval(s, tmp_path / "run", progress=False, report=False).generated == 3


# -- F: bad views are one line ---------------------------------------------------------------------


def test_f_bad_views_are_one_line_and_a_bar_is_fine_in_a_description(tmp_path, capsys):
    base = ["eval", "--backend", "toy", "--no-progress", "-q", "--max-new-tokens", "3", "--limit", "1"]
    base += ["--scorers", "length", "--run-dir", str(tmp_path / "run")]
    for flags in (["--view="], ["--view", "concise", "--view=,"]):
        assert main([*base, *flags]) == 2
        assert "--view" in one_line_error(capsys)
    assert main([*base, "--pair=answer a|b,concise"]) == 0, capsys.readouterr().err  # as generate --prefer takes it
    with pytest.raises(EvalError, match="every view needs at least one preference"):
        Experiment(name="x", views=[[]])
    with pytest.raises(EvalError, match="must not contain"):
        Experiment(name="a|b", views=[["concise"], ["informative"]])


# -- G: a config file's preferences are refused, not dropped ---------------------------------------


def test_g_config_preferences_are_refused(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preferences = [{name = "pirate", description = "Talk like a pirate"}, "concise"]\n')
    argv = ["eval", "--backend", "toy", "--no-progress", "-q", "--limit", "1", "--config", str(cfg)]
    assert main([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    assert "--config" in one_line_error(capsys) and not (tmp_path / "run").exists()


# -- H: plugin scorers that misbehave are one PluginError line --------------------------------------


class Raises(PointwiseScorer):
    name = "t-raises"

    def score(self, prompt, response):
        raise RuntimeError("scorer service down")


class Short(PointwiseScorer):
    name = "t-short"

    def score_many(self, items):
        return [1.0 for _ in items][:-1]


class Text(PointwiseScorer):
    name = "t-text"

    def score_many(self, items):
        return ["high" for _ in items]


class Nothing(PointwiseScorer):
    name = "t-none"

    def score(self, prompt, response):
        return None


class Scorers:
    @hookimpl
    def register_scorers(self, register):
        for cls in (Raises, Short, Text, Nothing):
            register(cls)


@pytest.fixture
def bad_scorers():
    plugin = Scorers()
    register_plugin(plugin, name="test-eval3-scorers")
    yield
    unregister_plugin(plugin)


@pytest.mark.parametrize(
    "name, says",
    [
        ("t-raises", "raised RuntimeError: scorer service down"),
        ("t-short", "returned 5 values for 6"),
        ("t-text", "str 'high'"),
        ("t-none", "NoneType"),
    ],
)
def test_h_a_misbehaving_plugin_scorer_is_a_plugin_error(bad_scorers, tmp_path, name, says):
    with pytest.raises(PluginError, match=f"scorer '{name}'.*{says}"):
        run_eval(spec(scorers=[{"name": name}]), tmp_path / "run", progress=False, report=False)


# -- I: --dimension must name a dimension of the run ----------------------------------------------


def test_i_a_dimension_not_in_the_run_is_an_error(tmp_path):
    typo = spec(dimensions=[{"dimension": "concize", "scorer": "length", "direction": "higher"}])
    with pytest.raises(EvalError, match="did you mean 'concise'"):
        run_eval(typo, tmp_path / "a", progress=False)
    two = spec(
        experiments=build_experiments(pairs=["answer like a pirate,concise", "answer like a pirate!,informative"]),
        dimensions=[{"dimension": "answer-like-a-pirate", "scorer": "length", "direction": "higher"}],
    )
    with pytest.raises(EvalError, match=r"its dimensions are answer-like-a-pirate-[0-9a-f]{6}"):
        run_eval(two, tmp_path / "b", progress=False)


# -- J: numpy seeds exactly, no booleans or strings as numbers ------------------------------------


def test_j_numpy_seeds_are_exact_and_bools_are_not_numbers():
    assert spec(seeds=[np.int64(2**53 + 1)]).seeds == [2**53 + 1]
    assert spec(seeds=[np.uint64(2**63 + 1)]).seeds == [2**63 + 1]
    assert spec(seeds=np.array([2**53 + 1, 2**53 + 2], dtype=np.int64)).seeds == [2**53 + 1, 2**53 + 2]
    for field, value in (
        ("seeds", [True]),
        ("seeds", ["3"]),
        ("limit", True),
        ("lambdas", [True]),
        ("batch_size", True),
    ):
        with pytest.raises(EvalError, match=field):
            EvalSpec(**{**spec().model_dump(), field: value})


def test_a_negative_seed_is_refused_before_the_run_directory_is_written(tmp_path, monkeypatch, capsys):
    """(audit cli3 F) Refused when the row's config was built, after run.json: the corrected command was then
    refused as "a run with a different configuration", and --resume repeated the error."""
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--backend", "toy", "--max-new-tokens", "3", "-q", "--no-progress", "--limit", "1"]
    assert main([*args, "--seed", "-1", "--scorers", "length"]) == 2
    assert "seeds are 0 or more (got -1)" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()
    assert main([*args, "--seed", "0", "--scorers", "length"]) == 0
    with pytest.raises(EvalError, match=r"seeds: seeds are 0 or more \(got -2\)"):
        EvalSpec(**{**spec().model_dump(), "seeds": [3, -2]})


def test_a_config_files_method_eval_does_not_compare_is_one_warning(tmp_path, monkeypatch, capsys):
    """(audit cli3, not fixed there) ``method = "pad"`` in a --config file was dropped without a word: eval
    compares the methods --methods names, so the file's own gets a warning line, as bench gives."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "pad.toml"
    cfg.write_text('method = "pad"\n[backend]\nname = "toy"\n')
    args = ["eval", "--config", str(cfg), "--max-new-tokens", "2", "-q", "--no-progress", "--limit", "1"]
    assert main([*args, "--scorers", "length", "--methods", "persona-judge"]) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "'pad' is not compared" in warning[0], warning
    assert "--methods prompt,persona-judge,pad" in warning[0]  # the baseline and the methods, then the file's
    assert main([*args, "--scorers", "length", "--methods", "pad", "--run-dir", "runs/b"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_report_json_on_an_ascii_stdout_is_valid_json_with_the_text_kept(tmp_path):
    """(audit cli3 D, in eval) A stdout that cannot encode the text escapes what it cannot write; in JSON,
    ``\\xe7`` is not a valid escape, so ``report --json`` writes ``\\u00e7`` instead: the same JSON value."""
    d = tmp_path / "run"
    text = "réponds en français 🐈"
    run_eval(spec(f"{text},concise"), d, progress=False)
    proc = subprocess.run(
        [sys.executable, "-m", "personajudge", "report", str(d), "--json", "--no-plots"],
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert text in json.dumps(json.loads(proc.stdout.decode("ascii")), ensure_ascii=False)


# -- K: report and message details ----------------------------------------------------------------


def test_k_win_rate_cells_with_their_own_n(tmp_path):
    d = tmp_path / "run"
    run_eval(spec(methods=["prompt", "persona-judge", "base"]), d, progress=False, report=False)
    path = d / "scores.jsonl"
    rows, _ = read_rows(path)  # without persona-judge's scores of prompt 0, its cells have n = 2, base's 3
    kept = [r for r in rows if not (r["gen"].startswith("0|") and "|persona-judge|" in r["gen"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    write_report(d, plots=False)
    md = (d / "report.md").read_text()
    rep = json.loads((d / "report.json").read_text())
    assert {(w["method"], w["n_prompts"]) for w in rep["win_rates"]} == {("persona-judge", 2), ("base", 3)}
    table = md.split("## Win rate")[1].split("##")[0]
    line = {ln.split(" | ")[0]: ln for ln in table.splitlines() if ln.startswith("| `")}
    for w in rep["win_rates"]:  # each cell says its own n, in the table's rows
        assert line[f"| `{w['method']}`"].count(f"[n = {w['n_prompts']}]") == 2
    assert "n per cell (prompts):" not in md


def test_k_report_names_the_text_of_each_free_text_preference(tmp_path):
    d = tmp_path / "run"
    run_eval(
        spec(experiments=build_experiments(pairs=["请 用 简单 的话,concise", "请 用 正式 的 语气,concise"])),
        d,
        progress=False,
    )
    # a row of its own (the reproduce line names them too, but not in its `--resume` form)
    (row,) = [ln for ln in (d / "report.md").read_text().splitlines() if ln.startswith("| preferences |")]
    assert "请 用 简单 的话" in row and "请 用 正式 的 语气" in row and "`custom-" in row


def test_k_no_warnings_that_the_user_of_eval_cannot_follow(tmp_path):
    s = spec(
        methods=["base", "prompt", "persona-judge"],
        experiments=build_experiments(objectives=["answer like a pirate,concise"]),
    )
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        run_eval(s, tmp_path / "run", progress=False, report=False)
    assert not [w for w in got if issubclass(w.category, PersonaJudgeWarning)], [str(w.message) for w in got]


def test_k_a_dataset_path_is_recorded_absolute(tmp_path, monkeypatch, capsys):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "my.jsonl").write_text('{"prompt": "Why is the sky blue?"}\n')
    monkeypatch.chdir(sub)
    argv = ["eval", "--backend", "toy", "--no-progress", "-q", "--max-new-tokens", "3", "--scorers", "length"]
    assert main([*argv, "--dataset", "my.jsonl", "--run-dir", "../dsr"]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--resume", "--run-dir", "dsr", "--no-progress", "-q"]) == 0, capsys.readouterr().err
    assert "0 generated" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="relative path, read from the current folder"):
        read_prompts("my.jsonl")


def test_k_bad_run_json_dimensions_and_bool_ids_are_one_line(tmp_path, capsys):
    d = tmp_path / "run"
    run_eval(spec(), d, progress=False, report=False)
    record = json.loads((d / "run.json").read_text())
    (d / "run.json").write_text(json.dumps({**record, "dimensions": 5}))
    assert main(["report", str(d), "-q", "--no-plots"]) == 2
    assert "'dimensions'" in one_line_error(capsys)
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"id": true, "prompt": "Hi?"}\n')
    with pytest.raises(DatasetError, match="id must be a string or a number, got true"):
        read_prompts(ids)


def test_k_example_docstring_names_the_flesch_scorer_as_it_is():
    doc = (Path(__file__).parents[2] / "examples" / "evaluate_small.py").read_text()
    assert "reading-ease" not in doc and "Flesch-Kincaid grade" in doc
