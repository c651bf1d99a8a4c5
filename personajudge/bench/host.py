"""``python -m personajudge.bench.host``: host time per decoding step against batch size.

On a GPU a 32-row forward costs about what a 2-row one does, so what grows
with the batch is the host's work around it. This measures exactly that: a
stub session whose forward costs next to nothing (it hands out preallocated
logits rows, torch tensors of a 32000-token vocabulary by default) is stepped
by a :class:`~personajudge.core.decoding.StepDriver` holding ``B`` two-view
Persona-judge requests, once as generator loops (one filtered support pair,
one acceptance call and one host read per request per step) and once as rows
of one :class:`~personajudge.core.batched.BatchedJudge` (one vectorized
decision and one read per step for all of them). Both paths (and the compiled
one with ``--compile``) run in the same process side by side, step for step:
each has its own driver, and every step of the loop steps each driver once in
turn (the warm-up steps first), so a load that comes and goes on a shared
machine falls on every path alike. The table gives the median microseconds per
step and per request.

On a CPU the "device" is the host too, so the batched path's time includes
its kernels' arithmetic on (B, V) arrays; on a GPU that work is queued
asynchronously and the host waits once per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from personajudge.backends.hf import CompiledKernel
from personajudge.bench.options import at_least, counts
from personajudge.core.batched import BatchedJudge, Kernel, judge_rows
from personajudge.core.contract import ForwardCall, Session
from personajudge.core.decoding import DecodeRequest, StepDriver, persona_judge_loop
from personajudge.core.result import Stats
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)


class _Tokenizer:
    """Letters for text; no EOS, so no request ends while it is timed."""

    chat_template: str | None = None
    eos_token_ids: frozenset[int] = frozenset()

    def __init__(self, vocab: int):
        self.vocab_size = vocab

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return [1 + ord(c) % 26 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def apply_chat_template(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        raise NotImplementedError


class StubSession(Session):
    """A forward that costs ~nothing: rows of a preallocated pool, picked by each view's length."""

    def __init__(self, n_views: int, pool: Any, empty: Any):
        super().__init__(n_views, 1 << 30, None)
        self.pool, self.empty = pool, empty

    def _forward_many(self, calls: list[ForwardCall]) -> list[Any]:
        n = len(self.pool)
        return [self.pool[(self.length(c.view) + c.view) % n] if c.n_logits else self.empty for c in calls]

    def _truncate(self, view: int, length: int) -> None:
        pass


def endless_request(
    tok: Any, contexts: list[list[int]], *, seed: int, lam: int, params: SamplingParams, context_length: int = 1 << 30
) -> DecodeRequest:
    """A Persona-judge request (interleaved, alternating roles) with no token limit: it runs until its
    timer stops stepping it. Also the GPU check's host profile (``examples/gpu_check.py``)."""
    return DecodeRequest(
        contexts=contexts,
        params=params,
        lam=lam,
        rng=np.random.default_rng(seed),
        emitter=Emitter(tok, max_new_tokens=1 << 30),
        context_length=context_length,
        roles="alternate",
        stats=Stats(),
    )


def _requests(batch: int, vocab: int, lam: int, params: SamplingParams) -> list[DecodeRequest]:
    tok = _Tokenizer(vocab)
    return [
        endless_request(tok, [[1 + (i + v) % 26] * 8 for v in range(2)], seed=i, lam=lam, params=params)
        for i in range(batch)
    ]


#: one timed path: (batched, kernel); (False, None) is the generator loops
Path = tuple[bool, "Kernel | None"]


def _driver(batch: int, path: Path, *, pool: Any, empty: Any, lam: int, params: SamplingParams) -> StepDriver:
    """A driver holding ``batch`` two-view requests on a stub session of its own, stepped one way."""
    batched, kernel = path
    session = StubSession(2 * batch, pool, empty)
    driver, judge = StepDriver(session), BatchedJudge(kernel)
    for i, req in enumerate(_requests(batch, pool.shape[-1], lam, params)):
        slots = [2 * i, 2 * i + 1]
        if batched:
            driver.add_row(i, judge, req, slots)
        else:
            driver.add(i, persona_judge_loop(req), slots)
    return driver


def time_paths(
    batch: int,
    paths: Sequence[Path],
    *,
    pool: Any,
    empty: Any,
    steps: int,
    warmup: int,
    lam: int,
    params: SamplingParams,
    clock: Any = time.perf_counter,
) -> list[float]:
    """Median seconds of one ``StepDriver.step()`` with ``batch`` two-view requests, per path, the paths
    stepped in turn (step n of every path, then step n + 1 of every path; warm-up steps first)."""
    drivers = [_driver(batch, p, pool=pool, empty=empty, lam=lam, params=params) for p in paths]
    times: list[list[float]] = [[] for _ in paths]
    for n in range(warmup + steps):
        for driver, out in zip(drivers, times):
            t0 = clock()
            finished, failed = driver.step()
            dt = clock() - t0
            if finished or failed:
                raise RuntimeError(f"a request left the timed batch: {failed or finished}")
            if n >= warmup:
                out.append(dt)
    return [statistics.median(t) for t in times]


