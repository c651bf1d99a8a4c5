"""Evaluation scorers: the protocol and the built-in ones (one module each).

Built-ins: ``length``, ``flesch``, ``vader`` (deterministic), ``reward-model``
(a transformers sequence-classification model) and ``pairwise-judge`` (an LLM
judge comparing two responses on one aspect). Each module registers its class
through the ``register_scorers`` hook, like a third-party plugin would.
"""

from personajudge.plugins import registry

from .base import (
    PairItem,
    PairResult,
    PairwiseScorer,
    PointwiseScorer,
    Scorer,
    ScorerOptions,
    ScoringContext,
)

__all__ = [
    "PairItem",
    "PairResult",
    "PairwiseScorer",
    "PointwiseScorer",
    "Scorer",
    "ScorerOptions",
    "ScoringContext",
    "get_scorer_class",
    "make_scorer",
]


def get_scorer_class(name: str) -> type[Scorer]:
    """The registered scorer class called ``name`` (UnknownPluginError lists the registered ones)."""
    return registry("scorer").get(name)


def make_scorer(name: str, options: dict | None = None) -> Scorer:
    """An instance of the registered scorer ``name`` with ``options``."""
    return get_scorer_class(name)(**(options or {}))
