"""``personajudge serve`` on the toy backend, through the official ``openai`` client and httpx on 127.0.0.1.

Expected texts come from the same request run in-process alone (the toy's
logits are a pure function of each row's context, so batching with other
requests must not change a single token).
"""

import asyncio
import json
import signal
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_helpers import health, running_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402

KEY = "sekret-key"
PREFS = ["concise", "humor"]
FLAGS = [
    "--backend",
    "toy",
    "--prefer",
    "concise",
    "--prefer",
    "humor",
    "--encoder",
    "plain",
    "--api-key",
    KEY,
    "--max-tokens-limit",
    "5000",
    "--max-batch",
    "8",
    "--max-queue",
    "8",
]
PROMPTS = [
    "tell me about owls",
    "why is the sky blue",
    "how do bees make honey",
    "what is a prime number",
    "describe a sunset",
    "how do trains work",
    "what do cats eat",
    "why do leaves fall",
]


@pytest.fixture(scope="module")
def local():
    """The same model in-process: what each request gives alone."""
    return PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain", "preferences": PREFS}, backend=ToyBackend())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(FLAGS, tmp_path_factory.mktemp("serve") / "server.log") as (base, proc):
        yield base, proc


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _error(err):
    return err.response.json()["error"]


def test_chat_completion_with_extra_body_equals_the_request_alone(client, local):
    r = client.chat.completions.create(
        model="persona-judge",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=24,
        seed=5,
        temperature=0.7,
        extra_body={"preferences": ["concise", "formal"], "lambda": 3, "top_k": 10},
    )
    alone = local.generate(PROMPTS[0], preferences=["concise", "formal"], seed=5, max_new_tokens=24, lam=3, top_k=10)
    assert r.choices[0].message.content == alone.text
    assert r.choices[0].finish_reason == {"eos": "stop", "stop": "stop", "length": "length"}[alone.finish_reason]
    assert r.usage.completion_tokens == len(alone.tokens)
    assert r.usage.prompt_tokens == sum(alone.stats.prompt_tokens)
    pj = r.model_extra["persona_judge"]
    assert pj["seed"] == 5 and pj["views"] == 2 and pj["method"] == "persona-judge"
    assert (pj["drafted"], pj["accepted"]) == (alone.stats.drafted, alone.stats.accepted)


def test_a_plain_openai_client_gets_the_server_default_preferences(client, local):
    r = client.chat.completions.create(
        model="persona-judge", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=20, seed=9
    )
    assert r.choices[0].message.content == local.generate(PROMPTS[1], seed=9, max_new_tokens=20).text
    assert r.model_extra["persona_judge"]["views"] == 2


def test_streaming_chunks_concatenate_to_the_text_and_end_with_usage(client, local):
    stream = client.chat.completions.create(
        model="persona-judge",
        messages=[{"role": "user", "content": PROMPTS[2]}],
        max_tokens=30,
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"method": "persona-judge-base"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    alone = local.generate(PROMPTS[2], seed=11, max_new_tokens=30, method="persona-judge-base")
    assert text == alone.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["persona_judge"]["method"] == "persona-judge-base"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(alone.tokens)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed, not one blob


def test_completions_endpoint(client, local):
    r = client.completions.create(
        model="persona-judge",
        prompt=PROMPTS[3],
        max_tokens=16,
        seed=2,
        extra_body={"views": [["concise", "humor"], ["formal"]]},
    )
    alone = local.generate(PROMPTS[3], views=[["concise", "humor"], ["formal"]], seed=2, max_new_tokens=16)
    assert r.choices[0].text == alone.text and r.object == "text_completion"


def test_models_and_unknown_model(client):
    assert [m.id for m in client.models.list().data] == ["persona-judge"]
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert _error(info.value)["code"] == "model_not_found" and "persona-judge" in _error(info.value)["message"]


@pytest.mark.parametrize(
    "kwargs,param,needle",
    [
        (dict(n=2), "n", "n=1"),
        (dict(max_tokens=6000), "max_tokens", "at most 5000"),
        (dict(temperature=-1), "temperature", "temperature"),
        (dict(extra_body={"preferences": ["concize"]}), "preferences", "did you mean concise"),
        (dict(extra_body={"method": "nope"}), "method", "unknown method"),
        (dict(extra_body={"lambda": 0}), "lambda", "lambda"),
        (dict(logprobs=True), "logprobs", "not supported"),
    ],
)
def test_bad_fields_are_400_in_openai_shape_naming_the_field(client, kwargs, param, needle):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="persona-judge", messages=[{"role": "user", "content": "hi"}], **kwargs)
    err = _error(info.value)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"


