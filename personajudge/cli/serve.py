"""``personajudge serve`` (the OpenAI-compatible server) and ``personajudge bench-serve`` (its benchmark)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import ipaddress
import json
import math
import os
import signal
import socket
import sys
import threading
import warnings
from typing import Any

from personajudge.api import PersonaJudge
from personajudge.core.config import DecodingConfig
from personajudge.core.errors import ConfigError, PersonaJudgeError, PersonaJudgeWarning
from personajudge.core.files import os_error_text
from personajudge.core.processes import terminate_as_exit
from personajudge.engine import MAX_BATCH
from personajudge.serve import create_app
from personajudge.serve.app import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_VIEWS, Server, check_api_key
from personajudge.serve.bench import format_table, run_bench_serve

from .options import _Parser, add_run_options, config_from_args, mark_refused

#: serve's defaults; bench-serve raises them (and says so) when they are not given
SERVE_MAX_BATCH = 8
SERVE_MAX_QUEUE = 64
#: bench-serve's most requests per concurrency level: a load test is bounded, and the queue default
#: (``max(SERVE_MAX_QUEUE, --requests)``) and the kept latencies grow with it
BENCH_MAX_REQUESTS = 10_000

SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")
#: bench-serve also talks to the server over HTTP (httpx, in the ``serve`` extra too)
BENCH_SERVE_MODULES = (*SERVE_MODULES, "httpx")
#: the largest ``max_new_tokens`` the config takes (bench-serve's --max-tokens becomes it)
MAX_NEW_TOKENS: int = next(m.le for m in DecodingConfig.model_fields["max_new_tokens"].metadata if hasattr(m, "le"))
INSTALL_HINT = 'pip install -e ".[serve]" in your persona-judge clone'


def _require_serve_extra(modules: tuple[str, ...] = SERVE_MODULES, what: str = "the server") -> None:
    """One line naming the extra, before any work: a module found missing later (bench-serve's httpx,
    imported where it is used) would be a traceback after the direct row ran and the server started."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise PersonaJudgeError(f"{what} needs {', '.join(missing)}; run: {INSTALL_HINT}")


