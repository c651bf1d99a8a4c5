"""``personajudge serve`` under hostile or unlucky clients, through httpx (and a raw socket where a client
must misbehave) on 127.0.0.1: every case an OpenAI-shaped error, no traceback in the server's log, and a
server that stays healthy; and a second SIGTERM that cancels the in-flight requests with the README's
503 ``shutting_down`` and exits 0.

The cases are an audit's (notes/audit_server.md, A-F): bodies the JSON parser cannot read (deep nesting,
a number past Python's digit limit), a body past ``--max-request-bytes`` (by Content-Length and chunked),
a client that disconnects while sending its body, requests asking for more views than ``--max-views``,
and a backend that refuses a session for that many views.
"""

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from gated_toy import GatedToy  # noqa: E402
from serve_helpers import health, in_process_server, running_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402
from personajudge.core.errors import TooManyViewsError  # noqa: E402

LIMIT = 65536  # --max-request-bytes of the module's server: small, so the tests send little
FLAGS = [
    "--backend",
    "toy",
    "--encoder",
    "plain",
    "--prefer",
    "concise",
    "--prefer",
    "humor",
    "--max-batch",
    "1",  # the session is reserved for 1 x 2 views: whatever a request makes it grow to shows in /health
    "--max-queue",
    "4",
    "--max-request-bytes",
    str(LIMIT),
]  # --max-views left at its default, 8
CHAT = {"model": "persona-judge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PATH = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-hostile") / "server.log"
    with running_server(FLAGS, log) as (url, _proc):
        yield url, log


@pytest.fixture
def base(server):
    """The server's URL; after the test, the server is healthy, still answers, and logged no traceback."""
    url, log = server
    yield url
    assert health(url)["status"] == "ok"
    assert httpx.post(url + PATH, json=CHAT, timeout=60).status_code == 200
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


def _error(resp, status):
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"] == "application/json"
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _post_raw(base, body: bytes, **kw):
    return httpx.post(base + PATH, content=body, headers={"Content-Type": "application/json"}, timeout=60, **kw)


# ---------------------------------------------------------------- A: bodies json.loads cannot read


