"""Every example is a runnable program; run each the way a user would."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=timeout
    )
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


def _gguf_available():
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return _llama_available()


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.skipif(not _gguf_available(), reason="needs gguf and llama-cpp-python")
def test_synthetic_gguf_has_the_asked_shape_and_runs(tmp_path):
    """The speed-benchmark model builder writes a GGUF llama.cpp loads, with the embedded tokenizer."""
    import gguf

    from personajudge import PersonaJudge

    dest = tmp_path / "tiny.gguf"
    out = run("synthetic_gguf.py", "--shape", "tiny", str(dest))
    assert "shape tiny" in out and dest.is_file()
    assert not list(tmp_path.glob("*.part"))
    fields = gguf.GGUFReader(str(dest)).fields
    assert fields["gemma3.block_count"].contents() == 2
    assert fields["gemma3.embedding_length"].contents() == 64

    # plain encoder: a random-weight model is only "two views of one model" when the prefixes are short
    with PersonaJudge({"backend": {"name": "llama-cpp", "model": str(dest), "threads": 1}, "encoder": "plain"}) as pj:
        assert pj.backend.tokenizer.encode("Why is the sky blue?") == _embedded_tokens("Why is the sky blue?")
        res = pj.generate("Why is the sky blue?", preferences=["concise", "humor"], max_new_tokens=12, seed=0)
    assert res.stats.tokens == 12 and res.stats.drafted >= res.stats.accepted > 0


def _embedded_tokens(text):
    from personajudge import PersonaJudge

    with PersonaJudge({"backend": {"name": "llama-cpp", "threads": 1}}) as pj:
        return pj.backend.tokenizer.encode(text)


@pytest.mark.parametrize(
    "script, args, needle",
    [
        ("quickstart.py", ["--backend", "nope"], "unknown backend 'nope'"),
        ("multi_objective.py", ["--backend", "nope"], "unknown backend 'nope'"),
        ("demo.py", ["--backend", "toy", "--max-new-tokens", "0"], "max_new_tokens"),
        ("bench_hf.py", ["--repeats", "0"], "--repeats and --max-new-tokens must be at least 1"),
        ("evaluate_small.py", ["--backend", "toy", "--limit", "0"], "invalid evaluation: limit"),
    ],
)
def test_an_examples_mistake_is_one_line_and_status_2(script, args, needle):
    """The examples are the first thing a user runs: a mistake ends as it does at the CLI, not in a traceback."""
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error:") and needle in last, proc.stderr
