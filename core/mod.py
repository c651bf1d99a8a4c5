"""MOD-style multi-objective decoding: sample from a weighted mixture of the views.

Each view carries one preference; at every step the views' log-probabilities
are mixed with the user's weights (summing to 1) and the mixture is sampled
with the same transforms as every other method. This is the logit-mixing
baseline the Persona-judge paper compares against: it needs every view's
forward at every token (batched here into one call), and it changes the
distribution being sampled, unlike Persona-judge's exact acceptance rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from array_api_compat import array_namespace

from .acceptance import sample_from
from .decoding import DecodeRequest, Loop, Views, _dev_array
from .errors import ConfigError
from .transforms import filtered_probs


def log_softmax(logits: Any) -> Any:
    xp = array_namespace(logits)
    m = xp.max(logits, axis=-1, keepdims=True)
    z = logits - m
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def normalize_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ConfigError(f"method_options.weights: got {len(weights)} weights for {n} views")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError("method_options.weights: weights must be >= 0 with a positive sum")
    total = float(sum(weights))
    return [w / total for w in weights]


def mod_loop(req: DecodeRequest, weights: Sequence[float]) -> Loop:
    """Sample each token from softmax(sum_i w_i log p_i) after the shared transforms.

    Views with weight 0 are never fed, so weight 1 on one view is exactly that
    view's plain sampling (same uniforms, same tokens).
    """
    w = normalize_weights(weights, len(req.contexts))
    active = [i for i, x in enumerate(w) if x > 0]
    views = Views(req.contexts, req.context_length, req.stats)
    em = req.emitter
    while True:
        if not views.room(1):
            em.finish("context")
            return
        yield from views.sync(active)
        mixed = None
        for i in active:
            lp = log_softmax(views.last[i]) * w[i] if len(active) > 1 else views.last[i]
            mixed = lp if mixed is None else mixed + lp
        p = filtered_probs(mixed, req.params)
        u = _dev_array(p, req.rng.random(1))
        tok = int(sample_from(p, u[0]))
        req.stats.iterations += 1
        if not em.push(tok):
            return
        views.commit(tok)
