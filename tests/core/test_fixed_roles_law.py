"""What exactness implies for the role schedule, tested on the toy backend.

Every committed token is an exact sample from the view that judges it. With
fixed roles (``persona-judge-base``) the judge never changes, so the output is
distributed exactly as the judge view's filtered distribution: the drafting
view changes how many tokens each iteration commits (speed), never the text's
distribution. So ``persona-judge-base`` with views [A] | [B] must be
indistinguishable from plain sampling of view [B] alone, and distinguishable
from plain sampling of view [A] alone (the negative control: it shows the
test has the power to see a difference between the two views).

With alternating roles (``persona-judge``) each iteration's tokens come from
that iteration's judge, and an iteration ends at a rejection (or after λ
accepted drafts plus the bonus token), so the two views' distributions are
interleaved at those boundaries: the result is neither view's law, which the
last test shows.

Two-sample chi-square over whole sequences of a few tokens (a 2 x K
contingency table, outcomes expected fewer than 5 times pooled), seeds fixed,
so every case is deterministic; a one-sample test against the exact law of
view B (computed here with numpy from the toy model's raw logits) backs the
two-sample one.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.testing.exactness import (
    SessionOracle,
    chi_square,
    filtered_distribution,
    sample_outcomes,
    token_law,
    view_contexts,
)

stats = pytest.importorskip("scipy.stats")

PROMPT = "hello there"
A, B = "concise", "humor"
SETTINGS = dict(temperature=1.0, top_k=3, top_p=1.0, lam=2)
LENGTH = 4  # tokens per sequence: two windows of lambda = 2, so the drafter's and bonus branches both occur
N = 2000  # sequences per sample
ALPHA = 1e-3  # same law: the p-value is uniform; below this we call the laws different
POWER = 1e-6  # different laws must be rejected far below ALPHA


@pytest.fixture(scope="module")
def model():
    # the plain encoder keeps the toy contexts short; no stop strings, no repetition guard (nothing cut)
    return PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"})


def sample(model, method, prefs, seed):
    return sample_outcomes(
        model,
        PROMPT,
        n=N,
        seed=seed,
        preferences=prefs,
        method=method,
        max_new_tokens=LENGTH,
        stop=[],
        repeat_lines=0,
        **SETTINGS,
    )


def two_sample_pvalue(a: Counter, b: Counter, min_expected: float = 5.0) -> float:
    """Chi-square test of homogeneity of two samples of outcomes (rare outcomes pooled into one cell)."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    cols, rest = [], [0, 0]
    for k in keys:
        tot = a.get(k, 0) + b.get(k, 0)
        if tot * min(na, nb) / (na + nb) >= min_expected:
            cols.append([a.get(k, 0), b.get(k, 0)])
        else:
            rest[0] += a.get(k, 0)
            rest[1] += b.get(k, 0)
    if sum(rest):
        cols.append(rest)
    assert len(cols) >= 5, "too few outcomes to compare laws: the test would have no power"
    return float(stats.chi2_contingency(np.asarray(cols).T).pvalue)


def view_law(model, pref):
    """The exact law of LENGTH tokens sampled from one view, from the toy model's raw logits."""
    ctx = view_contexts(model, PROMPT, method="prompt", preferences=[pref])[0]
    oracle = SessionOracle(model.backend, [ctx])
    try:
        step = lambda seq: filtered_distribution(
            oracle.logits(0, seq),
            temperature=SETTINGS["temperature"],  # noqa
            top_k=SETTINGS["top_k"],
            top_p=SETTINGS["top_p"],
        )
        return token_law(step, length=LENGTH, eos_ids=model.backend.tokenizer.eos_token_ids)
    finally:
        oracle.close()


@pytest.fixture(scope="module")
def samples(model):
    return {
        "base": sample(model, "persona-judge-base", [A, B], seed=0),
        "alternate": sample(model, "persona-judge", [A, B], seed=0),
        "A": sample(model, "prompt", [A], seed=10_000),
        "B": sample(model, "prompt", [B], seed=20_000),
    }


def test_the_judge_view_is_the_plain_view_b(model):
    """Plain sampling from [B] prompts exactly the context persona-judge-base's judge view gets."""
    judge = view_contexts(model, PROMPT, method="persona-judge-base", preferences=[A, B])[1]
    assert judge == view_contexts(model, PROMPT, method="prompt", preferences=[B])[0]


def test_fixed_roles_sample_the_judge_views_law(model, samples):
    assert two_sample_pvalue(samples["base"], samples["B"]) > ALPHA
    res = chi_square(samples["base"], view_law(model, B), eos_ids=model.backend.tokenizer.eos_token_ids)
    assert res.impossible == 0 and res.dof >= 5
    assert res.pvalue > ALPHA, f"p = {res.pvalue:.3g}"


def test_the_drafter_does_draft_and_get_overruled(model):
    """Not a vacuous pass: view A drafts, and the judge rejects some of its tokens."""
    res = model.generate_batch(
        [PROMPT] * 200,
        seeds=list(range(200)),
        preferences=[A, B],
        method="persona-judge-base",
        max_new_tokens=LENGTH,
        stop=[],
        repeat_lines=0,
        **SETTINGS,
    )
    drafted = sum(r.stats.drafted for r in res)
    accepted = sum(r.stats.accepted for r in res)
    assert drafted > 0 and 0 < accepted < drafted


def test_negative_control_fixed_roles_are_not_the_drafters_law(model, samples):
    assert two_sample_pvalue(samples["base"], samples["A"]) < POWER
    res = chi_square(samples["base"], view_law(model, A), eos_ids=model.backend.tokenizer.eos_token_ids)
    assert res.pvalue < POWER


def test_alternating_roles_interleave_both_views(samples):
    """With roles swapping at iteration boundaries the output is neither view's law alone."""
    assert two_sample_pvalue(samples["alternate"], samples["B"]) < POWER
    assert two_sample_pvalue(samples["alternate"], samples["A"]) < POWER