def test_prompt_past_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="persona-judge", messages=[{"role": "user", "content": "word " * 1000}], max_tokens=5
        )
    assert _error(info.value)["code"] == "context_length_exceeded"


def test_invalid_json_and_auth(server):
    base = server[0]
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        base + "/v1/chat/completions", json={"model": "persona-judge"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(base + "/v1/models").status_code == 401
    assert httpx.get(base + "/health").status_code == 200  # health and metrics need no key


def _ttft_count(base):
    lines = httpx.get(base + "/metrics").text.splitlines()
    return float(
        next(ln for ln in lines if ln.startswith("personajudge_time_to_first_token_seconds_count")).split()[-1]
    )


def test_metrics_count_requests_tokens_and_acceptance(client, server):
    before = _ttft_count(server[0])
    client.chat.completions.create(
        model="persona-judge", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=1
    )
    assert _ttft_count(server[0]) == before + 1  # a request that does not stream has a first token too
    text = httpx.get(server[0] + "/metrics").text
    for name in (
        "personajudge_requests_total",
        "personajudge_completion_tokens_total",
        "personajudge_acceptance_rate",
        "personajudge_queue_depth",
        "personajudge_batch_size_bucket",
        "personajudge_request_duration_seconds_bucket",
        "personajudge_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name
    ok = [
        line
        for line in text.splitlines()
        if line.startswith('personajudge_requests_total{endpoint="/v1/chat') and 'status="200"' in line
    ]
    assert ok and float(ok[0].split()[-1]) >= 1


def _duration_counts(base):
    """``personajudge_request_duration_seconds_count`` by endpoint label."""
    out = {}
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("personajudge_request_duration_seconds_count{"):
            out[line.split('endpoint="', 1)[1].split('"', 1)[0]] = float(line.split()[-1])
    return out


def test_every_http_request_is_labelled_by_its_path_in_the_latency_histogram(server):
    """Short requests raced the label: the engine could finish a job before the handler set its
    endpoint, and its latency went under ``endpoint="python"`` (152 of 200 one-token requests)."""
    from concurrent.futures import ThreadPoolExecutor

    base = server[0]
    before = _duration_counts(base)
    body = {"model": "persona-judge", "prompt": "hi", "max_tokens": 1, "seed": 1}

    def one(i):
        return httpx.post(
            base + "/v1/completions", json={**body, "seed": i}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ).status_code

    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(one, range(40)))
    after = _duration_counts(base)
    assert codes == [200] * 40
    assert after.get("/v1/completions", 0) - before.get("/v1/completions", 0) == 40
    assert after.get("python", 0) == before.get("python", 0)


LONG = {
    "model": "persona-judge",
    "messages": [{"role": "user", "content": "hold the line"}],
    "max_tokens": 3000,
    "temperature": 0,
    "stream": True,
}  # greedy on the toy: 3000 tokens, no EOS (about 2 s alone)
AUTH = {"Authorization": f"Bearer {KEY}"}


def _wait_idle(base, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(base)
        if h["running"] == 0 and h["queued"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {h}")


def test_queue_full_is_429_with_retry_after_and_a_disconnect_cancels(tmp_path):
    flags = [
        "--backend",
        "toy",
        "--encoder",
        "plain",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--api-key",
        KEY,
        "--max-batch",
        "1",
        "--max-queue",
        "0",
        "--n-ctx",
        "200000",
    ]
    # requests that cannot finish before they are cancelled, however slow the machine is (LONG alone
    # could finish between the stream's first line and the 429 check on a loaded machine)
    endless = {**LONG, "max_tokens": 150000}
    with running_server(flags, tmp_path / "server.log") as (base, _):
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", base + "/v1/chat/completions", json=endless, headers=AUTH) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                next(lines)  # running now
                busy = health(base)
                r = c.post(base + "/v1/chat/completions", headers=AUTH, json={**LONG, "stream": False, "max_tokens": 5})
                if r.status_code != 429:  # say what the first request was doing (this failed once, in CI)
                    after = [line for _, line in zip(range(3), lines)]
                    pytest.fail(
                        f"not refused: {r.status_code} {r.text[:300]}; health while the first ran: {busy}; "
                        f"its next lines: {after}; health now: {health(base)}; "
                        f"server log: {(tmp_path / 'server.log').read_text()[-1500:]}"
                    )
                assert busy["running"] == 1 and busy["queued"] == 0
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
            # the client hung up mid-stream: the request is cancelled, not finished, and its slots freed
        h = _wait_idle(base)
        assert h["completed"] == 0 and h["slots_in_use"] == 0
        # a non-streaming client that gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):  # a slow connect is not the timeout this is about
            httpx.post(
                base + "/v1/chat/completions",
                json={**endless, "stream": False},
                headers=AUTH,
                timeout=httpx.Timeout(0.5, connect=30),
            )
        h = _wait_idle(base)
        assert h["completed"] == 0 and h["slots_in_use"] == 0
        assert "personajudge_cancelled_requests_total 2.0" in httpx.get(base + "/metrics").text


def test_sigterm_stops_accepting_finishes_or_cancels_in_flight_and_exits_0(tmp_path):
    flags = [
        "--backend",
        "toy",
        "--encoder",
        "plain",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--shutdown-timeout",
        "1",
    ]
    with running_server(flags, tmp_path / "server.log") as (base, proc):
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", base + "/v1/chat/completions", json=LONG) as resp:
                lines = resp.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line]  # finished, or cancelled after the grace period
        assert proc.wait(30) == 0
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][6:])
        if "error" in last:  # cancelled after the grace period
            assert "shutting down" in last["error"]["message"]
        else:  # or finished within it
            assert last["choices"][0]["finish_reason"] in ("stop", "length")
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + "/health")


