"""What `make demo` shows: one prompt answered with no preference, with direct prompting, and with Persona-judge.

    python examples/demo.py                       # the embedded Gemma 3 270M via llama.cpp
    python examples/demo.py --backend toy         # no model at all (what the fast tests run)
    python examples/demo.py --prompt "How do magnets work?" --prefer informative --prefer friendly

The embedded model is a *base* model: it imitates demonstrations far better
than it follows instructions, so `auto` picks the `exemplar` encoder for it
(a few question/answer exemplars that show each view's preferences). The
three answers use the same seed:

- `base`: no preference (neutral exemplars, the same format);
- `prompt`: both preferences in one prompt (the pair's combined exemplars);
- `persona-judge`: one view per preference, drafting and judging each other.
"""

from __future__ import annotations

import argparse
import textwrap

from personajudge import PersonaJudge, PersonaJudgeError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="llama-cpp")
    ap.add_argument("--prompt", default="Why is the sky blue?")
    ap.add_argument("--prefer", action="append", help="a preference (twice: one view each); default concise, friendly")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    args = ap.parse_args()
    try:
        run(args)
    except PersonaJudgeError as err:  # a mistake is one line and status 2, as at the CLI
        ap.exit(2, f"{ap.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> None:
    prefs = args.prefer or ["concise", "friendly"]

    # `is not None`: 0 is a value for RunConfig to refuse (as the CLI does), not "the default"
    backend = {"name": args.backend, **({"threads": args.threads} if args.threads is not None else {})}
    with PersonaJudge({"backend": backend, "decoding": {"max_new_tokens": args.max_new_tokens}}) as pj:
        encoder = pj.resolved_encoder(pj.config.model_copy(update={"preferences": prefs}))
        print(f"Q: {args.prompt}    (preferences: {', '.join(prefs)}; encoder {encoder}, seed {args.seed})\n")
        runs = [
            ("no preference (base)", "base", []),
            (f"prompt: {' + '.join(prefs)} in one prompt", "prompt", prefs),
            (f"persona-judge: views {' | '.join(prefs)}", "persona-judge", prefs),
        ]
        for title, method, p in runs:
            res = pj.generate(args.prompt, preferences=p, method=method, seed=args.seed)
            s = res.stats
            acc = f", acceptance {s.acceptance_rate:.2f}" if s.acceptance_rate is not None else ""
            print(f"--- {title}  [{len(res.text.split())} words{acc}]")
            print(textwrap.fill(res.text.strip() or "(empty)", width=100))
            print()


if __name__ == "__main__":
    main()
