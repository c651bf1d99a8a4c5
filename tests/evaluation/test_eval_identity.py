"""Experiments, dimensions and judge verdicts keep their identity.

- Two different preferences whose names would be the same slug (descriptions without ASCII letters
  are all ``custom``; slugs are cut to 40 characters and drop punctuation) stay two experiments /
  two dimensions: nothing is dropped or merged without a word.
- A pairwise verdict is reused only against the same baseline response: a run switched to another
  ``--baseline`` judges again, and rows written before verdict keys named their baseline are
  reused only where their ``baseline`` field still matches.
"""

import hashlib
import json
from pathlib import Path

import pytest

from personajudge.cli import main
from personajudge.evaluation import EvalSpec, pair_experiment, run_eval
from personajudge.evaluation.errors import EvalError
from personajudge.evaluation.scorers import PairResult, PairwiseScorer
from personajudge.evaluation.store import read_rows
from personajudge.plugins import register_plugin, unregister_plugin
from personajudge.plugins.hookspecs import hookimpl

# 'base' ignores preferences: said once per generation, beside the point here
pytestmark = pytest.mark.filterwarnings("ignore:method 'base' ignores preferences")

BASE = ["--backend", "toy", "--no-progress", "-q", "--max-new-tokens", "4", "--scorers", "length", "--limit", "2"]


def experiments_of(run_dir: Path) -> list[tuple[str, list[list[str]]]]:
    spec = json.loads((run_dir / "run.json").read_text())["spec"]
    return [(e["name"], e["views"]) for e in spec["experiments"]]


def suffixed(slug: str, text: str) -> str:
    """The documented name of a slug shared by several preferences: slug + 6 hex digits of the text's sha256."""
    return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"


@pytest.mark.parametrize(
    ("a", "b", "slug"),
    [
        ("请 用 简单 的话", "请 用 正式 的 语气", "custom"),  # no ASCII letters: both slugs are 'custom'
        (  # the same first 40 characters
            "Answer as a friendly kindergarten teacher and simply",
            "Answer as a friendly kindergarten teacher and in rhymes",
            "answer-as-a-friendly-kindergarten-teache",
        ),
    ],
)
def test_two_pairs_whose_preferences_share_a_slug_are_two_experiments(a, b, slug, tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["eval", *BASE, "--pair", f"{a},concise", "--pair", f"{b},concise", "--run-dir", str(d)]) == 0
    assert "8 generated" in capsys.readouterr().err  # 2 prompts x 2 experiments x (prompt, persona-judge)
    assert experiments_of(d) == [
        (f"{suffixed(slug, a)}-vs-concise", [[a], ["concise"]]),
        (f"{suffixed(slug, b)}-vs-concise", [[b], ["concise"]]),
    ]
    gens, _ = read_rows(d / "generations.jsonl")
    assert {r["experiment"] for r in gens} == {suffixed(slug, a) + "-vs-concise", suffixed(slug, b) + "-vs-concise"}


def test_the_same_views_twice_are_one_experiment_and_a_lone_slug_keeps_its_name(tmp_path, capsys):
    d = tmp_path / "run"
    zh = "请 用 简单 的话"
    argv = ["eval", *BASE, "--pair", f"{zh},concise", "--pair", f"{zh} ,concise", "--run-dir", str(d)]
    assert main(argv) == 0  # the same description (the space is stripped): one experiment, named as before
    assert experiments_of(d) == [("custom-vs-concise", [[zh], ["concise"]])]
    assert "4 generated" in capsys.readouterr().err


def test_a_pair_that_is_also_an_objectives_step_is_that_step(tmp_path):
    d = tmp_path / "run"
    argv = ["eval", *BASE, "--pair", "concise,friendly", "--objectives", "concise,friendly", "--run-dir", str(d)]
    assert main(argv) == 0
    spec = json.loads((d / "run.json").read_text())["spec"]
    assert [(e["name"], e["objectives"]) for e in spec["experiments"]] == [
        ("concise-vs-concise", 1),
        ("concise-vs-friendly", 2),
    ]


def test_the_api_refuses_two_experiments_with_one_name():
    a = pair_experiment("请 用 简单 的话,concise")
    b = pair_experiment("请 用 正式 的 语气,concise")
    assert a.name == b.name == "custom-vs-concise"  # each named on its own
    with pytest.raises(EvalError, match="two experiments are named 'custom-vs-concise'"):
        EvalSpec(methods=["prompt"], experiments=[a, b])


# -- a pairwise scorer whose verdict depends on the aspect and on both responses -----------------


class AspectJudge(PairwiseScorer):
    """Response A wins when the aspect ends with '!', else when it has more distinct characters than
    response B (ties: 0.5). Deterministic, no model."""

    name = "aspect-judge"
    description = "test judge"

    def compare(self, item):
        if item.aspect.endswith("!"):
            return PairResult(1.0, {"answers": ["1"]})
        a, b = len(set(item.response_a)), len(set(item.response_b))
        return PairResult(0.5 if a == b else float(a > b), {"answers": ["x"]})


