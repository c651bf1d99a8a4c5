"""``python -m personajudge.bench.text``: the emitter's host time per committed token, on a real tokenizer.

Every committed token goes through :class:`~personajudge.core.stopping.Emitter`.
How often it decodes text depends on who reads the text: after every token
when the request streams or has stop strings, every ``GUARD_EVERY`` tokens
when only the repetition guard reads it, once at the end when nothing does.
This pushes the same tokens (a fixed English text, encoded by the backend's
tokenizer) through each regime in one process, ``finish`` included, and
prints the best of ``--repeats`` microseconds per token.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from personajudge.bench.options import at_least
from personajudge.core.config import build_config
from personajudge.core.errors import PersonaJudgeError
from personajudge.core.stopping import Emitter
from personajudge.plugins.manager import load_backend

#: Distinct sentences, so the repetition guard scans segments and never cuts.
SENTENCES = (
    "The owl turns its head almost all the way round, because its eyes cannot move in their sockets.",
    "Bees make honey from nectar, which they carry home, pass from mouth to mouth and fan until it thickens.",
    "A prime number has exactly two divisors: one and itself.",
    "Trains stay on the rails thanks to the cone shape of their wheels, not to the flanges!",
    "Why do leaves fall? The tree seals them off to save water over the winter.",
    "Cats need meat; they cannot make some of the nutrients that other animals make for themselves.",
    "At sunset the light crosses more air, which scatters the blue and leaves the reds and oranges.",
)

#: (label, emitter options, whether a listener takes the text as it is committed)
REGIMES: tuple[tuple[str, dict[str, Any], bool], ...] = (
    ("streamed (on_text), guard on", {"repeat_lines": 3}, True),
    ("stop string, guard on", {"repeat_lines": 3, "stop": ["\nQuestion:"]}, False),
    ("guard only (not streamed)", {"repeat_lines": 3}, False),
    ("nothing reads the text", {"repeat_lines": 0}, False),
)


def per_token_us(tokenizer: Any, tokens: Sequence[int], options: dict[str, Any], listen: bool, repeats: int) -> float:
    """Best of ``repeats``: microseconds per token to push ``tokens`` and finish."""
    best = float("inf")
    sink: Callable[[str], None] | None = (lambda piece: None) if listen else None
    for _ in range(repeats):
        em = Emitter(tokenizer, max_new_tokens=len(tokens) + 1, eos_token_ids=(), on_text=sink, **options)
        t0 = time.perf_counter()
        for t in tokens:
            em.push(t)
        em.finish("length")
        best = min(best, time.perf_counter() - t0)
        if em.finish_reason != "length" or len(em.tokens) != len(tokens):
            raise RuntimeError(f"the text ended early ({em.finish_reason}); the timing would not be comparable")
    return best / len(tokens) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m personajudge.bench.text", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="llama-cpp", help="whose tokenizer (default: the embedded model's, llama.cpp)")
    ap.add_argument("--model", default=None, help="the backend's model (default: the embedded one)")
    ap.add_argument("--tokens", type=at_least(1), default=2000)
    ap.add_argument("--repeats", type=at_least(1), default=5)
    a = ap.parse_args(argv)
    try:
        backend = load_backend(build_config({"backend": {"name": a.backend, "model": a.model}}).backend)
    except PersonaJudgeError as err:  # an unknown backend, a missing model: one line, as the CLI says it
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        tok = backend.tokenizer
        text = " ".join(SENTENCES)
        tokens: list[int] = []
        while len(tokens) < a.tokens:
            tokens += tok.encode(text + "\n", add_bos=False)
        tokens = tokens[: a.tokens]
        print(
            f"Emitter host time per committed token: {a.backend} tokenizer, {len(tokens)} tokens, best of {a.repeats}"
        )
        print(
            f"(decodes after every token when streamed or with stop strings, every {Emitter.GUARD_EVERY} for the guard)"
        )
        print()
        print(f"{'regime':<30} | {'us/token':>8}")
        print("-" * 41)
        for label, options, listen in REGIMES:
            print(f"{label:<30} | {per_token_us(tok, tokens, options, listen, a.repeats):>8.2f}")
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
