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

Near the end of the context (or of the token budget) an iteration's window
shrinks to what fits instead of ending the generation early: w = min(lambda,
free - 1, tokens left), where ``free`` is the room left in the fullest view's
context (see :func:`window_length`). w = 0 emits one token from the judge's
distribution. Generation ends with ``context`` only when not one token fits,
as plain sampling does, so every position of the context is used.

Randomness: every iteration draws ``2 * lambda + 1`` uniforms from the
request's generator in one call (u[i] drafts token i, u[lambda + i] judges
it, u[2 * lambda] draws the emitted token), whatever its window and whether or
not all are used, so both schedules -- and every backend -- consume the stream
identically, and the first w decisions of a shrunk window are exactly those
of the full window.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from array_api_compat import array_namespace

from .acceptance import Dist, draft_and_judge, judge_draft, sample_dist, verify_window
from .arrays import like
from .contract import ForwardCall, Session, as_index
from .errors import ContextLengthError, PluginError, PromptTokenError, SessionError, one_each
from .result import Stats
from .scheduler import RoleScheduler
from .sparse import candidates, device_candidates, uniforms
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


@dataclass(frozen=True)
class Forward:
    """Op yielded by a loop: run these calls (one per view); send back their logits."""

    calls: list[ForwardCall]


@dataclass(frozen=True)
class Truncate:
    """Op yielded by a loop: forget ``view`` after ``length`` tokens."""

    view: int
    length: int


Op = Forward | Truncate
Loop = Generator[Op, Any, None]


def check_contexts(
    contexts: Sequence[Sequence[int]],
    context_length: int,
    *,
    model_max: int | None = None,
    vocab_size: int | None = None,
    token_name: Callable[[int], str] | None = None,
    prompt_tokens: Callable[[], int] | None = None,
) -> None:
    """Raise :class:`ContextLengthError` unless every view's prompt leaves room for a token.

    Every loop checks this when it starts; the API checks it too before it queues a request, so a
    prompt that does not fit is an error in the caller's thread (the server's 400, before a stream
    starts) and a batch names the row, rather than an error arriving after the request began.

    The API passes what only the backend knows, so the message can be acted on: ``model_max``, the
    model's own limit on positions (at it, a larger ``--n-ctx`` is no remedy); ``vocab_size``, to
    raise :class:`PromptTokenError` for an id the model has no embedding row for (a tokenizer with
    added tokens, the embeddings not resized), which would otherwise fail mid-request in the
    session's contract check; ``token_name`` names such a token for the message; ``prompt_tokens``
    counts the tokens of the user's own text (called only when a view is too long), so a view that is
    mostly the encoder's text (its instructions and few-shot exemplars) is not met with "shorten the
    prompt", which could never make it fit."""
    for i, c in enumerate(contexts):
        if not c:
            raise ContextLengthError(f"view {i} has an empty context; the encoder produced no tokens")
        if len(c) >= context_length:
            fits = [j for j, o in enumerate(contexts) if o and len(o) < context_length]
            if fits:
                # every view holds the same user prompt: when another view of it fits, it is what the
                # encoder adds for this view (its preference's instructions or few-shot exemplars) that
                # makes this one too long, and shortening the prompt cannot make it fit
                raise ContextLengthError(
                    f"the prompt of view {i} is {len(c)} tokens, the model's context holds {context_length}, "
                    f"though view {fits[0]} of the same prompt is {len(contexts[fits[0]])}: what the encoder "
                    "adds for this view's preference (its instructions or few-shot exemplars) makes it too "
                    "long; use a lighter encoder (--encoder plain or --encoder instruction), a shorter "
                    "preference, or a larger context (--show-prompt shows each view)"
                )
            at_max = model_max is not None and context_length >= model_max
            up_to = f", up to {model_max}" if model_max is not None else ""
            own = prompt_tokens() if prompt_tokens is not None else None
            if own is not None and own < context_length and 2 * own < len(c):
                # every view is too long, and each is mostly what the encoder adds: the prompt is not
                # what to shorten (a lighter encoder or a larger context is)
                larger = "" if at_max else f", or a larger context (--n-ctx{up_to})"
                raise ContextLengthError(
                    f"the prompt of view {i} is {len(c)} tokens, the model's context holds {context_length}, "
                    f"and only {own} of them are your text: the rest is what the encoder adds (the preferences' "
                    "instructions or few-shot exemplars, the template); use a lighter encoder (--encoder plain "
                    f"or --encoder instruction){larger} (--show-prompt shows each view)"
                )
            if at_max:
                raise ContextLengthError(
                    f"the prompt of view {i} is {len(c)} tokens, the model holds at most {model_max} positions; "
                    "shorten the prompt"
                )
            raise ContextLengthError(
                f"the prompt of view {i} is {len(c)} tokens, the model's context holds {context_length}; "
                f"shorten the prompt or raise the context size (--n-ctx{up_to})"
            )
        if vocab_size is not None:
            if min(c) < 0 or max(c) >= vocab_size:
                bad = next(t for t in c if not 0 <= t < vocab_size)
                name = f"{token_name(bad)!r} (id {bad})" if token_name is not None else f"id {bad}"
                raise PromptTokenError(
                    f"the prompt of view {i} has token {name}, which the model has no embedding for (ids "
                    f"0..{vocab_size - 1}); keep it out of the prompt, or resize the model's embeddings to its tokenizer"
                )