@pytest.fixture
def aspect_judge():
    class Plugin:
        @hookimpl
        def register_scorers(self, register):
            register(AspectJudge)

    plugin = Plugin()
    register_plugin(plugin, name="test-aspect-judge")
    yield
    unregister_plugin(plugin)


def judge_spec(baseline: str, experiment: str = "concise,informative", limit: int = 8) -> EvalSpec:
    return EvalSpec(
        limit=limit,
        methods=["base", "prompt", "persona-judge"],
        baseline=baseline,
        experiments=[pair_experiment(experiment)],
        scorers=[{"alias": "j", "name": "aspect-judge"}],
        run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 16}},
    )


def judge_rates(run_dir: Path) -> dict[tuple[str, str], float]:
    rep = json.loads((run_dir / "report.json").read_text())
    return {(w["dimension"], w["method"]): w["win_rate"] for w in rep["win_rates"]}


def test_two_dimensions_that_share_a_slug_each_get_their_verdicts(aspect_judge, tmp_path):
    d = tmp_path / "run"
    a, b = "answer like a pirate", "answer like a pirate!"
    run_eval(judge_spec("prompt", f"{a},{b}", limit=3), d, progress=False)
    scores, _ = read_rows(d / "scores.jsonl")
    # 3 prompts x (base, persona-judge) x 2 dimensions against prompt
    assert len(scores) == 12
    slug = "answer-like-a-pirate"
    assert {r["dimension"] for r in scores} == {suffixed(slug, a), suffixed(slug, b)}
    rates = judge_rates(d)
    assert rates[(suffixed(slug, b), "persona-judge")] == 1.0  # the '!' aspect always wins
    assert {r["value"] for r in scores if r["dimension"] == suffixed(slug, a)} <= {0.0, 0.5, 1.0}


def expected_rates(run_dir: Path, baseline: str) -> dict[tuple[str, str], float]:
    """AspectJudge's win rates recomputed from the generated texts (one seed, so the mean over prompts)."""
    gens, _ = read_rows(run_dir / "generations.jsonl")
    text = {(r["prompt_id"], r["method"]): r["text"] for r in gens}
    out = {}
    for m in ("base", "prompt", "persona-judge"):
        if m == baseline:
            continue
        vals = []
        for pid in sorted({p for p, _ in text}):
            a, b = len(set(text[(pid, m)])), len(set(text[(pid, baseline)]))
            vals.append(0.5 if a == b else float(a > b))
        for dim in ("concise", "informative"):
            out[(dim, m)] = sum(vals) / len(vals)
    return out


def test_switching_the_baseline_judges_again(aspect_judge, tmp_path):
    d = tmp_path / "run"
    run_eval(judge_spec("prompt"), d, progress=False)
    assert judge_rates(d) == expected_rates(d, "prompt")
    res = run_eval(judge_spec("base"), d, progress=False, force=True)
    assert res.generated == 0 and res.scored == 2 * 8 * 2  # (prompt, persona-judge) x 8 prompts x 2 dimensions
    assert judge_rates(d) == expected_rates(d, "base")
    # the judge rows of the report name the baseline they were judged against
    scores, _ = read_rows(d / "scores.jsonl")
    assert {r["baseline"].split("|")[2] for r in scores} == {"prompt", "base"}
    # and back: the verdicts against prompt are all still there
    res = run_eval(judge_spec("prompt"), d, progress=False, force=True)
    assert res.generated == 0 and res.scored == 0
    assert judge_rates(d) == expected_rates(d, "prompt")


def test_verdict_rows_without_their_baseline_in_the_key_are_read_but_judged_again(aspect_judge, tmp_path):
    """Before verdict keys named their baseline, a row's key was GEN|ALIAS|DIMENSION, with the
    baseline's key only in its ``baseline`` field. Such rows come from run directories older than
    the row fingerprints that name the baseline response (run.json ``fingerprint`` 2): the report
    reads them, a run never reuses them."""
    d = tmp_path / "run"
    run_eval(judge_spec("prompt"), d, progress=False)
    rates = judge_rates(d)
    path = d / "scores.jsonl"
    rows, _ = read_rows(path)
    assert all("@vs@" in r["key"] for r in rows)
    path.write_text("".join(json.dumps({**r, "key": r["key"].split("@vs@")[0]}) + "\n" for r in rows))
    main(["report", str(d), "-q", "--no-plots"])
    assert judge_rates(d) == rates  # readable as they are
    res = run_eval(judge_spec("prompt"), d, progress=False)
    assert res.scored == 2 * 8 * 2 and judge_rates(d) == rates  # judged again, to the same verdicts
    res = run_eval(judge_spec("base"), d, progress=False, force=True)
    assert res.scored == 2 * 8 * 2  # against another baseline: judged again
    assert judge_rates(d) == expected_rates(d, "base")
