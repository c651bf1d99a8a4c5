"""MOD and PAD against arithmetic written out in the test, with unequal weights.

The expected next-token distributions are computed here from the toy model's
raw logits (``ToyBackend.logits_after``) with scipy's ``log_softmax`` and the
exactness module's own filtering -- never with ``core.mod`` or ``core.pad``:

- MOD samples softmax(sum_i w_i log p_i) after the shared transforms, with
  the weights normalized to sum to one;
- PAD re-ranks the base view's top-k by
  score(t) = log p_base(t) + w * beta * (log pi_rm(t) - log pi_ref(t)),
  with pi_ref = the base view (view 0, no preference) and pi_rm = the
  preference view (view 1), then samples the scores with the transforms.

Sampled sequences are compared with the law by chi-square; the same samples
must reject the law with the weights reversed (MOD) or the reward's sign
flipped (PAD), so a weight-reversal or sign bug fails. Greedy decoding is
checked token by token against the argmax of the same arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax

from personajudge.api import PersonaJudge
from personajudge.testing.exactness import chi_square, filtered_distribution, sample_outcomes, token_law, view_contexts

PROMPT = "tell me a story"
PREFS2 = ["concise", "humor"]
PREFS3 = ["concise", "humor", "expert"]
SAMPLING = dict(temperature=0.9, top_k=3, top_p=1.0)
LENGTH = 3
N = 1500
ALPHA, POWER = 1e-3, 1e-6


def model_for(toy, method, options):
    return PersonaJudge({"backend": {"name": "toy"}, "method": method, "method_options": options}, backend=toy)


def mod_logits(toy, contexts, weights, seq):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    rows = [log_softmax(toy.logits_after(c + list(seq)).astype(np.float64)) for c in contexts]
    return sum(wi * r for wi, r in zip(w, rows))


def pad_logits(toy, contexts, weight, beta, k, seq):
    lb = log_softmax(toy.logits_after(contexts[0] + list(seq)).astype(np.float64))
    lrm = log_softmax(toy.logits_after(contexts[1] + list(seq)).astype(np.float64))
    kth = np.sort(lb)[-k]
    return np.where(lb >= kth, lb + weight * beta * (lrm - lb), -np.inf)


def law_of(toy, logits_fn, sampling=SAMPLING, length=LENGTH):
    return token_law(
        lambda seq: filtered_distribution(logits_fn(seq), **sampling),
        length=length,
        eos_ids=toy.tokenizer.eos_token_ids,
    )


def sample(model, prefs, method, n=N, **kw):
    return sample_outcomes(
        model, PROMPT, n=n, preferences=prefs, method=method, max_new_tokens=LENGTH, stop=[], **{**SAMPLING, **kw}
    )


# ------------------------------------------------------------------------------------------------ MOD


@pytest.mark.parametrize(
    "prefs,weights",
    [(PREFS2, [0.8, 0.2]), (PREFS2, [3.0, 1.0]), (PREFS3, [0.5, 0.3, 0.2])],
    ids=["0.8-0.2", "unnormalized-3-1", "three-views"],
)
def test_mod_samples_the_weighted_log_mixture(toy, prefs, weights):
    model = model_for(toy, "mod", {"weights": weights})
    contexts = view_contexts(model, PROMPT, method="mod", preferences=prefs)
    assert len(contexts) == len(prefs)
    counts = sample(model, prefs, "mod")
    eos = toy.tokenizer.eos_token_ids
    right = chi_square(counts, law_of(toy, lambda s: mod_logits(toy, contexts, weights, s)), eos_ids=eos)
    assert right.impossible == 0 and right.pvalue > ALPHA, right
    reversed_ = chi_square(counts, law_of(toy, lambda s: mod_logits(toy, contexts, weights[::-1], s)), eos_ids=eos)
    assert reversed_.pvalue < POWER, f"reversed weights not rejected: p = {reversed_.pvalue:.3g}"
    equal = chi_square(counts, law_of(toy, lambda s: mod_logits(toy, contexts, [1.0] * len(prefs), s)), eos_ids=eos)
    assert equal.pvalue < POWER, f"equal weights not rejected: p = {equal.pvalue:.3g}"


def test_mod_greedy_takes_the_mixtures_argmax_at_every_step(toy):
    weights = [0.7, 0.3]
    model = model_for(toy, "mod", {"weights": weights})
    contexts = view_contexts(model, PROMPT, method="mod", preferences=PREFS2)
    differs = 0
    for prompt_seed in range(4):
        res = model.generate(
            PROMPT, preferences=PREFS2, method="mod", temperature=0.0, max_new_tokens=24, seed=prompt_seed, stop=[]
        )
        assert len(res.tokens) >= 8
        for i, t in enumerate(res.tokens):
            seq = res.tokens[:i]
            assert t == int(np.argmax(mod_logits(toy, contexts, weights, seq))), f"step {i}"
            differs += t != int(np.argmax(mod_logits(toy, contexts, weights[::-1], seq)))
    assert differs > 0  # the reversed mixture would have chosen otherwise somewhere: the check has teeth


# ------------------------------------------------------------------------------------------------ PAD


@pytest.mark.parametrize(
    "weight,beta,prefs", [(2.0, 0.3, ["humor"]), (0.5, 1.0, ["concise", "humor"])], ids=["w2-b0.3", "w0.5-b1-two-prefs"]
)
def test_pad_samples_the_reward_guided_scores(toy, weight, beta, prefs):
    model = model_for(toy, "pad", {"weight": weight, "beta": beta})
    contexts = view_contexts(model, PROMPT, method="pad", preferences=prefs)
    assert len(contexts) == 2  # view 0: the prompt without preferences (what `base` samples); view 1: with them
    assert contexts[0] == view_contexts(model, PROMPT, method="base", preferences=prefs)[0] != contexts[1]
    k = SAMPLING["top_k"]
    counts = sample(model, prefs, "pad")
    eos = toy.tokenizer.eos_token_ids
    right = chi_square(counts, law_of(toy, lambda s: pad_logits(toy, contexts, weight, beta, k, s)), eos_ids=eos)
    assert right.impossible == 0 and right.pvalue > ALPHA, right
    flipped = chi_square(counts, law_of(toy, lambda s: pad_logits(toy, contexts, -weight, beta, k, s)), eos_ids=eos)
    assert flipped.pvalue < POWER, f"the reward's sign flipped is not rejected: p = {flipped.pvalue:.3g}"
    swapped = chi_square(
        counts, law_of(toy, lambda s: pad_logits(toy, contexts[::-1], weight, beta, k, s)), eos_ids=eos
    )
    assert swapped.pvalue < POWER, f"base and reward views swapped is not rejected: p = {swapped.pvalue:.3g}"


def test_pad_greedy_takes_the_best_score_at_every_step(toy):
    weight, beta, k = 3.0, 0.5, 5
    model = model_for(toy, "pad", {"weight": weight, "beta": beta, "k": k})
    contexts = view_contexts(model, PROMPT, method="pad", preferences=["humor"])
    res = model.generate(
        PROMPT, preferences=["humor"], method="pad", temperature=0.0, max_new_tokens=24, seed=0, stop=[]
    )
    assert len(res.tokens) >= 8
    differs = 0
    for i, t in enumerate(res.tokens):
        seq = res.tokens[:i]
        assert t == int(np.argmax(pad_logits(toy, contexts, weight, beta, k, seq))), f"step {i}"
        differs += t != int(np.argmax(pad_logits(toy, contexts, -weight, beta, k, seq)))
    assert differs > 0