class Views:
    """Tracks, per view, the committed context and how much of it the session holds.

    ``fed[v]`` tokens of ``contexts[v]`` are in the session; the rest are pending
    and get fed (batched across views) the next time the view is needed.
    ``last[v]`` are the logits after the last fed token.
    """

    def __init__(self, contexts: list[list[int]], context_length: int, stats: Stats):
        self.contexts = [list(c) for c in contexts]
        self.fed = [0] * len(contexts)
        self.last: list[Array | None] = [None] * len(contexts)
        self.context_length = context_length
        self.stats = stats
        check_contexts(self.contexts, context_length)

    def pending(self, v: int) -> list[int]:
        return self.contexts[v][self.fed[v] :]

    def sync(self, views: list[int], feed_only: Sequence[int] = ()) -> Loop:
        """Feed every pending token of ``views`` (and ``feed_only``) in one batched call.

        ``views`` get fresh next-token logits; ``feed_only`` views just take
        their tokens into the KV cache with no logits (on a large vocabulary
        the output projection is most of a small model's cost). A view whose
        logits are stale is re-fed its last token when it needs them.
        """
        calls = []
        for v in dict.fromkeys(views):
            if not self.pending(v) and self.last[v] is None:
                yield Truncate(v, self.fed[v] - 1)
                self.fed[v] -= 1
            if self.pending(v):
                calls.append(ForwardCall(v, self.pending(v), 1))
        calls += [
            ForwardCall(v, self.pending(v), 0) for v in dict.fromkeys(feed_only) if v not in views and self.pending(v)
        ]
        if not calls:
            return
        outs = yield Forward(calls)
        self.stats.forwards += 1
        for (v, toks, n), logits in zip(calls, outs):
            self.fed[v] += len(toks)
            self.last[v] = logits[-1] if n else None

    def commit(self, token: int) -> None:
        for c in self.contexts:
            c.append(token)

    def free(self) -> int:
        """How many more tokens the fullest view's context holds."""
        return self.context_length - max(len(c) for c in self.contexts)

    def room(self, extra: int) -> bool:
        """Whether every view can take ``extra`` more tokens."""
        return self.free() >= extra


def token_loop(req: DecodeRequest, active: list[int], next_dist: Callable[[Views], Dist]) -> Loop:
    """One token per step: feed the ``active`` views, sample ``next_dist(views)`` with one uniform.

    The shape of every method that samples a single distribution per token
    (plain sampling, logit mixing, reward-guided re-ranking).
    """
    views = Views(req.contexts, req.context_length, req.stats)
    em = req.emitter
    while True:
        if not views.room(1):
            em.finish("context")
            return
        yield from views.sync(active)
        tok = sample_dist(next_dist(views), req.rng.random())
        req.stats.iterations += 1
        if not em.push(tok):
            return
        views.commit(tok)


def plain_loop(req: DecodeRequest) -> Loop:
    """Plain sampling from view 0 (the ``prompt`` and ``base`` methods)."""
    return token_loop(
        dataclasses.replace(req, contexts=req.contexts[:1]),
        [0],
        lambda views: device_candidates(views.last[0], req.params),
    )


