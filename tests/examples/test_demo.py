"""`make demo`'s script: the same prompt with no preference, with `prompt` and with Persona-judge, on one screen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _sections(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("--- ")]


def test_demo_on_the_toy_backend_prints_three_answers_on_one_screen():
    out = run("--backend", "toy", "--max-new-tokens", "16")
    heads = _sections(out)
    assert [h.split(":")[0].split(" (")[0] for h in heads] == ["--- no preference", "--- prompt", "--- persona-judge"]
    assert "encoder exemplar" in out.splitlines()[0]  # the toy model has no chat template: auto -> exemplar
    assert "acceptance" in heads[2] and len(out.splitlines()) <= 24


@pytest.mark.model
def test_demo_on_the_embedded_model():
    pytest.importorskip("llama_cpp")
    out = run("--threads", "1", "--max-new-tokens", "48")
    assert len(_sections(out)) == 3 and len(out.splitlines()) <= 24
    answers = out.split("--- ")[1:]
    assert all(a.split("\n", 1)[1].strip() not in ("", "(empty)") for a in answers)
    assert "Question:" not in out and "Answer:" not in out  # clean answers: no echoed labels
