"""The prepared GPU check: install, CUDA tests and the benchmark on real model shapes, in one run.

GPU time for this project is rare and short (a bare machine with torch,
transformers, accelerate, pluggy and pytest, no internet, about ten minutes a
run), so everything the GPU must answer is asked by this one command::

    make gpu-wheels                      # here, with internet: wheels the GPU image lacks -> .whl/
    python3 examples/gpu_check.py OUT    # there (or: make gpu-check GPU_OUT=OUT)

It

1. installs what the image lacks from the wheels in ``.whl/`` and the project
   from the working tree (``pip install --no-index``), then re-runs itself with
   them on ``PYTHONPATH`` (nothing to do where ``personajudge`` imports already);
2. runs the CUDA tests (``pytest -m cuda`` on the hf backend and the host-sync
   tests);
3. builds random-weight bfloat16 models with real shapes directly on the GPU
   (Gemma 3 270M, Gemma 3 1B, Qwen2.5-7B; no download) with a synthetic
   tokenizer of the right vocabulary size, and on each runs the benchmark of
   ``personajudge bench --backend hf --device cuda`` in this process: plain
   ``model.generate`` (dynamic cache), ``persona-judge``, ``persona-judge-base``,
   3 views, ``generate_batch`` of 16 prompts against 1, peak GPU memory with 1
   and 2 views, the step costs, and cached-vs-recomputed logits;
4. writes ``gpu_check.json`` and ``gpu_check.md`` to OUT, skipping the larger
   shapes when the time budget (``--budget-s``, default 420 s) runs short.

Random weights make the text noise and the acceptance rate meaningless; the
speed is what counts (with the interleaved schedule every step commits about
one token whatever is accepted). On a machine without CUDA it runs tiny shapes
on the CPU (``--shapes tiny-gemma3,tiny-qwen2``, the default there) in well
under a minute: the test suite runs it that way so it cannot rot.
"""

from __future__ import annotations

import argparse
import faulthandler
import glob
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "personajudge.gpu_check/1"
_INSTALLED_ENV = "PERSONAJUDGE_GPU_CHECK_INSTALL"

#: name -> (transformers config class, config fields, estimated seconds on one H100 for the whole shape)
SHAPES: dict[str, tuple[str, dict[str, Any], float]] = {
    "gemma3-270m": (
        "Gemma3TextConfig",
        dict(
            vocab_size=262144,
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            max_position_embeddings=32768,
            query_pre_attn_scalar=256,
            rope_theta=1_000_000.0,
        ),
        60.0,
    ),
    "gemma3-1b": (
        "Gemma3TextConfig",
        dict(
            vocab_size=262144,
            hidden_size=1152,
            intermediate_size=6912,
            num_hidden_layers=26,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            sliding_window=512,
            max_position_embeddings=32768,
            query_pre_attn_scalar=256,
            rope_theta=1_000_000.0,
        ),
        90.0,
    ),
    "qwen2.5-7b": (
        "Qwen2Config",
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            use_sliding_window=False,
        ),
        150.0,
    ),
    # CPU rehearsal: the same code paths (a sliding-window Gemma 3 with mixed layer types, a Qwen 2).
    "tiny-gemma3": (
        "Gemma3TextConfig",
        dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=8,
            max_position_embeddings=2048,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        10.0,
    ),
    "tiny-qwen2": (
        "Qwen2Config",
        dict(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
        10.0,
    ),
}
#: seconds the compiled run needs left on a GPU before it starts (compile, warm-up, timed runs)
COMPILE_S = 100.0
GPU_SHAPES = ["gemma3-270m", "gemma3-1b", "qwen2.5-7b"]
TINY_SHAPES = ["tiny-gemma3", "tiny-qwen2"]
PROMPTS = [
    "Why is the sky blue?",
    "Tell me a joke about cats.",
    "How does a bicycle stay upright?",
    "Explain photosynthesis to a child.",
    "What is a black hole?",
    "Write a haiku about rain.",
    "Why do we dream?",
    "How do vaccines work?",
    "What makes bread rise?",
    "Describe the moon.",
    "How do airplanes fly?",
    "What is inflation?",
    "Why is the sea salty?",
    "How do magnets work?",
    "What is a prime number?",
    "Why do leaves change colour?",
]
CUDA_TESTS = ["tests/backends/test_hf.py", "tests/backends/test_hf_static.py", "tests/core/test_host_syncs.py"]


# --------------------------------------------------------------------------------------------- install


