"""Multi-objective views: one view carries several preferences at once.

    python examples/multi_objective.py [--backend toy]

Reproduces the shape of the paper's Table 5: the cost of Persona-judge as the
number of combined objectives in a view grows (touching; touching+vivid;
touching+vivid+creative), judged by a "helpful" view. The cost should grow
only with the prefix length.
"""

import argparse

from personajudge import PersonaJudge, PersonaJudgeError

OBJECTIVES = ["touching", "vivid", "creative"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="llama-cpp")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args()
    try:
        run(args)
    except PersonaJudgeError as err:  # a mistake is one line and status 2, as at the CLI
        ap.exit(2, f"{ap.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> None:
    with PersonaJudge({"backend": {"name": args.backend}}) as pj:
        for n in (1, 2, 3):
            views = [OBJECTIVES[:n], ["helpful"]]
            res = pj.generate(
                "Describe a sunset over the sea.", views=views, seed=0, max_new_tokens=args.max_new_tokens
            )
            s = res.stats
            print(
                f"{n} objective(s) {'+'.join(OBJECTIVES[:n]):<26} prefix tokens {s.prompt_tokens}  "
                f"{s.wall_time_s:.2f}s  acceptance {s.acceptance_rate:.2f}"
            )


if __name__ == "__main__":
    main()
