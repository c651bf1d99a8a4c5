"""The acceptance / resampling algebra of speculative sampling.

With draft distributions q_1..q_k, judge distributions p_1..p_{k+1} and draft
tokens t_i ~ q_i, token t_i is accepted while u_i < min(1, p_i(t_i) / q_i(t_i));
at the first rejection a token is drawn from the residual
norm(max(0, p_i - q_i)); if all k are accepted one is drawn from p_{k+1}. Every
committed token is then distributed exactly as the judge's p for its position
(Leviathan et al. 2023; Persona-judge appendix C.2) -- the property the tests
check statistically.

The functions are vectorized over the window and over any leading batch axes,
and written against the array API so they run where the logits are. Tokens are
drawn by inverse-CDF from caller-supplied uniforms, so the same uniforms give
the same decisions on every backend and array library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .arrays import array_namespace, device
from .transforms import not_finite_error

Array = Any


def sample_from(probs: Array, u: Array) -> Array:
    """Inverse-CDF sample along the last axis: one index per row for uniform ``u``.

    ``probs`` need not be normalized. A zero-probability entry is never
    returned, even when ``u`` rounds to the top of the CDF.
    """
    xp = array_namespace(probs)
    cdf = xp.cumulative_sum(probs, axis=-1)
    total = cdf[..., -1:]
    if isinstance(u, float):  # a Python scalar is an argument of the kernel: no upload to the device
        at = float(u) * total
    else:
        at = xp.asarray(u, dtype=probs.dtype, device=device(probs))[..., None] * total
    below = (cdf <= at) & (cdf < total)
    return xp.sum(xp.astype(below, xp.int64), axis=-1)


def accept_mask(p_at: Array, q_at: Array, u: Array) -> Array:
    """u < min(1, p/q), written u * q < p: no division, and p == 0 always rejects."""
    return u * q_at < p_at


def count_accepted(mask: Array) -> Array:
    """Length of the leading run of ``True`` along the last axis (window)."""
    xp = array_namespace(mask)
    k = mask.shape[-1]
    rejected = xp.concat([~mask, xp.ones(mask.shape[:-1] + (1,), dtype=xp.bool, device=device(mask))], axis=-1)
    return xp.argmax(xp.astype(rejected, xp.int8), axis=-1) if k else xp.zeros(mask.shape[:-1], dtype=xp.int64)


def residual(p: Array, q: Array) -> Array:
    """norm(max(0, p - q)); falls back to p where the residual mass is zero.

    Zero mass means p == q on the support: rejection had probability zero and
    can only be reached by rounding, so sampling from p keeps exactness and
    never divides by zero.
    """
    xp = array_namespace(p)
    r = xp.maximum(p - q, xp.zeros_like(p))
    mass = xp.sum(r, axis=-1, keepdims=True)
    safe = xp.where(mass > 0, mass, xp.ones_like(mass))
    return xp.where(mass > 0, r / safe, p)


def verify_window(p: Array, q: Array, tokens: Array, u_accept: Array, u_emit: Array) -> tuple[Array, Array]:
    """Judge a window of ``k`` draft tokens in one vectorized pass.

    Shapes (any leading batch axes ``...``): ``p`` (..., k+1, V), ``q`` (..., k, V),
    ``tokens`` (..., k) integer, ``u_accept`` (..., k), ``u_emit`` (...).

    Returns ``(n_accepted, emitted)``: how many draft tokens are kept and the
    token emitted after them (from the residual at the first rejection, or from
    p_{k+1} when all were accepted).
    """
    xp = array_namespace(p)
    k = q.shape[-2]
    idx = xp.astype(tokens, xp.int64)[..., None]
    p_at = xp.take_along_axis(p[..., :k, :], idx, axis=-1)[..., 0]
    q_at = xp.take_along_axis(q, idx, axis=-1)[..., 0]
    u_accept = xp.asarray(u_accept, dtype=p.dtype, device=device(p))
    n = count_accepted(accept_mask(p_at, q_at, u_accept))
    zero_row = xp.zeros(q.shape[:-2] + (1, q.shape[-1]), dtype=q.dtype, device=device(q))
    q_pad = xp.concat([q, zero_row], axis=-2)  # q_{k+1} = 0 makes the residual equal p_{k+1}
    row = xp.astype(n, xp.int64)[..., None, None]
    p_n = xp.take_along_axis(p, row, axis=-2)[..., 0, :]
    q_n = xp.take_along_axis(q_pad, row, axis=-2)[..., 0, :]
    emitted = sample_from(residual(p_n, q_n), u_emit)
    return n, emitted


def judge_token(p: Array, q: Array, token: int, u_accept: float, u_emit: float) -> tuple[bool, int]:
    """The rule for one draft token (a window of one) on 1-D distributions.

    Used by the interleaved loop, which learns p_i before drafting t_{i+1} and
    so can stop drafting at the first rejection. Returns (accepted, token to
    emit if rejected; -1 when accepted).
    """
    p_at = p[token]
    q_at = q[token]
    if bool(accept_mask(p_at, q_at, u_accept)):
        return True, -1
    return False, int(sample_from(residual(p, q), u_emit))


# ------------------------------------------------------------------------------------------------
# The same rule on sparse distributions: the per-token fast path (see ``sparse.candidates``).
# After top-k a filtered distribution has a handful of nonzero entries out of a vocabulary of up
# to 262k, so it is kept as ``(ids, probs)`` with ``ids`` sorted ascending. Summing in id order
# makes inverse-CDF sampling over the support pick the same token as the dense code above.
#
# Everything below up to the ``read`` is written without host reads (no ``int()``, ``bool()``,
# boolean compaction or data-dependent shapes), so on a GPU a whole draft-and-judge step is queued
# on the device and the host waits once, for the few integers it needs to build the next forward
# (:func:`draft_and_judge`, :func:`sample_dist`, :func:`judge_draft` each read exactly once).

#: ``Dist.status`` codes, read in the same transfer as the step's result
OK, TIES_PAST_SLACK, NOT_FINITE = 0, 1, 2


@dataclass(frozen=True)
class Dist:
    """A distribution over ``ids`` (sorted ascending); every other token has probability 0.

    ``probs`` may hold zeros: a support of fixed size computed on the device
    (``sparse.device_candidates``) does not know how many entries survive the
    filters. A zero-probability id is never sampled and adds nothing to a sum,
    so it changes no decision. ``status`` is None when the distribution was
    checked on the host already, else a 0-d integer array read together with
    the result: :data:`NOT_FINITE` (NaN or infinite logits) raises
    :class:`~personajudge.core.errors.NumericalError`; :data:`TIES_PAST_SLACK`
    (more ties at the k-th value than the fixed support holds) recomputes the
    exact support with ``exact()`` and decides again. ``full`` marks a support
    that is the whole vocabulary in order (no top-k), where the union of two
    supports is either one.
    """

    ids: Array
    probs: Array
    status: Array | None = field(default=None, compare=False)
    exact: Callable[[], Dist] | None = field(default=None, compare=False, repr=False)
    full: bool = field(default=False, compare=False)


def _index(xp, token: Any, like_ids: Array) -> Array:
    """``token`` as a (1,) int64 array beside ``like_ids``; an array stays on the device (no read)."""
    if isinstance(token, int):
        return xp.full((1,), token, dtype=xp.int64, device=device(like_ids))  # a fill, not a copy
    return xp.reshape(xp.astype(token, xp.int64), (1,))


def _on(d: Dist, ids: Array) -> Array:
    """d's probabilities at the (sorted) ``ids``."""
    xp = array_namespace(d.probs)
    n = d.ids.shape[0]
    pos = xp.searchsorted(d.ids, ids)
    pos_c = xp.clip(pos, max=n - 1) if hasattr(xp, "clip") else xp.minimum(pos, n - 1)
    hit = xp.take(d.ids, pos_c) == ids
    return xp.where(hit, xp.take(d.probs, pos_c), xp.zeros_like(xp.take(d.probs, pos_c)))


