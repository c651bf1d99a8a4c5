"""The report's "method minus base" table: paired differences per prompt, with a bootstrap interval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from personajudge.evaluation import EvalSpec, pair_experiment
from personajudge.evaluation.report import bootstrap_ci
from personajudge.evaluation.runner import run_eval

pytest.importorskip("matplotlib")


def test_differences_against_base_and_the_baseline_are_paired_per_prompt(tmp_path):
    spec = EvalSpec.model_validate(
        dict(
            limit=4,
            methods=["base", "prompt", "persona-judge"],
            baseline="prompt",
            experiments=[pair_experiment("concise,friendly")],
            scorers=[{"alias": "length", "name": "length"}],
            run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 16}},
        )
    )
    d = tmp_path / "run"
    run_eval(spec, d, progress=False)
    report = json.loads((d / "report.json").read_text())
    # the expected side, from the raw JSONL rows (not from the report's code): words per response
    gens = {r["key"]: r for r in map(json.loads, (d / "generations.jsonl").read_text().splitlines())}
    words = {(r["method"], r["prompt_id"]): len(r["text"].split()) for r in gens.values()}
    prompts = sorted({p for _, p in words})
    for ref in ("base", "prompt"):
        for m in {"base", "prompt", "persona-judge"} - {ref}:
            diffs = [words[(m, p)] - words[(ref, p)] for p in prompts]
            row = next(x for x in report["differences"] if x["reference"] == ref and x["method"] == m)
            assert row["scorer"] == "length" and row["n_prompts"] == len(prompts)
            assert row["mean"] == pytest.approx(np.mean(diffs))
            assert tuple(row["ci"]) == pytest.approx(bootstrap_ci(diffs))
    md = (d / "report.md").read_text()
    assert "## Method minus `base`" in md and "## Method minus `prompt`" in md


def test_a_difference_without_an_interval_is_printed_not_a_crash():
    """One prompt gives no bootstrap interval (``--limit 1``): the table shows the mean alone."""
    from personajudge.evaluation.report import _diff

    assert _diff({"mean": 0.5, "ci": None, "n_prompts": 1}) == "+0.50"
    assert _diff({"mean": -12.0}) == "-12.0"
    assert _diff({"mean": 3.0, "ci": [1.0, 5.0], "n_prompts": 50}) == "**+3.0 (+1.0 to +5.0)**"
