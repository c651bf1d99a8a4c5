"""Evaluate Persona-judge against direct prompting on a few P-Soups prompts, end to end.

Runs on the embedded default model (Gemma 3 270M through llama.cpp): 3 of the
50 shipped P-Soups prompts, two experiments (concise vs. informative, scored by
length; friendly vs. unfriendly, scored by VADER sentiment; every response also
gets a Flesch-Kincaid grade, its reading level, in the mean-scores table), the methods
``prompt`` (both preferences in one prompt) and ``persona-judge`` (one view per
preference), 32 new tokens each. It writes ``report.md``, ``report.json`` and
PNG plots into the run directory and prints where they are. Takes about a
minute on two CPU cores.

    python examples/evaluate_small.py                       # embedded model
    python examples/evaluate_small.py --backend toy         # seconds, no model
    python examples/evaluate_small.py --run-dir runs/mine --limit 10

The run is resumable: interrupt it and run the same command again. The same
evaluation from the command line:

    personajudge eval --limit 3 --max-new-tokens 32 --seed 0 --run-dir runs/evaluate_small

Needs ``pip install -e ".[llama,eval]"`` (in the clone).
"""

from __future__ import annotations

import argparse

from personajudge import PersonaJudgeError
from personajudge.evaluation import EvalSpec, pair_experiment, run_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="llama-cpp", help="llama-cpp (default, the embedded model) or toy")
    ap.add_argument("--run-dir", default="runs/evaluate_small")
    ap.add_argument("--limit", type=int, default=3, help="number of P-Soups prompts (of 50)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        run(args)
    except PersonaJudgeError as err:  # a mistake is one line and status 2, as at the CLI
        ap.exit(2, f"{ap.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> None:
    spec = EvalSpec(
        limit=args.limit,
        methods=["prompt", "persona-judge"],
        baseline="prompt",
        experiments=[pair_experiment("concise,informative"), pair_experiment("friendly,unfriendly")],
        scorers=[{"name": "length"}, {"name": "flesch"}, {"name": "vader"}],
        seeds=[args.seed],
        run={"backend": {"name": args.backend}, "decoding": {"max_new_tokens": args.max_new_tokens}},
    )
    result = run_eval(spec, args.run_dir)
    print(f"{result.generated} responses generated, {result.reused} reused from an earlier run")
    report = result.report["markdown"].read_text(encoding="utf-8")
    start = report.index("## Win rate")
    print(report[start : report.index("## Mean scores")].strip())
    print()
    print(f"report: {result.report['markdown']}")
    print(f"data:   {result.report['json']}")
    for name, path in result.report.items():
        if name not in ("markdown", "json"):
            print(f"plot:   {path}")


if __name__ == "__main__":
    main()
