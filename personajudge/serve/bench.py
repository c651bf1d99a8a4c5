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

The client is bounded: connecting takes at most :data:`CONNECT_TIMEOUT_S`, each
request (the warm-up too) at most the server's ``--request-timeout`` plus
:data:`GRACE_S` (after which the server itself answers 408). A failed warm-up,
or a level where every request failed, stops the bench with the server's first
error message (HTTP status and body), since its numbers would mean nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
import warnings
from typing import Any

from personajudge.api import PersonaJudge
from personajudge.core.config import RunConfig
from personajudge.core.decoding import run_timed
from personajudge.core.errors import ConfigError, PersonaJudgeError, PersonaJudgeWarning
from personajudge.core.processes import StderrTail, dies_with_parent, stop_process
from personajudge.plugins import get_method

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
CONNECT_TIMEOUT_S = 10.0
#: beyond the server's --request-timeout, how long the client waits for its 408 before giving up itself
GRACE_S = 5.0
#: how much of a server's error body a report quotes
ERROR_CHARS = 300


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1]


def _row(
    name: str,
    wall: float,
    lat: list[float],
    ttft: list[float],
    tokens: int,
    errors: int,
    first_error: str | None = None,
    *,
    no_usage: int = 0,
    views: list[int] | None = None,
    acceptance: list[float] | None = None,
    encoders: list[str] | None = None,
) -> dict[str, Any]:
    """One row. ``no_usage``: successful requests whose stream carried no ``usage`` (a server that
    ignores ``stream_options``): their tokens are unknown, so the row has no tokens and no tokens/s
    rather than a 0 that reads as a measurement. ``views`` / ``acceptance`` / ``encoders``: what the
    responses' ``persona_judge`` field said (the direct row: what its run resolved), so the report shows
    what actually ran; ``encoder`` is None where nothing said (a server that does not report it)."""
    known = no_usage == 0
    return {
        "name": name,
        "requests": len(lat),
        "errors": errors,
        "first_error": first_error,
        "tokens": tokens if known else None,
        "requests_without_usage": no_usage,
        "views": sorted(set(views)) if views else None,
        "acceptance_rate": round(statistics.mean(acceptance), 4) if acceptance else None,
        "encoder": ",".join(sorted(set(encoders))) if encoders else None,
        "wall_s": round(wall, 3),
        "tokens_per_s": (round(tokens / wall, 2) if wall > 0 else 0.0) if known else None,
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
    encoders: list[str] = []  # what `auto` resolved to on this model, as a started server resolves it
    with PersonaJudge(cfg) as pj:

        def one(i: int) -> tuple[float, float | None, int]:
            first: list[float] = []
            cfg_i, meth, views = pj._prepare(preferences, None, None, {"seed": i, "max_new_tokens": max_tokens})
            encoders.append(cfg_i.encoder)
            t0 = time.perf_counter()
            contexts = pj.encode_views(DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], cfg_i, meth, views)
            req = pj._request(contexts, cfg_i, i, on_text=lambda t: first.append(time.perf_counter()) if t else None)
            with pj.backend.open(len(contexts)) as session:
                run_timed(meth.decode, session, req)
            t1 = time.perf_counter()
            views.append(len(contexts))
            if req.stats.acceptance_rate is not None:
                acc.append(req.stats.acceptance_rate)
            return t1 - t0, (first[0] - t0) if first else None, len(req.emitter.tokens)

        views: list[int] = []
        acc: list[float] = []
        one(0)  # warm-up
        views.clear()
        acc.clear()
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
    return _row("direct (no server)", wall, lat, ttft, tokens, 0, views=views, acceptance=acc, encoders=encoders)


def _quote(body: bytes | str) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = " ".join(text.split())
    return text[:ERROR_CHARS] + ("..." if len(text) > ERROR_CHARS else "")


