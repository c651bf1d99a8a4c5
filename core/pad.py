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

from .decoding import DecodeRequest, Loop, token_loop
from .mod import log_softmax
from .sparse import Dist, candidates
from .transforms import _top_values


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
    use_rm = weight != 0 and len(req.contexts) > 1

    def reranked(views) -> Dist:
        base = views.last[0]
        rm = views.last[1] if use_rm else base
        return candidates(pad_scores(base, rm, base, weight=weight if use_rm else 0.0, beta=beta, k=k), req.params)

    return token_loop(req, [0, 1] if use_rm else [0], reranked)
