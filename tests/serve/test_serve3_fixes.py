"""The third server audit's findings (notes/audit_serve3.md, A-D), each through a real client on 127.0.0.1.

A: SIGTERM's grace period covers every request received before the signal, also one whose body is still
   arriving or that is being encoded (not yet in the engine); only later arrivals get the 503.
B: ``stop`` takes at most 4 sequences (OpenAI's limit) of at most ``MAX_STOP_CHARS`` characters each.
C: ``/metrics`` counts the prompt and completion tokens of requests that end early (a client that
   leaves, a timeout, the end of the grace period).
D: a JSON value of the wrong type is a 400 naming the field (as OpenAI), not coerced; ``temperature``
   is bounded to OpenAI's [0, 2].

The drain of A and the shutdown of C run ``personajudge serve``'s own uvicorn server
(:func:`personajudge.cli.serve.graceful_server`) in-process, its signal handler called by the test, so
a request can be held exactly where the audit found the gap; the body-still-arriving case runs the real
CLI in a subprocess and sends it a real SIGTERM.
"""

import contextlib
import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serve_helpers import in_process_server, running_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.cli.serve import graceful_server  # noqa: E402
from personajudge.serve import create_app  # noqa: E402
from personajudge.serve.schemas import MAX_STOP_CHARS, MAX_STOPS, MAX_TEMPERATURE  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:method 'persona-judge' with a single view")

CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"
PATHS = [CHAT_PATH, COMPLETION_PATH]
FLAGS = ["--backend", "toy", "--encoder", "plain", "--prefer", "concise", "--prefer", "humor"]
#: greedy on the toy with this prompt: no EOS for far longer than any test runs (test_server_errors' drain)
LONG = {"messages": [{"role": "user", "content": "hold the line"}], "max_tokens": 90000, "temperature": 0}


def _body(path, **extra):
    base = {"model": "persona-judge", "max_tokens": 4, "seed": 1}
    if path == CHAT_PATH:
        return {**base, "messages": [{"role": "user", "content": "tell me about owls"}], **extra}
    return {**base, "prompt": "tell me about owls", **extra}


def _error(resp, status=400):
    assert resp.status_code == status, resp.text[:500]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def _toy(n_ctx=200000):
    return PersonaJudge(
        {"backend": {"name": "toy", "n_ctx": n_ctx}, "encoder": "plain", "preferences": ["concise", "humor"]}
    )


def _metrics(text: str) -> dict[str, float]:
    """The unlabelled samples of a Prometheus scrape (``personajudge_prompt_tokens_total``, ...)."""
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def _scrape(url):
    return _metrics(httpx.get(url + "/metrics", timeout=30).text)


def _wait(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("serve3") / "server.log") as (url, _proc):
        yield url


@contextlib.contextmanager
def graceful(pj, shutdown_timeout, **kw):
    """``personajudge serve``'s uvicorn server for ``create_app(pj)`` in a thread on 127.0.0.1; yields
    ``(url, server, app)``. The test calls ``server.handle_exit`` as the signal would (signal handlers
    are installed only in the main thread). Bounded: the thread must end within 60 s."""
    app = create_app(pj, reserve=False, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = graceful_server(config, app.state.server, shutdown_timeout)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started or not thread.is_alive(), "the server did not start")
        assert thread.is_alive()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server, app, thread
    finally:
        if thread.is_alive():
            server.handle_exit(signal.SIGTERM, None)  # a first one drains, a second cancels at once
            server.handle_exit(signal.SIGTERM, None)
        thread.join(60)
        sock.close()
        assert not thread.is_alive()


# ---------------------------------------------------------------- A: the drain waits for every request received