def persona_judge_loop(req: DecodeRequest) -> Loop:
    """Persona-judge with the request's role and loop schedules."""
    n = len(req.contexts)
    if n == 1:
        yield from plain_loop(req)
        return
    sched = RoleScheduler(n, req.roles or "alternate")  # type: ignore[arg-type]
    views = Views(req.contexts, req.context_length, req.stats)
    step = _interleaved_iteration if req.schedule == "interleaved" else _windowed_iteration
    it = 0
    while not req.emitter.done:
        w = window_length(req.lam, views.free(), req.emitter.remaining)
        if w is None:
            req.emitter.finish("context")
            return
        d, j = sched.roles(it)
        yield from step(views, req, d, j, w)
        it += 1
        req.stats.iterations += 1


def window_length(lam: int, free: int, remaining: int | None = None) -> int | None:
    """This iteration's window: ``min(lam, free - 1, remaining)``, or None when no token fits (``free < 1``).

    An iteration of window w feeds each view at most w tokens past its
    committed context and commits at most w + 1 (the last, emitted one is
    never fed), so ``w <= free - 1`` keeps every forward inside the context
    and lets the generation use the room down to the last token, as plain
    sampling does (``token_loop``'s ``room(1)``). ``w == 0`` is an iteration
    that emits one token from the judge's distribution (what follows a fully
    accepted window). A window past the emitter's ``remaining`` budget would
    only waste forwards.

    The shrunk window changes neither the committed tokens' law nor, far
    from the end, the tokens themselves: the iteration still draws all
    ``2 * lam + 1`` uniforms and its first w decisions read the same ones as
    the full window's. A window cut to ``free - 1`` that is accepted to its
    end ends the generation with its emitted token, drawn from the same
    judge's p as the full window's next token would be; one cut to
    ``remaining`` ends it at the length limit before its emitted token.
    """
    if free < 1:
        return None
    w = min(lam, free - 1)
    return w if remaining is None else max(0, min(w, remaining))


def _interleaved_iteration(views: Views, req: DecodeRequest, d: int, j: int, w: int) -> Loop:
    lam, params, em, st = req.lam, req.params, req.emitter, req.stats
    if w == 0:  # room for one token: the judge's, as after a fully accepted window
        yield from views.sync([j])
        u = uniforms(views.last[j], req.rng.random(2 * lam + 1))
        tok = sample_dist(device_candidates(views.last[j], params), u[2 * lam])
        if em.push(tok):
            views.commit(tok)
        return
    yield from views.sync([d, j])
    # One upload of the iteration's uniforms; each step below then reads the host once (t, accept, emit).
    u = uniforms(views.last[d], req.rng.random(2 * lam + 1))
    for i in range(w):
        q = device_candidates(views.last[d], params)
        p = device_candidates(views.last[j], params)
        t, ok, emit = draft_and_judge(p, q, u[i], u[lam + i], u[2 * lam])
        st.drafted += 1
        if not ok:
            if em.push(emit):
                views.commit(emit)
            return
        st.accepted += 1
        if not em.push(t):
            return
        views.commit(t)
        if i < w - 1:
            yield from views.sync([d, j])
        else:
            # Only the judge's p_{w+1} is needed; the drafter takes the token
            # without logits, so two views stay in lockstep (one batched row each).
            yield from views.sync([j], feed_only=[d])
    tok = sample_dist(device_candidates(views.last[j], params), u[2 * lam])
    if em.push(tok):
        views.commit(tok)