def test_load_32_clients_every_response_is_its_own_and_rss_does_not_grow(server, local):
    psutil = pytest.importorskip("psutil")
    base, proc = server
    n_clients, rounds = 32, 4

    def args(c, k):
        return PROMPTS[c % 8] + " " + "abcdefghijklmnopqrstuvwxyz"[c % 26], 1000 * c + k

    expected = {
        (c, k): local.generate(args(c, k)[0], seed=args(c, k)[1], max_new_tokens=16).text
        for c in range(n_clients)
        for k in range(rounds)
    }
    statuses: dict[tuple, int] = {}
    texts: dict[tuple, str] = {}
    rss = []

    async def one(client, c, k):
        prompt, seed = args(c, k)
        r = await client.post(
            base + "/v1/chat/completions",
            headers=AUTH,
            json={
                "model": "persona-judge",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 16,
                "seed": seed,
                "stream": k % 2 == 1,
            },
        )
        statuses[(c, k)] = r.status_code
        if r.status_code == 200:
            if k % 2:
                texts[(c, k)] = "".join(
                    (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                    for line in r.text.splitlines()
                    if line.startswith("data: {")
                )
            else:
                texts[(c, k)] = r.json()["choices"][0]["message"]["content"]

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            for k in range(rounds):
                await asyncio.gather(*(one(client, c, k) for c in range(n_clients)))
                rss.append(psutil.Process(proc.pid).memory_info().rss)

    asyncio.run(asyncio.wait_for(main(), 60))
    assert set(statuses.values()) <= {200, 429}
    assert sum(s == 200 for s in statuses.values()) >= n_clients  # the batch and the queue take 16 at a time
    for key, text in texts.items():
        assert text == expected[key], key
    assert rss[-1] - rss[1] < 16 * 2**20, [r // 2**20 for r in rss]
    h = _wait_idle(base)
    assert h["slots_in_use"] == 0