def test_sigterm_waits_for_a_request_that_is_still_being_encoded():
    """The audit's race, held open: the request is inside ``pj.submit`` (encoding, not yet in the engine)
    when the signal comes. The drain must keep polling (it saw the engine idle and closed it under the
    request, which got a 503 with 9 of 10 s of grace left) until the request is answered: a 200 with
    its completion. Requests that arrive after the signal still get the 503, on every /v1 route."""
    pj = _toy()
    srv_submit = pj.submit
    entered, release = threading.Event(), threading.Event()

    def held_submit(*args, **kwargs):
        entered.set()
        assert release.wait(60)
        return srv_submit(*args, **kwargs)

    pj.submit = held_submit  # what the server calls in its worker thread (Server.submit)
    engine_stats = pj.engine.stats
    polls = []

    def counted_stats():
        if threading.current_thread().name == "personajudge-drain":
            polls.append(time.monotonic())
        return engine_stats()

    pj.engine.stats = counted_stats
    body = _body(CHAT_PATH, max_tokens=5)
    with pj, graceful(pj, shutdown_timeout=60) as (url, server, app, thread), ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url + CHAT_PATH, json=body, timeout=120)
        assert entered.wait(60), "the request never reached the encoder"
        server.handle_exit(signal.SIGTERM, None)
        _wait(lambda: len(polls) >= 3, "the drain stopped looking before the request was answered")
        assert not pj.engine.stats()["closing"] and thread.is_alive()  # still draining
        h = httpx.get(url + "/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "shutting_down"
        assert h.json()["in_flight"] == 1  # received before the signal, not yet answered
        # a request that arrives now is refused, and not counted in
        late = httpx.post(url + CHAT_PATH, json=body, timeout=30)
        err = _error(late, 503)
        assert (err["type"], err["code"]) == ("server_error", "shutting_down")
        assert _error(httpx.get(url + "/v1/models", timeout=30), 503)["code"] == "shutting_down"
        assert httpx.get(url + "/health", timeout=30).json()["in_flight"] == 1
        release.set()
        r = first.result()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        thread.join(60)  # then the drain ends on its own: nothing left in flight
        assert not thread.is_alive() and pj.engine.stats()["closing"]
    # the 200 and the 503s were counted under their routes before the server stopped
    families = _metrics(app.state.server.metrics.render().decode())
    assert families["personajudge_completion_tokens_total"] == 5


def test_sigterm_waits_for_a_request_whose_body_is_still_arriving(tmp_path):
    """The deterministic variant (the audit's shut4.py), against the real CLI and a real SIGTERM: the
    headers and part of the body arrive, then the signal, then the rest. The request arrived before the
    signal, so it is answered (a 200, not the 503 it got), and then the server exits 0."""
    payload = json.dumps(_body(CHAT_PATH, max_tokens=5)).encode()
    with running_server([*FLAGS, "--shutdown-timeout", "60"], tmp_path / "server.log") as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            head = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
            )
            s.sendall(head + payload[:20])
            _wait(lambda: httpx.get(url + "/health", timeout=30).json().get("in_flight") == 1, "never received")
            proc.send_signal(signal.SIGTERM)
            _wait(lambda: httpx.get(url + "/health", timeout=30).status_code == 503, "/health never turned 503")
            assert proc.poll() is None  # draining: the request holds it open
            s.sendall(payload[20:])
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 200"), raw[:500]
        answer = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert answer["usage"]["completion_tokens"] == 5
        assert proc.wait(60) == 0


# ---------------------------------------------------------------- B: a bound on stop strings