@pytest.mark.parametrize(
    "body, needle",
    [
        ('{"model": "persona-judge", "x": ' + "[" * 2000 + "]" * 2000 + "}", "nested too deeply"),
        ('{"model": "persona-judge", "x": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}", "nested too deeply"),
        ('{"model": "persona-judge", "seed": 1' + "0" * 4300 + "}", "digits"),
        ('{"model": "persona-judge", "x": -' + "9" * 5000 + "}", "digits"),
        ('{"model": "persona-judge", "x": ' + "[" * 2000, "nested too deeply"),  # deep and truncated
    ],
    ids=["deep-arrays", "deep-objects", "long-seed", "long-number", "deep-truncated"],
)
def test_a_body_the_json_parser_cannot_read_is_400_invalid_json(base, body, needle):
    """RecursionError (nesting past the interpreter's limit) and ValueError (an integer past
    ``sys.get_int_max_str_digits()``) are unparseable bodies like any other: 400 ``invalid_json``."""
    err = _error(_post_raw(base, body.encode()), 400)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_json", None)
    assert needle in err["message"]


def test_nesting_the_parser_reads_is_refused_by_the_schema(base):
    """Below the parser's limit the schema refuses it, naming the field: also no 500."""
    deep = "[" * 500 + '"x"' + "]" * 500
    body = '{"model": "persona-judge", "messages": [{"role": "user", "content": "hi"}], "views": ' + deep + "}"
    err = _error(_post_raw(base, body.encode()), 400)
    assert err["code"] == "invalid_value" and err["param"].startswith("views")


# ---------------------------------------------------------------- C: --max-request-bytes


def _padded(size: int) -> bytes:
    """A valid chat request of exactly ``size`` bytes (JSON whitespace as padding)."""
    raw = json.dumps(CHAT).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_a_body_at_the_limit_is_served(base):
    r = _post_raw(base, _padded(LIMIT))
    assert r.status_code == 200, r.text[:500]


def test_a_body_past_the_limit_is_413(base):
    err = _error(_post_raw(base, _padded(LIMIT + 1)), 413)
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_too_large")
    assert f"limit of {LIMIT} bytes" in err["message"] and "--max-request-bytes" in err["message"]


def test_a_chunked_body_past_the_limit_is_413(base):
    """No Content-Length to check up front: the body is counted while it arrives."""
    body = _padded(4 * LIMIT)

    def chunks():
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    r = _post_raw(base, chunks())
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    err = _error(r, 413)
    assert err["code"] == "request_too_large"


def test_a_declared_length_past_the_limit_is_refused_before_the_body_is_sent(base):
    """Only the headers are sent: the 413 must come from Content-Length alone (a server reading the
    body first would wait for bytes that never come, and the read would time out)."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n".encode()
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(payload)["error"]["code"] == "request_too_large"


# ---------------------------------------------------------------- D: a client gone while sending its body


def _count(base, status: str) -> float:
    """``personajudge_requests_total`` for the chat endpoint and ``status``."""
    text = httpx.get(base + "/metrics", timeout=10).text
    want = f'personajudge_requests_total{{endpoint="{PATH}",status="{status}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(want))


def test_a_client_that_disconnects_mid_body_leaves_no_traceback(base):
    """The request ends as a 499 (counted in /metrics: nobody reads it) instead of an unhandled
    ClientDisconnect; the ``base`` fixture then checks the log and that the server still serves."""
    port = int(base.rsplit(":", 1)[1])
    before = {s: _count(base, s) for s in ("499", "500")}
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                'Content-Length: 1000\r\n\r\n{"model": "persona-'.encode()
            )
            time.sleep(0.2)  # the server is waiting for the rest of the body
    deadline = time.monotonic() + 30
    while sum(_count(base, s) - before[s] for s in before) < 3:
        assert time.monotonic() < deadline, "the server never finished the disconnected requests"
        time.sleep(0.05)
    assert _count(base, "499") - before["499"] == 3 and _count(base, "500") == before["500"]


# ---------------------------------------------------------------- E/F: --max-views


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"views": [["concise"]] * 120}, "views"),
        ({"views": [["concise"]] * 9, "preferences": ["concise"]}, "views"),  # the views decide
        ({"preferences": ["concise", "humor", "expert"] * 3}, "preferences"),
    ],
    ids=["120-views", "9-views", "9-preferences"],
)
def test_more_views_than_max_views_is_400_naming_the_field_and_reserves_nothing(base, extra, param):
    slots = health(base)["slots"]
    err = _error(httpx.post(base + PATH, json={**CHAT, **extra}, timeout=60), 400)
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_value", param)
    assert "at most 8 views" in err["message"] and "--max-views" in err["message"]
    assert health(base)["slots"] == slots  # the engine's session did not grow for it


def test_max_views_views_are_served(base):
    prefs = ["concise", "humor", "expert", "friendly", "helpful", "vivid", "creative", "professional"]
    r = httpx.post(base + PATH, json={**CHAT, "preferences": prefs}, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert len(r.json()["persona_judge"]["prompt_tokens"]) >= 8


# ---------------------------------------------------------------- G: long lists, errors per message (audit 2)

MANY = 3000  # items: past the schema's bound of 1024 (and the toy's context of 4096 less than MANY*2), in 12 KiB


@pytest.mark.parametrize(
    "path, extra, param, needle",
    [
        (PATH, {"preferences": [1] * MANY}, "preferences", f"at most 1024 preferences are allowed, got {MANY}"),
        (PATH, {"views": [1] * MANY}, "views", f"at most 1024 views are allowed, got {MANY}"),
        (PATH, {"views": [["concise"], [1] * MANY]}, "views", "at most 1024 preferences in view 2 are allowed"),
        (PATH, {"stop": [1] * MANY}, "stop", f"at most 4 stop sequences are allowed, got {MANY}"),
        (PATH, {"messages": [1] * (2 * MANY)}, "messages", "cannot fit in this model's context of 4096 tokens"),
        (PATH, {"messages": [{"role": "user", "content": [1] * MANY}]}, "messages.0.content", "at most 1024 content"),
        ("/v1/completions", {"prompt": [1] * MANY}, "prompt", "send one prompt per request"),
    ],
    ids=["preferences", "views", "view-preferences", "stop", "messages", "content-parts", "prompt"],
)
def test_a_list_longer_than_its_field_can_be_is_refused_before_its_items_are_read(base, path, extra, param, needle):
    """Each item of a list was validated, and an error built for each that failed: a 3 MiB list of numbers
    held the event loop, every request of the server, 13 to 30 s, and answered with a message as large.
    The bound is checked first: one error naming the field, and what it holds."""
    body = {**CHAT, **extra} if path == PATH else {"model": "persona-judge", "max_tokens": 2, **extra}
    err = _error(httpx.post(base + path, json=body, timeout=60), 400)
    assert (err["code"], err["param"]) == ("invalid_value", param)
    assert needle in err["message"] and len(err["message"]) < 300, err["message"][:500]


def test_a_400_describes_five_invalid_fields_and_counts_the_rest(base):
    err = _error(httpx.post(base + PATH, json={**CHAT, "preferences": [1] * 20}, timeout=60), 400)
    assert err["param"] == "preferences.0"
    described = [f"preferences.{i}: Input should be a valid string" for i in range(5)]
    assert all(d in err["message"] for d in described) and "preferences.5" not in err["message"]
    assert err["message"].endswith("; and 15 more invalid fields")


@pytest.mark.parametrize(
    "content, needle",
    [
        ([{"type": "image_url", "image_url": {"url": "x"}}], "only text content parts are supported"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "\ud800"}], "the text is not valid Unicode"),
        ("\udfff b", "the text is not valid Unicode: a lone surrogate U+DFFF at character 0"),
    ],
    ids=["image-part", "surrogate-in-part", "surrogate"],
)
def test_a_bad_message_content_names_that_message(base, content, needle):
    """The README's promise: ``param`` names the message (``messages.2.content``), not the whole list."""
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": content},
    ]
    raw = json.dumps({**CHAT, "messages": messages})  # a lone surrogate as its escape, \\ud800 (httpx's json= fails)
    err = _error(_post_raw(base, raw.encode()), 400)
    assert (err["code"], err["param"]) == ("invalid_value", "messages.2.content")
    assert needle in err["message"]


