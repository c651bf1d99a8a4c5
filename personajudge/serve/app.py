"""The OpenAI-compatible HTTP server: a thin FastAPI layer over the engine.

Every request is validated here, encoded in a worker thread, and submitted to
the :class:`~personajudge.engine.Engine` that owns the model (continuous
batching across requests); its committed text comes back as events on the
event loop. The server adds no decoding of its own.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``, ``GET /metrics``. Errors use OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.

FastAPI is imported when an app is created, not with this module, so the CLI
lists ``serve`` without the ``serve`` extra installed. (No ``from __future__
import annotations`` here: FastAPI reads the route functions' annotations,
and ``Request`` is a local name of :func:`create_app`.)
"""

import asyncio
import json
import logging
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from pydantic import BaseModel, ValidationError

from personajudge.api import PersonaJudge, make_method
from personajudge.core.errors import (
    ChatTemplateError,
    ConfigError,
    ContextLengthError,
    DeviceError,
    PersonaJudgeError,
    PreferenceError,
    PromptTokenError,
    TooManyViewsError,
    UnknownPluginError,
    UnknownPreferenceError,
)
from personajudge.engine import EngineClosedError, Job, QueueFullError, RequestCancelled
from personajudge.plugins import preference_library
from personajudge.plugins.manager import plan_views
from personajudge.preferences import Preference, build_views, named_by, normalize_conversation

from .metrics import Metrics
from .schemas import FINISH_REASONS, ChatCompletionRequest, CompletionRequest, error_body, field_error

#: how often a waiting request checks whether its client went away
DISCONNECT_POLL_S = 0.25
#: the default of ``--max-request-bytes``: a body is read into memory and its prompt tokenized before the
#: context check, so the body is what bounds that work; 8 MiB is far more text than any context holds
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
#: the default of ``--max-views``: each view of a request takes a KV slot, and the engine's session,
#: sized for the largest batch it has seen, never shrinks
DEFAULT_MAX_VIEWS = 8

#: the ``endpoint`` label of ``personajudge_requests_total`` for a path no route has (the others are labelled by
#: their route), so scanners and typos cannot grow the label set, and every scrape, without bound
OTHER_ENDPOINT = "other"

#: the CLI flags the library's messages name as a remedy, and the request field an HTTP client uses instead
_FLAG_FIELDS = {
    "--encoder": "encoder",
    "--method": "method",
    "--stop": "stop",
    "--lambda": "lambda",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--temperature": "temperature",
    "--seed": "seed",
    "--max-new-tokens": "max_tokens",
    "--roles": "roles",
    "--schedule": "schedule",
    "--prefer": "preferences",
    "--view": "views",
}
#: a flag, its value, and the same flag repeated right after (``--prefer concise --prefer humor``)
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)(?![\w-])(?:[ =]([^\s;()]+))?((?:\s+\1[ =][^\s;()]+)*)")
#: the config's name for a setting (a ``ConfigError``'s "invalid config: decoding.stop: ..."), and the request
#: field it came from; ``max_new_tokens``, ``preferences`` and ``views`` depend on the request (see map_error)
_CONFIG_FIELDS = {
    "decoding.temperature": "temperature",
    "decoding.top_p": "top_p",
    "decoding.top_k": "top_k",
    "decoding.seed": "seed",
    "decoding.stop": "stop",
    "decoding.lambda": "lambda",
    "decoding.lambda_": "lambda",
    "decoding.roles": "roles",
    "decoding.schedule": "schedule",
    "method": "method",
    "encoder": "encoder",
}
_CONFIG_LOC = re.compile(r"(^|; )([A-Za-z_][\w]*(?:\.[\w]+)*): ")

log = logging.getLogger(__name__)


