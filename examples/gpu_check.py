"""The prepared GPU check: install, the issue's measurements, CUDA tests and compiled steps, in one run.

GPU time for this project is rare and short: a bare machine (torch,
transformers, accelerate, pluggy and pytest; no internet) for 15 minutes of
device time in all, a machine start costing 1-2 of them, and nothing can be
debugged there afterwards. So everything the GPU must answer is asked by this
one command, and its report must say by itself what ran, what did not and why::

    make gpu-wheels                      # here, with internet: wheels the GPU image lacks -> .whl/
    python3 examples/gpu_check.py OUT    # there (or: make gpu-check GPU_OUT=OUT)

``.whl/`` is git-ignored: the device call must name it (``carry: [".whl"]``)
or it stays behind, and the check then stops at once with that advice.

It

1. installs what the image lacks from the wheels in ``.whl/`` and the project
   from the working tree (``pip install --no-index``), then re-runs itself with
   them on ``PYTHONPATH`` (nothing to do where ``personajudge`` imports already).
   A missing or empty wheels folder, a wheel pip refuses, or a module still
   missing after the install is one line on stderr and in ``OUT/gpu_check.json``
   and ``.md``, exit status 2;
2. builds random-weight bfloat16 models with real shapes directly on the GPU
   (Gemma 3 1B, Qwen2.5-7B, Gemma 3 270M; no download) with a synthetic
   tokenizer of the right vocabulary size, and runs the plan (:func:`plan`):
   first what the issue needs (*required*), then the rest while time is left
   (*optional*). With the shapes ``A, B, C...`` (by default 1B, 7B, 270M):

   required
     a. the targets' measurements on A and B (the persona-judge target is
        judged on 1B and 7B): cached-vs-recomputed logits, plain
        ``model.generate`` (dynamic cache) against ``persona-judge``, peak GPU
        memory with 1 and with 2 views (each on a fresh engine, so each session
        holds just its own views' KV cache), ``generate_batch`` of 16 prompts
        against 1;
     b. the CUDA tests (``pytest -m cuda``, not the CUDA-graph ones);
     c. ``persona-judge-base`` with the step costs on A;
     d. the CUDA-graph tests, which compile;
     e. the compiled step on A (static cache, ``torch.compile``, CUDA graphs)
        on a fresh copy of its weights, in a subprocess given what is left of
        the budget, recording whether CUDA graphs were recorded, replayed or
        skipped;
   optional
     f. ``persona-judge-base`` and 3 views on B, 3 views on A;
     g. everything of C... (targets, ``persona-judge-base``, 3 views);
     h. the compiled steps of B, C...;

   each step only when the time budget (``--budget-s``, default
   :data:`BUDGET_S`, counted from the first start, the install included) has
   its estimate left. By the estimates below the required part fits the
   default budget (``tests/examples/test_gpu_check_budget.py`` replays the plan
   on a virtual clock);
3. writes ``gpu_check.json`` and ``gpu_check.md`` to OUT after every step.

The verdict (``"verdict"``, the exit status):

- ``ok`` (0): every required step ran and passed, and the compiled step
  really compiled (on CUDA: CUDA graphs replayed). Optional steps skipped for
  time are listed (``"complete": false`` then);
- ``failed`` (1): a step or a test failed (a test that hangs past its own
  limit fails, named, with its stack);
- ``incomplete`` (3): nothing failed, but a required step was skipped for time
  (not started), stopped for time (a test run or the compiled step's process
  killed at the budget) or not reached (a shape the compiled step's process
  never started);
- ``compiled step fell back`` (4): nothing failed, but a compiled step ran
  eager (its compile failed) or, on CUDA, replayed no CUDA graphs: it did not
  measure what it exists for. On the CPU rehearsal, where no CUDA graphs can
  exist, graphs are not asked for.

Random weights make the text noise and the acceptance rate meaningless; the
speed is what counts (with the interleaved schedule every step commits about
one token whatever is accepted). On a machine without CUDA it runs tiny shapes
on the CPU (``--shapes tiny-gemma3,tiny-qwen2``, the default there) in well
under a minute: the test suite runs it that way so it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import glob
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "personajudge.gpu_check/2"
_INSTALLED_ENV = "PERSONAJUDGE_GPU_CHECK_INSTALL"
#: the default --budget-s: one attempt of under 8 minutes (the issue), planned so that the required part
#: fits with room to spare; the README ("GPU check") gives the arithmetic with the device call's timeout_s
BUDGET_S = 465.0
#: estimated seconds before the first step on the GPU machine: Python, the install, its re-run, torch and CUDA
STARTUP_S = 15.0
#: share of a shape's estimate that building its model (random weights, on the device) takes
BUILD_SHARE = 0.05

#: name -> (transformers config class, config fields, estimated seconds on one H100/H200 for all the shape's
#: in-process steps, estimated seconds of its compiled step: the child's start, a fresh model, the compiles
#: of each query bucket and the judge, CUDA-graph capture, the timed runs). The 1B and 7B figures are from
#: the first H200 run (2026-11-28, 128 tokens: 1B's target steps 143 s, 7B's 103 s; the 1B's compiled step
#: 113 s, compiled and then eager), scaled to 64 tokens; the 270M's and the 7B's compiled step are guesses
#: (the run did not reach them)
SHAPES: dict[str, tuple[str, dict[str, Any], float, float]] = {
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
        120.0,
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
        130.0,
        130.0,
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
        90.0,
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
        3.0,
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
        3.0,
    ),
}
#: the order of the GPU shapes: the persona-judge target is judged on the 1B and 7B shapes, so they go first
GPU_SHAPES = ["gemma3-1b", "qwen2.5-7b", "gemma3-270m"]
TARGET_SHAPES = ("gemma3-1b", "qwen2.5-7b")
TINY_SHAPES = ["tiny-gemma3", "tiny-qwen2"]
#: step -> (phase, share of the shape's estimate it needs left before it starts)
STEPS: dict[str, tuple[str, float]] = {
    "cache_check": ("targets", 0.05),
    "bench": ("targets", 0.3),  # plain generate against persona-judge
    "memory": ("targets", 0.1),
    "batch": ("targets", 0.2),
    "profile": ("targets", 0.03),  # where a step's host and device time go, when a target is missed (host_profile)
    "bench_extra": ("base", 0.2),  # persona-judge-base and the step costs (no ceiling run: no time for it)
    "views_3": ("views", 0.15),
}
#: the two CUDA test runs (``-k``): the CUDA-graph tests compile (tens of seconds each), so they run apart
#: and a slow compile cannot lose the other tests' results. Per run: the seconds it needs left before it
#: starts (pytest's start, CUDA's, tiny models), the most it may take (then it is stopped: skipped for
#: time), and how long one test may run before pytest-timeout calls it hung (failed, named, its stack shown)
TESTS_S = {"not graphs": 30.0, "graphs": 95.0}  # H200: 20.5 s and 73.1 s, before one more graph test
TESTS_CAP_S = {"not graphs": 90.0, "graphs": 150.0}
HANG_S = {"not graphs": 40.0, "graphs": 75.0}
TEST_KEYS = {"not graphs": "tests", "graphs": "tests_graphs"}
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
#: third-party modules the project imports that the bare GPU image lacks (the Makefile's GPU_WHEELS)
DEPS = ("typing_extensions", "annotated_types", "typing_inspection", "pydantic_core", "pydantic", "array_api_compat")
#: a plan record's statuses: what ran, what did not (and so makes the run incomplete)
DONE, FAILED, FELL_BACK = "ok", "failed", "fell back"
SHORT = ("skipped for time", "stopped for time", "not reached")
#: verdict -> exit status
VERDICTS = {"ok": 0, "failed": 1, "incomplete": 3, "compiled step fell back": 4}


# --------------------------------------------------------------------------------------------- install


class SetupError(Exception):
    """The check cannot start (the wheels, the install): one line, exit status 2, a stub report in OUT."""

    def __init__(self, message: str, info: dict[str, Any] | None = None):
        super().__init__(message)
        self.info = info or {}  # what the install did before it failed


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


def _missing_deps() -> list[str]:
    """The modules of :data:`DEPS` that do not import here."""
    missing = []
    for mod in DEPS:
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return missing


def install(wheels: Path, site: Path) -> dict[str, Any]:
    """Install the wheels and the project into ``site`` with no index (nothing can be fetched there).

    Refuses (:class:`SetupError`) a missing or empty wheels folder when a dependency is missing,
    and a wheel pip will not install, with what to do about it."""
    files = sorted(glob.glob(str(wheels / "*.whl")))
    info: dict[str, Any] = {"site": str(site), "wheels_dir": str(wheels), "wheels": [Path(w).name for w in files]}
    missing = _missing_deps()
    if missing and not files:
        where = "does not exist" if not wheels.is_dir() else "holds no wheels"
        raise SetupError(
            f"{', '.join(missing)} cannot be imported here and the wheels folder {wheels} {where}: run "
            "`make gpu-wheels` where there is internet, and name the folder in the device call "
            '(carry: [".whl"]); it is git-ignored, so it does not travel with the working tree by itself'
        )
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
    t0 = time.perf_counter()
    if files:
        proc = subprocess.run(pip + files, capture_output=True, text=True)
        if proc.returncode != 0:
            why = [x.strip() for x in proc.stderr.splitlines() if "error" in x.lower()] or proc.stderr.splitlines()
            raise SetupError(
                f"pip could not install the wheels in {wheels} ({(why or ['?'])[0][:240]}); were they made for "
                f"this machine's Python {platform.python_version()} on {platform.machine()}? "
                f"(make gpu-wheels GPU_PYTHON={'.'.join(platform.python_version_tuple()[:2])})"
            )
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
    """Install if needed and re-run this script with the new site on ``PYTHONPATH``.

    In the re-run, a module that still does not import is a :class:`SetupError` naming it."""
    done = os.environ.get(_INSTALLED_ENV)
    if done:
        info = json.loads(done)
        missing = _importable()
        if missing is not None:
            raise SetupError(
                f"{missing} still cannot be imported after installing {len(info.get('wheels', []))} wheel(s) "
                f"from {info.get('wheels_dir')} into {info.get('site')}: the folder lacks its wheel (run "
                "`make gpu-wheels` again: the Makefile's GPU_WHEELS lists what the image lacks)",
                info,
            )
        return info
    missing = "(--reinstall)" if args.reinstall else _importable()
    if missing is None:
        return {"project": "already importable", "python": sys.executable}
    print(f"[gpu-check] {missing} is missing: installing from {args.wheels} (no index)", flush=True)
    info = install(Path(args.wheels), Path(args.site))
    info["missing_before"] = missing
    info["started"] = args.started  # the budget counts the install too
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([args.site, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        **{_INSTALLED_ENV: json.dumps(info)},
    )
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], env)
    raise AssertionError("unreachable")


def write_stub(out: Path, error: str, install_info: dict[str, Any] | None) -> None:
    """The report of a run that could not start: the error, where the check looks first (no project imports)."""
    rep = {
        "schema": SCHEMA,
        "ok": False,
        "complete": False,
        "error": error,
        "install": install_info or {},
        "versions": {"python": platform.python_version()},
    }
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.json").write_text(json.dumps(rep, indent=2))
        (out / "gpu_check.md").write_text(f"# GPU check: did not start\n\n**Error:** {error}\n")
    except OSError as err:
        print(f"gpu-check: cannot write the report to {out}: {err}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- models


_PREBUILT: list[type] = []  # the one Prebuilt class, made at the first build (the project imports after the install)


def _prebuilt_class() -> type:
    """The hf backend on a model built in memory (loading is the only step it skips).

    One class for every build, taking its model from the instance (``_prebuilt``, dropped once
    loaded): a class made per call with ``_load`` closing over the model kept every released
    shape's weights alive through a reference cycle until a cyclic GC pass happened to run."""
    if not _PREBUILT:
        from personajudge.backends.hf import HFBackend

        class Prebuilt(HFBackend):
            def _load(self, model_name, gguf_file):
                label, model, tok = self.__dict__.pop("_prebuilt")
                return label, model, tok

        _PREBUILT.append(Prebuilt)
    return _PREBUILT[0]


