"""Quick start: Persona-judge on the embedded default model, from Python.

    python examples/quickstart.py            # the embedded Gemma 3 270M via llama.cpp
    python examples/quickstart.py --backend toy   # no model at all (what the tests also run)

Loads the model once, then compares direct prompting with Persona-judge on
one prompt and prints both answers with their statistics.
"""

import argparse

from personajudge import PersonaJudge, PersonaJudgeError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="llama-cpp")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    try:
        run(args)
    except PersonaJudgeError as err:  # a mistake is one line and status 2, as at the CLI
        ap.exit(2, f"{ap.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> None:
    pj = PersonaJudge({"backend": {"name": args.backend}, "decoding": {"max_new_tokens": args.max_new_tokens}})
    prompt = "Why is the sky blue?"
    for method in ("prompt", "persona-judge"):
        res = pj.generate(prompt, preferences=["concise", "humor"], method=method, seed=7)
        s = res.stats
        acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
        print(f"--- {method}: {s.tokens} tokens, {s.tokens_per_s:.1f} tok/s{acc}")
        print(res.text.strip())
    pj.close()


if __name__ == "__main__":
    main()
