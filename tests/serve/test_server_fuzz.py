"""Fuzzed request bodies against a real server on 127.0.0.1: a result or an OpenAI-shaped error, never a 500.

Bodies are drawn by hypothesis from the request schema's field names with
values of every JSON type (and from raw bytes), so both the validation layer
and the generation path see hostile and unlucky input. Bounded by the
hypothesis profile (tests/conftest.py) and a 64-token cap on the server.
"""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_helpers import running_server  # noqa: E402

FLAGS = [
    "--backend",
    "toy",
    "--prefer",
    "concise",
    "--prefer",
    "humor",
    "--encoder",
    "plain",
    "--max-tokens-limit",
    "64",
    "--max-batch",
    "4",
    "--max-queue",
    "64",
]
ALLOWED = {200, 400, 404, 413, 422, 429}

FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "preferences",
    "views",
    "method",
    "lambda",
    "top_k",
    "encoder",
    "roles",
    "schedule",
    "user",
    "logprobs",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
            "content": st.one_of(st.text(max_size=40), values),
        }
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["persona-judge", "", "other-model"])},
    optional={
        **{f: values for f in FIELDS if f not in ("messages", "model")},
        "messages": messages,
        "max_tokens": st.integers(-5, 100),
        "stream": st.booleans(),
        "preferences": st.lists(st.sampled_from(["concise", "humor", "concize", "be kind please", ""]), max_size=3),
    },
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("fuzz") / "server.log") as (url, _proc):
        yield url


def check(resp):
    assert resp.status_code in ALLOWED, (resp.status_code, resp.text[:500])
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["message"], str), err
        assert "\n" not in err["message"] and "Traceback" not in err["message"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=bodies, endpoint=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_any_json_body_gets_a_result_or_an_openai_error(base, body, endpoint):
    with httpx.Client(base_url=base, timeout=60) as c:
        check(c.post(endpoint, json=body))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    raw=st.one_of(
        st.binary(max_size=200), st.text(max_size=200).map(str.encode), values.map(lambda v: json.dumps(v).encode())
    )
)
def test_any_bytes_get_a_400_not_a_crash(base, raw):
    with httpx.Client(base_url=base, timeout=60) as c:
        resp = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in {400, 422}, (resp.status_code, resp.text[:300])
    check(resp)