def _windowed_iteration(views: Views, req: DecodeRequest, d: int, j: int, w: int) -> Loop:
    lam, params, em, st = req.lam, req.params, req.emitter, req.stats
    u = req.rng.random(2 * lam + 1)
    if w == 0:  # room for one token: the judge's, as after a fully accepted window
        yield from views.sync([j])
        tok = sample_dist(candidates(views.last[j], params), u[2 * lam])
        if em.push(tok):
            views.commit(tok)
        return
    yield from views.sync([d])
    base_d = views.fed[d]
    raw_q = [views.last[d]]
    q_dists, draft = [], []
    for i in range(w):
        q = candidates(raw_q[i], params)
        draft.append(sample_dist(q, u[i]))
        q_dists.append(q)
        if i < w - 1:
            out = yield Forward([ForwardCall(d, [draft[-1]], 1)])
            st.forwards += 1
            raw_q.append(out[0][-1])
    xp = array_namespace(raw_q[0])
    pend = views.pending(j)
    base_j = len(views.contexts[j])  # the judge's length once its pending tokens are in
    if pend:
        out = yield Forward([ForwardCall(j, pend + draft, w + 1)])
        raw_p = out[0]
    else:
        out = yield Forward([ForwardCall(j, draft, w)])
        last_j = views.last[j]
        assert last_j is not None  # nothing pending: fed and last were set together at the end of the last window
        raw_p = xp.concat([last_j[None, :], out[0]], axis=0)
    st.forwards += 1
    n_acc, emitted = _judge_window(raw_p, raw_q, q_dists, draft, u, req)
    st.accepted += n_acc
    st.drafted += min(n_acc + 1, w)  # judged tokens, as in the interleaved schedule
    # Roll back what was fed past the accepted prefix; the logits after the
    # kept prefix are already at hand (draft step m, judge row n_acc).
    m = min(n_acc, w - 1)
    if m < w - 1:
        yield Truncate(d, base_d + m)
    views.fed[d], views.last[d] = base_d + m, raw_q[m]
    if n_acc < w:
        yield Truncate(j, base_j + n_acc)
    views.fed[j], views.last[j] = base_j + n_acc, raw_p[n_acc]
    for t in draft[:n_acc] + [emitted]:
        if not em.push(t):
            return
        views.commit(t)


def _judge_window(
    raw_p: Array, raw_q: list[Array], q_dists: list[Dist], draft: list[int], u: np.ndarray, req: DecodeRequest
) -> tuple[int, int]:
    """(accepted count, emitted token) for a drafted window of ``w = len(draft)`` tokens.

    Draft token i is judged with ``u[lam + i]`` and the emitted token drawn
    with ``u[2 * lam]`` whatever w is (the randomness contract), so a window
    cut short makes the first decisions of the full one.

    Without top-k the distributions are dense anyway and the whole window is
    judged in one vectorized call; with top-k each row is judged on its
    support, row by row up to the first rejection, which on a CPU is far
    cheaper than filtering w+1 dense rows. Same decisions either way.
    """
    lam, params, w = req.lam, req.params, len(draft)
    if params.greedy or 0 < params.top_k < raw_p.shape[-1]:
        for i in range(w):
            ok, emit = judge_draft(candidates(raw_p[i], params), q_dists[i], draft[i], u[lam + i], u[2 * lam])
            if not ok:
                return i, emit
        return w, sample_dist(candidates(raw_p[w], params), u[2 * lam])
    xp = array_namespace(raw_p)
    p = filtered_probs(raw_p, params)
    q = filtered_probs(xp.stack(raw_q), params)
    ud = like(p, u)
    tokens = like(p, draft, xp.int64)
    n_acc, emitted = verify_window(p, q, tokens, ud[lam : lam + w], ud[2 * lam])
    return int(n_acc), int(emitted)


#: The most operations in a row a loop may yield without making progress -- progress being a
#: ``Forward`` with at least one call (each call feeds at least one token, or the session refuses it)
#: or, where the driver sees the request's emitter (the engine), a token committed -- before its driver
#: stops it with a :class:`PluginError`. A loop that only ever truncates, or forwards nothing, would
#: otherwise spin at 100% CPU for ever, holding its place in the batch, with nothing that could end it.
#:
#: No built-in loop comes near it, whatever its window, views or context: between two forwards they
#: yield at most two ``Truncate`` ops -- the windowed schedule's rollback of its drafter and its judge
#: (every other op of an iteration is a forward that feeds a token); :meth:`Views.sync`'s truncate of
#: a view whose logits are stale is followed by the forward that re-feeds it; the plain, ``mod`` and
#: ``pad`` loops never truncate. (A test runs every built-in with this set to 2.) Large enough, too, for
#: a plugin's search that rolls back many branches between two forwards. Read at each check, so a
#: test can lower it.
MAX_IDLE_OPS = 10_000


