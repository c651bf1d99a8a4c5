"""What one decoding step costs on a backend, and the speed ceiling that implies.

Persona-judge's tokens/s over plain decoding is set almost entirely by four
step costs of the backend on this machine, so ``personajudge bench`` measures
them next to the end-to-end numbers. With the default interleaved schedule
every committed token costs one batched step over two views. In a window
whose λ drafts are all accepted, λ of those steps need logits from both views
and one (the judge's last position) from one view. Plain decoding costs one
single-view step with logits. At full acceptance that gives the ceiling

    one_view_one_row / ((λ · two_views_two_rows + two_views_one_row) / (λ + 1))

before any per-token work on the CPU (sampling, the acceptance rule), and a
rejection only adds two-row steps. On a GPU a batch of two views costs about
one view and the ceiling is near 1. On a small CPU model with a large
vocabulary, each logits row is a full output projection, and the ceiling is
well below 1.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from personajudge.core.contract import Session

#: name -> the forward_many calls of one step, given a token per view
STEPS: dict[str, Callable[[int, int], list[tuple[int, list[int], int]]]] = {
    "one_view_one_row": lambda a, b: [(0, [a], 1)],
    "one_view_no_row": lambda a, b: [(0, [a], 0)],
    "two_views_two_rows": lambda a, b: [(0, [a], 1), (1, [b], 1)],
    "two_views_one_row": lambda a, b: [(0, [a], 1), (1, [b], 0)],
}


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


def step_costs(
    session: Session,
    contexts: Sequence[Sequence[int]],
    *,
    lam: int,
    repeats: int = 20,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds of each step in :data:`STEPS`, and the ceiling they imply for ``lam``.

    ``contexts`` are the two views' prompts. They are fed once, and every
    timed step is rolled back, so each step sees the same context length. Each
    step is run once untimed first, to warm up.
    """
    if session.n_views < 2 or len(contexts) < 2:
        raise ValueError("step costs need a session with two views")
    base = [len(c) for c in contexts[:2]]
    session.forward_many([(v, list(contexts[v]), 1) for v in (0, 1)])
    a, b = int(contexts[0][-1]), int(contexts[1][-1])
    res: dict[str, float] = {}
    for name, make in STEPS.items():
        times = []
        for r in range(repeats + 1):
            calls = make(a, b)
            device_sync()
            t0 = clock()
            _wait(session.forward_many(calls))
            dt = clock() - t0
            for v, _, _ in calls:
                session.truncate(v, base[v])
            if r:
                times.append(dt * 1e3)
        res[f"{name}_ms"] = statistics.median(times)
    res["ceiling_ratio"] = ceiling(res, lam)
    return res


def ceiling(costs: dict[str, float], lam: int) -> float:
    """Persona-judge over plain tokens/s at full acceptance, from the step costs alone."""
    per_token = (lam * costs["two_views_two_rows_ms"] + costs["two_views_one_row_ms"]) / (lam + 1)
    return costs["one_view_one_row_ms"] / per_token


def format_steps(costs: dict[str, float]) -> str:
    return (
        f"step costs (ms, median): 1 view 1 logits row {costs['one_view_one_row_ms']:.1f}, "
        f"1 view no row {costs['one_view_no_row_ms']:.1f}, 2 views 2 rows {costs['two_views_two_rows_ms']:.1f}, "
        f"2 views 1 row {costs['two_views_one_row_ms']:.1f}; persona-judge ceiling at full acceptance "
        f"{costs['ceiling_ratio']:.2f} of plain"
    )