def _check_limits(args: argparse.Namespace) -> None:
    if not args.host.strip():
        # ``--host "$HOST"`` with HOST unset: getaddrinfo would read it as "every interface" and the
        # "serving" line would name no address; listening everywhere is a choice that names itself
        raise ConfigError(
            f"--host is empty (got {args.host!r}); to listen on every interface, pass --host 0.0.0.0 "
            "(or --host :: for IPv6)"
        )
    for flag, value, low in (
        ("--max-batch", args.max_batch, 1),
        ("--max-queue", args.max_queue, 0),
        ("--port", args.port, 0),
        ("--max-views", args.max_views, 1),
        ("--max-request-bytes", args.max_request_bytes, 1),
    ):
        if value < low:
            raise ConfigError(f"{flag} must be at least {low}, got {value}")
    if args.port > 65535:
        raise ConfigError(f"--port must be at most 65535, got {args.port}")
    if args.max_batch > MAX_BATCH:  # each request takes a view at least, and a session holds no more
        raise ConfigError(f"--max-batch must be at most {MAX_BATCH}, got {args.max_batch}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise ConfigError(f"--max-tokens-limit must be at least 1, got {args.max_tokens_limit}")
    # math.isfinite: NaN passes every comparison below (they are all False)
    if not (math.isfinite(args.request_timeout) and args.request_timeout > 0):
        raise ConfigError(f"--request-timeout must be a positive number of seconds, got {args.request_timeout}")
    if not (math.isfinite(args.shutdown_timeout) and args.shutdown_timeout >= 0):
        raise ConfigError(f"--shutdown-timeout must be a non-negative number of seconds, got {args.shutdown_timeout}")
    if not args.served_model_name.strip():  # no request could name it: every one would be a 400 or a 404
        raise ConfigError(f"--served-model-name must not be empty, got {args.served_model_name!r}")


def _bind(host: str, port: int) -> list[socket.socket]:
    """The listening sockets, bound before anything is printed or loaded: a port in use or an address
    that is not this machine's is one line and exit 2 here (uvicorn would log it after our "serving"
    line and exit 3). One socket per address ``host`` resolves to, as asyncio's ``create_server``
    (what uvicorn does with a host and a port) binds them."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as err:  # socket.gaierror: not an address or a known name; UnicodeError: IDNA
        raise ConfigError(f"cannot serve on {where}: {getattr(err, 'strerror', None) or err}") from None
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart despite TIME_WAIT
            if family == socket.AF_INET6:  # as asyncio: IPv4 addresses of the host are bound on their own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
    except OSError as err:
        for sock in socks:
            sock.close()
        raise ConfigError(f"cannot serve on {where}: {os_error_text(err)}") from None
    return socks


def _off_host(addresses: list[str]) -> list[str]:
    """The bound ``addresses`` other hosts may reach: those that are not loopback (``0.0.0.0``, ``::``,
    a LAN address). A name resolves to what it resolves to: ``localhost`` is loopback."""
    out = []
    for address in addresses:
        try:
            loopback = ipaddress.ip_address(address.split("%", 1)[0]).is_loopback  # fe80::1%eth0: a scope id
        except ValueError:
            loopback = False
        if not loopback:
            out.append(address)
    return out


def _api_key(args: argparse.Namespace) -> str | None:
    """``--api-key``, else ``PERSONAJUDGE_API_KEY``, else None; refused in one line when no client could send
    it, or when it is empty (given, but to nothing)."""
    key = args.api_key if args.api_key is not None else os.environ.get("PERSONAJUDGE_API_KEY")
    return check_api_key(key)


#: the shortest question a client might send: the server's default views must fit it with room to answer
_PROBE_PROMPT = "Hi?"


def _warn_if_defaults_do_not_fit(srv: Any, context_length: int) -> None:
    """A warning before "serving" when the default preferences' views leave no room even for a short
    question (a base model's exemplars on a small --n-ctx): every request that relies on them would be a
    400, while requests that send lighter preferences still run, so the server starts."""
    with warnings.catch_warnings():  # the defaults' own warnings were given as they were resolved
        warnings.simplefilter("ignore")
        try:
            lengths = srv.default_view_lengths(_PROBE_PROMPT)
        except PersonaJudgeError:
            return  # a request with the defaults says what is wrong, as generate would
    if max(lengths) >= context_length:
        warnings.warn(
            f"the default preferences' views are {max(lengths)} tokens for the question {_PROBE_PROMPT!r}, and the "
            f"model's context holds {context_length}: requests that use them will be refused (use a lighter "
            "--encoder, such as plain, or a larger --n-ctx)",
            PersonaJudgeWarning,
            stacklevel=2,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serve_extra()
    _check_limits(args)
    cfg, prefs = config_from_args(args)  # --prefer / --preferences-file: the server's default preferences
    default_views = len(cfg.views) if cfg.views else len(prefs or cfg.preferences)
    if default_views > args.max_views:  # a request sending the defaults itself would be refused
        raise ConfigError(f"the default preferences open {default_views} views, more than --max-views {args.max_views}")
    import uvicorn

    api_key = _api_key(args)  # checked before the model loads
    sockets = _bind(args.host, args.port)
    with contextlib.ExitStack() as stack:
        for sock in sockets:
            stack.enter_context(sock)
        pj = stack.enter_context(PersonaJudge(cfg, max_batch=args.max_batch, max_queue=args.max_queue))
        app = create_app(
            pj,
            model_name=args.served_model_name,
            api_key=api_key,
            max_tokens_limit=args.max_tokens_limit,
            request_timeout=args.request_timeout,
            max_views=args.max_views,
            max_request_bytes=args.max_request_bytes,
            default_preferences=prefs,
            reserve=False,  # here, below: a backend that cannot open a session fails before "serving"
        )
        _warn_if_defaults_do_not_fit(app.state.server, pj.backend.context_length)
        engine = pj.engine
        asked = args.max_batch * app.state.server.default_views()
        slots = engine.reserve(asked)
        if slots < asked:
            warnings.warn(
                f"the {pj.config.backend.name} backend holds {slots} views at once, fewer than --max-batch "
                f"{args.max_batch} requests of the default preferences need ({asked}): requests wait for room",
                PersonaJudgeWarning,
                stacklevel=1,
            )

        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,  # after the drain: the cancelled responses write their last events
            access_log=args.access_log,
        )
        server = graceful_server(config, app.state.server, args.shutdown_timeout)
        port = sockets[0].getsockname()[1]  # the one the OS picked for --port 0
        host = f"[{args.host}]" if ":" in args.host else args.host
        exposed = _off_host([sock.getsockname()[0] for sock in sockets])
        if exposed and api_key is None:  # a warning, not a refusal: keyless on a trusted network is a choice
            warnings.warn(
                f"serving on {', '.join(exposed)} without --api-key: anyone who can reach this port can use the "
                "model (set --api-key or PERSONAJUDGE_API_KEY, or bind 127.0.0.1)",
                PersonaJudgeWarning,
                stacklevel=1,
            )
        facts = pj.backend.describe()  # optional for a plugin: the default names only the backend
        model = facts.get("model") or facts.get("backend") or pj.config.backend.name
        print(
            f"personajudge: serving '{args.served_model_name}' ({model}) "
            f"on http://{host}:{port}/v1 (max batch {args.max_batch}, queue {args.max_queue}"
            f"{', API key required' if api_key else ''})",
            file=sys.stderr,
            flush=True,
        )
        server.run(sockets=sockets)
    return 0


def graceful_server(config: Any, srv: Server, shutdown_timeout: float) -> Any:
    """The uvicorn server of ``personajudge serve``, which drains ``srv`` on SIGTERM/SIGINT for up to
    ``shutdown_timeout`` seconds (a function: uvicorn is imported only when serving)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """On the first SIGTERM/SIGINT: drain with the port still open. ``/health`` and requests that
        arrive from then on answer 503 ``shutting_down`` (a load balancer takes the replica out);
        requests already received, wherever they are (their body still arriving, being encoded, in
        the engine, streaming), get ``shutdown_timeout`` seconds (:meth:`Server.drain`), the rest are
        cancelled in the engine so that their responses still end properly (an error event and
        [DONE] on a stream), and only then does uvicorn stop accepting and close. A second signal
        ends the grace period at once: the in-flight requests are cancelled the same way (uvicorn's
        own second-signal path would leave the engine running, wait ``timeout_graceful_shutdown`` for
        requests that cannot end, then kill them mid-response with a 500 or a cut stream)."""

        draining = False

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.stop_now = threading.Event()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version re-raises the signal after the graceful shutdown, which would
            # kill the process with it; a SIGTERM'd server that shut down cleanly exits with 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            if self.draining and not self.should_exit:  # the second signal, during the drain
                self.stop_now.set()
                return
            if self.draining or self.should_exit:  # the engine is closed: uvicorn's own handling
                super().handle_exit(sig, frame)
                return
            self.draining = True
            srv.shutting_down = True  # before the drain starts: from here on, arrivals are refused
            threading.Thread(target=self._drain, name="personajudge-drain", daemon=True).start()

        def _drain(self) -> None:
            srv.drain(shutdown_timeout, self.stop_now)
            self.should_exit = True  # uvicorn's loop sees it within a tick: stop accepting, close

    return GracefulServer(config)


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency takes positive integers, e.g. 1,4,16; got {text!r}")
    if max(levels) > BENCH_MAX_REQUESTS:  # more clients than requests a level may send
        raise ConfigError(f"--concurrency levels must be at most {BENCH_MAX_REQUESTS}, got {max(levels)}")
    twice = sorted({c for c in levels if levels.count(c) > 1})
    if twice:  # two rows of one name, the second compared with the first as if it were another level
        raise ConfigError(f"--concurrency lists {', '.join(map(str, twice))} twice: {text!r}")
    return levels


def _check_server_flags(flags: list[str], own: set[str]) -> None:
    """Parse the ``--server-flag`` values as ``serve`` will, now: a flag serve does not know (or a bad value
    of one it knows) was found only once the direct baseline had run and the server was starting.

    ``own``: bench-serve's own options (its ``args``' names). One of them given as a server flag is refused:
    it came after bench-serve's own flags, so the server ran with it while the direct row and the report's
    ``settings`` used bench-serve's value (``--server-flag=--max-batch=1`` recorded 8)."""
    parser = _Parser(prog="personajudge serve")
    _add_serve_options(parser)
    for action in parser._actions:  # parsed, the namespace holds only what the flags give
        action.default = argparse.SUPPRESS
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            given = parser.parse_args(flags)
    except SystemExit:
        lines = said.getvalue().strip().splitlines()
        reason = lines[-1].split("error: ", 1)[-1].removesuffix(" (see --help)") if lines else "it asks for help"
        raise ConfigError(f"--server-flag: serve would refuse {' '.join(map(repr, flags))}: {reason}") from None
    taken = [a for a in parser._actions if a.dest in vars(given) and a.dest in own and a.option_strings]
    if taken:
        name = max(taken[0].option_strings, key=len)
        raise ConfigError(
            f"--server-flag: {name} is a flag of bench-serve itself; give it as {name}, so that the direct row "
            "and the report use it too (--server-flag is for serve's other flags, such as --log-level)"
        )


def cmd_bench_serve(args: argparse.Namespace) -> int:
    _require_serve_extra(BENCH_SERVE_MODULES, "bench-serve")
    if args.host is not None or args.port is not None:
        raise ConfigError(
            "bench-serve starts its server on 127.0.0.1 and a free port: --host and --port are not used "
            "(to bench a server elsewhere, pass --url)"
        )
    if args.max_new_tokens is not None or args.seed is not None:
        # every request sends its own max_tokens and seed, so the server's defaults would never apply
        raise ConfigError(
            "bench-serve sends each request its own max_tokens and seed: --max-new-tokens and --seed are "
            "not used (use --max-tokens; request i uses seed i)"
        )
    args.host, args.port = "127.0.0.1", 0
    levels = _levels(args.concurrency)
    # every refusal before the first line of output (the notes below) and before any work
    if args.requests < 1:
        raise ConfigError("--requests must be at least 1")
    if args.requests > BENCH_MAX_REQUESTS:
        raise ConfigError(
            f"--requests must be at most {BENCH_MAX_REQUESTS} (per concurrency level), got {args.requests}"
        )
    if args.max_tokens < 1:  # checked here, before the direct row runs, in the flag's name
        raise ConfigError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_tokens > MAX_NEW_TOKENS:
        raise ConfigError(f"--max-tokens must be at most {MAX_NEW_TOKENS}, got {args.max_tokens}")
    cfg, prefs = config_from_args(args)
    if args.url is None:
        _check_server_flags(args.server_flags, set(vars(args)))
    # Not given: raised so that every level's requests batch together and none waits in a full queue
    # (said in one line and recorded); given: passed to the server as given (benching --max-batch 1
    # against the default is a fair question), with a line when a level needs more.
    given_batch, given_queue = args.max_batch is not None, args.max_queue is not None
    if not given_batch:
        args.max_batch = max(SERVE_MAX_BATCH, max(levels))
    if not given_queue:
        args.max_queue = max(SERVE_MAX_QUEUE, args.requests)
    _check_limits(args)
    if args.url is None:
        raised = []
        if not given_batch and args.max_batch != SERVE_MAX_BATCH:
            raised.append(
                f"--max-batch {args.max_batch} (serve's default {SERVE_MAX_BATCH}, raised to the largest level)"
            )
        if not given_queue and args.max_queue != SERVE_MAX_QUEUE:
            raised.append(f"--max-queue {args.max_queue} (serve's default {SERVE_MAX_QUEUE}, raised to --requests)")
        if raised:
            print(f"bench-serve: the server runs with {' and '.join(raised)}; pass them to set them", file=sys.stderr)
        if given_batch and args.max_batch < max(levels):
            print(
                f"bench-serve: --max-batch {args.max_batch} is below concurrency {max(levels)}: requests beyond "
                "it wait for a batch slot (passed as given)",
                file=sys.stderr,
            )
    flags = _run_flags(args) + [
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.max_queue),
        f"--max-views={args.max_views}",
        f"--max-request-bytes={args.max_request_bytes}",
        f"--request-timeout={args.request_timeout}",
        f"--shutdown-timeout={args.shutdown_timeout}",
    ]
    if args.max_tokens_limit is not None:
        flags.append(f"--max-tokens-limit={args.max_tokens_limit}")
    api_key = _api_key(args)
    with terminate_as_exit():  # `kill PID`: the started server is stopped too
        rep = run_bench_serve(
            cfg,
            preferences=prefs,
            server_flags=flags + list(args.server_flags),
            levels=levels,
            n_requests=args.requests,
            max_tokens=args.max_tokens,
            url=args.url,
            direct=not args.no_direct,
            progress=not args.json,
            api_key=api_key,
            model=args.served_model_name,
            request_timeout=args.request_timeout,
            limits={"max_batch": args.max_batch, "max_queue": args.max_queue},
        )
    print(json.dumps(rep, indent=2) if args.json else format_table(rep))
    if rep.get("failed_level"):  # the levels before it are printed above; the run still failed
        raise PersonaJudgeError(rep["failed_level"]["error"])
    return 0


#: the run options (``add_run_options``) a started server gets, as (dest, flag); not --max-new-tokens
#: and --seed, which bench-serve refuses (each request sends its own max_tokens and seed)
_FORWARDED = [
    ("config", "--config"),
    ("backend", "--backend"),
    ("model", "--model"),
    ("device", "--device"),
    ("dtype", "--dtype"),
    ("threads", "--threads"),
    ("n_ctx", "--n-ctx"),
    ("n_gpu_layers", "--n-gpu-layers"),
    ("backend_option", "--backend-option"),
    ("prefer", "--prefer"),
    ("view", "--view"),
    ("preferences_file", "--preferences-file"),
    ("encoder", "--encoder"),
    ("system", "--system"),
    ("method", "--method"),
    ("method_option", "--method-option"),
    ("lam", "--lambda"),
    ("temperature", "--temperature"),
    ("top_k", "--top-k"),
    ("top_p", "--top-p"),
    ("stop", "--stop"),
    ("roles", "--roles"),
    ("schedule", "--schedule"),
    ("api_key", "--api-key"),
    ("served_model_name", "--served-model-name"),
]


def _run_flags(args: argparse.Namespace) -> list[str]:
    """The model/config flags given to bench-serve, for the server it starts (same model, same settings)."""
    out: list[str] = []
    for dest, flag in _FORWARDED:
        value = getattr(args, dest, None)
        for v in value if isinstance(value, list) else [value] if value is not None else []:
            out.append(f"{flag}={v}")
    return out


def _add_server_limits(p: argparse.ArgumentParser, *, bench: bool = False) -> None:
    """The server's flags; ``bench``: bench-serve's help, whose limits default to what its levels need."""
    batch_default = (
        f"default max({SERVE_MAX_BATCH}, the largest --concurrency)" if bench else f"default {SERVE_MAX_BATCH}"
    )
    queue_default = f"default max({SERVE_MAX_QUEUE}, --requests)" if bench else f"default {SERVE_MAX_QUEUE}"
    g = p.add_argument_group("server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 or :: for every interface)",
    )
    g.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    g.add_argument(
        "--api-key",
        dest="api_key",
        help="require 'Authorization: Bearer KEY' on /v1 (default: $PERSONAJUDGE_API_KEY, else none)",
    )
    g.add_argument(
        "--served-model-name",
        dest="served_model_name",
        default="persona-judge",
        help="the model id clients send and /v1/models lists (default persona-judge)",
    )
    g.add_argument(
        "--max-batch",
        dest="max_batch",
        type=int,
        default=SERVE_MAX_BATCH,
        help=f"requests decoded together in one batched step ({batch_default})",
    )
    g.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int,
        default=SERVE_MAX_QUEUE,
        help=f"requests waiting beyond the batch; more get 429 with Retry-After ({queue_default})",
    )
    g.add_argument(
        "--max-tokens-limit",
        dest="max_tokens_limit",
        type=int,
        help="largest max_tokens a request may ask for (default: no limit)",
    )
    g.add_argument(
        "--request-timeout",
        dest="request_timeout",
        type=float,
        default=600.0,
        help="seconds a request may take before it is cancelled with 408 (default 600)",
    )
    g.add_argument(
        "--shutdown-timeout",
        dest="shutdown_timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds in-flight requests get to finish before they are cancelled; a second "
        "signal cancels them at once (default 10)",
    )
    g.add_argument(
        "--max-views",
        dest="max_views",
        type=int,
        default=DEFAULT_MAX_VIEWS,
        help=f"most views one request may open (its views, or its preferences, one view each); each takes a "
        f"KV slot (default {DEFAULT_MAX_VIEWS})",
    )
    g.add_argument(
        "--max-request-bytes",
        dest="max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"largest request body; a larger one gets 413 before it is read (default {DEFAULT_MAX_REQUEST_BYTES}, "
        "8 MiB)",
    )


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    """Every flag of ``serve`` (also the parser bench-serve checks its ``--server-flag`` values with)."""
    add_run_options(p)
    _add_server_limits(p)
    p.add_argument(
        "--log-level",
        dest="log_level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )
    p.add_argument("--access-log", dest="access_log", action="store_true", help="log every request")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_serve_options(p)
    p.set_defaults(func=cmd_serve, uses_stdout=False)  # it logs to stderr; `>&-` is fine

    b = sub.add_parser("bench-serve", help="throughput and latency of the server at several concurrencies")
    add_run_options(b)
    _add_server_limits(b, bench=True)
    # The server bench-serve starts listens on 127.0.0.1 and a free port; a --host or --port is refused.
    b.set_defaults(host=None, port=None, max_batch=None, max_queue=None)  # None: not given (see cmd_bench_serve)
    mark_refused(
        b,
        {
            "host": "not used: bench-serve's server listens on 127.0.0.1 and a free port (refused if given)",
            "port": "not used: bench-serve's server listens on 127.0.0.1 and a free port (refused if given)",
            "max_new_tokens": "not used: each request sends --max-tokens (refused if given)",
            "seed": "not used: request i uses seed i (refused if given)",
        },
    )
    b.add_argument(
        "--url",
        help="benchmark a running server at this base URL (e.g. http://127.0.0.1:8000/v1) instead of starting one; "
        "checked (GET /models) before any work. --request-timeout then bounds each request on the client's side",
    )
    b.add_argument("--concurrency", default="1,4,16", help="client concurrency levels (default 1,4,16)")
    b.add_argument(
        "--requests", type=int, default=16, help=f"requests per level (default 16, at most {BENCH_MAX_REQUESTS})"
    )
    b.add_argument("--max-tokens", dest="max_tokens", type=int, default=64, help="max_tokens per request (default 64)")
    b.add_argument(
        "--no-direct",
        dest="no_direct",
        action="store_true",
        help="skip the in-process baseline (the same requests one by one, no server)",
    )
    b.add_argument(
        "--server-flag",
        dest="server_flags",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag of serve for the started server that bench-serve has not itself (repeatable), e.g. --server-flag=--log-level=info",
    )
    b.add_argument("--json", action="store_true", help="print the JSON report")
    b.set_defaults(func=cmd_bench_serve)