def _importable() -> str | None:
    """None when the project and its dependencies import; else the missing module's name."""
    try:
        import array_api_compat  # noqa: F401
        import pydantic  # noqa: F401

        import personajudge.api  # noqa: F401
        import personajudge.backends.hf  # noqa: F401
    except ImportError as err:
        return err.name or str(err)
    return None


def install(wheels: Path, site: Path) -> dict[str, Any]:
    """Install the wheels and the project into ``site`` with no index (nothing can be fetched there)."""
    site.mkdir(parents=True, exist_ok=True)
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(site),
    ]
    info: dict[str, Any] = {"site": str(site), "wheels": sorted(Path(w).name for w in glob.glob(str(wheels / "*.whl")))}
    t0 = time.perf_counter()
    if info["wheels"]:
        subprocess.run(pip + sorted(glob.glob(str(wheels / "*.whl"))), check=True)
    proc = subprocess.run(pip + ["--no-build-isolation", str(REPO)], capture_output=True, text=True)
    if proc.returncode == 0:
        info["project"] = "pip install --no-index --no-build-isolation (from the working tree)"
    else:  # no usable setuptools there: map the package folders by hand, as an editable install would
        why = [x.strip() for x in proc.stderr.splitlines() if "error" in x.lower()][:2]
        info["project"] = "folder links (pip could not build it: " + " / ".join(why or ["?"])[:200] + ")"
        pkg = site / "personajudge"
        pkg.mkdir(exist_ok=True)
        for src in (REPO / "personajudge").iterdir():
            if not (pkg / src.name).exists():
                (pkg / src.name).symlink_to(src)
        for sub in ("core", "backends", "preferences", "plugins"):
            if not (pkg / sub).exists():
                (pkg / sub).symlink_to(REPO / sub)
    info["install_s"] = round(time.perf_counter() - t0, 1)
    return info