def prob_of(d: Dist, token: Any) -> Array:
    """d(token) as a 0-d array, 0 when the token is outside the support (``token``: int or array)."""
    xp = array_namespace(d.probs)
    return _on(d, _index(xp, token, d.ids))[0]


def residual_dist(p: Dist, q: Dist) -> Dist:
    """norm(max(0, p - q)) on the union of supports; p itself when the mass is zero (reads the mass)."""
    xp = array_namespace(p.probs)
    ids = xp.sort(xp.unique_values(xp.concat([p.ids, q.ids])))
    pu, qu = _on(p, ids), _on(q, ids)
    r = xp.maximum(pu - qu, xp.zeros_like(pu))
    mass = float(xp.sum(r))
    if mass > 0:
        return Dist(ids, r / mass)
    return p


def _residual_probs(p: Dist, q: Dist) -> tuple[Array, Array]:
    """The residual to sample from, on the union of supports, without a host read.

    Same values as :func:`residual_dist`, laid out with a fixed size: the two
    supports concatenated and sorted, each repeated id counted once (its later
    copies get 0), and p there when the residual mass is zero.
    """
    xp = array_namespace(p.probs)
    if p.full and q.full and p.ids.shape == q.ids.shape:
        ids, pu, qu = p.ids, p.probs, q.probs
    else:
        ids = xp.sort(xp.concat([p.ids, q.ids]))
        first = xp.concat([xp.ones((1,), dtype=xp.bool, device=device(ids)), ids[1:] != ids[:-1]])
        pu, qu = _on(p, ids), _on(q, ids)
        zero = xp.zeros_like(pu)
        pu, qu = xp.where(first, pu, zero), xp.where(first, qu, zero)
    r = xp.maximum(pu - qu, xp.zeros_like(pu))
    mass = xp.sum(r)
    positive = mass > 0
    return ids, xp.where(positive, r / xp.where(positive, mass, xp.ones_like(mass)), pu)