def http_wording(message: str) -> str:
    """A library message as an HTTP client can act on it: the CLI flags it names as a remedy become the
    request fields that do the same (``use --encoder plain`` -> ``use "encoder": "plain"``; ``--prefer a
    --prefer b`` -> ``"preferences": ["a", "b"]``; ``--view a,b`` -> ``"views": [["a", "b"]]``). Flags
    that no request field matches (the server's own limits) are left as they are."""

    def field(m: re.Match) -> str:
        flag, first, more = m.group(1), m.group(2), m.group(3)
        name = _FLAG_FIELDS.get(flag)
        if name is None:
            return m.group(0)
        if first is None:
            return f'the "{name}" field'
        values = [first, *re.findall(re.escape(flag) + r"[ =]([^\s;()]+)", more)]
        tail = values[-1][len(values[-1].rstrip(".,:")) :]  # a sentence's punctuation after the last value
        values[-1] = values[-1][: len(values[-1]) - len(tail)]
        if name == "views":
            shown = json.dumps([[v for v in value.split(",") if v] for value in values])
        elif name == "preferences" or len(values) > 1:
            shown = json.dumps(values)
        else:
            shown = values[0] if re.fullmatch(r"-?\d+(\.\d+)?", values[0]) else json.dumps(values[0])
        return f'"{name}": {shown}{tail}'

    return _FLAG.sub(field, message)


def _config_error(message: str, fields: dict[str, str]) -> tuple[str | None, str]:
    """``(param, message)`` of a ``ConfigError`` from the run config the request's fields were merged into:
    "invalid config: decoding.stop: ..." names the config's field; the client sent ``stop``. The message's
    config names become the request's; ``param`` is the first (None when the setting is no request field's)."""
    body = message.removeprefix("invalid config: ")
    if body == message:
        return None, message
    found: list[str] = []

    def request_field(m: re.Match) -> str:
        loc = m.group(2)
        for config_name, request_name in fields.items():
            if loc == config_name or loc.startswith(config_name + "."):
                field = request_name + loc[len(config_name) :]
                found.append(field)
                return m.group(1) + field + ": "
        return m.group(0)

    body = _CONFIG_LOC.sub(request_field, body)
    return (found[0], body) if found else (None, message)


def _over_http(message: str) -> str:
    """A too-long prompt's advice for a client (:func:`http_wording` has put its flags in the request's
    words): ``--show-prompt`` is no option of a request, and ``--n-ctx`` is the server's to raise."""
    return message.replace(" (--show-prompt shows each view)", "").replace("(--n-ctx", "(the server's --n-ctx")


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> Any:
        from fastapi.responses import JSONResponse

        return JSONResponse(
            error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=self.headers
        )


def map_error(
    err: BaseException,
    *,
    prompt_field: str = "messages",
    preference_field: str = "preferences",
    token_field: str = "max_tokens",
    shutting_down: bool = False,
) -> APIError:
    """A persona-judge exception as the HTTP error a client should see.

    ``param`` names the field the client sent, which the exception cannot know: ``prompt_field`` is
    the endpoint's (``messages`` or ``prompt``), ``preference_field`` the one the request's views
    came from (``views`` or ``preferences``). A cancellation while ``shutting_down`` is the
    server's doing, not the client's: the 503 ``shutting_down`` of the README's table.
    A :class:`TooManyViewsError` (the backend cannot open a session for that many views, e.g.
    llama.cpp's sequence limit) names the field those views came from.

    A :class:`ConfigError` of the run config names the request field its setting came from
    (``token_field``: ``max_tokens`` or ``max_completion_tokens``); one whose remedy is another
    encoder (no chat template, an exemplar encoder without examples), and a chat template that
    failed on the request, name ``encoder``. Messages name request fields, not CLI flags
    (:func:`http_wording`).
    """
    if isinstance(err, APIError):
        return err
    raw = str(err)
    msg = http_wording(raw)
    if isinstance(err, QueueFullError):
        return APIError(
            429,
            msg,
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(max(1, round(err.retry_after)))},
        )
    if isinstance(err, EngineClosedError):
        return APIError(503, msg, "server_error", code="shutting_down")
    if isinstance(err, RequestCancelled):
        if shutting_down:
            return APIError(503, msg, "server_error", code="shutting_down")
        return APIError(499, msg, "invalid_request_error", code="cancelled")
    if isinstance(err, PromptTokenError):  # a token the model has no embedding for: the prompt's, not a length
        return APIError(400, msg, param=prompt_field, code="invalid_value")
    if isinstance(err, ContextLengthError):
        return APIError(400, _over_http(msg), param=prompt_field, code="context_length_exceeded")
    if isinstance(err, PreferenceError):  # an unknown name, or an invalid value (an empty view, an empty name)
        code = "unknown_preference" if isinstance(err, UnknownPreferenceError) else "invalid_value"
        return APIError(400, msg, param=preference_field, code=code)
    if isinstance(err, UnknownPluginError):
        param = {"method": "method", "encoder": "encoder"}.get(err.kind)
        return APIError(400, msg, param=param, code=f"unknown_{err.kind}")
    if isinstance(err, TooManyViewsError):
        return APIError(400, msg, param=preference_field, code="invalid_value")
    if isinstance(err, ChatTemplateError):  # the model's template failed on this request: "encoder": "plain" helps
        return APIError(400, msg, param="encoder", code="invalid_value")
    if isinstance(err, ConfigError):
        fields = {
            **_CONFIG_FIELDS,
            "decoding.max_new_tokens": token_field,
            "preferences": preference_field,
            "views": preference_field,
        }
        param, msg = _config_error(msg, fields)
        if param is None and "--encoder" in raw:  # the library's remedy is another encoder
            param = "encoder"
        return APIError(400, msg, param=param, code="invalid_value")
    if isinstance(err, DeviceError):
        return APIError(503, msg, "server_error", code="device_error")
    if isinstance(err, PersonaJudgeError):
        return APIError(500, msg, "server_error")
    return APIError(500, f"internal error: {type(err).__name__}: {msg}", "server_error")


