"""The law of what Persona-judge commits when the context runs out, by chi-square.

A prompt that leaves ``free`` tokens of room gets windows of ``min(lambda,
free - 1)``: a cut window that is accepted to its end emits its last token
from the judge's p_{w+1}, which is also the law of the token the full window
would commit there (accepted draft min(p, q) plus residual max(0, p - q) sum
to p, judged by the same view), and then the context is full. So the
``free`` committed tokens follow the law of the first ``free`` tokens with
ample room -- :func:`~personajudge.testing.exactness.expected_law`, derived
from the acceptance rule and the toy model's logits, not from the core.

Negative controls on the same sample sizes show the check has power: the
same samples against the wrong role schedule, and samples from a planted
window rule of ``free - 2`` (the conservative bound, under which the last
token comes from the next iteration's judge instead) against the right law.
"""

from __future__ import annotations

from collections import Counter

import pytest

from personajudge.api import PersonaJudge
from personajudge.core import batched, decoding
from personajudge.testing.exactness import _EOS_MARK, chi_square, expected_law, view_contexts

PROMPT = "hello there"
PREFS = ["concise", "humor"]
LAM = 4
SETTINGS = dict(temperature=1.0, top_k=2, top_p=1.0)
ALPHA = 1e-3  # a correct loop's p-value is uniform; below this we call it broken
POWER = 1e-6  # a wrong law or a planted bug must be rejected far below ALPHA
N = 1500


def longest_view() -> int:
    probe = PersonaJudge({"backend": {"name": "toy"}})
    return max(map(len, view_contexts(probe, PROMPT, method="persona-judge", preferences=PREFS)))


def sample(free: int, n: int = N, **kw) -> tuple[PersonaJudge, Counter]:
    """``n`` generations (seeds 0..n-1) from prompts that leave ``free`` tokens of room; outcome counts."""
    model = PersonaJudge({"backend": {"name": "toy", "n_ctx": longest_view() + free}})
    results = model.generate_batch(
        [PROMPT] * n,
        seeds=list(range(n)),
        preferences=PREFS,
        lam=LAM,
        max_new_tokens=free + 10,  # the context, not the budget, ends them
        stop=[],
        repeat_lines=0,
        **SETTINGS,
        **kw,
    )
    counts: Counter = Counter()
    for r in results:
        if r.finish_reason == "eos":
            counts[tuple(r.tokens) + (_EOS_MARK,)] += 1
        else:
            assert (r.finish_reason, len(r.tokens)) == ("context", free)
            counts[tuple(r.tokens)] += 1
    return model, counts


def law(model: PersonaJudge, free: int, roles: str = "alternate"):
    contexts = view_contexts(model, PROMPT, method="persona-judge", preferences=PREFS)
    return expected_law(model.backend, contexts, roles=roles, lam=LAM, length=free, **SETTINGS)


CASES = [(3, "interleaved"), (5, "windowed"), (4, "interleaved"), (3, "windowed"), (5, "interleaved")]
DEFAULT = {(3, "interleaved"), (5, "windowed")}


@pytest.mark.parametrize(
    "free,schedule",
    [pytest.param(*c, id=f"free{c[0]}-{c[1]}", marks=() if c in DEFAULT else pytest.mark.slow) for c in CASES],
)
def test_tokens_at_the_context_end_follow_the_ample_room_law(free, schedule):
    model, counts = sample(free, schedule=schedule)
    res = chi_square(counts, law(model, free), eos_ids={0})
    assert res.impossible == 0 and res.dof >= 3 and res.n == N
    assert res.pvalue > ALPHA, f"p = {res.pvalue:.3g} (chi2 {res.statistic:.1f}, {res.dof} dof)"
    # negative control: the same samples against the wrong role schedule
    assert chi_square(counts, law(model, free, roles="fixed"), eos_ids={0}).pvalue < POWER


@pytest.mark.parametrize("schedule", ["interleaved", "windowed"])
def test_a_planted_window_of_free_minus_two_is_rejected(monkeypatch, schedule):
    def minus_two(lam, free, remaining=None):
        if free < 1:
            return None
        w = max(0, min(lam, free - 2))
        return w if remaining is None else max(0, min(w, remaining))

    for module in (decoding, batched):  # the loops and the batched judge each look the rule up by name
        monkeypatch.setattr(module, "window_length", minus_two)
    model, counts = sample(5, schedule=schedule)
    assert chi_square(counts, law(model, 5), eos_ids={0}).pvalue < POWER
