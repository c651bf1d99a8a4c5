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

from dataclasses import dataclass
from typing import Any

from .arrays import array_namespace, device

Array = Any


def sample_from(probs: Array, u: Array) -> Array:
    """Inverse-CDF sample along the last axis: one index per row for uniform ``u``.

    ``probs`` need not be normalized. A zero-probability entry is never
    returned, even when ``u`` rounds to the top of the CDF.
    """
    xp = array_namespace(probs)
    cdf = xp.cumulative_sum(probs, axis=-1)
    total = cdf[..., -1:]
    u = xp.asarray(u, dtype=probs.dtype, device=device(probs))
    below = (cdf <= u[..., None] * total) & (cdf < total)
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


@dataclass(frozen=True)
class Dist:
    """A distribution over ``ids`` (sorted ascending); every other token has probability 0."""

    ids: Array
    probs: Array


def prob_of(d: Dist, token: int) -> Array:
    """d(token), 0 when the token is outside the support."""
    xp = array_namespace(d.probs)
    pos = int(xp.searchsorted(d.ids, xp.asarray(token, dtype=d.ids.dtype, device=device(d.ids))))
    if pos < d.ids.shape[0] and int(d.ids[pos]) == token:
        return d.probs[pos]
    return xp.asarray(0.0, dtype=d.probs.dtype, device=device(d.probs))


def _on(d: Dist, ids: Array) -> Array:
    """d's probabilities at the (sorted) ``ids``."""
    xp = array_namespace(d.probs)
    n = d.ids.shape[0]
    pos = xp.searchsorted(d.ids, ids)
    pos_c = xp.clip(pos, max=n - 1) if hasattr(xp, "clip") else xp.minimum(pos, n - 1)
    hit = xp.take(d.ids, pos_c) == ids
    return xp.where(hit, xp.take(d.probs, pos_c), xp.zeros_like(xp.take(d.probs, pos_c)))


def residual_dist(p: Dist, q: Dist) -> Dist:
    """norm(max(0, p - q)) on the union of supports; p itself when the mass is zero."""
    xp = array_namespace(p.probs)
    ids = xp.sort(xp.unique_values(xp.concat([p.ids, q.ids])))
    pu, qu = _on(p, ids), _on(q, ids)
    r = xp.maximum(pu - qu, xp.zeros_like(pu))
    mass = float(xp.sum(r))
    if mass > 0:
        return Dist(ids, r / mass)
    return p


def sample_dist(d: Dist, u: Array) -> int:
    """Inverse-CDF sample (same rule as :func:`acceptance.sample_from`)."""
    return int(d.ids[int(sample_from(d.probs, u))])


def judge_draft(p: Dist, q: Dist, token: int, u_accept: Array, u_emit: Array) -> tuple[bool, int]:
    """The acceptance rule for one draft token on sparse distributions.

    Returns (accepted, token to emit if rejected; -1 when accepted).
    """
    if bool(accept_mask(prob_of(p, token), prob_of(q, token), u_accept)):
        return True, -1
    return False, sample_dist(residual_dist(p, q), u_emit)
