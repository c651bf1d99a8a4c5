"""Every example is a runnable program; run each the way a user would."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script, *args, timeout=600):
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_quickstart_on_the_toy_backend():
    out = run("quickstart.py", "--backend", "toy")
    assert "--- prompt:" in out and "--- persona-judge:" in out and "acceptance" in out


def test_multi_objective_on_the_toy_backend():
    out = run("multi_objective.py", "--backend", "toy")
    lines = [line for line in out.splitlines() if "objective(s)" in line]
    assert len(lines) == 3


def _llama_available():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.model
@pytest.mark.skipif(not _llama_available(), reason="llama-cpp-python is not installed")
def test_quickstart_on_the_embedded_model():
    out = run("quickstart.py", "--max-new-tokens", "24")
    assert out.count("tok/s") == 2