def check_api_key(key: str | None) -> str | None:
    """``key`` when a client can send it (None: no key), else a :class:`ConfigError` that never shows it
    (an empty key too: it is what an unset variable gives, never a choice to serve without one).

    A client sends the key in ``Authorization: Bearer <key>``: a header carries no line break or other
    control character, Starlette reads its bytes as Latin-1 (so a non-ASCII key never compares equal
    to what arrives), and the token is compared stripped. A key outside printable ASCII, or with
    spaces around it, would start a server that answers every request 401."""
    if key == "":
        # ``--api-key "$KEY"`` with KEY unset, or ``PERSONAJUDGE_API_KEY=${KEY}`` in a compose file: an empty
        # key read as "no key" served every client unauthenticated, without a word
        raise ConfigError(
            "the API key (--api-key or PERSONAJUDGE_API_KEY) is empty (an unset variable?): give a key, or "
            "leave out the flag and unset the variable to serve without one"
        )
    if key is not None and not (key.isascii() and key.isprintable() and key == key.strip()):
        raise ConfigError(
            "the API key (--api-key or PERSONAJUDGE_API_KEY) must be printable ASCII without surrounding "
            "spaces: no client could send this one in an Authorization header"
        )
    return key


class Server:
    """The state behind the app: the model, its engine, the metrics and the limits."""

    def __init__(
        self,
        pj: PersonaJudge,
        *,
        model_name: str = "persona-judge",
        api_key: str | None = None,
        max_tokens_limit: int | None = None,
        request_timeout: float = 600.0,
        max_views: int = DEFAULT_MAX_VIEWS,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        default_preferences: list[Any] | None = None,
    ):
        """``default_preferences``: what a request that sends neither ``preferences`` nor ``views`` gets
        (``--prefer`` / ``--preferences-file``), names, descriptions or :class:`Preference` objects; the
        objects (a preferences file's) also define the names a request's ``views`` may use."""
        self.pj = pj
        self.default_preferences = default_preferences or None
        self.definitions = [p for p in default_preferences or () if isinstance(p, Preference)]
        self.engine = pj.engine
        self.model_name = model_name
        self.api_key = check_api_key(api_key)
        self.max_tokens_limit = max_tokens_limit
        self.request_timeout = request_timeout
        self.max_views = max_views
        self.max_request_bytes = max_request_bytes
        self.metrics = Metrics(self.engine)
        self.engine.on_step = self.metrics.on_step
        self.engine.on_finish = self.metrics.on_finish
        self.created = int(time.time())
        self.shutting_down = False
        #: ``/v1`` requests received and not yet answered (their body still arriving, being parsed or
        #: encoded, in the engine, or streaming). Written on the event loop only; the SIGTERM drain
        #: (another thread) waits for it to reach 0, since a request is in the engine only once encoded
        self.in_flight = 0

    def arrive(self) -> bool:
        """Count a ``/v1`` request in; False when it arrived after SIGTERM (it is then not counted, and its
        handler refuses it). Counted before the flag is read: a signal that lands between the two leaves it
        counted, so the drain waits for it, instead of seeing 0 and closing the engine under it."""
        self.in_flight += 1
        if self.shutting_down:
            self.in_flight -= 1
            return False
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def idle(self) -> bool:
        """Nothing left to drain: no request received and unanswered, nothing running or queued."""
        stats = self.engine.stats()
        return self.in_flight == 0 and not stats["running"] and not stats["queued"]

    def drain(self, timeout: float, stop: threading.Event) -> None:
        """SIGTERM's grace period: wait up to ``timeout`` seconds (less if ``stop`` is set) until
        :meth:`idle`, then close the engine, which cancels what is left (those responses end with the
        ``shutting_down`` error). Call after setting ``shutting_down``, in a thread of its own."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop.is_set() and not self.idle():
            stop.wait(0.05)
        self.engine.close()

    def check_arrival(self, request: Any) -> None:
        """Refuse a request that arrived after SIGTERM (503): one that arrived before it is served, even
        when its body was still arriving, or it was being encoded, when the signal came."""
        if request.scope.get(_LATE_KEY):
            raise APIError(
                503, "the server is shutting down and takes no new requests", "server_error", code="shutting_down"
            )

    def closing(self) -> bool:
        """Whether the server is shutting down: the engine closes (SIGTERM's grace period ended) before
        the app's lifespan ends."""
        return self.shutting_down or bool(self.engine.stats()["closing"])

    def _defaults(self) -> list[Any] | None:
        """The ``preferences`` a request that sends neither ``preferences`` nor ``views`` is run with: next
        to configured views only the definitions (the views decide), else the default preferences."""
        return self.definitions if self.pj.config.views else self.default_preferences

    def default_view_lengths(self, prompt: str) -> list[int]:
        """Each view's prompt length for ``prompt`` sent with the server's defaults."""
        return self.pj.view_lengths(prompt, preferences=self._defaults())

    def default_views(self) -> int:
        """Views one request with the configured defaults prompts (sizes the session)."""
        cfg = self.pj.config
        try:
            views = build_views(self.default_preferences or cfg.preferences, cfg.views, preference_library())
            return max(2, len(plan_views(make_method(cfg), cfg.method, views)))
        except PersonaJudgeError:
            return 2

    # ---------------------------------------------------------------- checks

    def check_auth(self, request: Any) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}' (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def check_views(self, req: Any) -> None:
        """At most ``max_views`` views per request, counted as sent, before anything is encoded: each view
        takes a KV slot, and a session sized for many views keeps that memory for good."""
        field = "views" if req.views else "preferences"  # build_views uses views when given
        n = len(req.views) if req.views else len(req.preference_list() or [])
        if n > self.max_views:
            raise APIError(
                400,
                f"{field}: {n} views asked for; this server allows at most {self.max_views} views per request "
                "(--max-views)",
                param=field,
                code="invalid_value",
            )

    def generation_kwargs(self, req: Any, max_tokens: int | None, field: str) -> dict[str, Any]:
        if (bad := req.unsupported()) is not None:
            raise APIError(400, bad[1], param=bad[0], code="unsupported")
        self.check_views(req)
        if max_tokens is not None and self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"{field} is {max_tokens}; this server allows at most {self.max_tokens_limit}",
                param=field,
                code="invalid_value",
            )
        prefs, views = req.preference_list(), req.view_groups()
        no_views = views == []
        if no_views:
            # "views": [] is no views, as views=[] is in the Python API: the request's preferences make
            # them (one each), and without any the request has none (the server's defaults are for a
            # request that sends neither field)
            views = None
            prefs = [] if prefs is None else prefs
        for i, group in enumerate(views or []):  # the Python API reads [[]] as no views; a request means one
            if not group:
                raise APIError(400, f"view {i + 1} is empty", param="views", code="invalid_value")
        if views and prefs:
            # Python warns and goes on (IGNORED_NEXT_TO_VIEWS), but a client never sees a warning: the
            # request's names would be dropped with a line in the server's log only
            raise APIError(
                400,
                "preferences and views were both given; the views decide, so the preferences would be ignored: "
                "put every preference into a view, or send only preferences (one view each)",
                param="preferences",
                code="invalid_value",
            )
        if prefs == [] and not no_views and self.pj.config.views:
            # "preferences": [] drops the preferences and leaves the configured views, as preferences=[]
            # does in the Python API; a preferences file's definitions go along, the names those views use
            prefs = self.definitions
        elif prefs is not None and views is None:
            if self.definitions:
                # a request's names mean what the preferences file defines or adjusts, as in its views
                prefs = named_by(prefs, self.definitions)
            # A request's preferences replace the server's default views too, one view per preference as
            # --prefer gives, as a call's preferences replace a config's views in the Python API: ``views=[]``
            # is "no views" to the API, so its preferences make the views
            views = []
        elif views is not None and self.definitions:
            prefs = self.definitions  # the names a preferences file defines or adjusts
        elif prefs is None and views is None and self.default_preferences is not None:
            prefs = self._defaults()
        kw: dict[str, Any] = {
            "preferences": prefs,
            "views": views,
            "method": req.method,
            "encoder": req.encoder,
            "max_new_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "seed": req.seed,
            "stop": req.stop_list(),
            "lambda": req.lambda_,
            "roles": req.roles,
            "schedule": req.schedule,
        }
        default_max = self.pj.config.decoding.max_new_tokens
        if max_tokens is None and self.max_tokens_limit is not None and default_max > self.max_tokens_limit:
            kw["max_new_tokens"] = self.max_tokens_limit
        return {k: v for k, v in kw.items() if v is not None}

    # ---------------------------------------------------------------- running a job

    async def submit(self, prompt: Any, kwargs: dict[str, Any], *, stream: bool = True, label: str) -> Job:
        """Queue a request; ``label`` (the route's path) labels its latency in the metrics. No check of
        ``shutting_down`` here: a request that got this far arrived before SIGTERM (see :meth:`arrive`) and
        gets the grace period; once it is over the engine is closed and refuses it (a 503)."""
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(
            lambda: self.pj.submit(prompt, loop=loop, wait=False, stream=stream, label=label, **kwargs)
        )

    async def next_event(self, job: Job, deadline: float) -> tuple:
        """The job's next event; cancels it and raises a 408 when the request's time is up."""
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(job.next_event(), remaining)
        except TimeoutError:
            job.cancel()
            raise APIError(
                408,
                f"the request did not finish within {self.request_timeout:g}s (--request-timeout)",
                "timeout_error",
                code="timeout",
                # the openai SDK retries a 408 (max_retries=2 by default): the same request would run out
                # of time again, at three times the work; this header, which the SDK obeys, says not to
                headers={"x-should-retry": "false"},
            ) from None

    async def watch(self, request: Any, job: Job) -> None:
        """Cancel ``job`` when the client disconnects (the engine frees its slots at the next step)."""
        while not job.done:
            if await request.is_disconnected():
                job.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