#: The most operations in a row a loop may yield without committing a token, where its driver sees
#: the request's emitter (the engine). :data:`MAX_IDLE_OPS` does not see a loop that feeds a token and
#: rolls it back for ever (``Forward``, ``Truncate``, ``Forward``, ...): each forward is progress to it,
#: yet nothing is ever written. A built-in loop commits a token every few ops -- at most one draft
#: window's forwards, its verification and two rollbacks (a test runs each with this set to 16) -- and
#: a plugin's search may explore thousands of branches per token, so the bound is high: at a
#: millisecond a forward, a loop that never commits is stopped within a few minutes, not never.
MAX_OPS_PER_TOKEN = 100_000


def makes_progress(op: Op) -> bool:
    """Whether ``op`` counts as progress for :data:`MAX_IDLE_OPS`: a ``Forward`` with a call."""
    return isinstance(op, Forward) and bool(op.calls)


def spinning(who: str, ops: int, op: Op) -> str:
    """The message for a loop (``who``'s) stopped by :data:`MAX_IDLE_OPS` after ``ops`` ops, the last ``op``."""
    return (
        f"{who} yielded {ops} operations in a row without feeding a token or committing one (the last: "
        f"{op!r:.60}); each step of a loop must make progress: a Forward feeds tokens, a Truncate only "
        "rolls back what forwards fed"
    )


def uncommitted(who: str, ops: int) -> str:
    """The message for a loop (``who``'s) stopped by :data:`MAX_OPS_PER_TOKEN` after ``ops`` ops."""
    return (
        f"{who} yielded {ops} operations in a row without committing a token (feeding tokens and rolling "
        "them back is no progress); each token of the answer must come within "
        f"{MAX_OPS_PER_TOKEN} operations (personajudge.core.decoding.MAX_OPS_PER_TOKEN)"
    )


def _id_range(tokens: Any) -> tuple[int, int] | None:
    """The smallest and largest id of ``tokens`` when they are a list, tuple or array of numbers (None
    otherwise, or when empty: the session says what is wrong with those). Never iterates anything else,
    which an iterator's single pass would lose before the session reads it."""
    try:
        if isinstance(tokens, np.ndarray):
            return (int(tokens.min()), int(tokens.max())) if tokens.size else None
        if isinstance(tokens, list | tuple) and tokens:
            return int(min(tokens)), int(max(tokens))
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def op_problem(op: Op, n_views: int, vocab_size: int | None = None) -> str | None:
    """What is wrong with ``op`` for a request of ``n_views`` views, in words that follow "yielded"
    (None: nothing this checks; a ``Forward``'s ``calls`` must be a list or tuple, see the engine).

    Checked where the request's own view numbers are known: a driver that maps them onto the slots of
    a shared session (:class:`StepDriver`) would otherwise index its list of slots with them, where
    view 7 of a two-view request is an ``IndexError`` and view -1 silently another of its views, and
    the session would name a slot number the loop never used. What else the session checks (an empty
    call, ``n_logits``, a view twice in one forward, the context's room) stays the session's."""
    last = n_views - 1
    if isinstance(op, Truncate):
        shown = f"Truncate({op.view!r:.20}, {op.length!r:.20})"
        v = as_index(op.view)
        if v is None or not 0 <= v < n_views:
            return f"{shown} for view {op.view!r:.20}, but the request has {n_views} views (0..{last})"
        if (n := as_index(op.length)) is None or n < 0:
            return f"{shown}; a truncate length is an int >= 0 (how many of the view's tokens to keep)"
        return None
    for call in op.calls:
        try:
            view, tokens, _ = call
        except (TypeError, ValueError):
            return f"a Forward with the call {call!r:.60}; each call is a ForwardCall(view, tokens, n_logits)"
        v = as_index(view)
        if v is None or not 0 <= v < n_views:
            return f"a Forward for view {view!r:.20}, but the request has {n_views} views (0..{last})"
        ids = _id_range(tokens) if vocab_size is not None else None
        if ids is not None and vocab_size is not None and (ids[0] < 0 or ids[1] >= vocab_size):
            bad = ids[0] if ids[0] < 0 else ids[1]
            return f"a Forward of token id {bad} on view {v}; the model's ids are 0..{vocab_size - 1}"
    return None


