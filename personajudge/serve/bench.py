"""``personajudge bench-serve``: the server's throughput and latency at several concurrencies.

Rows of the report:

- ``direct``: the same requests one by one in this process, the core driving
  a session of its own (no engine, no server): what ``personajudge generate``
  did before there was an engine, the baseline the server must not slow down;
- ``server c=N``: N clients at once against a ``personajudge serve`` started
  as a subprocess on 127.0.0.1 (or ``--url``), streaming chat completions
  with the official wire format (httpx, SSE).

Each row gives aggregate completion tokens/s (all tokens over the level's wall
time), p50/p95 request latency and p50/p95 time to first token (request sent
-> first non-empty text). Request i uses prompt ``i % len(DEFAULT_PROMPTS)``
and seed i at every level, so the levels do the same work.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from personajudge.api import PersonaJudge
from personajudge.core.config import RunConfig
from personajudge.core.decoding import run_timed
from personajudge.core.errors import PersonaJudgeError

DEFAULT_PROMPTS = [
    "Why is the sky blue?",
    "How do I make a good cup of coffee?",
    "What should I pack for a weekend hiking trip?",
    "Explain how a bicycle stays upright.",
    "Give me tips for learning a new language.",
    "What is the difference between weather and climate?",
    "How can I sleep better at night?",
    "Why do cats purr?",
]
READY_TIMEOUT_S = 300


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def _row(name: str, wall: float, lat: list[float], ttft: list[float], tokens: int, errors: int) -> dict[str, Any]:
    return {
        "name": name,
        "requests": len(lat),
        "errors": errors,
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "latency_p50_s": _r(_pct(lat, 50)),
        "latency_p95_s": _r(_pct(lat, 95)),
        "ttft_p50_s": _r(_pct(ttft, 50)),
        "ttft_p95_s": _r(_pct(ttft, 95)),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return f"{n} cores of {cpu}"


def direct_row(
    cfg: RunConfig, n_requests: int, max_tokens: int, progress: bool, preferences: list[Any] | None = None
) -> dict[str, Any]:
    """The requests one by one, the core driving its own session (no engine, no server); ``preferences``
    are the server's defaults (``--prefer`` / ``--preferences-file``), which its requests get."""
    lat, ttft, tokens = [], [], 0
    with PersonaJudge(cfg) as pj:

        def one(i: int) -> tuple[float, float | None, int]:
            first: list[float] = []
            cfg_i, meth, views = pj._prepare(preferences, None, None, {"seed": i, "max_new_tokens": max_tokens})
            t0 = time.perf_counter()
            contexts = pj.encode_views(DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], cfg_i, meth, views)
            req = pj._request(contexts, cfg_i, i, on_text=lambda t: first.append(time.perf_counter()) if t else None)
            with pj.backend.open(len(contexts)) as session:
                run_timed(meth.decode, session, req)
            t1 = time.perf_counter()
            return t1 - t0, (first[0] - t0) if first else None, len(req.emitter.tokens)

        one(0)  # warm-up
        t_start = time.perf_counter()
        for i in range(n_requests):
            dt, ft, nt = one(i)
            lat.append(dt)
            if ft is not None:
                ttft.append(ft)
            tokens += nt
            if progress:
                print(f"  direct {i + 1}/{n_requests}: {nt} tokens in {dt:.2f}s", file=sys.stderr)
        wall = time.perf_counter() - t_start
    return _row("direct (no server)", wall, lat, ttft, tokens, 0)


async def _one_request(
    client: Any, url: str, model: str, i: int, max_tokens: int, headers: dict[str, str]
) -> tuple[float, float | None, int, bool]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}],
        "max_tokens": max_tokens,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return time.perf_counter() - t0, None, 0, False
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return time.perf_counter() - t0, first, tokens, False
            for ch in chunk.get("choices", []):
                if ch.get("delta", {}).get("content") and first is None:
                    first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - t0, first, tokens, True