def build_backend(shape: str, device: str, *, model: Any = None, options: dict[str, Any] | None = None):
    """A random-weight model of ``shape`` built directly on ``device`` (bf16 on CUDA), wrapped in the hf backend.

    ``model``: reuse an already built model (another backend configuration of the same weights);
    ``options``: the backend's ``backend.options`` (e.g. a static cache and compile)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from personajudge.core.config import BackendConfig

    cls_name, fields, _, _ = SHAPES[shape]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model is None:
        cfg = getattr(transformers, cls_name)(**fields, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model.eval()
    from personajudge.testing.tokenizers import char_tokenizer  # the installed package's: nothing else travels

    config = BackendConfig(name="hf", device=device, dtype=str(dtype).removeprefix("torch."), options=options or {})
    cls = _prebuilt_class()
    backend = cls.__new__(cls)
    backend._prebuilt = (f"synthetic:{shape}", model, char_tokenizer(fields["vocab_size"]))
    del model
    backend.__init__(config)
    return backend


def _driver_version() -> str | None:
    """The NVIDIA driver's version: NVML (nvidia-ml-py, in the GPU image), else ``nvidia-smi``; None if neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML here, or it cannot start: ask nvidia-smi
        pass
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def gpu_info(torch: Any) -> dict[str, Any]:
    """What a GPU result needs beside the GPU's name: torch's CUDA, the driver, the card's memory.

    ``cuda``: ``torch.version.cuda`` (None in a CPU build); the rest only where CUDA is available."""
    info: dict[str, Any] = {"cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_total_mb"] = round(props.total_memory / 2**20)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["driver"] = _driver_version()
    return info


class GraphCounts:
    """CUDA-graph activity in this process while entered (every thread): recordings, replays, warm-up runs, skips.

    Both compile backends the check uses (inductor with ``reduce-overhead``, dynamo's ``cudagraphs``)
    run through inductor's CUDA-graph trees, which only log when they give up on graphs (a mutated
    input, dynamic shapes, the re-record limit): ``compile_fallback is None`` alone cannot tell a
    replayed graph from an eager run. The tree manager's methods are wrapped (every thread: the
    engine steps in its own) and inductor's ``cudagraph_skips`` counter is read before and after."""

    _METHODS = (("record_function", "recorded"), ("execute_node", "replayed"), ("run_eager", "warmup_runs"))

    def __enter__(self) -> GraphCounts:
        self.counts: dict[str, Any] = {key: 0 for _, key in self._METHODS}
        self._patched: list[tuple[Any, str, Any]] = []
        self._skips0: int | None = None
        try:
            from torch._dynamo.utils import counters
            from torch._inductor import cudagraph_trees
        except Exception as err:  # a torch without them: say so, count nothing
            self.counts["unavailable"] = f"{type(err).__name__}: {err}"
            return self
        self._counters = counters
        self._skips0 = int(counters["inductor"]["cudagraph_skips"])
        cls = cudagraph_trees.CUDAGraphTreeManager
        for meth, key in self._METHODS:
            orig = cls.__dict__.get(meth)
            if orig is None:
                self.counts[key] = None  # this torch names it otherwise: unknown, not zero
                continue

            def wrapper(mgr, *a, _orig=orig, _key=key, **kw):
                self.counts[_key] += 1
                return _orig(mgr, *a, **kw)

            setattr(cls, meth, wrapper)
            self._patched.append((cls, meth, orig))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, meth, orig in self._patched:
            setattr(cls, meth, orig)
        if self._skips0 is not None:
            self.counts["skips"] = int(self._counters["inductor"]["cudagraph_skips"]) - self._skips0
        self.counts["used"] = bool(self.counts.get("replayed")) and not self.counts.get("skips")


