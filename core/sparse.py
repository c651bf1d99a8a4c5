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

Two faces. :func:`candidates` returns the exact support (every id tied with
the k-th largest logit is kept, on every array library, as in the dense mask
and in ``model.generate``) and checks the logits on the host. The decoding
loops use :func:`device_candidates`: on torch it computes a support of fixed
size ``top_k + slack`` without reading anything back (no boolean compaction,
no data-dependent shape), so a step stays queued on the GPU; whether the
logits were finite and whether the ties fit in the slack are read later, in
the same transfer as the sampled token (see ``acceptance.Dist.status``).
On numpy both find the top entries the same way: a threshold guessed from a
strided sample of the row, and a partition of only what reaches it
(:func:`_np_above_guess`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_numpy_namespace, is_torch_namespace

from .acceptance import NOT_FINITE, OK, TIES_PAST_SLACK, Dist
from .arrays import like, take_along
from .transforms import SamplingParams, _softmax, _unchecked_filtered_probs, filtered_probs, not_finite_error

Array = Any


#: the numpy top-k samples every ``_STRIDE``-th logit of a row to guess its threshold
_STRIDE = 32


def _np_above_guess(z: np.ndarray, k: int) -> list[np.ndarray | None]:
    """Per row of ``z`` (R, V), the ids of the entries at or above a threshold guessed from a sample;
    None where the whole row must be partitioned instead.

    A partition of a 262k vocabulary costs ~1 ms a row (~30 ms for a batched step's 32 rows), yet
    only the top few dozen entries matter. The ``j``-th largest of every ``_STRIDE``-th entry has
    about ``j * _STRIDE`` entries of the row above it, and ``j`` is chosen so that fewer than ``k``
    is vanishingly unlikely unless the row's top entries sit on the sampled ids. Either way the
    result is exact: when at least ``k`` entries reach the guess, the ``k`` largest and every tie
    with the ``k``-th are among them (the ``k``-th largest is >= the guess); when fewer do -- or
    the guess is NaN, which no entry reaches -- the row gets None. What the guess decides is
    only how much is partitioned afterwards, never which entries win.
    """
    r, n = z.shape
    j = 4 * k // _STRIDE + 16
    sample = z[:, ::_STRIDE]
    m = sample.shape[1]
    if m < 8 * j:  # a small vocabulary: partitioning it outright costs about as much as the guess
        return [None] * r
    guess = np.partition(sample, m - j, axis=-1)[:, m - j]
    out: list[np.ndarray | None] = []
    for row, g in zip(z, guess):
        cand = np.flatnonzero(row >= g)
        out.append(cand if cand.size >= k else None)
    return out


def _top_k_ids(xp, z: Array, k: int) -> Array:
    """Indices of every entry >= the k-th largest value (ties at the boundary kept, like the dense mask)."""
    n = z.shape[-1]
    if is_numpy_namespace(xp):
        if not math.isfinite(float(z.max())):  # NaN propagates through max
            raise not_finite_error()
        cand = _np_above_guess(z[None, :], k)[0]
        if cand is None:
            return np.flatnonzero(z >= np.partition(z, n - k)[n - k])
        vals = z[cand]
        if cand.size > k:
            kth = np.partition(vals, cand.size - k)[cand.size - k]
            cand = cand[vals >= kth]
        return cand
    if is_torch_namespace(xp):
        # ``topk`` alone breaks ties at the k-th value arbitrarily; keep every tie instead
        # (tensor methods: the core never imports torch). Reads the max to check it.
        top = z.topk(k, dim=-1, sorted=True).values
        if not math.isfinite(float(top[0])):
            raise not_finite_error()
        return xp.nonzero(z >= top[k - 1])[0]
    order = xp.argsort(z, descending=True, stable=True)
    kth = xp.take(z, order[k - 1 : k])
    return xp.nonzero(z >= kth)[0]


def candidates(logits: Array, params: SamplingParams) -> Dist:
    """The filtered next-token distribution of one position, on its support."""
    xp = array_namespace(logits)
    dev = device(logits)
    n = logits.shape[-1]
    if params.greedy:
        i = xp.reshape(xp.astype(xp.argmax(logits), xp.int64), (1,))
        if not math.isfinite(float(xp.take(logits, i)[0])):  # argmax finds NaN and +inf first
            raise not_finite_error()
        return Dist(i, xp.ones((1,), dtype=xp.float64, device=dev))
    k = params.top_k
    if not 0 < k < n:
        p = filtered_probs(logits, params)
        return Dist(xp.arange(n, dtype=xp.int64, device=dev), p, full=True)
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


@dataclass(frozen=True)
class Rows:
    """Filtered distributions of several rows: ``probs[r]`` over ``ids[r]`` (sorted ascending).

    ``ids`` is None when the support is the whole vocabulary in order (no
    top-k; ``probs`` is then dense). ``status`` holds one
    :data:`~.acceptance.OK` / ``TIES_PAST_SLACK`` / ``NOT_FINITE`` code per row,
    as :class:`~.acceptance.Dist.status` does for one.
    """

    ids: Array | None
    probs: Array
    status: Array


def _top(xp, logits: Array, kk: int) -> tuple[Array, Array]:
    """The ``kk`` largest logits of each row, descending, and their ids (which of tied ones: any)."""
    n = logits.shape[-1]
    if is_torch_namespace(xp):
        return logits.topk(kk, dim=-1, sorted=True)  # a tensor method: the core never imports torch
    if is_numpy_namespace(xp):
        if kk < n:
            cands = _np_above_guess(logits, kk)
            idx = np.empty(logits.shape[:-1] + (kk,), dtype=np.intp)
            whole = [i for i, cand in enumerate(cands) if cand is None]  # every row of a small vocabulary
            if whole:  # (usually none at a large vocabulary: no empty partition in the token loop)
                idx[whole] = np.argpartition(logits[whole], n - kk, axis=-1)[:, n - kk :]  # in one call
            for i, cand in enumerate(cands):
                if cand is not None:
                    top = np.argpartition(logits[i, cand], cand.size - kk)[cand.size - kk :]
                    idx[i] = cand[top]
        else:
            idx = np.broadcast_to(np.arange(n), logits.shape)
        vals = np.take_along_axis(logits, idx, axis=-1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        return np.take_along_axis(vals, order, axis=-1), np.take_along_axis(idx, order, axis=-1)
    idx = xp.argsort(logits, axis=-1, descending=True, stable=True)[:, :kk]
    return xp.take_along_axis(logits, idx, axis=-1), idx


def row_candidates(logits: Array, params: SamplingParams, *, slack: int | None = None) -> Rows:
    """:func:`~.sparse.device_candidates` for every row of ``logits`` (R, V) at once, with no host read.

    The same supports, probabilities and status codes row by row: greedy is
    the argmax with probability 1; without top-k the dense filtered
    distribution; with top-k the ``top_k + slack`` largest logits, those
    below the k-th value or outside top-p given probability 0, sorted by id.
    """
    xp = array_namespace(logits)
    dev = device(logits)
    r, n = logits.shape
    if params.greedy:
        i = xp.reshape(xp.astype(xp.argmax(logits, axis=-1), xp.int64), (r, 1))
        bad = ~xp.isfinite(take_along(logits, i)[:, 0])  # argmax finds NaN and +inf first
        return Rows(i, xp.ones((r, 1), dtype=xp.float64, device=dev), _codes(xp, bad))
    k = params.top_k
    if not 0 < k < n:
        bad = ~xp.isfinite(xp.max(logits, axis=-1))
        return Rows(None, _unchecked_filtered_probs(logits, params), _codes(xp, bad))
    kk = min(n, k + (k if slack is None else max(slack, 0)))
    vals, idx = _top(xp, logits, kk)
    kth = vals[:, k - 1 : k]
    keep = vals >= kth  # every tie with the k-th value that fits in the slack
    z = xp.astype(vals, xp.float64) / params.temperature
    if params.top_p < 1.0:
        top = z[:, :k]  # the k largest, descending, as in the dense transform
        sp = _softmax(xp, top)
        before = xp.cumulative_sum(sp, axis=-1) - sp
        threshold = xp.min(xp.where(before < params.top_p, top, math.inf), axis=-1, keepdims=True)
        keep = keep & (z >= threshold)
    order = xp.argsort(idx, axis=-1)
    ids = xp.astype(take_along(idx, order), xp.int64)
    z = xp.where(take_along(keep, order), take_along(z, order), -math.inf)
    if is_numpy_namespace(xp):
        bad = ~xp.isfinite(xp.max(logits, axis=-1))  # numpy's partition does not put NaN first
    else:
        bad = ~xp.isfinite(vals[:, 0])  # topk puts NaN and +inf first
    overflow = vals[:, kk - 1] >= kth[:, 0] if kk < n else None
    return Rows(ids, _softmax(xp, z), _codes(xp, bad, overflow))


def _codes(xp, bad: Array, overflow: Array | None = None) -> Array:
    ok = OK if overflow is None else xp.where(overflow, TIES_PAST_SLACK, OK)
    return xp.astype(xp.where(bad, NOT_FINITE, ok), xp.int64)


def device_candidates(logits: Array, params: SamplingParams, *, slack: int | None = None) -> Dist:
    """The filtered distribution of one position on a support of fixed size, with no host read.

    The same distribution as :func:`candidates`, laid out for a GPU: the
    ``top_k + slack`` largest logits (``slack`` defaults to ``top_k``), those
    below the k-th value or outside top-p given probability 0, sorted by id.
    ``status`` records whether the logits were finite and whether the ties at
    the k-th value ran past the slack (then ``exact()`` is :func:`candidates`);
    the one read of the step reads it. Host arrays (numpy) need no such care:
    they get :func:`candidates` itself. One row of :func:`row_candidates`.
    """
    xp = array_namespace(logits)
    if not is_torch_namespace(xp):
        return candidates(logits, params)

    def exact() -> Dist:
        return candidates(logits, params)

    rows = row_candidates(logits[None, :], params, slack=slack)
    if rows.ids is None:  # no top-k: the whole vocabulary, in order
        ids = xp.arange(logits.shape[-1], dtype=xp.int64, device=device(logits))
        return Dist(ids, rows.probs[0], rows.status[0], exact, full=True)
    return Dist(rows.ids[0], rows.probs[0], rows.status[0], exact)


def uniforms(ref: Array, u: Any) -> Array:
    """An iteration's uniforms as float64 beside ``ref`` (the logits): one upload per iteration.

    On a GPU the copy is asynchronous from pinned memory, so it does not wait
    for the device; numpy arrays are returned as they are.
    """
    xp = array_namespace(ref)
    if is_numpy_namespace(xp):
        return u
    return like(ref, u, xp.float64)
