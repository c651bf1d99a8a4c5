"""The decoding loops: plain sampling and Persona-judge (two schedules).

Both Persona-judge schedules make the same decisions from the same uniforms:

- ``windowed`` is the algorithm as stated: the draft view samples lambda tokens,
  the judge scores them in one (lambda+1)-token forward, the vectorized rule
  decides, and both views roll back the rejected positions.
- ``interleaved`` feeds each draft token to the draft *and* the judge view in
  one batched forward (two sequences, one token each). That forward yields
  q_{i+1} and p_{i+1} together, so a rejection is known before anything is
  drafted past it: no wasted draft tokens and no rollback. The window, the
  roles and the emitted distribution are unchanged.

Randomness: every iteration draws ``2 * lambda + 1`` uniforms from the
request's generator in one call (lambda for drafting, lambda for acceptance,
one for the emitted token), whether or not all are used, so both schedules --
and every backend -- consume the stream identically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .acceptance import judge_token, sample_from, verify_window
from .contract import Session
from .errors import ContextLengthError
from .result import Stats
from .scheduler import RoleScheduler
from .stopping import Emitter
from .transforms import SamplingParams, filtered_probs

Array = Any


@dataclass
class DecodeRequest:
    """What a decoding loop needs; built by the runner from a RunConfig."""

    contexts: list[list[int]]
    params: SamplingParams
    lam: int
    rng: np.random.Generator
    emitter: Emitter
    context_length: int
    roles: str | None = None
    schedule: str = "interleaved"
    stats: Stats = field(default_factory=Stats)


class Views:
    """Tracks, per view, the committed context and how much of it the session holds.

    ``fed[v]`` tokens of ``contexts[v]`` are in the session; the rest are pending
    and get fed (batched across views) the next time the view is needed.
    ``last[v]`` are the logits after the last fed token.
    """

    def __init__(self, session: Session, contexts: list[list[int]], context_length: int, stats: Stats):
        self.session = session
        self.contexts = [list(c) for c in contexts]
        self.fed = [0] * len(contexts)
        self.last: list[Array | None] = [None] * len(contexts)
        self.context_length = context_length
        self.stats = stats
        for i, c in enumerate(self.contexts):
            if not c:
                raise ContextLengthError(f"view {i} has an empty context; the encoder produced no tokens")
            if len(c) >= context_length:
                raise ContextLengthError(
                    f"the prompt of view {i} is {len(c)} tokens, the model's context holds {context_length}; "
                    "shorten the prompt or raise the context size (--n-ctx)")

    def pending(self, v: int) -> list[int]:
        return self.contexts[v][self.fed[v]:]

    def sync(self, views: list[int]) -> None:
        """Feed every pending token of ``views`` in one batched call."""
        calls = [(v, self.pending(v), 1) for v in dict.fromkeys(views) if self.pending(v)]
        if not calls:
            return
        outs = self.session.forward_many(calls)
        self.stats.forwards += 1
        for (v, toks, _), logits in zip(calls, outs):
            self.fed[v] += len(toks)
            self.last[v] = logits[-1]

    def commit(self, token: int) -> None:
        for c in self.contexts:
            c.append(token)

    def room(self, extra: int) -> bool:
        """Whether every view can take ``extra`` more tokens."""
        return max(len(c) for c in self.contexts) + extra <= self.context_length

    def rollback(self, v: int, length: int, last: Array) -> None:
        if self.session.length(v) > length:
            self.session.truncate(v, length)
        self.fed[v] = length
        self.last[v] = last


def _to_host_uniforms(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random(n)


def _dev_array(ref: Array, values: np.ndarray) -> Array:
    """Uniforms on the device and dtype of ``ref`` (one tiny copy per iteration)."""
    xp = array_namespace(ref)
    from array_api_compat import device

    return xp.asarray(values, dtype=ref.dtype, device=device(ref))


def decode_plain(session: Session, req: DecodeRequest) -> None:
    """Plain sampling from view 0 (the ``prompt`` and ``base`` methods)."""
    views = Views(session, req.contexts[:1], req.context_length, req.stats)
    em = req.emitter
    while True:
        if not views.room(1):
            em.finish("context")
            return
        views.sync([0])
        p = filtered_probs(views.last[0], req.params)
        u = _dev_array(p, req.rng.random(1))
        tok = int(sample_from(p, u[0]))
        req.stats.iterations += 1
        if not em.push(tok):
            return
        views.commit(tok)


def decode_persona_judge(session: Session, req: DecodeRequest) -> None:
    """Persona-judge with the request's role and loop schedules."""
    n = len(req.contexts)
    if n == 1:
        decode_plain(session, req)
        return
    sched = RoleScheduler(n, req.roles or "alternate")  # type: ignore[arg-type]
    views = Views(session, req.contexts, req.context_length, req.stats)
    step = _interleaved_iteration if req.schedule == "interleaved" else _windowed_iteration
    it = 0
    while not req.emitter.done:
        if not views.room(req.lam + 2):
            req.emitter.finish("context")
            return
        d, j = sched.roles(it)
        step(views, req, d, j)
        it += 1
        req.stats.iterations += 1


