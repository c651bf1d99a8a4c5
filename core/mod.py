"""MOD-style multi-objective decoding: sample from a weighted mixture of the views.

Each view carries one preference; at every step the views' log-probabilities
are mixed with the user's weights (summing to 1) and the mixture is sampled
with the same transforms as every other method. This is the logit-mixing
baseline the Persona-judge paper compares against: it needs every view's
forward at every token (batched here into one call), and it changes the
distribution being sampled, unlike Persona-judge's exact acceptance rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from .decoding import DecodeRequest, Loop, token_loop
from .errors import ConfigError
from .sparse import Dist, candidates


def log_softmax(logits: Any) -> Any:
    xp = array_namespace(logits)
    m = xp.max(logits, axis=-1, keepdims=True)
    z = logits - m
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def normalize_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ConfigError(f"method_options.weights: got {len(weights)} weights for {n} views")
    if not all(math.isfinite(w) for w in weights):
        raise ConfigError("method_options.weights: weights must be finite numbers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("method_options.weights: weights must be >= 0 with a positive sum")
    # scaled by the largest first: two weights of 1e308 sum to inf, and w / inf made every weight 0
    top = float(max(weights))
    scaled = [w / top for w in weights]
    total = sum(scaled)
    return [w / total for w in scaled]


def mod_loop(req: DecodeRequest, weights: Sequence[float]) -> Loop:
    """Sample each token from softmax(sum_i w_i log p_i) after the shared transforms.

    Views with weight 0 are never fed, so weight 1 on one view is exactly that
    view's plain sampling (same uniforms, same tokens).
    """
    w = normalize_weights(weights, len(req.contexts))
    active = [i for i, x in enumerate(w) if x > 0]

    def mixture(views) -> Dist:
        if len(active) == 1:
            return candidates(views.last[active[0]], req.params)
        return candidates(sum(log_softmax(views.last[i]) * w[i] for i in active), req.params)

    return token_loop(req, active, mixture)