@pytest.mark.parametrize("method, path", [("POST", PATH + "/"), ("POST", "/v1/completions/"), ("GET", "/health/")])
def test_a_trailing_slash_is_an_openai_404_not_a_redirect(base, method, path):
    """Starlette answered with an empty 307 whose Location it built from the client's Host header."""
    r = httpx.request(method, base + path, json=CHAT, timeout=60, follow_redirects=False)
    err = _error(r, 404)
    assert err["code"] == "not_found" and "location" not in r.headers


def _until(condition, what: str, bound_s: float = 20.0) -> None:
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_client_that_leaves_while_queued_behind_a_request_running_alone_frees_its_place():
    """``reference`` runs alone and holds the engine thread for its whole decode; a queued client that gave
    up kept its place until then, and every new client got a 429 meanwhile. Now the place is freed as the
    disconnect is seen, while the first request is still inside a forward (the gate is shut)."""
    be = GatedToy()
    two = {**CHAT, "preferences": ["concise", "humor"]}  # the in-process server has no default preferences
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=be, max_batch=1, max_queue=1)
    with pj, in_process_server(pj) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + PATH, json={**two, "method": "reference"}, timeout=60)
        assert be.entered.wait(30)
        with pytest.raises(httpx.ReadTimeout):  # queued behind it; gives up after 0.5 s
            httpx.post(url + PATH, json=two, timeout=httpx.Timeout(0.5, connect=30))
        _until(lambda: health(url)["queued"] == 0, "the place of the client that left was not freed")
        assert not be.gate.is_set() and health(url)["cancelled"] == 1
        third = pool.submit(httpx.post, url + PATH, json=two, timeout=60)
        _until(lambda: health(url)["queued"] == 1 or third.done(), "the third request was not queued")
        be.gate.set()
        assert first.result().status_code == 200 and third.result().status_code == 200, third.result().text


FOUR = ["concise", "humor", "expert", "friendly"]


