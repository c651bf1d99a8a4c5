"""The server and the thread-safe API on the embedded Gemma 3 270M (llama.cpp).

On llama.cpp a request batched with others runs through kernels of other
shapes than alone, which can change logits in the last bits; in greedy mode
that can only flip a token at a near-tie. The checks here are what must hold
regardless: every caller gets a complete, well-formed response of its own
(no RuntimeError, no DeviceError, no other caller's text), the greedy outputs
of concurrent callers equal their single-thread outputs up to a proven
near-tie (tests/helpers/llama_checks.py), and a disconnected client's KV
sequences are freed.
"""

import threading

import pytest

pytestmark = pytest.mark.model

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("llama_cpp")

from llama_checks import assert_same_until_tie, forced_logits  # noqa: E402
from serve_helpers import health, running_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402

PROMPTS = ["Why is the sky blue?", "How do bees make honey?", "What is a prime number?", "Why do cats purr?"]
CFG = {"backend": {"name": "llama-cpp", "n_ctx": 1024, "threads": 1}, "preferences": ["concise", "humor"]}


@pytest.fixture(scope="module")
def pj():
    with PersonaJudge(CFG, max_batch=4) as model:
        yield model


def test_four_threads_on_one_llama_model_get_the_single_thread_outputs(pj):
    alone = [pj.generate(p, temperature=0.0, max_new_tokens=12, seed=0) for p in PROMPTS]
    got, errors = [None] * 4, []

    def worker(i):
        try:
            got[i] = pj.generate(PROMPTS[i], temperature=0.0, max_new_tokens=12, seed=0)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    # Greedy outputs equal the single-thread ones, except that a batched row may part at a proven
    # near-tie (llama.cpp's logits move with the batch shape; README: batch-shape numerics).
    cfg, meth, views = pj._prepare(None, None, None, {"temperature": 0.0})
    for prompt, a, b in zip(PROMPTS, alone, got):
        contexts = pj.encode_views(prompt, cfg, meth, views)
        logit_lists = [forced_logits(pj.backend, c, a.tokens) for c in contexts]
        assert_same_until_tie(a.tokens, b.tokens, logit_lists, min_agree=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["--n-ctx", "1024", "--threads", "1", "--prefer", "concise", "--prefer", "humor", "--max-batch", "4"]
    with running_server(flags, tmp_path_factory.mktemp("serve-model") / "server.log", ready_timeout=300) as s:
        yield s


def test_openai_client_against_the_embedded_model(server):
    base, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    r = client.chat.completions.create(
        model="persona-judge",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=12,
        temperature=0,
        seed=1,
        extra_body={"preferences": ["concise"]},
    )
    assert r.choices[0].message.content.strip() and r.usage.completion_tokens <= 12
    stream = client.chat.completions.create(
        model="persona-judge",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=12,
        temperature=0,
        seed=1,
        stream=True,
        extra_body={"preferences": ["concise"]},
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content


def test_a_disconnect_frees_the_llama_sequences(server):
    base, _ = server
    body = {
        "model": "persona-judge",
        "messages": [{"role": "user", "content": PROMPTS[1]}],
        "max_tokens": 500,
        "stream": True,
    }
    with httpx.Client(timeout=300) as c:
        with c.stream("POST", base + "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            next(lines)
            assert health(base)["slots_in_use"] >= 2
    for _ in range(600):
        h = health(base)
        if h["running"] == 0:
            break
        threading.Event().wait(0.1)
    assert h["running"] == 0 and h["slots_in_use"] == 0 and h["cancelled"] >= 1