def check_url(url: str, *, model: str, headers: dict[str, str], timeout: float = CONNECT_TIMEOUT_S) -> str:
    """``url`` without a trailing slash, once ``GET url/models`` answers 200 and lists ``model``: a
    mistyped, unreachable or wrong server is one line (:class:`ConfigError`) before any work is done."""
    import httpx

    url = url.rstrip("/")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        raise ConfigError(f"--url {url!r}: {err}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--url {url!r}: expected a base URL like http://127.0.0.1:8000/v1")
    try:
        r = httpx.get(url + "/models", headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise ConfigError(f"--url {url}: no answer from {url}/models within {timeout:g}s") from None
    except httpx.HTTPError as err:
        raise ConfigError(f"--url {url}: cannot reach the server ({type(err).__name__}: {err})") from None
    if r.status_code != 200:
        raise ConfigError(f"--url {url}: GET /models answered HTTP {r.status_code}: {_quote(r.content)}")
    try:  # TypeError: "data" null or a number (a server that is not OpenAI-compatible)
        ids = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(
            f"--url {url}: GET /models did not answer an OpenAI model list: {_quote(r.content)}"
        ) from None
    if model not in ids:
        raise ConfigError(
            f"--url {url}: the server does not serve '{model}' (it lists {', '.join(map(str, ids)) or 'none'}); "
            "pass --served-model-name"
        )
    return url


#: one request's outcome: latency, time to first text, completion tokens (None: no usage reported),
#: the error (None when it succeeded), and the response's persona_judge info (views, acceptance rate)
Outcome = tuple[float, float | None, int | None, str | None, dict[str, Any]]


async def _one_request(
    client: Any, url: str, model: str, i: int, max_tokens: int, headers: dict[str, str], bound: float
) -> Outcome:
    """One streamed request: latency, time to first text, completion tokens and, when it failed, why
    (the HTTP status and the server's message). Never longer than ``bound`` seconds."""
    import httpx

    t0 = time.perf_counter()
    try:
        return await asyncio.wait_for(_stream(client, url, model, i, max_tokens, headers, t0), bound)
    except (TimeoutError, httpx.TimeoutException):
        return time.perf_counter() - t0, None, 0, f"no complete answer within {bound:g}s", {}
    except (httpx.HTTPError, ValueError) as err:  # a dropped connection, a malformed event: say why
        return time.perf_counter() - t0, None, 0, f"{type(err).__name__}: {_quote(str(err))}", {}


async def _stream(
    client: Any, url: str, model: str, i: int, max_tokens: int, headers: dict[str, str], t0: float
) -> Outcome:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)]}],
        "max_tokens": max_tokens,
        "seed": i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    first = None
    tokens: int | None = None
    info: dict[str, Any] = {}
    async with client.stream("POST", url + "/chat/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            return time.perf_counter() - t0, None, 0, f"HTTP {resp.status_code}: {_quote(await resp.aread())}", {}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            try:  # a server that is not OpenAI-compatible: its request fails, said in one line, no traceback
                if "error" in chunk:
                    err = f"stream error: {_quote(json.dumps(chunk['error']))}"
                    return time.perf_counter() - t0, first, tokens or 0, err, info
                for ch in chunk.get("choices", []):
                    if ch.get("delta", {}).get("content") and first is None:
                        first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    if not isinstance(tokens, int) or isinstance(tokens, bool):
                        raise TypeError("completion_tokens is not an integer")
                if isinstance(chunk.get("persona_judge"), dict):
                    info = chunk["persona_judge"]
            except (TypeError, AttributeError, KeyError) as err:
                raise ValueError(f"not an OpenAI chat.completion.chunk ({err}): {_quote(line[6:])}") from None
    return time.perf_counter() - t0, first, tokens, None, info


async def _level(
    url: str,
    model: str,
    concurrency: int,
    n_requests: int,
    max_tokens: int,
    headers: dict[str, str],
    bound: float = 600.0 + GRACE_S,
) -> dict[str, Any]:
    """One concurrency level; raises when the warm-up or every request failed, quoting the first error."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)
    timeout = httpx.Timeout(bound, connect=CONNECT_TIMEOUT_S)  # and wait_for bounds the request as a whole
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        warm = await _one_request(client, url, model, 0, max_tokens, headers, bound)
        if warm[3] is not None:
            raise PersonaJudgeError(f"server at {url}: the warm-up request failed: {warm[3]}")

        async def run(i: int):
            async with sem:
                return await _one_request(client, url, model, i, max_tokens, headers, bound)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(run(i) for i in range(n_requests)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r[3] is None]
    failed = [r[3] for r in results if r[3] is not None]
    if not ok:
        raise PersonaJudgeError(
            f"server at {url}: all {n_requests} requests at concurrency {concurrency} failed; the first: {failed[0]}"
        )
    return _row(
        f"server c={concurrency}",
        wall,
        [r[0] for r in ok],
        [r[1] for r in ok if r[1] is not None],
        sum(r[2] or 0 for r in ok),
        len(failed),
        failed[0] if failed else None,
        no_usage=sum(r[2] is None for r in ok),
        views=[r[4]["views"] for r in ok if isinstance(r[4].get("views"), int)],
        acceptance=[r[4]["acceptance_rate"] for r in ok if isinstance(r[4].get("acceptance_rate"), (int, float))],
        encoders=[r[4]["encoder"] for r in ok if isinstance(r[4].get("encoder"), str)],
    )


#: The line ``personajudge serve`` writes to stderr once its socket is bound (``cli/serve.py``), naming the
#: port the OS picked for ``--port 0``.
SERVING_LINE = re.compile(r"personajudge: serving .* on http://127\.0\.0\.1:(\d+)/v1")


def start_server(flags: list[str]) -> tuple[subprocess.Popen, str]:
    """``personajudge serve FLAGS`` on 127.0.0.1 and a port the OS picks; returns once /health answers.

    The server binds ``--port 0`` itself, and its "serving" line (:data:`SERVING_LINE`) says which port it
    got: a port found free here and bound there later could be taken in between, and another server
    answering /health on it would then be benchmarked in its place. A server that exits before it is
    ready is one line quoting the last line it wrote to stderr (a bad ``--server-flag`` names itself
    there). While it loads, an interrupt (Ctrl-C, or SIGTERM turned into an exception by the command)
    stops it before going on; and on Linux it gets SIGTERM when this process dies
    (:func:`~personajudge.core.processes.dies_with_parent`), so it is never left running.
    """
    cmd = [sys.executable, "-m", "personajudge", "serve", *flags, "--host", "127.0.0.1", "--port", "0"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=dies_with_parent(),
    )
    assert proc.stderr is not None
    tail = StderrTail(proc.stderr, watch=SERVING_LINE)
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                said = tail.last()
                raise PersonaJudgeError(
                    f"the server exited with status {proc.returncode} before it was ready"
                    + (f"; it said: {_quote(said)}" if said else "")
                )
            serving = tail.matched
            if serving is not None:
                base = f"http://127.0.0.1:{serving.group(1)}"
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            return proc, base
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise PersonaJudgeError(f"the server was not ready within {READY_TIMEOUT_S}s")
            time.sleep(0.25)
    except BaseException:
        stop_process(proc)
        raise


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
    request_timeout: float = 600.0,
    limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report (see the module's docstring). ``url`` is checked (:func:`check_url`) before any work;
    ``request_timeout`` is the server's (``server_flags`` should pass it to a started one): each request
    is bounded by it plus :data:`GRACE_S`. ``limits``: the started server's ``max_batch`` and
    ``max_queue`` as passed (recorded in ``settings``).

    A level where every request failed ends the bench; the levels measured before it are kept, and the
    report gets ``failed_level`` (``{"concurrency", "error"}``): the caller prints it and exits 2."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if url is not None:
        url = check_url(url, model=model, headers=headers)
    n_views = len(cfg.views) if cfg.views else len(preferences if preferences is not None else cfg.preferences)
    if url is None and n_views < 2 and getattr(get_method(cfg.method), "min_views", 1) >= 2:
        # the server's requests carry no preferences of their own: each would be one view
        warnings.warn(
            f"bench-serve: method '{cfg.method}' with {'a single view' if n_views else 'no preferences (one view)'} "
            "is plain sampling; every request would run one view. Give two preferences or more "
            "(--prefer concise --prefer humor, or --view) to bench persona-judge",
            PersonaJudgeWarning,
            stacklevel=2,
        )
    bound = request_timeout + GRACE_S
    rows = []
    if direct:
        if progress:
            print("direct: the requests one by one, no server", file=sys.stderr)
        rows.append(direct_row(cfg, n_requests, max_tokens, progress, preferences))
    proc = None
    exit_code = None
    started = False
    if url is None:
        if progress:
            print("starting the server ...", file=sys.stderr)
        proc, base = start_server(server_flags)  # stops it itself when it fails or is interrupted
        started, url = True, base + "/v1"
    failed_level = None
    try:
        for c in levels:
            if progress:
                print(f"server: {n_requests} requests at concurrency {c}", file=sys.stderr)
            try:
                rows.append(asyncio.run(_level(url, model, c, n_requests, max_tokens, headers, bound)))
            except PersonaJudgeError as err:
                if not any(r["name"].startswith("server") for r in rows):
                    raise  # nothing measured yet: the error is the whole report
                failed_level = {"concurrency": c, "error": str(err)}  # keep the levels measured so far
                break
    finally:
        if proc is not None:
            exit_code = stop_process(proc)
    base_rate = next((r["tokens_per_s"] for r in rows if r["name"] == "server c=1"), None)
    for r in rows:
        # a server at --url may run another model on another machine: this process's direct row is
        # no fraction of its speed, so it gets no ratio (the server's own levels still do)
        comparable = started or r["name"].startswith("server")
        known = r["tokens_per_s"] is not None
        r["vs_c1"] = round(r["tokens_per_s"] / base_rate, 2) if base_rate and comparable and known else None
    d = cfg.decoding
    served = [r for r in rows if r["name"].startswith("server")]
    seen = sorted({v for r in served for v in (r.get("views") or [])})
    if seen == [1] and getattr(get_method(cfg.method), "min_views", 1) >= 2 and url is not None and not started:
        warnings.warn(
            f"bench-serve: the server at {url} ran every request with one view (plain sampling under the name "
            f"'{cfg.method}')",
            PersonaJudgeWarning,
            stacklevel=2,
        )
    return {
        "machine": machine(),
        # with --url the local flags describe only the direct row (if any), not the server
        "server": "started" if started else url,
        "backend": cfg.backend.name,
        "model": cfg.backend.model or "default",
        "method": cfg.method,
        "preferences": [p if isinstance(p, str) else p.name for p in preferences] if preferences else cfg.preferences,
        "temperature": d.temperature,
        "max_tokens": max_tokens,
        "requests_per_level": n_requests,
        # everything that changes the numbers (with --url, only the direct row and the requests follow it)
        "settings": {
            "views": len(cfg.views) if cfg.views else max(1, n_views),
            "view_groups": [list(v) for v in cfg.views] if cfg.views else None,
            "preferences": [p if isinstance(p, str) else p.name for p in preferences]
            if preferences
            else cfg.preferences,
            "lambda": d.lambda_,
            "temperature": d.temperature,
            "top_k": d.top_k,
            "top_p": d.top_p,
            "schedule": d.schedule,
            "roles": d.roles,
            "repeat_lines": d.repeat_lines,
            "encoder": _ran_encoder(cfg, rows),
            "encoder_options": cfg.encoder_options,
            "system": cfg.system,
            "method_options": cfg.method_options,
            "max_batch": (limits or {}).get("max_batch") if started else None,
            "max_queue": (limits or {}).get("max_queue") if started else None,
        },
        "rows": rows,
        "failed_level": failed_level,
        "server_exit_code_after_sigterm": exit_code,
    }


def _ran_encoder(cfg: RunConfig, rows: list[dict[str, Any]]) -> str | None:
    """The encoder the requests ran with, as ``bench`` and a run's settings report it: ``auto`` resolved
    on the model. The direct row resolved it here; the server's responses say what it resolved (no second
    model is loaded to find out). Neither: a named encoder is itself, ``auto`` unknown (None)."""
    said = next((r["encoder"] for r in rows if r.get("encoder")), None)
    return said or (cfg.encoder if cfg.encoder != "auto" else None)


def format_table(rep: dict[str, Any]) -> str:
    local = f"backend {rep['backend']} ({rep['model']}), method {rep['method']}"
    if rep.get("server", "started") == "started":
        where = local
    else:  # the local flags say nothing about a server at --url
        direct = any(not r["name"].startswith("server") for r in rep["rows"])
        where = f"server at {rep['server']}" + (f" (direct row: {local}, this process)" if direct else "")
    head = f"{rep['machine']}; {where}, {rep['requests_per_level']} requests x max_tokens {rep['max_tokens']}"
    st = rep.get("settings") or {}
    lines = [head]
    if st:
        groups = st.get("view_groups")
        views = "; ".join(",".join(map(str, g)) for g in groups) if groups else ", ".join(map(str, st["preferences"]))
        lines.append(
            f"{st['views']} view(s) [{views or 'none'}], lambda {st['lambda']}, T {st['temperature']}, top-k "
            f"{st['top_k']}, top-p {st['top_p']}, schedule {st['schedule']}, roles {st['roles'] or 'the method'}'s, "
            f"encoder {st['encoder'] or 'not reported'}"
            + (f", system {json.dumps(st['system'])}" if st.get("system") else "")
            + (f"; server max-batch {st['max_batch']}, max-queue {st['max_queue']}" if st.get("max_batch") else "")
        )
    lines += [
        "",
        "| run | requests | tokens | tok/s (aggregate) | vs c=1 | latency p50 / p95 (s) | TTFT p50 / p95 (s) "
        "| views | acceptance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["rows"]:
        err = f" ({r['errors']} failed)" if r["errors"] else ""
        nu = r.get("requests_without_usage")
        tokens = r["tokens"] if r["tokens"] is not None else f"no usage reported ({nu} requests)"
        tps = r["tokens_per_s"] if r["tokens_per_s"] is not None else "-"
        views = ",".join(map(str, r["views"])) if r.get("views") else "-"
        acc = r["acceptance_rate"] if r.get("acceptance_rate") is not None else "-"
        # no request returned text: no time to first text, shown as "-" as the other columns show none
        ttft = f"{r['ttft_p50_s']} / {r['ttft_p95_s']}" if r.get("ttft_p50_s") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['requests']}{err} | {tokens} | {tps} | "
            f"{r['vs_c1'] if r['vs_c1'] is not None else '-'} | {r['latency_p50_s']} / {r['latency_p95_s']} | "
            f"{ttft} | {views} | {acc} |"
        )
    for r in rep["rows"]:
        if r.get("first_error"):
            lines.append(f"\n{r['name']}: first error: {r['first_error']}")
    if rep.get("failed_level"):
        fl = rep["failed_level"]
        lines.append(f"\nconcurrency {fl['concurrency']} (and any level after it) not measured: {fl['error']}")
    if rep.get("server_exit_code_after_sigterm") is not None:
        lines.append(f"\nserver exit code after SIGTERM: {rep['server_exit_code_after_sigterm']}")
    return "\n".join(lines)