def ensure_installed(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Install if needed and re-run this script with the new site on ``PYTHONPATH``."""
    done = os.environ.get(_INSTALLED_ENV)
    if done:
        return json.loads(done)
    missing = "(--reinstall)" if args.reinstall else _importable()
    if missing is None:
        return {"project": "already importable", "python": sys.executable}
    print(f"[gpu-check] {missing} is missing: installing from {args.wheels} (no index)", flush=True)
    info = install(Path(args.wheels), Path(args.site))
    info["missing_before"] = missing
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([args.site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **{_INSTALLED_ENV: json.dumps(info)},
    )
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------- models


def build_backend(shape: str, device: str, *, model: Any = None, options: dict[str, Any] | None = None):
    """A random-weight model of ``shape`` built directly on ``device`` (bf16 on CUDA), wrapped in the hf backend.

    ``model``: reuse an already built model (another backend configuration of the same weights);
    ``options``: the backend's ``backend.options`` (e.g. a static cache and compile)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from personajudge.backends.hf import HFBackend
    from personajudge.core.config import BackendConfig

    cls_name, fields, _ = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model is None:
        cfg = getattr(transformers, cls_name)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.eval()
    from personajudge.testing.tokenizers import char_tokenizer  # the installed package's: nothing else travels

    tok = char_tokenizer(fields["vocab_size"])

    class Prebuilt(HFBackend):
        """The hf backend on a model built in memory (loading is the only step it skips)."""

        def _load(self, model_name, gguf_file):
            return f"synthetic:{shape}", model, tok

    config = BackendConfig(name="hf", device=device, dtype=str(dtype).removeprefix("torch."), options=options or {})
    return Prebuilt(config)


def compiled(shape: str, device: str, backend, args: argparse.Namespace) -> dict[str, Any]:
    """The same weights with a static cache and compiled steps (CUDA graphs on CUDA), timed against generate.

    On CUDA, inductor first; when it cannot compile here (it needs a C
    compiler and Triton), dynamo's ``cudagraphs`` backend, which captures the
    traced step as CUDA graphs without generating code. On the CPU rehearsal
    dynamo only traces (``compile_backend=eager``): the GPU's code path minus
    code generation."""
    from personajudge.bench import run_bench
    from personajudge.core.config import build_config

    gpu = device == "cuda"
    if args.compile_backend:
        tries = [args.compile_backend]
    else:
        tries = ["inductor", "cudagraphs"] if gpu else ["eager"]
    attempts: list[dict[str, Any]] = []
    for name in tries:
        options = {
            "compile": "reduce-overhead" if gpu else True,
            "compile_backend": name,
            "max_cache_len": 1024 if gpu else 256,
        }
        static = build_backend(shape, device, model=backend.model, options=options)
        cfg = build_config(
            {
                "backend": {"name": "hf", "device": device, "options": options},
                "decoding": {"max_new_tokens": args.max_new_tokens, "seed": 0},
            }
        )
        try:
            rep = run_bench(
                cfg,
                views=2,
                repeats=args.repeats,
                progress=False,
                backend=static,
                methods=["plain", "persona-judge"],
                steps=False,
            )
        finally:
            static.model = None  # the weights belong to the shape's backend; drop only this reference
        rep["options"] = options
        rep["compile_fallback"] = static.compile_fallback
        rep["compile_judge"] = static.describe().get("compile_judge")  # the batched judge, compiled or why not
        attempts.append({"compile_backend": name, "fallback": static.compile_fallback})
        if static.compile_fallback is None:
            break
    rep["attempts"] = attempts
    return rep


# --------------------------------------------------------------------------------------------- measurements


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def cache_check(backend) -> dict[str, Any]:
    """Logits from the batched KV cache (prefill, then single-token steps) against a full recompute."""
    import torch

    g = torch.Generator().manual_seed(0)
    v = backend.tokenizer.vocab_size
    ctx = [[1] + torch.randint(10, v, (n,), generator=g).tolist() for n in (40, 23)]
    with backend.open(2) as s:
        s.forward_many([(0, ctx[0], 1), (1, ctx[1], 1)])
        for _ in range(6):
            new = torch.randint(10, v, (2,), generator=g).tolist()
            ctx[0].append(new[0])
            ctx[1].append(new[1])
            outs = s.forward_many([(0, [new[0]], 1), (1, [new[1]], 1)])
    diffs, agree = [], []
    with torch.inference_mode():
        for c, out in zip(ctx, outs):
            ref = backend.model(input_ids=torch.tensor([c], device=backend.input_device)).logits[0, -1].float()
            diffs.append(float((out[-1] - ref).abs().max()))
            agree.append(int(out[-1].argmax()) == int(ref.argmax()))
    return {"max_abs_diff": max(diffs), "argmax_agrees": all(agree)}


def batch_speed(pj, n: int, max_new_tokens: int) -> dict[str, Any]:
    """tokens/s of ``generate_batch`` with ``n`` prompts against one prompt (persona-judge, 2 views)."""
    out: dict[str, Any] = {}
    for size in (1, n):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
        kw = dict(preferences=["concise", "humor"], max_new_tokens=max_new_tokens, seed=0)
        pj.generate_batch(prompts[: min(size, 2)], **kw)  # warm-up
        _sync()
        t0 = time.perf_counter()
        res = pj.generate_batch(prompts, **kw)
        _sync()
        wall = time.perf_counter() - t0
        toks = sum(len(r.tokens) for r in res)
        out[f"batch_{size}"] = {"prompts": size, "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall}
    out["speedup"] = out[f"batch_{n}"]["tokens_per_s"] / out["batch_1"]["tokens_per_s"]
    return out


def kv_bytes_per_view(backend, prompt_tokens: int, new_tokens: int, lam: int) -> int:
    """KV-cache bytes of one view (row), replaying the cache's capacity rule (``backends/hf.py``)."""
    model = backend.model
    tcfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    kv_heads = tcfg.num_key_value_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    cap = 0
    for need in range(prompt_tokens, prompt_tokens + new_tokens + lam + 2):
        if need > cap:
            cap = min(backend.context_length, max(need + 64, 2 * cap, 256))
    elem = next(model.parameters()).element_size()
    return tcfg.num_hidden_layers * 2 * kv_heads * head_dim * (cap + 1) * elem


def memory(pj, max_new_tokens: int) -> dict[str, Any] | None:
    """Peak GPU memory of a generation with 1 view and with 2 (reset in between, same process)."""
    import torch

    if not torch.cuda.is_available():
        return None
    res: dict[str, Any] = {}
    for views, method in ((1, "prompt"), (2, "persona-judge")):
        prefs = ["concise", "humor"][:views]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = pj.generate(PROMPTS[0], preferences=prefs, method=method, max_new_tokens=max_new_tokens, seed=0)
        torch.cuda.synchronize()
        res[f"peak_mb_{views}_view"] = torch.cuda.max_memory_allocated() / 2**20
        res[f"weights_mb_{views}_view"] = base / 2**20
        res[f"prompt_tokens_{views}_view"] = max(r.stats.prompt_tokens)
    kv = kv_bytes_per_view(pj.backend, res["prompt_tokens_2_view"], max_new_tokens, 4) / 2**20
    res["kv_mb_one_view"] = kv
    res["allowed_mb_2_views"] = 1.1 * (res["peak_mb_1_view"] + kv)
    res["ratio"] = res["peak_mb_2_view"] / res["peak_mb_1_view"]
    return res


def check_shape(
    shape: str, device: str, args: argparse.Namespace, budget: Budget, row: dict[str, Any], save: Any
) -> dict[str, Any]:
    """Fill ``row`` step by step, calling ``save()`` after each, so a crash keeps what was measured."""
    import torch

    from personajudge.api import PersonaJudge
    from personajudge.bench import run_bench
    from personajudge.core.config import build_config

    row.update({"shape": shape, "config": SHAPES[shape][1], "skipped": []})
    t0 = time.perf_counter()
    backend = build_backend(shape, device)
    _sync()
    row["build_s"] = time.perf_counter() - t0
    row["parameters_b"] = sum(p.numel() for p in backend.model.parameters()) / 1e9
    row["backend"] = backend.describe()
    cfg = build_config(
        {"backend": {"name": "hf", "device": device}, "decoding": {"max_new_tokens": args.max_new_tokens, "seed": 0}}
    )
    pj = PersonaJudge(cfg, backend=backend, max_batch=args.batch)
    steps = [
        ("cache_check", lambda: cache_check(backend)),
        (
            "bench",
            lambda: run_bench(
                cfg,
                views=2,
                repeats=args.repeats,
                progress=False,
                backend=backend,
                methods=["plain", "persona-judge", "persona-judge-base"],
            ),
        ),
        (
            "views_3",
            lambda: run_bench(
                cfg,
                views=3,
                repeats=args.repeats,
                progress=False,
                backend=backend,
                methods=["persona-judge"],
                steps=False,
            ),
        ),
        ("batch", lambda: batch_speed(pj, args.batch, args.max_new_tokens)),
        ("memory", lambda: memory(pj, args.max_new_tokens)),
        ("compiled", lambda: compiled(shape, device, backend, args)),  # last: compiling may take a while
    ]
    est = SHAPES[shape][2]
    try:
        for name, fn in steps:
            # compiling a 7B-class step takes about a minute or more (inductor's autotuning, CUDA graph capture)
            need = max(est / len(steps), COMPILE_S if name == "compiled" and device == "cuda" else 0.0)
            if budget.left() < need:
                row["skipped"].append(f"{name}: time budget")
                continue
            t1 = time.perf_counter()
            try:
                row[name] = fn()
            except Exception as err:  # one failed measurement must not lose the others
                row[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            row[f"{name}_s"] = round(time.perf_counter() - t1, 1)
            save()
            print(f"[gpu-check] {shape}: {name} done in {row[f'{name}_s']} s", flush=True)
    finally:
        eng = getattr(pj, "_engine", None)
        if eng is not None:
            eng.close()
        backend.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["targets"] = targets(shape, row)
    row["shape_s"] = time.perf_counter() - t0
    return row


def targets(shape: str, row: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, where this run measured them (True/False), else None."""
    out: dict[str, Any] = {}
    bench = row.get("bench") or {}
    ratio = next((r["ratio_to_plain"] for r in bench.get("results", []) if r["method"] == "persona-judge"), None)
    out["persona_judge_over_generate"] = ratio
    out["persona_judge_ge_0.9x_generate"] = (ratio >= 0.9) if ratio is not None and shape in GPU_SHAPES[1:] else None
    comp = {r["method"]: r for r in (row.get("compiled") or {}).get("results", [])}
    if "persona-judge" in comp:
        out["compiled_persona_judge_over_generate"] = comp["persona-judge"]["ratio_to_plain"]
    sp = (row.get("batch") or {}).get("speedup")
    out["batch_16_over_1"] = sp
    out["batch_16_ge_8x"] = sp >= 8 if sp is not None and "error" not in (row.get("batch") or {}) else None
    mem = row.get("memory") or {}
    if "peak_mb_2_view" in mem:
        out["memory_2_views_within_1.1x"] = mem["peak_mb_2_view"] <= mem["allowed_mb_2_views"]
    return out


def run_tests(device: str, timeout: float, select: str) -> dict[str, Any]:
    """The CUDA tests (``-m cuda``) matching ``-k select``; on a machine without CUDA they skip, which this records.

    Two runs: the CUDA-graph tests compile (tens of seconds each), so they get their own time limit and a
    slow compile cannot lose the other tests' results."""
    # -P: the repository root must not shadow the installed package (its personajudge/ lacks core/ etc.)
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "-k", select]
    cmd += CUDA_TESTS
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        return {"rc": None, "summary": f"timed out after {timeout:.0f} s", "tail": str(err.stdout or "")[-3000:]}
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    return {
        "rc": proc.returncode,
        "summary": lines[-1] if lines else "",
        "wall_s": round(time.perf_counter() - t0, 1),
        "tail": (proc.stdout + proc.stderr)[-4000:],
    }


# --------------------------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [
        f"# GPU check ({rep['device']}: {m.get('gpu') or m.get('cpu') or m['processor']})",
        "",
        f"torch {rep['versions']['torch']}, transformers {rep['versions']['transformers']}; "
        f"{rep['settings']['max_new_tokens']} new tokens, median of {rep['settings']['repeats']} after a "
        f"warm-up; T 0.7, top-k 20, top-p 0.9, λ 4; random {rep['dtype']} weights (speed only). "
        f"Install: {rep['install'].get('project')}. CUDA tests: {rep['tests'].get('summary', '–')}; "
        f"CUDA-graph tests: {rep.get('tests_graphs', {}).get('summary', '–')}. "
        f"Wall time {rep['elapsed_s']:.0f} s.",
        "",
        "| shape | params | generate tok/s | persona-judge | × | pj-base | × | 3 views | × | "
        "batch 16 / 1 | GPU MB 1 view | 2 views | allowed | steps ms 1v·1r / 2v·2r / 2v·1r | ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for row in rep["shapes"]:
        if "bench" not in row and "error" in row:
            lines.append(f"| {row['shape']} | error: {row['error'][:80]} |")
            continue
        res = {r["method"]: r for r in (row.get("bench") or {}).get("results", [])}
        plain = res.get("plain", {}).get("tokens_per_s")
        v3 = ((row.get("views_3") or {}).get("results") or [{}])[0].get("tokens_per_s")
        st = (row.get("bench") or {}).get("steps") or {}
        mem = row.get("memory") or {}

        def rate(name: str, res: dict = res, plain: float | None = plain) -> tuple[str, str]:
            t = res.get(name, {}).get("tokens_per_s")
            return _fmt(t), _fmt(t / plain if t and plain else None, ".2f")

        pj, pjb = rate("persona-judge"), rate("persona-judge-base")
        lines.append(
            f"| {row['shape']} | {row.get('parameters_b', 0):.2f} B | {_fmt(plain)} | {pj[0]} | {pj[1]} | {pjb[0]} | "
            f"{pjb[1]} | {_fmt(v3)} | {_fmt(v3 / plain if v3 and plain else None, '.2f')} | "
            f"{_fmt((row.get('batch') or {}).get('speedup'), '.2f')} | {_fmt(mem.get('peak_mb_1_view'), '.0f')} | "
            f"{_fmt(mem.get('peak_mb_2_view'), '.0f')} | {_fmt(mem.get('allowed_mb_2_views'), '.0f')} | "
            f"{_fmt(st.get('one_view_one_row_ms'), '.2f')} / {_fmt(st.get('two_views_two_rows_ms'), '.2f')} / "
            f"{_fmt(st.get('two_views_one_row_ms'), '.2f')} | {_fmt(st.get('ceiling_ratio'), '.2f')} |"
        )
    lines += [
        "",
        "Static cache and compiled steps (`cache_implementation=static`, `compile`), the same weights:",
        "",
        "| shape | options | generate tok/s | persona-judge | × | compile |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rep["shapes"]:
        comp = row.get("compiled") or {}
        if "results" not in comp:
            lines.append(f"| {row['shape']} | – | – | – | – | {comp.get('error', 'not run')[:80]} |")
            continue
        res = {r["method"]: r.get("tokens_per_s") for r in comp["results"]}
        plain, pj = res.get("plain"), res.get("persona-judge")
        opts = comp.get("options", {})
        lines.append(
            f"| {row['shape']} | {opts.get('compile')}/{opts.get('compile_backend')} | {_fmt(plain)} | {_fmt(pj)} | "
            f"{_fmt(pj / plain if pj and plain else None, '.2f')} | "
            f"{'ok' if comp.get('compile_fallback') is None else 'fell back: ' + comp['compile_fallback'][:60]}; "
            f"judge: {str(comp.get('compile_judge'))[:60]} |"
        )
    skipped = [f"{r['shape']}: {', '.join(r['skipped'])}" for r in rep["shapes"] if r.get("skipped")]
    skipped += [f"{s}: time budget" for s in rep["skipped_shapes"]]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    errors = [
        f"{r['shape']}.{k}: {v['error']}"
        for r in rep["shapes"]
        for k, v in r.items()
        if isinstance(v, dict) and "error" in v
    ]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    lines += [
        "",
        "Targets (issue 17): persona-judge ≥ 0.9× generate on the 1B and 7B shapes; batch 16 ≥ 8× one "
        "prompt; 2-view peak ≤ 1.1 × (1-view peak + one view's KV cache).",
    ]
    for row in rep["shapes"]:
        lines.append(f"- {row['shape']}: {json.dumps(row.get('targets', {}))}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument(
        "--shapes",
        help=f"comma-separated subset of {','.join(SHAPES)} (default: the GPU shapes on "
        "CUDA, the tiny ones on the CPU)",
    )
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would not fit in this many seconds")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--batch", type=int, default=16, help="prompts in the batched run (against 1)")
    ap.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    ap.add_argument(
        "--compile-backend", help="torch.compile backend of the compiled run (default: inductor on CUDA, eager on CPU)"
    )
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels to install from (make gpu-wheels)")
    ap.add_argument("--site", default="/tmp/personajudge-site", help="where to install them")
    ap.add_argument(
        "--reinstall",
        action="store_true",
        help="install into --site and re-run from there even when everything imports (rehearses a bare machine)",
    )
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    faulthandler.enable()  # a crash in native code (a compiler, a driver) prints where it happened
    install_info = ensure_installed(args, argv)

    import torch
    import transformers

    import personajudge
    from personajudge.bench import machine_info

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = args.shapes.split(",") if args.shapes else (GPU_SHAPES if device == "cuda" else TINY_SHAPES)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    gpu = device == "cuda"
    args.max_new_tokens = args.max_new_tokens or (128 if gpu else 12)
    args.repeats = args.repeats or (3 if gpu else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rep: dict[str, Any] = {
        "schema": SCHEMA,
        "device": device,
        "dtype": "bfloat16" if gpu else "float32",
        "machine": machine_info(),
        "install": install_info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "personajudge_from": str(Path(personajudge.__file__).resolve().parent),
        },
        "settings": {
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "batch": args.batch,
            "budget_s": args.budget_s,
            "shapes": shapes,
        },
        "tests": {},
        "shapes": [],
        "skipped_shapes": [],
    }

    def save() -> None:
        """Write what is measured so far (after every step): a crash, a kill at the time limit or an
        out-of-memory abort leaves everything before it in OUT, with ``"unfinished": true`` on the shape."""
        rep["elapsed_s"] = budget.elapsed()
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(rep, indent=2, default=str))
        os.replace(tmp, out / "gpu_check.json")
        (out / "gpu_check.md").write_text(markdown(rep))

    if gpu:
        rep["machine"]["gpu"] = torch.cuda.get_device_name(0)
    ok = True
    if not args.no_tests:
        print("[gpu-check] CUDA tests ...", flush=True)
        rep["tests"] = run_tests(device, max(60.0, min(150.0, budget.left() / 4)), "not graphs")
        print(f"[gpu-check] tests: {rep['tests']['summary']}", flush=True)
        print("[gpu-check] CUDA-graph tests ...", flush=True)
        rep["tests_graphs"] = run_tests(device, max(60.0, min(150.0, budget.left() / 4)), "graphs")
        print(f"[gpu-check] CUDA-graph tests: {rep['tests_graphs']['summary']}", flush=True)
        ok = rep["tests"]["rc"] == 0 and rep["tests_graphs"]["rc"] == 0
    for shape in shapes:
        if budget.left() < SHAPES[shape][2]:
            rep["skipped_shapes"].append(shape)
            print(
                f"[gpu-check] {shape}: skipped ({budget.left():.0f} s left, needs ~{SHAPES[shape][2]:.0f})", flush=True
            )
            continue
        print(f"[gpu-check] {shape} ...", flush=True)
        row: dict[str, Any] = {"shape": shape, "skipped": [], "unfinished": True}
        rep["shapes"].append(row)
        try:
            check_shape(shape, device, args, budget, row, save)
        except Exception as err:
            ok = False
            row.update({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]})
        del row["unfinished"]
        ok = ok and not any(isinstance(v, dict) and "error" in v for v in row.values())
        save()
    rep["ok"] = ok
    save()
    md = markdown(rep)
    print(md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
