"""The server's errors name what the client sent: the request field (``param``) and what was wrong with
it (``code``), in the client's vocabulary, through httpx on 127.0.0.1 against ``personajudge serve``.

The README promises OpenAI's shape with "a field invalid (`param` names it)"; these are the cases an
audit found naming the wrong field (or none), and the shutdown behaviour the README's error table
and endpoint list describe.
"""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from annotated_types import Le  # noqa: E402
from serve_helpers import health, running_server  # noqa: E402

from personajudge.core.config import DecodingConfig  # noqa: E402
from personajudge.serve.schemas import MAX_TEMPERATURE, ChatCompletionRequest, CompletionRequest  # noqa: E402

FLAGS = ["--backend", "toy", "--encoder", "plain", "--prefer", "concise", "--prefer", "humor"]
CHAT = {"model": "persona-judge", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": "persona-judge", "prompt": "hi", "max_tokens": 4}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("serve-errors") / "server.log") as (url, _):
        yield url


def _error(base, path, body, status=400):
    r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize(
    "extra,param,code,needle",
    [
        ({"views": [[]]}, "views", "invalid_value", "view 1 is empty"),
        ({"views": [["concise"], [" , "]]}, "views", "invalid_value", "view 2 is empty"),
        ({"views": [["concize"], ["humor"]]}, "views", "unknown_preference", "did you mean concise"),
        ({"preferences": ["concize"]}, "preferences", "unknown_preference", "did you mean concise"),
        ({"preferences": ["concise", " "]}, "preferences", "invalid_value", "empty preference"),
    ],
)
def test_a_preference_error_names_the_field_sent_and_what_was_wrong(base, extra, param, code, needle):
    err = _error(base, "/v1/chat/completions", {**CHAT, **extra})
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert needle in err["message"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "max_tokens": 10**12}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10**12}, "max_completion_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 10**12}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "lambda": 65}, "lambda"),
        ("/v1/completions", {**COMPLETION, "top_k": -1}, "top_k"),
        ("/v1/completions", {**COMPLETION, "seed": -1}, "seed"),
        ("/v1/completions", {**COMPLETION, "stop": ["x", ""]}, "stop"),
        ("/v1/completions", {**COMPLETION, "method": " "}, "method"),
        ("/v1/completions", {**COMPLETION, "encoder": ""}, "encoder"),
    ],
)
def test_a_value_the_config_refuses_names_the_request_field_not_the_config_field(base, path, body, param):
    err = _error(base, path, body)
    assert (err["param"], err["code"]) == (param, "invalid_value")
    assert err["message"].startswith(param + ":") and "decoding" not in err["message"]


# request field -> the DecodingConfig field it becomes (the server's generation_kwargs)
DECODING_FIELDS = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "lambda_": "lambda_",
}


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_request_fields_carry_the_bounds_of_the_config_fields_they_become(model):
    """So that every value the config would refuse is refused while parsing, naming the request field.
    ``temperature`` then has OpenAI's tighter bound, 2 (the config takes up to 100)."""
    pairs = {**DECODING_FIELDS}
    if model is ChatCompletionRequest:
        pairs["max_completion_tokens"] = "max_new_tokens"
    tighter = {"temperature": [Le(MAX_TEMPERATURE)]}
    for request_field, config_field in pairs.items():
        expected = DecodingConfig.model_fields[config_field].metadata + tighter.get(request_field, [])
        assert model.model_fields[request_field].metadata == expected, request_field


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "  "}]}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": "hi"}]}, "messages"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["   "]}, "prompt"),
    ],
)
def test_an_empty_prompt_names_the_prompt_field(base, path, body, param):
    err = _error(base, path, body)
    assert (err["param"], err["code"]) == (param, "invalid_value")


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 1000}]}, "messages"),
        ("/v1/completions", {**COMPLETION, "prompt": "word " * 1000}, "prompt"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("method", ["persona-judge", "reference"])
def test_a_prompt_past_the_context_names_the_endpoints_prompt_field(base, path, body, param, method, stream):
    """A 400 streamed or not, whatever the method. ``reference`` runs alone: it used to start (a 200
    stream) before its loop found the prompt too long, and sent the error as an event."""
    err = _error(base, path, {**body, "method": method, "stream": stream})
    assert (err["param"], err["code"]) == (param, "context_length_exceeded")


@pytest.mark.parametrize("stream", [False, None])
@pytest.mark.parametrize("path,body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_stream_options_without_stream_is_400(base, path, body, stream):
    extra = {} if stream is None else {"stream": stream}
    err = _error(base, path, {**body, **extra, "stream_options": {"include_usage": True}})
    assert (err["param"], err["type"]) == ("stream_options", "invalid_request_error")
    assert "stream" in err["message"]
    # with stream it is what it was: a usage chunk before [DONE]
    r = httpx.post(base + path, json={**body, "stream": True, "stream_options": {"include_usage": True}}, timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.status_code == 200 and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_sigterm_drains_with_health_503_then_cancels_with_shutting_down(tmp_path):
    """SIGTERM: the port stays open while the server drains. ``/health`` answers 503 (a load balancer
    takes the replica out) and a new request is refused with 503 ``shutting_down``, while the running
    ones go on; after ``--shutdown-timeout`` they are cancelled with the README table's 503 row
    (server_error, shutting_down): an error event and [DONE] on the stream, a 503 for the request
    that does not stream. Then the port closes and the process exits 0."""
    flags = [*FLAGS, "--n-ctx", "100000", "--shutdown-timeout", "2"]
    long = {
        "model": "persona-judge",
        "messages": [{"role": "user", "content": "hold the line"}],
        "max_tokens": 90000,
        "temperature": 0,
        "stream": True,
    }  # greedy on the toy: far more than 2 s of tokens, so the grace period runs out
    with running_server(flags, tmp_path / "server.log") as (url, proc), ThreadPoolExecutor(1) as pool:
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=long) as resp:
                lines = resp.iter_lines()
                next(lines)
                plain = pool.submit(
                    httpx.post, url + "/v1/chat/completions", json={**long, "stream": False}, timeout=60
                )
                deadline = time.monotonic() + 30
                while health(url)["running"] < 2:
                    assert time.monotonic() < deadline, "the second request never started"
                    time.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while (h := httpx.get(url + "/health", timeout=5)).status_code == 200:
                    assert time.monotonic() < deadline, "/health never turned 503"
                    time.sleep(0.02)
                assert h.status_code == 503 and h.json()["status"] == "shutting_down"
                assert h.json()["running"] == 2  # the in-flight requests still run
                late = httpx.post(url + "/v1/chat/completions", json={**long, "stream": False}, timeout=10)
                assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
                assert proc.poll() is None  # still draining
                rest = [line for line in lines if line]
            r = plain.result()
        assert proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
    assert rest[-1] == "data: [DONE]"
    for err in (json.loads(rest[-2][6:])["error"], r.json()["error"]):
        assert (err["type"], err["code"]) == ("server_error", "shutting_down") and "shutting down" in err["message"]
    assert r.status_code == 503
