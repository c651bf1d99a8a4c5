"""PAD-style reward-guided decoding (Chen et al., ICLR 2025), training-free variant.

PAD re-ranks the base policy's top-k candidates by a token-level personalized
reward: score(t) = log p_base(t) + w * r(t), with
r(t) = beta * (log pi_rm(t | context, preference) - log pi_ref(t | context)).
PAD trains pi_rm; the training-free stand-in used here takes pi_rm = the same
model conditioned on the preference (view 1) and pi_ref = the base model
without it (view 0), so no reward model is needed. Greedy (temperature 0)
takes the best-scoring candidate; sampling draws from the scores with the
shared transforms.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

from .acceptance import sample_from
from .decoding import DecodeRequest, Loop, Views, _dev_array
from .mod import log_softmax
from .transforms import _top_values, filtered_probs


def pad_scores(base_logits: Any, rm_logits: Any, ref_logits: Any, *, weight: float, beta: float, k: int) -> Any:
    """log p_base + weight * beta * (log pi_rm - log pi_ref) on base's top-k, -inf elsewhere."""
    xp = array_namespace(base_logits)
    lb = log_softmax(base_logits)
    n = lb.shape[-1]
    k = k if 0 < k < n else n
    kth = _top_values(xp, lb, k)[..., -1:]
    score = lb if weight == 0 else lb + (weight * beta) * (log_softmax(rm_logits) - log_softmax(ref_logits))
    return xp.where(lb >= kth, score, -math.inf)


def pad_loop(req: DecodeRequest, *, weight: float, beta: float, k: int) -> Loop:
    """View 0 is the base (pi_base = pi_ref), view 1 the preference-conditioned pi_rm."""
    views = Views(req.contexts, req.context_length, req.stats)
    em = req.emitter
    use_rm = weight != 0 and len(req.contexts) > 1
    need = [0, 1] if use_rm else [0]
    while True:
        if not views.room(1):
            em.finish("context")
            return
        yield from views.sync(need)
        base = views.last[0]
        score = pad_scores(base, views.last[1] if use_rm else base, base, weight=weight if use_rm else 0.0,
                           beta=beta, k=k)
        p = filtered_probs(score, req.params)
        u = _dev_array(p, req.rng.random(1))
        tok = int(sample_from(p, u[0]))
        req.stats.iterations += 1
        if not em.push(tok):
            return
        views.commit(tok)
