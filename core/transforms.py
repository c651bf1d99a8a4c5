"""Sampling transforms: temperature, top-k, top-p, greedy.

Persona-judge applies the same transforms to the draft distribution q and the
judge distribution p *before* the acceptance rule, so the emitted tokens follow
the judge's *filtered* distribution. Everything here is written against the
Python array API (through ``array_api_compat``): the same code runs on numpy
arrays from llama.cpp and on torch tensors on the GPU, where the logits already
are, without copying the vocabulary to the host.

All functions work on the last axis and accept any leading batch dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace, device, is_numpy_namespace, is_torch_namespace

from .errors import NumericalError

Array = Any


#: temperatures below this are greedy. Dividing logits by less overflows float64 (about 1e-308) and is
#: the argmax in every meaningful sense well before; vLLM draws the line at the same place.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """The transform settings shared by draft and judge."""

    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.9

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _top_values(xp, z: Array, k: int) -> Array:
    """The ``k`` largest values along the last axis, sorted descending.

    The array API has no top-k, and a full sort of a 262k-entry vocabulary per
    token is the dominant cost on a CPU, so numpy and torch take their native
    partial-selection routes; other namespaces fall back to a sort.
    """
    n = z.shape[-1]
    if k >= n:
        return xp.flip(xp.sort(z, axis=-1), axis=-1)
    if is_torch_namespace(xp):
        return z.topk(k, dim=-1, sorted=True).values  # a tensor method: the core never imports torch
    if is_numpy_namespace(xp):
        import numpy as np

        part = np.partition(z, n - k, axis=-1)[..., n - k :]
        return np.flip(np.sort(part, axis=-1), axis=-1)
    return xp.flip(xp.sort(z, axis=-1), axis=-1)[..., :k]


def not_finite_error() -> NumericalError:
    """The error for NaN or infinite logits, raised wherever they are found, on every backend."""
    return NumericalError(
        "the model produced NaN or infinite logits, so no token can be sampled from them; this "
        "is a broken model file (its weights, or a hyperparameter such as a RoPE base of 0), a "
        "plugin backend's forward that returns them, or, on a backend that takes --dtype (hf), a dtype "
        "that overflows (float16: try --dtype bfloat16 or float32)"
    )


def _softmax(xp, z: Array) -> Array:
    m = xp.max(z, axis=-1, keepdims=True)
    e = xp.exp(z - m)
    return e / xp.sum(e, axis=-1, keepdims=True)


def filtered_probs(logits: Array, params: SamplingParams) -> Array:
    """Turn raw logits into the filtered next-token distribution.

    Temperature 0 gives the one-hot distribution on the first argmax: with the
    acceptance rule this *is* the greedy limit (accept iff the draft equals the
    judge's argmax, else emit that argmax), so greedy needs no special case in
    the algebra. NaN or infinite logits raise
    :class:`~personajudge.core.errors.NumericalError` (one host read).
    """
    xp = array_namespace(logits)
    if not bool(xp.all(xp.isfinite(xp.max(logits, axis=-1)))):  # NaN propagates through max
        raise not_finite_error()
    return _unchecked_filtered_probs(logits, params)


def _unchecked_filtered_probs(logits: Array, params: SamplingParams) -> Array:
    """:func:`filtered_probs` without the host-side check of the logits (the caller checks them)."""
    xp = array_namespace(logits)
    z = logits if logits.dtype in (xp.float32, xp.float64) else xp.astype(logits, xp.float32)
    n = z.shape[-1]
    if params.greedy:
        idx = xp.argmax(z, axis=-1, keepdims=True)
        ar = xp.arange(n, device=device(z))
        return xp.astype(ar == idx, z.dtype)
    z = z / params.temperature
    k = params.top_k if 0 < params.top_k < n else n
    neg_inf = -math.inf
    if k < n or params.top_p < 1.0:
        top = _top_values(xp, z, k)  # (..., k) descending
        threshold = top[..., -1:]
        if params.top_p < 1.0:
            sp = _softmax(xp, top)
            before = xp.cumulative_sum(sp, axis=-1) - sp
            keep = before < params.top_p  # the most likely token is always kept
            threshold = xp.min(xp.where(keep, top, math.inf), axis=-1, keepdims=True)
        z = xp.where(z >= threshold, z, neg_inf)
    return _softmax(xp, z)
