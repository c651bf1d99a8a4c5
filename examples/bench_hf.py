"""Persona-judge vs plain ``model.generate`` on the Hugging Face backend, side by side.

Loads the model once (default: the embedded Gemma 3 270M GGUF, dequantized by
transformers; the first load converts and caches it, later loads take
seconds), then times, on the same prompt and settings (paper defaults:
temperature 0.7, top-k 20, top-p 0.9, lambda 4, 128 new tokens):

- ``plain``: ``model.generate(do_sample=True)`` on one preference-prompted view
  (the backend's ``native_generate``, as in ``personajudge bench``);
- ``persona-judge``: two views (two preferences) drafting and judging each other.

The two alternate (plain, pj, pj, plain, ...) after a warm-up of each, so a
noisy neighbour on a shared machine hits both alike. Both wall-clock and
process CPU time are recorded; with one thread (``--threads 1``) the CPU-time
rate is immune to other processes competing for the cores. Run it as::

    python examples/bench_hf.py --threads 1        # embedded Gemma 270M on CPU
    python examples/bench_hf.py --model Qwen/Qwen2.5-0.5B-Instruct --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from personajudge.api import PersonaJudge, make_method
from personajudge.core.config import build_config
from personajudge.core.errors import PersonaJudgeError
from personajudge.preferences import build_views

DEFAULT_PROMPT = "Why is the sky blue?"


def bench_hf(
    model: str | None = None,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    prompt: str = DEFAULT_PROMPT,
    preferences: tuple[str, ...] = ("concise", "humor"),
    repeats: int = 3,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_k: int = 20,
    top_p: float = 0.9,
    lam: int = 4,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the side-by-side benchmark; print a summary and return the numbers."""
    cfg = build_config(
        {
            "backend": {
                "name": "hf",
                "model": model,
                "device": device,
                "dtype": dtype,
                "threads": threads,
                "options": dict(options or {}),
            },
            "preferences": list(preferences),
            "decoding": {
                "lambda": lam,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": top_p,
                "max_new_tokens": max_new_tokens,
            },
        }
    )
    t0 = time.perf_counter()
    pj = PersonaJudge(cfg)
    load_s = time.perf_counter() - t0
    backend = pj.backend
    torch = backend.torch

    # The plain baseline's context: one view prompted with the first preference (the "prompt" method).
    plain_cfg = cfg.model_copy(update={"method": "prompt", "preferences": list(preferences[:1])})
    meth = make_method(plain_cfg)
    plain_ctx = pj.encode_views(prompt, plain_cfg, meth, build_views(list(preferences[:1])))[0]

    def sync() -> None:
        if backend.input_device.type == "cuda":
            torch.cuda.synchronize()

    def run(name: str, s: int) -> dict[str, Any]:
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        if name == "plain":
            toks = backend.native_generate(
                plain_ctx, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens, seed=s
            )
            n, acc = len(toks), None
        else:
            res = pj.generate(prompt, seed=s)
            n, acc = len(res.tokens), res.stats.acceptance_rate
        sync()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        return {
            "seed": s,
            "tokens": n,
            "wall_s": wall,
            "cpu_s": cpu,
            "tokens_per_s": n / wall,
            "tokens_per_cpu_s": n / cpu,
            "acceptance_rate": acc,
        }

    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "persona-judge": []}
    order = ["plain", "persona-judge"]
    run("plain", seed)  # warm-ups
    run("persona-judge", seed)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            runs[name].append(run(name, seed + 1 + r))
            if verbose:
                x = runs[name][-1]
                print(
                    f"  {name:<14} seed {x['seed']}: {x['tokens']} tokens, {x['tokens_per_s']:.2f} tok/s wall, "
                    f"{x['tokens_per_cpu_s']:.2f} tok/CPU-s",
                    file=sys.stderr,
                )
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "tokens_per_cpu_s": statistics.median(x["tokens_per_cpu_s"] for x in rs),
            "tokens": statistics.median(x["tokens"] for x in rs),
            "acceptance_rate": (
                statistics.mean(x["acceptance_rate"] for x in rs) if rs[0]["acceptance_rate"] is not None else None
            ),
        }
    p, j = summary["plain"], summary["persona-judge"]
    rep = {
        "backend": backend.describe(),
        "load_time_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "prompt": prompt,
            "preferences": list(preferences),
            "lambda": lam,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "repeats": repeats,
        },
        "summary": summary,
        "runs": runs,
        "ratio_wall": j["tokens_per_s"] / p["tokens_per_s"],
        "ratio_cpu": j["tokens_per_cpu_s"] / p["tokens_per_cpu_s"],
    }
    pj.close()
    if verbose:
        print(f"backend: {json.dumps(rep['backend'])}")
        print(f"settings: {json.dumps(rep['settings'])}, torch threads {rep['torch_threads']}")
        print("| method        | tokens/s (wall) | tokens/CPU-s | acceptance | tokens |")
        print("|---------------|-----------------|--------------|------------|--------|")
        for name, s in summary.items():
            acc = f"{s['acceptance_rate']:.2f}" if s["acceptance_rate"] is not None else "-"
            print(
                f"| {name:<13} | {s['tokens_per_s']:>15.2f} | {s['tokens_per_cpu_s']:>12.2f} | {acc:>10} | "
                f"{s['tokens']:>6.0f} |"
            )
        print(
            f"persona-judge / plain model.generate: {rep['ratio_wall']:.2f} (wall), {rep['ratio_cpu']:.2f} (CPU time)"
        )
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="hub id, model folder or .gguf (default: embedded Gemma 3 270M)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method (at least 1)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-prepack", action="store_true", help="backend option cpu_prepack=false")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    a = ap.parse_args(argv)
    if a.repeats < 1 or a.max_new_tokens < 1:
        ap.error("--repeats and --max-new-tokens must be at least 1")
    try:
        rep = bench_hf(
            a.model,
            device=a.device,
            dtype=a.dtype,
            threads=a.threads,
            prompt=a.prompt,
            repeats=a.repeats,
            max_new_tokens=a.max_new_tokens,
            options={"cpu_prepack": False} if a.no_prepack else None,
            verbose=not a.json,
        )
    except PersonaJudgeError as err:  # a mistake is one line and status 2, as at the CLI
        ap.exit(2, f"{ap.prog}: error: {err}\n")
    if a.json:
        print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