class CappedToy(ToyBackend):
    """The toy model with a backend's limit on views per session (as llama.cpp's sequence limit)."""

    MAX = 3

    def open(self, n_views):
        if n_views > self.MAX:
            raise TooManyViewsError(f"{n_views} views need more KV sequences than this backend supports ({self.MAX})")
        return super().open(n_views)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "extra, param",
    [({"views": [[p] for p in FOUR]}, "views"), ({"preferences": FOUR}, "preferences")],
)
def test_a_backends_refusal_of_that_many_views_names_the_field(extra, param, stream):
    """Below ``--max-views`` the backend may still refuse the session (a TooManyViewsError from ``open``): the
    400 names the field the views came from, not ``null``."""
    pj = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=CappedToy())
    with pj, in_process_server(pj, max_views=8) as url:
        ok = httpx.post(url + PATH, json={**CHAT, "stream": stream, "preferences": FOUR[:3]}, timeout=60)
        assert ok.status_code == 200, ok.text[:500]
        err = _error(httpx.post(url + PATH, json={**CHAT, **extra, "stream": stream}, timeout=60), 400)
        assert (err["code"], err["param"]) == ("invalid_value", param)
        assert "more KV sequences than this backend supports" in err["message"]


# ---------------------------------------------------------------- the options, checked at start-up


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--max-views", "0"], "--max-views must be at least 1, got 0"),
        (["--max-request-bytes", "0"], "--max-request-bytes must be at least 1, got 0"),
        (["--max-request-bytes", "-5"], "--max-request-bytes must be at least 1, got -5"),
        (
            ["--prefer", "concise", "--prefer", "humor", "--prefer", "expert", "--max-views", "2"],
            "the default preferences open 3 views, more than --max-views 2",
        ),
    ],
)
def test_bad_limits_are_one_line_and_exit_2(flags, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "personajudge", "serve", "--backend", "toy", "--host", "127.0.0.1", "--port", "0"]
        + flags,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"personajudge: error: {needle}\n"


# ---------------------------------------------------------------- B: the second signal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_cancels_in_flight_requests_with_shutting_down_and_exits_0(tmp_path, sig):
    """The README: "A second signal stops at once". With a grace period far longer than the test
    (600 s), the second signal must cancel both requests through the engine: the stream ends with the
    ``shutting_down`` error event and ``[DONE]``, the request that does not stream gets the 503
    (uvicorn's own second-signal path cut them with a 500 and a truncated stream), and the process
    exits 0 well inside the grace period."""
    flags = [*FLAGS, "--n-ctx", "100000", "--shutdown-timeout", "600"]
    long = {
        "model": "persona-judge",
        "messages": [{"role": "user", "content": "hold the line"}],
        "max_tokens": 90000,
        "temperature": 0,
        "stream": True,
    }
    flags[flags.index("--max-batch") + 1] = "2"
    with running_server(flags, tmp_path / "server.log") as (url, proc), ThreadPoolExecutor(1) as pool:
        with httpx.Client(timeout=120) as c:
            with c.stream("POST", url + PATH, json=long) as resp:
                lines = resp.iter_lines()
                next(lines)
                plain = pool.submit(httpx.post, url + PATH, json={**long, "stream": False}, timeout=120)
                deadline = time.monotonic() + 30
                while health(url)["running"] < 2:
                    assert time.monotonic() < deadline, "the second request never started"
                    time.sleep(0.02)
                proc.send_signal(sig)
                deadline = time.monotonic() + 30
                while httpx.get(url + "/health", timeout=5).status_code == 200:
                    assert time.monotonic() < deadline, "/health never turned 503"
                    time.sleep(0.02)
                assert health_running(url) == 2 and proc.poll() is None  # draining, both still running
                proc.send_signal(sig)
                rest = [line for line in lines if line]
            r = plain.result()
        assert proc.wait(120) == 0  # << the 600 s grace period
    assert rest[-1] == "data: [DONE]"
    for err in (json.loads(rest[-2][6:])["error"], _error(r, 503)):
        assert (err["type"], err["code"]) == ("server_error", "shutting_down") and "shutting down" in err["message"]
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log, log[-3000:]


def health_running(url: str) -> int:
    """Running requests from ``/health``, which answers 503 while draining."""
    return httpx.get(url + "/health", timeout=5).json()["running"]