def _interleaved_iteration(views: Views, req: DecodeRequest, d: int, j: int) -> None:
    lam, params, em, st = req.lam, req.params, req.emitter, req.stats
    views.sync([d, j])
    u_host = req.rng.random(2 * lam + 1)
    u = None
    for i in range(lam):
        q = filtered_probs(views.last[d], params)
        p = filtered_probs(views.last[j], params)
        if u is None:
            u = _dev_array(q, u_host)
        t = int(sample_from(q, u[i]))
        st.drafted += 1
        ok, emit = judge_token(p, q, t, u[lam + i], u[2 * lam])
        if not ok:
            if em.push(emit):
                views.commit(emit)
            return
        st.accepted += 1
        if not em.push(t):
            return
        views.commit(t)
        views.sync([d, j] if i < lam - 1 else [j])
    p = filtered_probs(views.last[j], params)
    tok = int(sample_from(p, u[2 * lam]))
    if em.push(tok):
        views.commit(tok)


def _windowed_iteration(views: Views, req: DecodeRequest, d: int, j: int) -> None:
    lam, params, em, st = req.lam, req.params, req.emitter, req.stats
    session = views.session
    u_host = req.rng.random(2 * lam + 1)
    views.sync([d])
    base_d = views.fed[d]
    raw_q = [views.last[d]]
    q_rows, draft = [], []
    u = None
    for i in range(lam):
        q = filtered_probs(raw_q[i], params)
        if u is None:
            u = _dev_array(q, u_host)
        t = int(sample_from(q, u[i]))
        draft.append(t)
        q_rows.append(q)
        if i < lam - 1:
            raw_q.append(session.forward(d, [t], 1)[-1])
            st.forwards += 1
    st.drafted += lam
    xp = array_namespace(q_rows[0])
    pend = views.pending(j)
    base_j = len(views.contexts[j])  # judge's length once its pending tokens are in
    if pend:
        raw_p = session.forward(j, pend + draft, lam + 1)
    else:
        raw_p = xp.concat([views.last[j][None, :], session.forward(j, draft, lam)], axis=0)
    st.forwards += 1
    p = filtered_probs(raw_p, params)
    tokens = xp.asarray(draft, dtype=xp.int64, device=_device(p))
    n_acc, emitted = verify_window(p, xp.stack(q_rows), tokens, u[lam:2 * lam], u[2 * lam])
    n_acc, emitted = int(n_acc), int(emitted)
    st.accepted += n_acc
    m = min(n_acc, lam - 1)
    views.rollback(d, base_d + m, raw_q[m])
    views.rollback(j, base_j + n_acc, raw_p[n_acc])
    for t in draft[:n_acc] + [emitted]:
        if not em.push(t):
            return
        views.commit(t)


def _device(x: Array):
    from array_api_compat import device

    return device(x)


def run_timed(fn, session: Session, req: DecodeRequest) -> None:
    t0 = time.perf_counter()
    try:
        fn(session, req)
    finally:
        req.stats.wall_time_s = time.perf_counter() - t0
        req.stats.tokens = len(req.emitter.tokens)
