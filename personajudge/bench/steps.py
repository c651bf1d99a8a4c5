"""What one decoding step costs on a backend, and the speed the step model estimates for persona-judge.

Persona-judge's speed is set almost entirely by the forwards its loop issues, so ``personajudge
bench`` times those forwards next to the end-to-end numbers. Which forwards, exactly, depends on the
schedule (``interleaved`` or ``windowed``), the role schedule (``alternate`` / ``round-robin`` /
``fixed``), the number of views K and λ. Rather than restate that from memory, :func:`loop_cycle`
*runs* :func:`~personajudge.core.decoding.persona_judge_loop` (the loop the bench times) against
logits that are the same for every view, so every draft is accepted, and reads off the
``forward_many`` calls of one role cycle in the steady state (after every view has fed its prompt):
each call with its views *in the order the loop issues them* (on llama.cpp a batch's view order
changes its cost by ~30 %), the tokens each view feeds and the logits rows it wants.

Derived from core/decoding.py, a cycle of P iterations (P = 2 for two alternating views, K for K
rotating views, K - 1 for fixed roles with K > 2, 1 for fixed roles with two views) at full
acceptance commits P·(λ+1) tokens with:

- ``interleaved``: per iteration (d drafts, j judges), λ batched steps ``[(d, 1 token, 1 row),
  (j, 1 token, 1 row)]`` (the first of them also feeds j what it missed while idle: with K > 2 views,
  1 + (K-2)(λ+1) tokens) and one step ``[(j, 1, 1 row), (d, 1, no row)]``; with alternating roles
  half of the iterations have d, j = 0, 1 and half 1, 0;
- ``windowed``: per iteration λ single-view draft steps ``(d, 1 token, 1 row)`` (the first feeds
  what d has pending) and one verification ``(j, pending + λ tokens, λ+1 rows)``.

:func:`step_costs` times each distinct call of the cycle on the backend (isolated, rolled back, all
steps in turn per repeat, median of the repeats) and gives the *step model*

    per_token_ms = Σ_steps count · median_ms / (P · (λ + 1))
    estimate_tokens_per_s = 1000 / per_token_ms,   estimate_ratio = plain_step_ms / per_token_ms

what the loop's forwards would cost per committed token at full acceptance if each cost what it
costs alone. This is an estimate that explains the speed, **not** a bound: on llama.cpp (CPU) a
step timed alone, rolled back and repeated, can cost more than the same step inside a run (audit 2
measured a persona-judge run at 41 ms a token against a modelled 45 ms, so the run beat the model)
or less (other runs: 33.6 ms modelled against 39.7 ms measured at full acceptance).
The bench's *ceiling* is therefore measured, not modelled (``personajudge.bench.run_bench``): the
persona-judge loop itself, with the run's K, schedule, roles, λ and length, on K copies of the first
view's prompt, so p == q and every draft is accepted. A rejection commits fewer tokens for the same
or more forwards (interleaved: one two-view step per token, against (λ·two-row + one-row)/(λ+1) at
full acceptance; windowed: the whole window's forwards for fewer tokens) and adds the residual's
work, so that run's tokens/s bounds the persona-judge row's from above, up to the noise of the
machine. The reference method (no KV cache) and one-view runs are not modelled.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from personajudge.core.contract import ForwardCall, Session
from personajudge.core.decoding import DecodeRequest, Forward, Truncate, persona_judge_loop
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams

#: one forward_many call: (view, tokens fed, logits rows) per view, in the loop's order
Shape = tuple[tuple[int, int, int], ...]

#: the plain baseline's step: one view, one token, one logits row
PLAIN_STEP: Shape = ((0, 1, 1),)


def device_sync() -> None:
    """Wait for every queued kernel on the GPU (a no-op without CUDA in use).

    CUDA runs asynchronously: a clock read right after a step returns measures
    the launches, not the work; and work still queued from before the clock
    starts would be charged to the step.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _wait(outs: list[Any]) -> None:
    """Make an asynchronous backend finish the step before the clock stops."""
    device_sync()
    for out in outs:
        if getattr(out, "shape", (0,))[0]:
            float(out[-1][0])


class _NoText:
    """The tokenizer of a simulated run: no EOS, and no text is ever read (no stop strings, no guard)."""

    eos_token_ids: tuple[int, ...] = ()

    def decode(self, ids: Sequence[int]) -> str:  # pragma: no cover - never called without stop strings
        return ""


def _period(n_views: int, roles: str) -> int:
    """Iterations until the role scheduler repeats (core/scheduler.py)."""
    if roles == "fixed":
        return max(1, n_views - 1)
    return n_views


def _simulate(n_views: int, lam: int, schedule: str, roles: str, iterations: int) -> tuple[Counter[Shape], int]:
    """The forward_many shapes of the real loop over ``iterations`` fully accepted iterations."""
    req = DecodeRequest(
        contexts=[[1, 2] for _ in range(n_views)],
        params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
        lam=lam,
        rng=np.random.default_rng(0),
        emitter=Emitter(_NoText(), max_new_tokens=iterations * (lam + 1), eos_token_ids=()),  # type: ignore[arg-type]
        context_length=10**7,
        roles=roles,
        schedule=schedule,
    )
    loop = persona_judge_loop(req)
    shapes: Counter[Shape] = Counter()
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))  # the same for every view: p == q, every draft accepted
    try:
        op = next(loop)
        while True:
            if isinstance(op, Truncate):  # only a rejection rolls back
                raise AssertionError("the simulated loop rolled back: it did not accept every draft")
            assert isinstance(op, Forward)
            shapes[tuple((int(c[0]), len(c[1]), int(c[2])) for c in op.calls)] += 1
            op = loop.send([np.tile(logits, (int(c[2]), 1)) for c in op.calls])
    except StopIteration:
        pass
    if req.stats.accepted != req.stats.drafted:
        raise AssertionError("the simulated loop rejected a draft")
    return shapes, len(req.emitter.tokens)