# --------------------------------------------------------------------------------------------- compiled steps


def compiled(shape: str, device: str, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """The same weights, freshly built, with a static cache and compiled steps, timed against generate.

    A fresh model: on the CPU the shape's own backend has swapped its Linear layers for oneDNN's
    prepacked kernels, which inductor cannot lower (and which the GPU never runs). On CUDA,
    inductor first; when it cannot compile here (it needs a C compiler and Triton), dynamo's
    ``cudagraphs`` backend, which captures the traced step as CUDA graphs without generating
    code, and only with the shape's compile estimate still left. On the CPU rehearsal dynamo only
    traces (``compile_backend=eager``): the GPU's code path minus code generation."""
    from personajudge.bench import run_bench
    from personajudge.core.config import build_config

    gpu = device == "cuda"
    if args.compile_backend:
        tries = [args.compile_backend]
    else:
        tries = ["inductor", "cudagraphs"] if gpu else ["eager"]
    attempts: list[dict[str, Any]] = []
    rep: dict[str, Any] = {}
    model = None
    for name in tries:
        if attempts and budget.left() < SHAPES[shape][3]:
            attempts.append({"compile_backend": name, "skipped": f"time budget ({budget.left():.0f} s left)"})
            break
        options = {
            "compile": "reduce-overhead" if gpu else True,
            "compile_backend": name,
            "max_cache_len": 1024 if gpu else 256,
        }
        static = build_backend(shape, device, model=model, options=options)
        model = static.model  # a failed compile leaves the weights as they were: the next attempt reuses them
        cfg = build_config(
            {
                "backend": {"name": "hf", "device": device, "options": options},
                "decoding": {"max_new_tokens": args.max_new_tokens, "seed": 0},
            }
        )
        try:
            with GraphCounts() as graphs:
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
            static.close()
        rep["options"] = options
        rep["compile_fallback"] = static.compile_fallback
        rep["compile_judge"] = static.describe().get("compile_judge")  # the batched judge, compiled or why not
        rep["graphs"] = graphs.counts
        attempts.append({"compile_backend": name, "fallback": static.compile_fallback, "graphs": graphs.counts})
        if static.compile_fallback is None:
            break
    rep["attempts"] = attempts
    return rep


def compiled_fell_back(comp: dict[str, Any], gpu: bool) -> str | None:
    """Why a finished compiled step did not measure what it exists for, or None when it did.

    Its compile (or the judge's) ran eager, or, on CUDA, no CUDA graph was replayed (inductor only
    logs a graph it gives up on and runs on without it). On the CPU no CUDA graphs can exist: a
    trace without a fallback is all the rehearsal can ask for."""
    if comp.get("compile_fallback"):
        return f"compile fell back to eager: {str(comp['compile_fallback'])[:200]}"
    judge = str(comp.get("compile_judge") or "")
    if judge.startswith("failed"):
        return f"the judge's compile fell back: {judge[:200]}"
    if gpu:
        g = comp.get("graphs") or {}
        if "unavailable" in g:
            return f"CUDA graphs could not be counted ({str(g['unavailable'])[:120]})"
        if g.get("replayed") is None:
            return "CUDA graphs could not be counted (this torch's CUDAGraphTreeManager has no execute_node)"
        if not g.get("used"):
            return (
                f"no CUDA graphs used ({g.get('recorded')} recorded, {g.get('replayed')} replayed, "
                f"{g.get('skips')} skipped)"
            )
    return None


def _decode(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _run_bounded(
    cmd: list[str], limit: float, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``cmd`` for at most ``limit`` seconds; its output decoded, stdout and stderr apart.

    In a process group of its own: at the limit, less a grace period, it gets SIGINT (pytest then
    prints the test it was in and its summary; Python the traceback of where it was), then the
    whole group SIGKILL (a compiler's worker processes too). Unbuffered, so that what it printed
    before it was stopped is not lost."""
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1", COLUMNS="200")
    grace = min(5.0, limit / 4)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=max(limit - grace, 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired as late:  # a grandchild left its group and holds the pipes
                proc.kill()
                out, err = late.stdout, late.stderr
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # what the SIGINT left of the group
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "stdout": _decode(out),
        "stderr": _decode(err),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _started(shape: str) -> dict[str, Any]:
    """What the compiled steps' process writes for ``shape`` before it starts it (its result replaces it)."""
    return {"started": shape}


def compiled_in_subprocess(
    shapes: list[str], device: str, args: argparse.Namespace, budget: Budget
) -> dict[str, dict[str, Any]]:
    """:func:`compiled` for each of ``shapes`` in one child process, stopped when the budget runs out.

    A compile cannot be interrupted in-process, and a compiler can crash its process: the child keeps
    both away from everything measured before it. It marks each shape started, then writes its
    result; it skips a shape (``{"skipped": ...}``) with less than its compile estimate left. Here,
    a shape the child started but did not finish is ``{"stopped": ...}`` when the budget stopped
    it (skipped for time, not failed) and ``{"error": ...}`` when the child died; a shape it never
    started is ``{"not_reached": ...}``."""
    child_out = Path(args.out) / ".compiled"
    for shape in shapes:  # a result left by an earlier run must not pass for this one's
        (child_out / f"{shape}.json").unlink(missing_ok=True)
    limit = max(budget.left(), 1.0)
    cmd = [sys.executable, str(Path(__file__).resolve()), str(child_out), "--internal-compiled", ",".join(shapes)]
    cmd += ["--device", device, "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--budget-s", str(limit)]
    if args.compile_backend:
        cmd += ["--compile-backend", args.compile_backend]
    run = _run_bounded(cmd, limit)
    tail = {"stdout_tail": run["stdout"][-3000:], "stderr_tail": run["stderr"][-3000:], "child_wall_s": run["wall_s"]}
    if run["timed_out"]:
        stopped = f"the time budget ran out: the compiled steps' process was stopped after {run['wall_s']:.0f} s"
    else:
        stopped = f"the compiled steps' process exited with status {run['rc']}"
    out: dict[str, dict[str, Any]] = {}
    for shape in shapes:
        f = child_out / f"{shape}.json"
        res = json.loads(f.read_text()) if f.is_file() else None
        if res is None:
            out[shape] = {"not_reached": f"{stopped} before it started this shape", **tail}
        elif res != _started(shape):
            out[shape] = res  # finished: a result, an error it caught, or its own skip for time
        elif run["timed_out"]:
            out[shape] = {"stopped": f"{stopped} in this shape's compiled step", **tail}
        else:
            out[shape] = {"error": f"{stopped} in this shape's compiled step", **tail}
    return out


# --------------------------------------------------------------------------------------------- measurements


class Budget:
    """Seconds left of ``seconds``, counted from ``started`` (a ``time.time()``; default now)."""

    def __init__(self, seconds: float, started: float | None = None):
        self.t0, self.seconds = started or time.time(), seconds

    def elapsed(self) -> float:
        return time.time() - self.t0

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


def batch_speed(backend, cfg, n: int, max_new_tokens: int) -> dict[str, Any]:
    """tokens/s of ``generate_batch`` with ``n`` prompts against one prompt (persona-judge, 2 views)."""
    from personajudge.api import PersonaJudge

    out: dict[str, Any] = {}
    pj = PersonaJudge(cfg, backend=backend, max_batch=n)
    try:
        for size in (1, n):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(size)]
            kw: dict[str, Any] = dict(preferences=["concise", "humor"], max_new_tokens=max_new_tokens, seed=0)
            pj.generate_batch(prompts[: min(size, 2)], **kw)  # warm-up
            _sync()
            t0 = time.perf_counter()
            res = pj.generate_batch(prompts, **kw)
            _sync()
            wall = time.perf_counter() - t0
            toks = sum(len(r.tokens) for r in res)
            out[f"batch_{size}"] = {"prompts": size, "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall}
    finally:
        pj.close(keep_backend=True)  # the engine goes: the next step's sessions are sized afresh
    out["prompts"] = n
    out["speedup"] = out[f"batch_{n}"]["tokens_per_s"] / out["batch_1"]["tokens_per_s"]
    return out


def host_profile(backend, steps: int = 12) -> dict[str, Any]:
    """Where a persona-judge step's time goes: the engine's batched path, one request, in this thread.

    The H200's first run (2026-11-28) found about 9 ms a token outside the forward on 7B (12 on 1B)
    with eager steps, host-bound. The eager judge is 144 dispatched ops a step, whatever the row
    count, so about 100 kernel launches: not all of it. This steps the request that the engine would
    (``StepDriver`` + ``BatchedJudge``, the sync test's set-up, under the backend's decoding context as
    in the engine's thread) three times over ``steps`` steps:
    timed, under ``cProfile`` (the host's functions), and under ``torch.profiler`` (the device's busy
    time and the kernel launches per step)."""
    import cProfile
    import pstats

    import torch

    from personajudge.bench.host import endless_request
    from personajudge.core.batched import BatchedJudge, judge_rows
    from personajudge.core.decoding import StepDriver
    from personajudge.core.transforms import SamplingParams

    tok = backend.tokenizer
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    contexts = [tok.encode(p) for p in PROMPTS[:2]]
    req = endless_request(tok, contexts, seed=0, lam=4, params=params, context_length=backend.context_length)
    out: dict[str, Any] = {"steps": steps}
    # the engine thread steps under the backend's decoding context (inference mode): so does this
    with backend.decoding_context(), contextlib.closing(backend.open(2)) as session:
        driver = StepDriver(session)
        driver.add_row(0, BatchedJudge(backend.compile_kernel(judge_rows)), req, [0, 1])

        def run() -> tuple[float, int]:
            _sync()
            before, t0 = len(req.emitter.tokens), time.perf_counter()
            for _ in range(steps):
                driver.step()
            _sync()
            return time.perf_counter() - t0, len(req.emitter.tokens) - before

        run()  # the prompts and warm-up
        wall, tokens = run()
        out.update(ms_per_step=1e3 * wall / steps, tokens=tokens, ms_per_token=1e3 * wall / max(tokens, 1))
        prof = cProfile.Profile()
        prof.enable()
        run()
        prof.disable()
        # (file, line, function) -> (primitive calls, calls, self seconds, cumulative seconds, callers)
        rows = [
            (Path(f).name, line, fn, tt, ct) for (f, line, fn), (_, _, tt, ct, _) in pstats.Stats(prof).stats.items()
        ]
        cum = {(name, fn): ct for name, _, fn, _, ct in rows}
        parts = {
            "step": ("decoding.py", "step"),
            "forward": ("hf.py", "_forward_many"),
            "judge": ("batched.py", "advance"),
        }
        out["host_ms_per_step"] = {k: 1e3 * cum.get(key, 0.0) / steps for k, key in parts.items()}
        out["host_top_self_ms_per_step"] = [
            {"function": f"{name}:{line}({fn})", "self_ms": 1e3 * tt / steps, "cum_ms": 1e3 * ct / steps}
            for name, line, fn, tt, ct in sorted(rows, key=lambda r: r[3], reverse=True)[:15]
        ]
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as tp:
            run()
        events = tp.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
        launches = sum(e.count for e in events if e.key.startswith(("cudaLaunch", "cuLaunch")))
        out.update(device_busy_ms_per_step=device_us / 1e3 / steps, kernel_launches_per_step=launches / steps)
        out["aten_ops_per_step"] = sum(e.count for e in events if e.key.startswith("aten::")) / steps
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        out["ops_top_self_cpu_ms_per_step"] = [
            {"op": e.key, "calls_per_step": e.count / steps, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps}
            for e in top
        ]
    return out


def _bench_ms_per_token(row: dict[str, Any]) -> float | None:
    """Milliseconds a token of the shape's timed ``persona-judge`` row (the API and the engine, prompts
    included), beside which the host profile's driver-only figure says whether a gap between the step
    model and the run lies inside the step or around it; None when the bench did not run it."""
    for r in (row.get("bench") or {}).get("results") or []:
        if r.get("method") == "persona-judge" and r.get("tokens_per_s"):
            return 1e3 / float(r["tokens_per_s"])
    return None


def _profile_lines(rep: dict[str, Any]) -> list[str]:
    """The report's lines for each shape's :func:`host_profile`: where a step's time went."""
    lines = []
    for row in rep.get("shapes", []):
        pr = row.get("profile") or {}
        if "ms_per_step" not in pr:
            continue
        host = pr.get("host_ms_per_step") or {}
        top = ", ".join(f"{t['function']} {t['self_ms']:.2f}" for t in pr.get("host_top_self_ms_per_step", [])[:5])
        engine = _bench_ms_per_token(row)
        against = (
            f" (the bench's persona-judge run, through the engine with its prompts: {engine:.2f} ms a token)"
            if engine is not None
            else ""
        )
        lines += [
            f"Host profile, {row['shape']} (one request, {pr['steps']} steps, eager judge path): "
            f"{pr['ms_per_step']:.2f} ms a step, {pr['ms_per_token']:.2f} ms a token{against}; under cProfile the step "
            f"{_fmt(host.get('step'), '.2f')} ms, of which the forward {_fmt(host.get('forward'), '.2f')} and the "
            f"judge {_fmt(host.get('judge'), '.2f')}; device busy {pr['device_busy_ms_per_step']:.2f} ms, "
            f"{pr['kernel_launches_per_step']:.0f} kernel launches and {pr['aten_ops_per_step']:.0f} aten ops a "
            f"step. Most host time (self ms a step): {top}.",
            "",
        ]
    return lines


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


def memory(backend, cfg, max_new_tokens: int) -> dict[str, Any]:
    """Peak GPU memory of one generation with 1 view and one with 2 (reset in between, same process).

    Each runs on a fresh engine (a :class:`PersonaJudge` of its own, closed after), so its session
    holds just its own views: an engine that ran the 16-prompt batch would keep its 32-row session,
    and both peaks would hold 32 rows of KV cache. ``rows_*``: the session's views (the rows its KV
    cache allocates), measured on the CPU too; the peaks only on CUDA."""
    import torch

    from personajudge.api import PersonaJudge

    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {}
    for views, method in ((1, "prompt"), (2, "persona-judge")):
        prefs = ["concise", "humor"][:views]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            res[f"weights_mb_{views}_view"] = torch.cuda.memory_allocated() / 2**20
        pj = PersonaJudge(cfg, backend=backend, max_batch=1)
        try:
            r = pj.generate(PROMPTS[0], preferences=prefs, method=method, max_new_tokens=max_new_tokens, seed=0)
            res[f"rows_{views}_view"] = pj.engine.stats()["slots"]
        finally:
            pj.close(keep_backend=True)
        if cuda:
            torch.cuda.synchronize()
            res[f"peak_mb_{views}_view"] = torch.cuda.max_memory_allocated() / 2**20
        res[f"prompt_tokens_{views}_view"] = max(r.stats.prompt_tokens)
    if cuda:
        kv = kv_bytes_per_view(backend, res["prompt_tokens_2_view"], max_new_tokens, 4) / 2**20
        res["kv_mb_one_view"] = kv
        res["allowed_mb_2_views"] = 1.1 * (res["peak_mb_1_view"] + kv)
        res["ratio"] = res["peak_mb_2_view"] / res["peak_mb_1_view"]
    return res


# --------------------------------------------------------------------------------------------- the plan


def plan(shapes: list[str], tests: bool = True) -> list[dict[str, Any]]:
    """The run's items in order, each ``required`` (what the issue needs) or not (only with time left).

    With the shapes ``A, B, C...``: the targets on A and B, the CUDA tests, ``persona-judge-base``
    with the step costs on A, the CUDA-graph tests, the compiled step on A; then, optional, the rest
    of B (base, 3 views), 3 views on A, everything of C..., the compiled steps of B, C... The
    tests come right after the target shapes, so an overrun there costs the optional shapes, not
    the sync-debug tests; each shape's steps are together, so a model is built as rarely as the
    order allows."""
    core, rest = shapes[:2], shapes[2:]

    def steps(shape: str, phase: str, required: bool) -> dict[str, Any]:
        return {"kind": "steps", "shape": shape, "phase": phase, "required": required}

    def test_run(select: str) -> list[dict[str, Any]]:
        return [{"kind": "tests", "select": select, "required": True}] if tests else []

    items = [steps(s, "targets", True) for s in core]
    items += test_run("not graphs")
    items.append(steps(core[0], "base", True))
    items += test_run("graphs")
    items.append({"kind": "compiled", "shapes": core[:1], "required": True})
    items += [steps(s, phase, False) for s in core[1:] for phase in ("base", "views")]
    items.append(steps(core[0], "views", False))
    items += [steps(s, phase, False) for s in rest for phase in ("targets", "base", "views")]
    if shapes[1:]:
        items.append({"kind": "compiled", "shapes": shapes[1:], "required": False})
    return items


class Shapes:
    """The shapes' report rows, the plan's records, and the one model held at a time (built when a step needs it)."""

    def __init__(self, device: str, args: argparse.Namespace, budget: Budget, rep: dict[str, Any], save: Any):
        self.device, self.args, self.budget, self.rep, self.save = device, args, budget, rep, save
        self.rows: dict[str, dict[str, Any]] = {}
        self.current: tuple[str, Any] | None = None
        rep.setdefault("plan", [])

    def row(self, shape: str) -> dict[str, Any]:
        if shape not in self.rows:
            self.rows[shape] = {"shape": shape, "config": SHAPES[shape][1], "skipped": []}
            self.rep["shapes"].append(self.rows[shape])
        return self.rows[shape]

    def record(self, step: str, required: bool, estimate: float, status: str, **more: Any) -> None:
        """One line of ``rep["plan"]``: a step of the plan, whether the issue needs it, its estimate, what became of it."""
        rec = {"step": step, "required": required, "estimate_s": round(estimate, 1), "status": status}
        rec.update({k: v for k, v in more.items() if v is not None})
        self.rep["plan"].append(rec)

    def backend(self, shape: str):
        if self.current is not None and self.current[0] == shape:
            return self.current[1]
        self.release()
        row = self.row(shape)
        t0 = time.perf_counter()
        backend = build_backend(shape, self.device)
        _sync()
        row.setdefault("build_s", time.perf_counter() - t0)
        row["parameters_b"] = sum(p.numel() for p in backend.model.parameters()) / 1e9
        row["backend"] = backend.describe()
        self.current = (shape, backend)
        return backend

    def release(self) -> None:
        """Drop the held model for real: close its backend, collect what cycles still hold it, return the
        cached GPU memory, so the next shape's memory baseline and peaks hold its own weights alone."""
        if self.current is None:
            return
        self.current[1].close()
        self.current = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def cfg(self):
        from personajudge.core.config import build_config

        a = self.args
        return build_config(
            {
                "backend": {"name": "hf", "device": self.device},
                "decoding": {"max_new_tokens": a.max_new_tokens, "seed": 0},
            }
        )

    def need(self, shape: str, name: str) -> float:
        """Seconds step ``name`` needs left on ``shape``: its share of the shape's estimate, and the build
        when the held model is another shape's."""
        est = SHAPES[shape][2]
        held = self.current is not None and self.current[0] == shape
        return est * STEPS[name][1] + (0.0 if held else est * BUILD_SHARE)

    def run_phase(self, shape: str, phase: str, required: bool) -> None:
        """Every step of ``phase`` (see :data:`STEPS`) on ``shape``."""
        for name, (step_phase, _) in STEPS.items():
            if step_phase == phase:
                self.run(shape, name, required)

    def run(self, shape: str, name: str, required: bool) -> None:
        """Run step ``name`` on ``shape`` when its estimate is left; its result, or its error, goes in the row."""
        need = self.need(shape, name)
        step = f"{shape}.{name}"
        if self.budget.left() < need:
            why = f"time budget ({self.budget.left():.0f} s left, needs ~{need:.0f})"
            self.row(shape)["skipped"].append(f"{name}: {why}")
            self.record(step, required, need, SHORT[0], detail=why)
            print(f"[gpu-check] {shape}: {name} skipped (time budget)", flush=True)
            self.save()
            return
        row = self.row(shape)
        row["unfinished"] = name
        self.save()
        t1 = time.perf_counter()
        try:
            row[name] = self._step(shape, name)
        except Exception as err:  # one failed measurement must not lose the others
            row[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
        row[f"{name}_s"] = round(time.perf_counter() - t1, 1)
        del row["unfinished"]
        row["targets"] = targets(shape, row, self.args.batch)
        failed = "error" in row[name]
        self.record(step, required, need, FAILED if failed else DONE, took_s=row[f"{name}_s"])
        self.save()
        print(f"[gpu-check] {shape}: {name} {'FAILED' if failed else 'done'} in {row[f'{name}_s']} s", flush=True)

    def run_compiled(self, shapes: list[str], required: bool) -> None:
        """The compiled steps of ``shapes``, in one child process (:func:`compiled_in_subprocess`), when the
        first one's estimate is left; each shape's outcome recorded (see :data:`SHORT`)."""
        need = SHAPES[shapes[0]][3]
        if self.budget.left() < need:
            why = f"time budget ({self.budget.left():.0f} s left, needs ~{need:.0f})"
            for shape in shapes:
                self.row(shape)["skipped"].append(f"compiled: {why}")
                self.record(f"{shape}.compiled", required, SHAPES[shape][3], SHORT[0], detail=why)
            print(f"[gpu-check] compiled steps of {', '.join(shapes)} skipped (time budget)", flush=True)
            self.save()
            return
        self.release()  # fresh weights, in a process of its own
        for shape in shapes:
            self.row(shape)["unfinished"] = "compiled"
        self.save()
        print(f"[gpu-check] compiled steps of {', '.join(shapes)} ...", flush=True)
        results = compiled_in_subprocess(shapes, self.device, self.args, self.budget)
        for shape, res in results.items():
            row = self.row(shape)
            del row["unfinished"]
            status, detail = self._compiled_status(res)
            if status in SHORT:
                row["skipped"].append(f"compiled: {status}: {detail}")
            if "skipped" not in res:
                row["compiled"] = res
                row["compiled_s"] = res.get("wall_s")
            row["targets"] = targets(shape, row, self.args.batch)
            self.record(
                f"{shape}.compiled", required, SHAPES[shape][3], status, took_s=res.get("wall_s"), detail=detail
            )
            print(f"[gpu-check] {shape}: compiled step {status}{': ' + detail if detail else ''}", flush=True)
        self.save()

    def _compiled_status(self, res: dict[str, Any]) -> tuple[str, str | None]:
        if "skipped" in res:
            return SHORT[0], res["skipped"]
        if "stopped" in res:
            return SHORT[1], res["stopped"]
        if "not_reached" in res:
            return SHORT[2], res["not_reached"]
        if "error" in res:
            return FAILED, res["error"][:300]
        why = compiled_fell_back(res, self.device == "cuda")
        res["fell_back"] = why
        return (FELL_BACK, why) if why else (DONE, None)

    def _step(self, shape: str, name: str) -> Any:
        from personajudge.bench import run_bench

        a = self.args
        backend, cfg = self.backend(shape), self.cfg()
        if name == "cache_check":
            return cache_check(backend)
        if name == "bench":
            methods = ["plain", "persona-judge"]
            return run_bench(
                cfg, views=2, repeats=a.repeats, progress=False, backend=backend, methods=methods, steps=False
            )
        if name == "memory":
            return memory(backend, cfg, a.max_new_tokens)
        if name == "batch":
            return batch_speed(backend, cfg, a.batch, a.max_new_tokens)
        if name == "bench_extra":
            return run_bench(
                cfg,
                views=2,
                repeats=a.repeats,
                progress=False,
                backend=backend,
                methods=["persona-judge-base"],
                ceiling_run=False,
            )
        if name == "profile":
            return host_profile(backend)
        if name == "views_3":
            methods = ["persona-judge"]
            return run_bench(
                cfg, views=3, repeats=a.repeats, progress=False, backend=backend, methods=methods, steps=False
            )
        raise ValueError(f"unknown step {name!r}")


def targets(shape: str, row: dict[str, Any], batch: int = 16) -> dict[str, Any]:
    """The issue's targets, where this run measured them (True/False), else None.

    The batch ratio is labelled with the batch's size (``--batch``); the ≥ 8× target is the issue's
    for 16 prompts, so it is judged only then. A compiled step that fell back gives no compiled
    ratio: it timed an eager run."""
    out: dict[str, Any] = {}
    bench = row.get("bench") or {}
    ratio = next((r["ratio_to_plain"] for r in bench.get("results", []) if r["method"] == "persona-judge"), None)
    out["persona_judge_over_generate"] = ratio
    out["persona_judge_ge_0.9x_generate"] = (ratio >= 0.9) if ratio is not None and shape in TARGET_SHAPES else None
    comp = row.get("compiled") or {}
    res = {r["method"]: r for r in comp.get("results", [])}
    if comp.get("fell_back"):
        out["compiled_fell_back"] = comp["fell_back"]
    elif "persona-judge" in res:
        out["compiled_persona_judge_over_generate"] = res["persona-judge"]["ratio_to_plain"]
    b = row.get("batch") or {}
    sp = b.get("speedup") if "error" not in b else None
    out[f"batch_{batch}_over_1"] = sp
    if batch == 16:
        out["batch_16_ge_8x"] = sp >= 8 if sp is not None else None
    mem = row.get("memory") or {}
    if "peak_mb_2_view" in mem:
        out["memory_2_views_within_1.1x"] = mem["peak_mb_2_view"] <= mem["allowed_mb_2_views"]
    return out


_OUTCOME = re.compile(r"^(?P<id>[^\s:]+::\S.*?) (?P<out>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(?P<id>[^\s:]+::\S.*?)\s*$")
_SUMMARY = re.compile(r"^(?P<out>FAILED|ERROR) (?P<id>\S+::\S+?)(?: - (?P<why>.*))?$")


def tests_report(
    rc: int | None, stdout: str, stderr: str, *, timed_out: bool, per_test_s: float | None, hang_s: float
) -> dict[str, Any]:
    """What a CUDA test run says, from ``pytest -v -rfEs``'s output: each test's outcome, the test it was in
    when it was stopped (``"unfinished"``), the failures with their reasons, both streams' tails.

    ``"skipped"`` (the run was stopped for time, not failed) when the budget stopped it, or when its only
    failures are pytest-timeout's at a per-test limit the budget had cut below :data:`HANG_S`."""
    outcomes: dict[str, str] = {}
    unfinished = None
    for line in stdout.splitlines():
        m = _OUTCOME.match(line)
        if m:
            outcomes[m["id"]] = m["out"]
            unfinished = None
            continue
        m = _STARTED.match(line)
        if m and m["id"] not in outcomes:
            unfinished = m["id"]
    reasons = {m["id"]: m["why"] or "" for m in map(_SUMMARY.match, stdout.splitlines()) if m}
    failures = {t: reasons.get(t, "") for t, o in outcomes.items() if o in ("FAILED", "ERROR")}
    lines = [x for x in stdout.strip().splitlines() if x.strip()]
    res: dict[str, Any] = {
        "rc": None if timed_out else rc,
        "summary": lines[-1].strip("= ") if lines else "",
        "counts": {o.lower(): list(outcomes.values()).count(o) for o in sorted(set(outcomes.values()))},
        "failures": failures,
        "unfinished": unfinished,
        "per_test_timeout_s": per_test_s,
        "tail": stdout[-6000:],
        "stderr_tail": stderr[-6000:],
    }
    budget_cut = per_test_s is not None and per_test_s < hang_s
    if timed_out:
        where = f" in {unfinished}" if unfinished else ""
        res["skipped"] = f"stopped by the time budget{where}"
        res["summary"] = f"stopped by the time budget{where}; before it: {res['counts']}"
    elif failures and budget_cut and all("Timeout" in why for why in failures.values()):
        res["skipped"] = f"stopped by the time budget: {', '.join(failures)} ran past {per_test_s:.0f} s"
    return res


def run_tests(limit: float, select: str) -> dict[str, Any]:
    """The CUDA tests (``-m cuda``) matching ``-k select``, for at most ``limit`` seconds; on a machine
    without CUDA they skip, which this records.

    ``-v`` names each test as it starts and ends, ``-rfEs`` the failures' reasons, unbuffered, so
    a run stopped at its limit still says which test it was in. pytest-timeout (``-o timeout``,
    below the limit) fails a test that hangs and shows where; pytest's ``faulthandler_timeout``
    dumps every thread's stack a little later, for a hang in native code the former cannot
    interrupt. (The project's ``timeout = 900`` is a safety net far above any limit here.)"""
    grace = min(5.0, limit / 4)
    per_test: float | None = float(math.floor(min(HANG_S[select], limit - grace - 5.0)))
    per_test = per_test if per_test >= 1.0 else None
    # -P: the repository root must not shadow the installed package (its personajudge/ lacks core/ etc.)
    cmd = [sys.executable, "-P", "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider"]
    if per_test is not None:
        cmd += ["-o", f"timeout={per_test:.0f}", "-o", f"faulthandler_timeout={per_test + 3:.0f}"]
    cmd += ["-m", "cuda", "-k", select, *CUDA_TESTS]
    run = _run_bounded(cmd, limit, cwd=REPO)
    res = tests_report(
        run["rc"], run["stdout"], run["stderr"], timed_out=run["timed_out"], per_test_s=per_test, hang_s=HANG_S[select]
    )
    res["limit_s"] = round(limit, 1)
    res["wall_s"] = run["wall_s"]
    return res


def tests_status(res: dict[str, Any]) -> str:
    """A test run's plan status: stopped for time, passed (exit status 0) or failed."""
    if "skipped" in res:
        return SHORT[1]
    return DONE if res.get("rc") == 0 else FAILED


def verdict(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's verdict from its plan records (see the module's docstring and :data:`VERDICTS`)."""
    failed = [r["step"] for r in records if r["status"] == FAILED]
    fell_back = [f"{r['step']}: {r.get('detail')}" for r in records if r["status"] == FELL_BACK]
    short = [r for r in records if r["status"] in SHORT]
    skipped = [
        f"{r['step']}: {r['status']}{'' if r['required'] else ' (optional)'}: {r.get('detail', '')}" for r in short
    ]
    if failed:
        name = "failed"
    elif fell_back:
        name = "compiled step fell back"
    elif any(r["required"] for r in short):
        name = "incomplete"
    else:
        name = "ok"
    return {
        "verdict": name,
        "ok": name == "ok",
        "complete": not short,
        "failed": failed,
        "fell_back": fell_back,
        "skipped": skipped,
        "skipped_required": [s for s, r in zip(skipped, short) if r["required"]],
    }


# --------------------------------------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def _graphs(comp: dict[str, Any], gpu: bool) -> str:
    g = comp.get("graphs") or {}
    if "unavailable" in g:
        return f"graphs: not counted ({str(g['unavailable'])[:40]})"
    counts = f"graphs: {g.get('recorded')} recorded, {g.get('replayed')} replayed, {g.get('skips')} skipped"
    if not gpu:
        return counts + " (no CUDA graphs on a CPU)"
    return counts + ("" if g.get("used") else " (NOT replayed)")


def _compiled_cell(comp: dict[str, Any], gpu: bool) -> str:
    for key, label in (("stopped", "stopped for time"), ("not_reached", "not reached"), ("error", "error")):
        if key in comp:
            return f"{label}: {str(comp[key])[:100]}"
    head = "ok" if not comp.get("fell_back") else f"FELL BACK: {comp['fell_back'][:100]}"
    return f"{head}; {_graphs(comp, gpu)}; judge: {str(comp.get('compile_judge'))[:60]}"


def _tests_cell(res: dict[str, Any]) -> str:
    if not res:
        return "–"
    text = res.get("summary") or res.get("skipped", "–")
    if res.get("failures"):
        text += " (failed: " + ", ".join(t.split("::")[-1] for t in res["failures"]) + ")"
    return text


def markdown(rep: dict[str, Any]) -> str:
    m, v = rep["machine"], rep["versions"]
    gpu = rep["device"] == "cuda"
    n = rep["settings"]["batch"]
    tests = rep.get("tests") or {}
    graph_tests = rep.get("tests_graphs") or {}
    device = m.get("gpu") or m.get("cpu") or m["processor"]
    if gpu:
        device += f", {_fmt(m.get('gpu_total_mb'), '.0f')} MB, driver {m.get('driver') or '?'}"
    lines = [f"# GPU check ({rep['device']}: {device})", ""]
    if "verdict" in rep:
        lines += [f"**Verdict: {rep['verdict']}** (ok: {rep['ok']}, complete: {rep['complete']})", ""]
    lines += [
        f"torch {v['torch']} (CUDA {v.get('cuda') or 'none'}), transformers {v['transformers']}; "
        f"{rep['settings']['max_new_tokens']} new tokens, median of {rep['settings']['repeats']} after a "
        f"warm-up; T 0.7, top-k 20, top-p 0.9, λ 4; random {rep['dtype']} weights (speed only). "
        f"Install: {rep['install'].get('project')}. CUDA tests: {_tests_cell(tests)}; "
        f"CUDA-graph tests: {_tests_cell(graph_tests)}. "
        f"Wall time {rep['elapsed_s']:.0f} s of a {rep['settings']['budget_s']:.0f} s budget.",
        "",
        "| shape | params | generate tok/s | persona-judge | × | pj-base | × | 3 views | × | "
        f"batch {n} / 1 | GPU MB 1 view | 2 views | allowed | rows 1v / 2v | ms plain step / pj token | "
        "est. × | cache Δ / argmax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for row in rep["shapes"]:
        res = {r["method"]: r for r in (row.get("bench") or {}).get("results", [])}
        res.update({r["method"]: r for r in (row.get("bench_extra") or {}).get("results", [])})
        plain = res.get("plain", {}).get("tokens_per_s")
        v3 = ((row.get("views_3") or {}).get("results") or [{}])[0].get("tokens_per_s")
        st = (row.get("bench_extra") or {}).get("steps") or {}
        plain_step = st.get("plain_step_ms")
        mem = row.get("memory") or {}
        cc = row.get("cache_check") or {}
        agrees = cc.get("argmax_agrees")

        def rate(name: str, res: dict = res, plain: float | None = plain) -> tuple[str, str]:
            t = res.get(name, {}).get("tokens_per_s")
            return _fmt(t), _fmt(t / plain if t and plain else None, ".2f")

        pj, pjb = rate("persona-judge"), rate("persona-judge-base")
        lines.append(
            f"| {row['shape']} | {row.get('parameters_b', 0):.2f} B | {_fmt(plain)} | {pj[0]} | {pj[1]} | {pjb[0]} | "
            f"{pjb[1]} | {_fmt(v3)} | {_fmt(v3 / plain if v3 and plain else None, '.2f')} | "
            f"{_fmt((row.get('batch') or {}).get('speedup'), '.2f')} | {_fmt(mem.get('peak_mb_1_view'), '.0f')} | "
            f"{_fmt(mem.get('peak_mb_2_view'), '.0f')} | {_fmt(mem.get('allowed_mb_2_views'), '.0f')} | "
            f"{_fmt(mem.get('rows_1_view'), 'd')} / {_fmt(mem.get('rows_2_view'), 'd')} | "
            f"{_fmt(plain_step, '.2f')} / {_fmt(st.get('per_token_ms'), '.2f')} | "
            f"{_fmt(st.get('estimate_ratio'), '.2f')} | "
            f"{_fmt(cc.get('max_abs_diff'), '.2g')} / {'–' if agrees is None else 'same' if agrees else 'DIFFERS'} |"
        )
    lines += [
        "",
        "Cache check: the batched KV cache's logits against a full recompute after 6 steps; in bfloat16 a "
        "difference of about 1e-2 and, with random weights, an argmax that differs at a near-tie are expected "
        "(float32 on the CPU: below 1e-3, the same argmax).",
        "",
        *_profile_lines(rep),
        "Static cache and compiled steps (`cache_implementation=static`, `compile`), a fresh copy of the weights:",
        "",
        "| shape | options | generate tok/s | persona-judge | × | compile |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rep["shapes"]:
        comp = row.get("compiled") or {}
        if "results" not in comp:
            cell = _compiled_cell(comp, gpu) if comp else "not run"
            lines.append(f"| {row['shape']} | – | – | – | – | {cell} |")
            continue
        res = {r["method"]: r.get("tokens_per_s") for r in comp["results"]}
        plain, cpj = res.get("plain"), res.get("persona-judge")
        opts = comp.get("options", {})
        lines.append(
            f"| {row['shape']} | {opts.get('compile')}/{opts.get('compile_backend')} | {_fmt(plain)} | {_fmt(cpj)} | "
            f"{_fmt(cpj / plain if cpj and plain else None, '.2f')} | {_compiled_cell(comp, gpu)} |"
        )
    if rep.get("plan"):
        lines += ["", "Plan (estimates are the script's, in seconds):", "", "| step | needed | est. | took | status |"]
        lines.append("|---|---|---:|---:|---|")
        for r in rep["plan"]:
            status = r["status"] + (f": {str(r['detail'])[:90]}" if r.get("detail") else "")
            lines.append(
                f"| {r['step']} | {'required' if r['required'] else 'optional'} | {r['estimate_s']:.0f} | "
                f"{_fmt(r.get('took_s'))} | {status} |"
            )
    errors = [
        f"{r['shape']}.{k}: {v['error']}"
        for r in rep["shapes"]
        for k, v in r.items()
        if isinstance(v, dict) and "error" in v
    ]
    errors += [
        f"{k}: {t}: {why}"
        for k in ("tests", "tests_graphs")
        for t, why in (rep.get(k) or {}).get("failures", {}).items()
    ]
    if errors:
        lines += ["", "Errors: " + "; ".join(errors)]
    if rep.get("skipped_shapes"):
        lines += ["", "Shapes not run (time budget): " + ", ".join(rep["skipped_shapes"])]
    lines += [
        "",
        f"Targets (issue 17): persona-judge ≥ 0.9× generate on the 1B and 7B shapes; batch 16 ≥ 8× one "
        f"prompt (this run: batch {n}); 2-view peak ≤ 1.1 × (1-view peak + one view's KV cache).",
    ]
    for row in rep["shapes"]:
        lines.append(f"- {row['shape']}: {json.dumps(row.get('targets', {}))}")
    return "\n".join(lines) + "\n"


def _internal_compiled(args: argparse.Namespace, budget: Budget) -> int:
    """The child of :func:`compiled_in_subprocess`: each shape's compiled step, to ``OUT/<shape>.json``,
    marked started first (so that its parent can tell a step stopped midway from one never reached)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shape in args.internal_compiled.split(","):
        t0 = time.perf_counter()
        need = SHAPES[shape][3]
        if budget.left() < need:
            res: dict[str, Any] = {"skipped": f"time budget ({budget.left():.0f} s left, needs ~{need:.0f})"}
        else:
            print(f"[gpu-check] {shape}: compiled steps ...", flush=True)
            (out / f"{shape}.json").write_text(json.dumps(_started(shape)))
            try:
                res = compiled(shape, args.device, args, budget)
            except Exception as err:
                res = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            res["wall_s"] = round(time.perf_counter() - t0, 1)
        tmp = out / f"{shape}.json.tmp"
        tmp.write_text(json.dumps(res, indent=2, default=str))
        os.replace(tmp, out / f"{shape}.json")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument(
        "--shapes",
        help=f"comma-separated subset of {','.join(SHAPES)} (default: the GPU shapes on "
        "CUDA, the tiny ones on the CPU); the plan makes the first two the target shapes",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET_S,
        help="skip what would not fit in this many seconds, counted from the start (the install included)",
    )
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
    ap.add_argument("--internal-compiled", metavar="SHAPE", help=argparse.SUPPRESS)  # the compiled step's child
    args = ap.parse_args(argv)
    args.error = ap.error
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.started = time.time()
    faulthandler.enable()  # a crash in native code (a compiler, a driver) prints where it happened
    out = Path(args.out)
    try:
        install_info = ensure_installed(args, argv)
    except SetupError as err:
        write_stub(out, str(err), err.info)
        print(f"gpu-check: error: {err}", file=sys.stderr)
        return 2
    if args.internal_compiled:  # its --budget-s is what its parent had left when it started it
        return _internal_compiled(args, Budget(args.budget_s, args.started))
    budget = Budget(args.budget_s, install_info.get("started"))

    import torch
    import transformers

    import personajudge
    from personajudge.bench import machine_info

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = args.shapes.split(",") if args.shapes else (GPU_SHAPES if device == "cuda" else TINY_SHAPES)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        args.error(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    if len(set(shapes)) != len(shapes):
        args.error(f"--shapes names a shape twice: {','.join(shapes)}")
    gpu = device == "cuda"
    args.device = device
    # 64 on a GPU: eager bf16 steps ran at 25-38 tokens/s on an H200 (host-bound), so 128 tokens x 3 repeats
    # took the budget's time from the compiled step (2026-11-28)
    args.max_new_tokens = args.max_new_tokens or (64 if gpu else 12)
    args.repeats = args.repeats or (3 if gpu else 1)
    out.mkdir(parents=True, exist_ok=True)
    info = gpu_info(torch)
    rep: dict[str, Any] = {
        "schema": SCHEMA,
        "device": device,
        "dtype": "bfloat16" if gpu else "float32",
        "machine": {**machine_info(), **{k: v for k, v in info.items() if k != "cuda"}},
        "install": install_info,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": info["cuda"],
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
        "plan": [],
    }

    def save() -> None:
        """Write what is measured so far (before and after every step): a crash, a kill at the time limit
        or an out-of-memory abort leaves everything before it in OUT, the step it was in named by
        ``"unfinished"`` on its shape."""
        rep["elapsed_s"] = budget.elapsed()
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(rep, indent=2, default=str))
        os.replace(tmp, out / "gpu_check.json")
        (out / "gpu_check.md").write_text(markdown(rep))

    work = Shapes(device, args, budget, rep, save)

    def tests(select: str, required: bool) -> None:
        key, need = TEST_KEYS[select], TESTS_S[select]
        if budget.left() < need:
            why = f"time budget ({budget.left():.0f} s left, needs ~{need:.0f})"
            rep[key] = {"skipped": why}
            work.record(key, required, need, SHORT[0], detail=why)
            print(f"[gpu-check] {key} skipped (time budget)", flush=True)
        else:
            work.release()  # the tests' process needs the GPU's memory more than a model the next step rebuilds
            print(f"[gpu-check] {key} ({select}) ...", flush=True)
            rep[key] = run_tests(min(TESTS_CAP_S[select], budget.left()), select)
            status = tests_status(rep[key])
            work.record(key, required, need, status, took_s=rep[key].get("wall_s"), detail=rep[key].get("skipped"))
            print(f"[gpu-check] {key}: {status}: {rep[key]['summary']}", flush=True)
        save()

    try:
        for item in plan(shapes, tests=not args.no_tests):
            if item["kind"] == "steps":
                work.run_phase(item["shape"], item["phase"], item["required"])
            elif item["kind"] == "tests":
                tests(item["select"], item["required"])
            else:
                work.run_compiled(item["shapes"], item["required"])
    finally:
        work.release()
    ran = set(STEPS) | {"compiled"}
    rep["skipped_shapes"] = [s for s in shapes if s not in work.rows or not any(k in work.rows[s] for k in ran)]
    rep["shapes"] = [r for r in rep["shapes"] if r["shape"] not in rep["skipped_shapes"]]
    rep.update(verdict(rep["plan"]))
    save()
    print(markdown(rep))
    name = rep["verdict"]
    if name == "failed":
        print(f"gpu-check: FAILED: {', '.join(rep['failed'])}", file=sys.stderr)
    elif name == "compiled step fell back":
        print(f"gpu-check: COMPILED STEP FELL BACK: {'; '.join(rep['fell_back'])}", file=sys.stderr)
    elif name == "incomplete":
        print(
            f"gpu-check: INCOMPLETE (nothing failed; required steps not run for time): "
            f"{'; '.join(rep['skipped_required'])}",
            file=sys.stderr,
        )
    elif rep["skipped"]:
        print(f"gpu-check: ok; optional steps not run for time: {'; '.join(rep['skipped'])}", file=sys.stderr)
    return VERDICTS[name]


if __name__ == "__main__":
    sys.exit(main())