def time_steps(
    batch: int,
    batched: bool,
    *,
    pool: Any,
    empty: Any,
    steps: int,
    warmup: int,
    lam: int,
    params: SamplingParams,
    kernel: Kernel | None = None,
) -> float:
    """Median seconds of one ``StepDriver.step()`` with ``batch`` two-view requests, one path alone."""
    return time_paths(
        batch, [(batched, kernel)], pool=pool, empty=empty, steps=steps, warmup=warmup, lam=lam, params=params
    )[0]


def _check_torch_flags(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``--device`` and ``--compile`` name things torch has here, or the run stops before it starts."""
    import torch  # an optional dependency: only this benchmark's torch mode needs it

    try:
        dev = torch.device(a.device)
    except (RuntimeError, ValueError):
        ap.error(f"--device: {a.device!r} is not a torch device (cpu, cuda, cuda:N, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device here")
    if a.compile is not None:
        if a.compile not in torch._dynamo.list_backends(exclude_tags=()):
            common = ", ".join(torch._dynamo.list_backends())  # without the debug and experimental ones
            ap.error(f"--compile: no torch.compile backend {a.compile!r}; for example: {common}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m personajudge.bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--batch-sizes", type=counts(1), default=list(DEFAULT_BATCHES), help="comma-separated (default 1,2,4,8,16,32)"
    )
    ap.add_argument("--vocab", type=at_least(2), default=32000)
    ap.add_argument("--steps", type=at_least(1), default=60, help="timed steps per configuration")
    ap.add_argument("--warmup", type=at_least(0), default=10)
    ap.add_argument("--lam", type=at_least(1), default=4)
    ap.add_argument("--threads", type=at_least(1), default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="where the stub's logits live (torch device)")
    ap.add_argument("--numpy", action="store_true", help="numpy logits instead of torch tensors")
    ap.add_argument(
        "--compile",
        metavar="BACKEND",
        help="also time the batched path with its judge compiled by torch.compile(backend=BACKEND), "
        "as the hf backend's compile option does (inductor: generated code; needs a C compiler on the CPU)",
    )
    a = ap.parse_args(argv)
    if a.compile and a.numpy:
        ap.error("--compile needs torch tensors; drop --numpy")
    if not a.numpy:
        _check_torch_flags(ap, a)
    params = SamplingParams()  # the paper's defaults: temperature 0.7, top-k 20, top-p 0.9
    g = np.random.default_rng(0)
    rows = (g.standard_normal((64, 1, a.vocab)) * 2).astype(np.float32)
    pool: Any
    empty: Any
    if a.numpy:
        pool, empty, where = rows, np.zeros((0, a.vocab), np.float32), "numpy"
    else:
        import torch  # an optional dependency: only this benchmark's torch mode needs it

        torch.set_num_threads(a.threads)
        pool = torch.from_numpy(rows).to(a.device)
        empty = torch.zeros((0, a.vocab), device=a.device)
        where = f"torch {torch.__version__} on {a.device}, {a.threads} thread(s)"
    batches = a.batch_sizes
    print(f"host time per StepDriver.step(), stub forward ({where}), vocab {a.vocab}, two views, lambda {a.lam},")
    print(f"temperature {params.temperature}, top-k {params.top_k}, top-p {params.top_p}; median of {a.steps} steps")
    print()
    kernel = None
    if a.compile:
        kernel = CompiledKernel(torch, judge_rows, a.compile)  # a failure raises: it is what is measured
    head = f"{'batch':>5} | {'generator us/step':>17} | {'batched us/step':>15} | {'gen us/req':>10} | {'bat us/req':>10} | {'speed-up':>8}"
    if kernel is not None:
        head += f" | {'compiled us/step':>16} | {'vs batched':>10}"
    print(head)
    print("-" * len(head))
    for b in batches:
        kw = dict(pool=pool, empty=empty, steps=a.steps, warmup=a.warmup, lam=a.lam, params=params)
        paths: list[Path] = [(False, None), (True, None)] + ([(True, kernel)] if kernel is not None else [])
        gen, bat, *comp = (t * 1e6 for t in time_paths(b, paths, **kw))
        line = f"{b:>5} | {gen:>17.0f} | {bat:>15.0f} | {gen / b:>10.0f} | {bat / b:>10.0f} | {gen / bat:>7.1f}x"
        if comp:
            line += f" | {comp[0]:>16.0f} | {bat / comp[0]:>9.1f}x"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