def not_an_op(op: Any, who: str) -> PluginError:
    """The error for a loop (``who``'s) that yielded something other than a ``Forward`` or ``Truncate``:
    a session would otherwise fail on it with an ``AttributeError`` that names no plugin."""
    return PluginError(
        f"{who} yielded a {type(op).__name__} ({op!r:.40}); a loop yields only Forward and Truncate "
        "operations (personajudge.core.decoding)"
    )


def drive(session: Session, loop: Loop) -> None:
    """Run one loop against a session (a method's ``decode`` runs its own loop through this).

    The session checks each op itself (its views are the loop's own here); a loop that makes no
    progress for :data:`MAX_IDLE_OPS` ops in a row is stopped with a :class:`PluginError` naming it."""
    who = f"the loop {getattr(loop, '__qualname__', type(loop).__name__)}"
    idle = 0
    try:
        op = next(loop)
        while True:
            if not isinstance(op, Forward | Truncate):
                raise not_an_op(op, who)
            idle = 0 if makes_progress(op) else idle + 1
            if idle > MAX_IDLE_OPS:
                raise PluginError(spinning(who, idle, op))
            if isinstance(op, Forward):
                res = session.forward_many(op.calls)
            else:
                session.truncate(op.view, op.length)
                res = None
            op = loop.send(res)
    except StopIteration:
        pass


def drive_many(session: Session, loops: list[Loop], n_views: int) -> None:
    """Run several requests' loops in lockstep, one batched forward per step.

    Request ``r``'s view ``v`` is the session's view ``r * n_views + v``; every
    step gathers the forwards of all unfinished requests into a single
    ``forward_many`` call, so a backend that batches rows serves many prompts
    at once. Requests finish at different times; the batch just shrinks, and
    a request's views are emptied as it leaves.

    A :class:`StepDriver` with a fixed set of requests, so one request's
    failure is its own here too: the others run to their end (their loops
    closed, their results emitted), then the first failed request's error is
    raised with ``.request``, its index.
    """
    driver = StepDriver(session)
    errors: dict[int, BaseException] = {}
    for r, loop in enumerate(loops):
        try:
            driver.add(r, loop, range(r * n_views, (r + 1) * n_views))
        except Exception as err:  # its own checks, as it is primed (a prompt that does not fit)
            errors[r] = err
    while len(driver):
        errors.update(driver.step()[1])
    if errors:
        first: Any = errors[min(errors)]
        first.request = min(errors)
        raise first


def run_timed(fn, session: Session, req: DecodeRequest) -> None:
    t0 = time.perf_counter()
    try:
        fn(session, req)
    finally:
        req.stats.wall_time_s = time.perf_counter() - t0
        req.stats.tokens = len(req.emitter.tokens)


class RowGroup(Protocol):
    """Requests that one object decides together (e.g. :class:`~personajudge.core.batched.BatchedJudge`).

    A member of a step driver beside the generator loops: each step the
    driver asks every row for its forward (``calls``, views numbered per
    request), runs them in the same single ``forward_many`` as the loops' and
    hands the group all its rows' results at once (``advance``), so the group
    can decide them in one vectorized pass with one host read.
    """

    def add(self, key: Any, req: DecodeRequest) -> bool: ...

    def calls(self, key: Any) -> list[ForwardCall]: ...

    def advance(self, outs: dict[Any, Sequence[Array]]) -> tuple[list[Any], dict[Any, BaseException]]: ...

    def remove(self, key: Any) -> None: ...


def _slot(slots: Sequence[int], view: Any) -> int:
    """The session view (slot) of a request's ``view``: ``slots[view]``, refused as the session refuses a
    view it lacks -- a list would take view -1 for the request's last view, and say ``IndexError``."""
    v = as_index(view)
    if v is None or not 0 <= v < len(slots):
        raise SessionError(f"view {view!r:.20} is out of range; the request has views 0..{len(slots) - 1}")
    return slots[v]


#: the most steps a :attr:`StepDriver.dirty` slot waits between two tries of its truncate (see ``reclaim``)
RECLAIM_MAX_WAIT = 64


