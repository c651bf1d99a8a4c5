"""``length``: response length in words (whitespace-separated tokens).

The paper's proxy for concise (lower) vs. informative (higher).
"""

from __future__ import annotations

from personajudge.plugins import hookimpl

from .base import PointwiseScorer


def word_count(text: str) -> int:
    return len(text.split())


class LengthScorer(PointwiseScorer):
    name = "length"
    description = "Response length in words (lower = more concise, higher = more informative)."

    def score(self, prompt: str, response: str) -> float:
        return float(word_count(response))


@hookimpl
def register_scorers(register):
    register(LengthScorer)