async def _level(
    url: str, model: str, concurrency: int, n_requests: int, max_tokens: int, headers: dict[str, str]
) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        await _one_request(client, url, model, 0, max_tokens, headers)  # warm-up

        async def run(i: int):
            async with sem:
                return await _one_request(client, url, model, i, max_tokens, headers)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r[3]]
    return _row(
        f"server c={concurrency}",
        wall,
        [r[0] for r in ok],
        [r[1] for r in ok if r[1] is not None],
        sum(r[2] for r in ok),
        len(results) - len(ok),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], *, port: int | None = None, log: Any = None) -> tuple[subprocess.Popen, str]:
    """``personajudge serve FLAGS`` on 127.0.0.1 and a free port; returns once /health answers."""
    port = port or _free_port()
    cmd = [sys.executable, "-m", "personajudge", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd,
        stdout=log or subprocess.DEVNULL,
        stderr=log or subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise PersonaJudgeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise PersonaJudgeError(f"the server was not ready within {READY_TIMEOUT_S}s")
        time.sleep(0.25)


def run_bench_serve(
    cfg: RunConfig,
    *,
    server_flags: list[str],
    levels: list[int],
    n_requests: int,
    max_tokens: int,
    url: str | None = None,
    direct: bool = True,
    progress: bool = True,
    model: str = "persona-judge",
    api_key: str | None = None,
    preferences: list[Any] | None = None,
) -> dict[str, Any]:
    rows = []
    if direct:
        if progress:
            print("direct: the requests one by one, no server", file=sys.stderr)
        rows.append(direct_row(cfg, n_requests, max_tokens, progress, preferences))
    proc = None
    exit_code = None
    if url is None:
        if progress:
            print("starting the server ...", file=sys.stderr)
        proc, base = start_server(server_flags)
        url = base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        for c in levels:
            if progress:
                print(f"server: {n_requests} requests at concurrency {c}", file=sys.stderr)
            rows.append(asyncio.run(_level(url, model, c, n_requests, max_tokens, headers)))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                exit_code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = proc.wait()
    base_rate = next((r["tokens_per_s"] for r in rows if r["name"] == "server c=1"), None)
    for r in rows:
        r["vs_c1"] = round(r["tokens_per_s"] / base_rate, 2) if base_rate else None
    d = cfg.decoding
    return {
        "machine": machine(),
        "backend": cfg.backend.name,
        "model": cfg.backend.model or "default",
        "method": cfg.method,
        "preferences": [p if isinstance(p, str) else p.name for p in preferences] if preferences else cfg.preferences,
        "temperature": d.temperature,
        "max_tokens": max_tokens,
        "requests_per_level": n_requests,
        "rows": rows,
        "server_exit_code_after_sigterm": exit_code,
    }


def format_table(rep: dict[str, Any]) -> str:
    head = (
        f"{rep['machine']}; backend {rep['backend']} ({rep['model']}), method {rep['method']}, "
        f"{rep['requests_per_level']} requests x max_tokens {rep['max_tokens']}"
    )
    lines = [
        head,
        "",
        "| run | requests | tokens | tok/s (aggregate) | vs c=1 | latency p50 / p95 (s) | TTFT p50 / p95 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        err = f" ({r['errors']} failed)" if r["errors"] else ""
        lines.append(
            f"| {r['name']} | {r['requests']}{err} | {r['tokens']} | {r['tokens_per_s']} | "
            f"{r['vs_c1'] if r['vs_c1'] is not None else '-'} | {r['latency_p50_s']} / {r['latency_p95_s']} | "
            f"{r['ttft_p50_s']} / {r['ttft_p95_s']} |"
        )
    if rep.get("server_exit_code_after_sigterm") is not None:
        lines.append(f"\nserver exit code after SIGTERM: {rep['server_exit_code_after_sigterm']}")
    return "\n".join(lines)