class StepDriver:
    """Continuous batching: loops join and leave a long-lived session between steps.

    Where :func:`drive_many` runs a fixed set of requests from start to end,
    a step driver keeps one session open (sized for the most views it will
    ever hold at once) and maps each request's views onto free *slots* of it:
    ``add`` primes a loop on the slots it is given, ``step`` runs one batched
    ``forward_many`` for every active request and advances each loop by one
    op, ``remove`` drops a request and empties its slots (``truncate(slot,
    0)``: the backend frees those KV cells) so the next request can reuse
    them. Rows of different lengths and different sampling settings share a
    step: sampling happens in each request's loop, on its own logits rows.
    ``add_row`` starts a request as a row of a :class:`RowGroup` instead,
    which decides all its rows together after the same forward.

    One request's failure is its own: an exception from its loop fails only
    it, and a batched forward that raises is retried request by request so
    that the request whose calls cannot run is the one that fails. So does a
    ``truncate`` that raises, as the request rolls back or leaves; a slot
    that could not be emptied is quarantined (:attr:`dirty`) rather than
    handed to a later request with another's KV cells in it. Quarantine, not
    a reopen on the spot, since the other requests still run on this
    session. Not for the rest of the session either: a server under steady
    load never closes it, and every stuck slot would shrink its batch for
    good. Between steps :meth:`reclaim` tries ``truncate(slot, 0)`` again,
    backing off, and a slot it empties is clean and free again.
    """

    def __init__(self, session: Session):
        self.session = session
        self._loops: dict[Any, Loop] = {}
        self._groups: dict[Any, RowGroup] = {}
        self._slots: dict[Any, list[int]] = {}  # every request, in the order they joined
        self._pending: dict[Any, Op] = {}
        #: slots whose ``truncate(slot, 0)`` raised: they may hold a departed request's tokens, so no
        #: later request is started on them (the session's owner keeps them out of its free list until
        #: :meth:`reclaim` empties them)
        self.dirty: set[int] = set()
        #: per dirty slot: the step from which :meth:`reclaim` tries it again, and the steps it waited for that
        self._retry: dict[int, tuple[int, int]] = {}
        self.steps = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: Any) -> bool:
        return key in self._slots

    def add(self, key: Any, loop: Loop, slots: Sequence[int]) -> bool:
        """Start ``loop`` on ``slots`` (its view v is session view ``slots[v]``).

        Primes the loop (its checks, e.g. that the prompt fits, run here and
        raise here). Returns False when it finished without a single op.
        """
        self._check_new(key, slots)
        try:
            op = next(loop)
        except StopIteration:
            return False
        self._loops[key], self._slots[key], self._pending[key] = loop, list(slots), op
        return True

    def add_row(self, key: Any, group: RowGroup, req: DecodeRequest, slots: Sequence[int]) -> bool:
        """Start ``req`` as a row of ``group`` on ``slots``; like :meth:`add` (checks raise here)."""
        self._check_new(key, slots)
        if not group.add(key, req):
            return False
        self._groups[key], self._slots[key] = group, list(slots)
        return True

    def _check_new(self, key: Any, slots: Sequence[int]) -> None:
        if key in self._slots:
            raise ValueError(f"request {key!r} is already running")
        stuck = sorted(self.dirty.intersection(slots))
        if stuck:
            raise ValueError(
                f"slot(s) {', '.join(map(str, stuck))} could not be emptied and may hold another request's tokens"
            )

    def remove(self, key: Any) -> None:
        """Stop ``key``'s loop (if it still runs) and empty its slots.

        A loop that fails as it is closed (its ``finally`` yields another op or raises) raises that
        here, for ``key``'s request alone, once its slots are emptied all the same: the slots go back
        to the next request clean, whatever the loop did on its way out. A slot whose ``truncate``
        raises is added to :attr:`dirty` and the error raised (``key``'s alone), once every other
        slot of the request has been emptied."""
        loop = self._loops.pop(key, None)
        group = self._groups.pop(key, None)
        self._pending.pop(key, None)
        slots = self._slots.pop(key, [])
        try:
            if loop is not None:
                loop.close()
        finally:
            if group is not None:
                group.remove(key)
            self._empty(slots)

    def _empty(self, slots: Sequence[int]) -> None:
        """``truncate(slot, 0)`` each of ``slots``; those that raise go to :attr:`dirty`, and the first
        error is raised after the others are tried (one stuck slot must not leave the next one full)."""
        if self.session.closed:  # nothing left to empty; the next session starts clean
            return
        error: Exception | None = None
        for s in slots:
            try:
                self.session.truncate(s, 0)
            except Exception as err:
                self.dirty.add(s)
                self._retry[s] = (self.steps + 1, 1)
                if error is None:
                    error = err
        if error is not None:
            raise error

    def reclaim(self) -> list[int]:
        """Between steps: ``truncate(slot, 0)`` again each :attr:`dirty` slot that is due; return the slots
        it emptied, which are clean again (out of :attr:`dirty`: the owner may free them).

        A retry that raises fails no request (the slot's request has left) and keeps the slot dirty; its
        next try waits twice as many steps as the last, up to :data:`RECLAIM_MAX_WAIT`, so that a slot
        that never empties costs a truncate every few dozen steps, not one every step. The first try is
        one step after the failure. Called with no step in between, nothing is due: it never spins."""
        if self.session.closed or not self.dirty:
            return []
        clean = []
        for s in sorted(self.dirty):
            due, wait = self._retry.get(s, (self.steps, 1))
            if self.steps < due:
                continue
            try:
                self.session.truncate(s, 0)
            except Exception:
                wait = min(2 * wait, RECLAIM_MAX_WAIT)
                self._retry[s] = (self.steps + wait, wait)
                continue
            self.dirty.discard(s)
            self._retry.pop(s, None)
            clean.append(s)
        return clean

    def step(self) -> tuple[list[Any], dict[Any, BaseException]]:
        """One batched forward for every active request.

        Returns the keys that finished and the keys that failed (with their
        exceptions); both are already removed and their slots emptied.
        """
        results: dict[Any, Any] = {}
        failed: dict[Any, BaseException] = {}
        calls: dict[Any, list[ForwardCall]] = {}
        for key, slots in self._slots.items():
            group = self._groups.get(key)
            if group is not None:
                try:
                    calls[key] = [ForwardCall(slots[v], toks, n) for v, toks, n in group.calls(key)]
                except Exception as err:
                    failed[key] = err
                continue
            op = self._pending[key]
            if isinstance(op, Truncate):
                try:
                    self.session.truncate(_slot(slots, op.view), op.length)
                    results[key] = None
                except Exception as err:
                    failed[key] = err
            else:
                try:  # a malformed op is its request's own failure, not the step's (which fails them all)
                    calls[key] = [ForwardCall(_slot(slots, v), toks, n) for v, toks, n in op.calls]
                except Exception as err:
                    failed[key] = err
        if calls:
            flat = [c for cs in calls.values() for c in cs]
            try:
                outs = self.session.forward_many(flat)
            except Exception as err:
                if len(calls) == 1:
                    failed[next(iter(calls))] = err
                else:  # isolate: one request's calls at a time
                    for key, cs in calls.items():
                        try:
                            results[key] = self.session.forward_many(cs)
                        except Exception as err:
                            failed[key] = err
            else:
                k = 0
                for key, cs in calls.items():
                    results[key] = outs[k : k + len(cs)]
                    k += len(cs)
        self.steps += 1
        finished = []
        rows: dict[int, tuple[RowGroup, dict[Any, Any]]] = {}
        for key in list(self._slots):
            if key in failed:
                continue
            group = self._groups.get(key)
            if group is not None:
                rows.setdefault(id(group), (group, {}))[1][key] = results[key]
                continue
            try:
                self._pending[key] = self._loops[key].send(results.get(key))
            except StopIteration:
                finished.append(key)
            except Exception as err:
                failed[key] = err
        for group, members in rows.values():
            try:
                done, errors = group.advance(members)
            except Exception as err:  # the group's own failure: every row it was deciding, an error each
                done, errors = [], dict(zip(members, one_each(err, len(members))))
            finished += done
            failed.update(errors)
        for key in finished + list(failed):
            try:
                self.remove(key)
            except Exception as err:  # its loop failed as it was closed: its own failure
                failed.setdefault(key, err)
        finished = [key for key in finished if key not in failed]
        return finished, failed
