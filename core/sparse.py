"""Filtering a logits row to its support: the per-token fast path.

After top-k (20 by default) a filtered distribution has a handful of nonzero
entries, yet a vocabulary can have 262k. Building and scanning the dense
vector costs milliseconds per token on a CPU -- as much as a small model's
forward. Here a distribution is kept as ``(ids, probs)`` with ``ids`` sorted
ascending. Because the dense routines sum in id order and zeros add nothing,
sampling by inverse CDF over the sorted support picks the same token as the
dense code for the same uniform (up to float rounding of the normalizers);
the tests check the two against each other. Without top-k (``top_k = 0``) the
support is the whole vocabulary and the dense transform is used.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace, device, is_numpy_namespace, is_torch_namespace

from .acceptance import Dist
from .transforms import SamplingParams, _softmax, filtered_probs

Array = Any


def _top_k_ids(xp, z: Array, k: int) -> Array:
    """Indices of every entry >= the k-th largest value (ties at the boundary kept, like the dense mask)."""
    n = z.shape[-1]
    if is_numpy_namespace(xp):
        import numpy as np

        # A full partition of a 262k vocabulary costs ~2 ms; the top entries sit close to the
        # maximum, so partition only the entries within `delta` of it: widen while fewer than k
        # fit, narrow while the band is so wide that partitioning it would cost as much.
        m = float(z.max())
        lo, hi, delta = 0.0, math.inf, 4.0
        for _ in range(40):
            cand = np.flatnonzero(z >= m - delta)
            if cand.size < k:
                lo = delta
                delta = delta * 2 if hi == math.inf else (lo + hi) / 2
            elif cand.size > 64 * k and delta - lo > 1e-3:
                hi = delta
                delta = (lo + hi) / 2
            else:
                break
        if cand.size < k:
            cand = np.argpartition(z, n - k)[n - k:]
        vals = z[cand]
        if cand.size > k:
            kth = np.partition(vals, cand.size - k)[cand.size - k]
            cand = cand[vals >= kth]
        return cand
    if is_torch_namespace(xp):
        return z.topk(k, dim=-1, sorted=False).indices  # a tensor method: the core never imports torch
    order = xp.argsort(z, descending=True, stable=True)
    return order[:k]


def candidates(logits: Array, params: SamplingParams) -> Dist:
    """The filtered next-token distribution of one position, on its support."""
    xp = array_namespace(logits)
    dev = device(logits)
    n = logits.shape[-1]
    if params.greedy:
        i = xp.argmax(logits)
        return Dist(xp.reshape(xp.astype(i, xp.int64), (1,)), xp.ones((1,), dtype=xp.float64, device=dev))
    k = params.top_k
    if not 0 < k < n:
        p = filtered_probs(logits, params)
        return Dist(xp.arange(n, dtype=xp.int64, device=dev), p)
    ids = xp.astype(_top_k_ids(xp, logits, k), xp.int64)
    ids = xp.sort(ids)
    z = xp.astype(xp.take(logits, ids), xp.float64) / params.temperature
    if params.top_p < 1.0:
        top = xp.flip(xp.sort(z), axis=0)[:k]  # the k largest, descending, as in the dense transform
        sp = _softmax(xp, top)
        before = xp.cumulative_sum(sp) - sp
        threshold = xp.min(xp.where(before < params.top_p, top, math.inf))
        keep = z >= threshold
        ids, z = ids[keep], z[keep]
    return Dist(ids, _softmax(xp, z))