@pytest.mark.parametrize("path", PATHS)
def test_more_than_four_stop_sequences_are_a_400_naming_stop(base, path):
    """OpenAI's limit: up to 4. 400,000 of them (within the body limit) used to slow every request in the
    batch (the emitter scans each one after every token, in the engine thread)."""
    for stops in ([f"zz{i}" for i in range(MAX_STOPS + 1)], [f"zz{i}" for i in range(1000)]):
        err = _error(httpx.post(base + path, json=_body(path, stop=stops), timeout=60))
        assert (err["param"], err["code"], err["type"]) == ("stop", "invalid_value", "invalid_request_error")
        assert f"at most {MAX_STOPS}" in err["message"] and str(len(stops)) in err["message"]
    ok = httpx.post(base + path, json=_body(path, stop=[f"zz{i}" for i in range(MAX_STOPS)]), timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("as_list", [False, True])
def test_a_stop_string_longer_than_the_limit_is_a_400_naming_stop(base, path, as_list):
    long = "z" * (MAX_STOP_CHARS + 1)
    stop = ["x y", long] if as_list else long
    err = _error(httpx.post(base + path, json=_body(path, stop=stop), timeout=60))
    assert (err["param"], err["code"]) == ("stop", "invalid_value")
    assert str(MAX_STOP_CHARS) in err["message"] and ("stop string 2" in err["message"]) == as_list
    at_limit = "z" * MAX_STOP_CHARS
    ok = httpx.post(base + path, json=_body(path, stop=[at_limit] if as_list else at_limit), timeout=60)
    assert ok.status_code == 200, ok.text


def test_the_openai_client_gets_a_bad_request_for_five_stops(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", timeout=60, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="persona-judge",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stop=["a", "b", "c", "d", "e"],
        )
    assert info.value.body["param"] == "stop"


# ---------------------------------------------------------------- C: tokens of requests that end early


def _stream_chunks(url, body, leave_after=None, on_chunk=None):
    """POST a stream; ``(text chunks read, final error code or None)``; leaves after ``leave_after`` chunks,
    and calls ``on_chunk(n)`` after the n-th."""
    n, code = 0, None
    with httpx.Client(timeout=120) as c, c.stream("POST", url + CHAT_PATH, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                code = event["error"]["code"]
                break
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                n += 1
                if on_chunk is not None:
                    on_chunk(n)
                if leave_after is not None and n >= leave_after:
                    break
    return n, code


def _prompt_tokens(url):
    """The prompt tokens of ``LONG``'s prompt (every view's), from a request that completes."""
    r = httpx.post(url + CHAT_PATH, json={"model": "persona-judge", **LONG, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_a_stream_the_client_leaves_counts_its_prompt_and_the_tokens_it_was_sent():
    pj = _toy()
    with pj, in_process_server(pj) as url:
        prompt = _prompt_tokens(url)
        before = _scrape(url)
        n, code = _stream_chunks(url, {"model": "persona-judge", **LONG}, leave_after=50)
        assert (n, code) == (50, None)
        _wait(
            lambda: (
                _scrape(url)["personajudge_cancelled_requests_total"]
                == before["personajudge_cancelled_requests_total"] + 1
            ),
            "the stream was never cancelled",
        )
        after = _scrape(url)
    assert after["personajudge_prompt_tokens_total"] - before["personajudge_prompt_tokens_total"] == prompt
    sent = after["personajudge_completion_tokens_total"] - before["personajudge_completion_tokens_total"]
    assert n <= sent <= LONG["max_tokens"]  # the server may have committed tokens the client never read


def test_a_stream_that_times_out_counts_its_prompt_and_the_tokens_it_was_sent():
    pj = _toy()
    with pj, in_process_server(pj, request_timeout=1.0) as url:
        prompt = _prompt_tokens(url)
        before = _scrape(url)
        n, code = _stream_chunks(url, {"model": "persona-judge", **LONG})
        assert code == "timeout" and n >= 1
        _wait(lambda: _scrape(url)["personajudge_running_requests"] == 0, "the request never left the engine")
        after = _scrape(url)
    assert after["personajudge_cancelled_requests_total"] - before["personajudge_cancelled_requests_total"] == 1
    assert after["personajudge_prompt_tokens_total"] - before["personajudge_prompt_tokens_total"] == prompt
    sent = after["personajudge_completion_tokens_total"] - before["personajudge_completion_tokens_total"]
    assert n <= sent <= LONG["max_tokens"]


def test_a_stream_cancelled_at_the_end_of_the_grace_period_counts_its_tokens():
    pj = _toy()
    with pj, graceful(pj, shutdown_timeout=0.5) as (url, server, app, thread):
        prompt = _prompt_tokens(url)
        before = _scrape(url)
        n, code = _stream_chunks(
            url,
            {"model": "persona-judge", **LONG},
            on_chunk=lambda k: k == 20 and server.handle_exit(signal.SIGTERM, None),
        )
        assert code == "shutting_down" and n >= 20
        thread.join(60)
        assert not thread.is_alive()
    after = _metrics(app.state.server.metrics.render().decode())
    assert after["personajudge_prompt_tokens_total"] - before["personajudge_prompt_tokens_total"] == prompt
    sent = after["personajudge_completion_tokens_total"] - before["personajudge_completion_tokens_total"]
    assert n <= sent <= LONG["max_tokens"]


# ---------------------------------------------------------------- D: wrong JSON types are a 400


WRONG_TYPES = [
    ("max_tokens", True),
    ("max_tokens", "5"),
    ("max_tokens", 2.0),
    ("max_completion_tokens", True),
    ("temperature", True),
    ("temperature", "0.5"),
    ("top_p", "0.5"),
    ("top_p", True),
    ("n", True),
    ("n", "1"),
    ("n", 1.0),
    ("seed", "3"),
    ("seed", True),
    ("seed", 3.0),
    ("stream", "yes"),
    ("stream", 1),
    ("lambda", True),
    ("lambda", "4"),
    ("top_k", "3"),
    ("top_k", False),
    ("echo", 0),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("field,value", WRONG_TYPES)
def test_a_value_of_the_wrong_json_type_is_a_400_naming_the_field(base, path, field, value):
    err = _error(httpx.post(base + path, json=_body(path, **{field: value}), timeout=60))
    assert (err["param"], err["code"], err["type"]) == (field, "invalid_value", "invalid_request_error")
    assert err["message"].startswith(field + ": Input should be a valid")


@pytest.mark.parametrize("path", PATHS)
def test_a_wrongly_typed_nested_field_is_a_400_naming_it(base, path):
    body = _body(path, stream=True, stream_options={"include_usage": 1})
    err = _error(httpx.post(base + path, json=body, timeout=60))
    assert err["param"] == "stream_options.include_usage"
    if path == CHAT_PATH:
        body = _body(path, messages=[{"role": "user", "content": 5}])
        assert _error(httpx.post(base + path, json=body, timeout=60))["param"] == "messages.0.content"


@pytest.mark.parametrize("path", PATHS)
def test_temperature_is_bounded_to_openais_range(base, path):
    """OpenAI takes 0 to 2; the server follows (the Python API and the CLI still take up to 100). Values of
    the right type are taken as before: JSON has one number type, so ``"temperature": 1`` is a float, as
    in OpenAI; ``"stream": null`` is false."""
    for too_hot in (2.5, 50):
        err = _error(httpx.post(base + path, json=_body(path, temperature=too_hot), timeout=60))
        assert (err["param"], err["code"]) == ("temperature", "invalid_value")
        assert "less than or equal to 2" in err["message"]
    for extra in (
        {"temperature": MAX_TEMPERATURE},
        {"temperature": 1, "top_p": 1},
        {"temperature": 0.5, "stream": None, "n": 1, "seed": 7, "echo": False},
    ):
        r = httpx.post(base + path, json=_body(path, **extra), timeout=60)
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["usage"]["completion_tokens"] == 4