def sample_token(d: Dist, u: Any) -> Array:
    """Inverse-CDF sample (same rule as :func:`sample_from`) as a 0-d id array, without a host read."""
    xp = array_namespace(d.probs)
    i = xp.reshape(sample_from(d.probs, u), (1,))
    return xp.take(d.ids, i)[0]


def judge_arrays(p: Dist, q: Dist, token: Any, u_accept: Any, u_emit: Any) -> tuple[Array, Array]:
    """The acceptance rule for one draft token, as 0-d arrays ``(accepted, token to emit if rejected)``.

    No host read: the residual is sampled whether or not it is needed, so
    nothing branches on a device value.
    """
    ok = accept_mask(prob_of(p, token), prob_of(q, token), _scalar(u_accept))
    ids, r = _residual_probs(p, q)
    return ok, sample_token(Dist(ids, r), u_emit)


def _scalar(u: Any) -> Any:
    return float(u) if isinstance(u, float) else u  # numpy float64 -> float: never np.float64 * tensor


def read_ints(*arrays: Any) -> list[int]:
    """Several 0-d results to the host in **one** transfer (the one host read of a step)."""
    xp = array_namespace(*arrays)
    packed = xp.concat([xp.reshape(xp.astype(a, xp.int64), (1,)) for a in arrays])
    return [int(x) for x in packed.tolist()]


def _statuses(*dists: Dist) -> list[Any]:
    return [d.status for d in dists if d.status is not None]


def _settle(codes: list[int], dists: tuple[Dist, ...]) -> tuple[Dist, ...] | None:
    """Act on the status codes read with a result: None when all is well, else the exact dists."""
    if not any(codes):
        return None
    if NOT_FINITE in codes:
        raise not_finite_error()
    return tuple(d.exact() if d.status is not None and d.exact is not None else d for d in dists)


def sample_dist(d: Dist, u: Array) -> int:
    """Inverse-CDF sample (same rule as :func:`acceptance.sample_from`); one host read."""
    tok, *codes = read_ints(sample_token(d, u), *_statuses(d))
    again = _settle(codes, (d,))
    return tok if again is None else sample_dist(again[0], u)


def judge_draft(p: Dist, q: Dist, token: Any, u_accept: Array, u_emit: Array) -> tuple[bool, int]:
    """The acceptance rule for one draft token on sparse distributions; one host read.

    Returns (accepted, token to emit if rejected; -1 when accepted).
    """
    ok, emit = judge_arrays(p, q, token, u_accept, u_emit)
    ok, emit, *codes = read_ints(ok, emit, *_statuses(p, q))
    again = _settle(codes, (p, q))
    if again is not None:
        return judge_draft(again[0], again[1], token, u_accept, u_emit)
    return (True, -1) if ok else (False, emit)


def draft_and_judge(p: Dist, q: Dist, u_draft: Any, u_accept: Any, u_emit: Any) -> tuple[int, bool, int]:
    """One interleaved step: sample the draft token t ~ q and judge it against p; one host read.

    Returns ``(t, accepted, token to emit if rejected)``. The host needs t (or
    the emitted token) to build the next forward, so this read is the one the
    algorithm cannot avoid; everything before it stays on the device.
    """
    t = sample_token(q, u_draft)
    ok, emit = judge_arrays(p, q, t, u_accept, u_emit)
    t, ok, emit, *codes = read_ints(t, ok, emit, *_statuses(p, q))
    again = _settle(codes, (p, q))
    if again is not None:
        return draft_and_judge(again[0], again[1], u_draft, u_accept, u_emit)
    return t, bool(ok), emit