def loop_cycle(
    n_views: int, lam: int, schedule: str = "interleaved", roles: str = "alternate"
) -> tuple[list[tuple[Shape, int]], int]:
    """The calls of one steady-state role cycle of persona-judge at full acceptance, and its tokens.

    Found by running the loop twice (warm-up + one cycle, warm-up + two cycles) and taking the
    difference, so the prompts' prefill and each view's first catch-up are left out.
    Returns ``([(shape, count), ...], tokens)`` in the order the shapes first occur.
    """
    if n_views < 2:
        raise ValueError("the persona-judge ceiling needs two views or more")
    p = _period(n_views, roles)
    warm = 2 * n_views  # every view has fed its prompt and caught up once
    one, t1 = _simulate(n_views, lam, schedule, roles, warm + p)
    two, t2 = _simulate(n_views, lam, schedule, roles, warm + 2 * p)
    diff = two.copy()
    diff.subtract(one)
    if any(v < 0 for v in diff.values()) or t2 - t1 != p * (lam + 1):
        raise AssertionError(f"no steady state found for {n_views} views, {schedule}, {roles}")
    order = list(dict.fromkeys(list(two)))
    return [(s, diff[s]) for s in order if diff[s] > 0], t2 - t1


def step_costs(
    session: Session,
    contexts: Sequence[Sequence[int]],
    *,
    lam: int,
    schedule: str = "interleaved",
    roles: str = "alternate",
    repeats: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Median milliseconds of the plain step and of each step of :func:`loop_cycle`, and the ceiling.

    ``contexts`` are the K views' prompts (``session`` holds K views). They are fed once, and every
    timed step is rolled back, so each step sees the same context length. Each round runs every
    step once in turn (plain's, then the cycle's), so a load that comes and goes falls on all of
    them alike; the first round is an untimed warm-up.
    """
    k = len(contexts)
    if k < 2 or session.n_views < k:
        raise ValueError("step costs need two views or more, and a session that holds them")
    cycle, tokens = loop_cycle(k, lam, schedule, roles)
    base = [len(c) for c in contexts]
    session.forward_many([ForwardCall(v, list(contexts[v]), 1) for v in range(k)])
    last = [int(c[-1]) for c in contexts]
    shapes = [PLAIN_STEP] + [s for s, _ in cycle]
    times: dict[Shape, list[float]] = {s: [] for s in shapes}
    for r in range(repeats + 1):
        for shape in shapes:
            calls = [ForwardCall(v, [last[v]] * n, rows) for v, n, rows in shape]
            device_sync()
            t0 = clock()
            _wait(session.forward_many(calls))
            dt = clock() - t0
            for v, _, _ in shape:
                session.truncate(v, base[v])
            if r:
                times[shape].append(dt * 1e3)
    med = {s: statistics.median(t) for s, t in times.items()}
    per_token = sum(med[s] * n for s, n in cycle) / tokens
    return {
        "schedule": schedule,
        "roles": roles,
        "views": k,
        "lambda": lam,
        "plain_step_ms": med[PLAIN_STEP],
        "cycle": [{"calls": [list(c) for c in s], "count": n, "ms": med[s]} for s, n in cycle],
        "cycle_tokens": tokens,
        "per_token_ms": per_token,
        "estimate_tokens_per_s": 1e3 / per_token,
        "estimate_ratio": estimate_ratio({"plain_step_ms": med[PLAIN_STEP], "per_token_ms": per_token}),
    }


def estimate_ratio(costs: dict[str, Any]) -> float:
    """The step model's persona-judge over plain: the plain step over the cycle's cost per token (an
    estimate, not a bound: see the module's docstring)."""
    return float(costs["plain_step_ms"]) / float(costs["per_token_ms"])


def _call(c: Sequence[int]) -> str:
    v, n, rows = c
    return f"v{v}:{n}t/{rows}r"


def format_steps(costs: dict[str, Any]) -> str:
    """Two lines: each step of the cycle with its cost, then the step model's estimate."""
    steps = ", ".join(f"[{' '.join(_call(c) for c in s['calls'])}] x{s['count']} {s['ms']:.2f}" for s in costs["cycle"])
    return (
        f"step costs (ms, median; [view:tokens/logits rows, in call order] x times per cycle of "
        f"{costs['cycle_tokens']} tokens): plain step {costs['plain_step_ms']:.2f}; persona-judge ({costs['views']} views, {costs['schedule']}, "
        f"roles {costs['roles']}, lambda {costs['lambda']}): {steps}\n"
        f"step model (each step as it costs alone, at full acceptance; an estimate, not a bound): "
        f"{costs['per_token_ms']:.2f} ms a token, {costs['estimate_tokens_per_s']:.1f} tokens/s = "
        f"{costs['estimate_ratio']:.2f} of the plain step"
    )
