"""The server on the hf backend (a tiny random Llama), dynamic cache and static cache with compiled steps.

The OpenAI client on 127.0.0.1 sends four requests at once; the server runs
them in shared steps of one session (continuous batching; the batch-size
histogram shows steps with several requests), and each answer, streamed or not,
must be the text the Python API gives for that request alone. hf's float32 CPU
logits move by ~1e-6 with the batch shape, which cannot flip a greedy token
of this model except at an exact tie.
"""

from __future__ import annotations

import threading
import urllib.request

import pytest

pytestmark = pytest.mark.hf

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from serve_helpers import health, running_server  # noqa: E402
from tiny_hf import build_tiny  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402

PROMPTS = ["Why is the sky blue?", "Name a fruit.", "What is 2+2?", "Say hi."]
PREFS = ["concise", "humor"]
COMPILED = {"compile": True, "compile_backend": "eager", "max_cache_len": 512}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("serve-hf") / "llama", "llama")


def alone(tiny: str, options: dict) -> list[str]:
    cfg = {"backend": {"name": "hf", "model": tiny, "device": "cpu", "options": options}, "preferences": PREFS}
    with PersonaJudge(cfg) as pj:
        return [
            pj.generate([{"role": "user", "content": p}], temperature=0.0, max_new_tokens=16, seed=1).text
            for p in PROMPTS
        ]


@pytest.mark.parametrize("options", [{}, COMPILED], ids=["dynamic", "compiled"])
def test_concurrent_openai_clients_get_their_own_answers(tiny, tmp_path, options):
    want = alone(tiny, options)
    flags = ["--backend", "hf", "--model", tiny, "--device", "cpu", "--max-batch", "4"]
    for k, v in options.items():
        flags += ["--backend-option", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    for p in PREFS:
        flags += ["--prefer", p]
    with running_server(flags, tmp_path / "server.log") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        got: list[str | None] = [None] * 4
        streamed: list[str | None] = [None] * 4
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            kw = dict(
                model="persona-judge",
                messages=[{"role": "user", "content": PROMPTS[i]}],
                max_tokens=16,
                temperature=0,
                seed=1,
            )
            try:
                got[i] = client.chat.completions.create(**kw).choices[0].message.content
                chunks = client.chat.completions.create(**kw, stream=True)
                streamed[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors and not any(t.is_alive() for t in threads)
        h = health(base)
        assert h["running"] == 0 and h["slots_in_use"] == 0
        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        steps = {
            line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("personajudge_batch_size_bucket")
        }
        assert steps["+Inf"] > steps["1.0"]  # some steps ran several requests' rows in one forward
    assert got == want and streamed == want
    assert len(set(want)) > 1  # the four prompts do get different answers: the comparison can see a mix-up