def _usage(res: Any) -> dict[str, int]:
    prompt = sum(res.stats.prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": len(res.tokens), "total_tokens": prompt + len(res.tokens)}


def _pj_info(res: Any) -> dict[str, Any]:
    s = res.stats
    return {
        "method": s.method,
        "views": s.views,
        "acceptance_rate": s.acceptance_rate,
        "drafted": s.drafted,
        "accepted": s.accepted,
        "seed": s.seed,
        "prompt_tokens": s.prompt_tokens,
        "iterations": s.iterations,
        "finish_reason": res.finish_reason,
        # what ``auto`` resolved to (or the encoder named): bench-serve records it without a model of its own
        "encoder": (res.settings or {}).get("encoder"),
    }


#: the ASGI scope key :class:`_InFlight` sets on a ``/v1`` request that arrived after SIGTERM
_LATE_KEY = "personajudge.after_sigterm"


class _InFlight:
    """Counts ``/v1`` requests from the moment they arrive (their headers read) until their response has
    been sent, streams included (:meth:`Server.arrive`), for the SIGTERM drain; marks those that arrive
    after the signal, which their handler refuses with a 503 (by then the route is known, so the refusal
    is counted under its endpoint). Plain ASGI, as :class:`_CountRequests`."""

    def __init__(self, app: Any, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if not self.server.arrive():
            scope[_LATE_KEY] = True
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.server.leave()


class _CountRequests:
    """Counts /v1 requests by endpoint and status: plain ASGI (Starlette's ``BaseHTTPMiddleware`` would
    hide client disconnects from the endpoints, and those cancel requests).

    The endpoint is the route the request matched (the router records it in the scope), and
    ``other`` for a path no route has: labelled by the raw path, every typo or scanner's probe
    would add a series for good."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", None)
            endpoint = path if isinstance(path, str) else OTHER_ENDPOINT
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(
    pj: PersonaJudge,
    *,
    model_name: str = "persona-judge",
    api_key: str | None = None,
    max_tokens_limit: int | None = None,
    request_timeout: float = 600.0,
    max_views: int = DEFAULT_MAX_VIEWS,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    reserve: bool = True,
    default_preferences: list[Any] | None = None,
) -> Any:
    """The FastAPI app serving ``pj`` (its engine is sized for ``max_batch`` requests up front when ``reserve``)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    srv = Server(
        pj,
        model_name=model_name,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
        request_timeout=request_timeout,
        max_views=max_views,
        max_request_bytes=max_request_bytes,
        default_preferences=default_preferences,
    )

    @asynccontextmanager
    async def lifespan(app: Any):
        if reserve:
            await asyncio.to_thread(srv.engine.reserve, srv.engine.max_batch * srv.default_views())
        yield
        # uvicorn has stopped accepting and waited (bounded) for in-flight requests; cancel the rest
        srv.shutting_down = True
        await asyncio.to_thread(srv.engine.close)

    # redirect_slashes off: ``/v1/completions/`` is a 404 in OpenAI's shape, as any unknown path is, not
    # Starlette's empty 307 to a Location built from the client's Host header
    app = FastAPI(title="persona-judge", lifespan=lifespan, docs_url=None, redoc_url=None, redirect_slashes=False)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        # err.headers: Starlette's 405 carries the ``Allow`` header RFC 9110 requires
        return JSONResponse(
            error_body(str(err.detail), type_, None, code), status_code=err.status_code, headers=err.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        return JSONResponse(error_body(str(err), param=None), status_code=400)

    app.add_middleware(_InFlight, server=srv)
    app.add_middleware(_CountRequests, metrics=srv.metrics)  # added last: the outer one, sees every status

    def too_large(size: str = "") -> APIError:
        return APIError(
            413,
            f"the request body{size} is larger than this server's limit of {srv.max_request_bytes} bytes "
            "(--max-request-bytes)",
            code="request_too_large",
        )

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 past ``max_request_bytes``: by its Content-Length before anything
        is read, and while it arrives (a chunked body has no Content-Length), so at most the limit
        plus one chunk is ever held."""
        limit = srv.max_request_bytes
        declared = request.headers.get("content-length", "")
        # h11 has checked it is digits; compare lengths first, as int() of thousands of digits raises
        digits = declared.lstrip("0")
        if declared.isdigit() and (len(digits) > len(str(limit)) or int(digits or "0") > limit):
            raise too_large(f" ({digits} bytes)" if len(digits) <= 20 else "")
        body = bytearray()
        try:
            async with aclosing(request.stream()) as chunks:
                async for chunk in chunks:
                    body += chunk
                    if len(body) > limit:
                        raise too_large()
        except ClientDisconnect:
            # nobody reads the answer; a client that gives up mid-upload is no server error
            log.debug("the client disconnected while sending its request body (%s)", request.url.path)
            raise APIError(
                499, "the client disconnected while sending the request body", code="client_disconnected"
            ) from None
        return bytes(body)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        srv.check_arrival(request)
        srv.check_auth(request)
        raw = await read_body(request)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # both are ValueErrors: first
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:  # the C parser recurses once per array or object level
            raise APIError(
                400, "the request body is not valid JSON: it is nested too deeply", code="invalid_json"
            ) from None
        except ValueError:  # int() of a number of more than sys.get_int_max_str_digits() digits
            raise APIError(
                400,
                "the request body could not be read: a number in it has more than "
                f"{sys.get_int_max_str_digits()} digits",
                code="invalid_json",
            ) from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            # one of the request models; all have .model. The context bounds a conversation's length
            req: Any = model.model_validate(body, context={"context_length": srv.pj.backend.context_length})
        except ValidationError as err:
            param, message = field_error(err)
            raise APIError(400, message, param=param, code="invalid_value") from None
        srv.check_model(req.model)
        return req

    async def run(request: Request, endpoint: str, req: Any, prompt: Any, kwargs: dict[str, Any]) -> Response:
        deadline = asyncio.get_running_loop().time() + srv.request_timeout

        def fail(err: BaseException) -> APIError:
            """``err`` as this request's error, naming the fields it sent."""
            return map_error(
                err,
                prompt_field="messages" if endpoint == "chat" else "prompt",
                preference_field="views" if req.views else "preferences",  # build_views uses views when given
                token_field=req.token_limit()[1],
                shutting_down=srv.closing(),
            )

        route = request.scope.get("route")
        label = getattr(route, "path", None) or request.url.path  # the route: a bounded set of labels
        try:
            job = await srv.submit(prompt, kwargs, stream=bool(req.stream), label=label)
        except Exception as err:
            raise fail(err) from None
        watcher = asyncio.create_task(srv.watch(request, job))
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            ev = await srv.next_event(job, deadline)  # "start", or the error that kept it from starting
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if ev[0] == "error":
            watcher.cancel()
            raise fail(ev[1])
        if not req.stream:
            try:
                while ev[0] not in ("done", "error"):  # no text events: the job does not stream
                    ev = await srv.next_event(job, deadline)
            finally:
                job.cancel()
                watcher.cancel()
            if ev[0] == "error":
                raise fail(ev[1])
            res = ev[1]
            fr = FINISH_REASONS[res.finish_reason]
            if endpoint == "chat":
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": res.text},
                    "finish_reason": fr,
                    "logprobs": None,
                }
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": res.text, "finish_reason": fr, "logprobs": None}
                obj = "text_completion"
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": srv.model_name,
                    "choices": [choice],
                    "usage": _usage(res),
                    "persona_judge": _pj_info(res),
                }
            )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            stream(job, watcher, endpoint, rid, created, include_usage, deadline, fail),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream(
        job: Job,
        watcher: asyncio.Task,
        endpoint: str,
        rid: str,
        created: int,
        include_usage: bool,
        deadline: float,
        fail: Callable[[BaseException], APIError],
    ) -> AsyncIterator[str]:
        chat = endpoint == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": srv.model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def piece(text: str, finish: str | None = None) -> dict[str, Any]:
            if chat:
                return {
                    "index": 0,
                    "delta": {"content": text} if text or finish is None else {},
                    "finish_reason": finish,
                    "logprobs": None,
                }
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": 0,
                            "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None,
                            "logprobs": None,
                        }
                    ]
                )
            while True:
                try:
                    ev = await srv.next_event(job, deadline)
                except APIError as err:
                    yield f"data: {json.dumps(error_body(err.message, err.type, err.param, err.code))}\n\n"
                    break
                if ev[0] == "text":
                    yield chunk([piece(ev[1])])
                elif ev[0] == "error":
                    api_err = fail(ev[1])
                    yield f"data: {json.dumps(error_body(api_err.message, api_err.type, api_err.param, api_err.code))}\n\n"
                    break
                elif ev[0] == "done":
                    res = ev[1]
                    yield chunk([piece("", FINISH_REASONS[res.finish_reason])], persona_judge=_pj_info(res))
                    if include_usage:
                        yield chunk([], usage=_usage(res))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away mid-stream frees its KV slots at the next step
            watcher.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        kwargs = srv.generation_kwargs(req, *req.token_limit())
        try:
            conversation = req.conversation()
            normalize_conversation(conversation)  # the API checks it again; here an error can name the field
        except ValueError as err:  # ConfigError too: an empty prompt, no final user turn, invalid text
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        return await run(request, "chat", req, conversation, kwargs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        kwargs = srv.generation_kwargs(req, *req.token_limit())
        try:
            normalize_conversation(req.prompt_text())
        except ConfigError as err:
            raise APIError(400, str(err), param="prompt", code="invalid_value") from None
        return await run(request, "completion", req, req.prompt_text(), kwargs)

    def model_card() -> dict[str, Any]:
        """OpenAI's model object for the one model this server serves, plus the backend's scalar facts."""
        return {
            "id": srv.model_name,
            "object": "model",
            "created": srv.created,
            "owned_by": "persona-judge",
            "backend": {k: v for k, v in srv.pj.backend.describe().items() if isinstance(v, (str, int, float, bool))},
        }

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_arrival(request)
        srv.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        """OpenAI's "retrieve model": SDKs call it (``client.models.retrieve``) to check a name before they
        send work. The ``:path`` converter keeps names with a slash (``google/gemma-3-1b``) in one piece."""
        srv.check_arrival(request)
        srv.check_auth(request)
        srv.check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health():
        stats = srv.engine.stats()
        ok = not (srv.shutting_down or stats["closing"])
        return JSONResponse(
            {"status": "ok" if ok else "shutting_down", "model": srv.model_name, "in_flight": srv.in_flight, **stats},
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics():
        return Response(srv.metrics.render(), media_type=srv.metrics.content_type)

    return app
