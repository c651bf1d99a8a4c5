"""The scorer protocol.

A scorer is a class registered through the ``register_scorers`` hook::

    from personajudge.plugins import hookimpl
    from personajudge.evaluation.scorers import PointwiseScorer

    class Exclamations(PointwiseScorer):
        name = "exclamations"
        description = "Number of exclamation marks."

        def score(self, prompt, response):
            return float(response.count("!"))

    @hookimpl
    def register_scorers(register):
        register(Exclamations)

Two kinds:

- **pointwise** (:class:`PointwiseScorer`): ``score(prompt, response) -> float``
  and the batched ``score_many(items)``. Win rates compare the values of two
  methods in a dimension's direction (see :mod:`..dimensions`).
- **pairwise** (:class:`PairwiseScorer`): ``compare(item) -> PairResult``
  where ``item`` holds two responses and one aspect; the result's ``value``
  is the first response's score (1 better, 0.5 tie, 0 worse). Pairwise
  scorers judge every preference dimension of an experiment directly.

Options come from ``--scorer-option ALIAS.KEY=VALUE`` and are validated by
the scorer's pydantic ``Options`` model (unknown keys are an error). Heavy
dependencies are imported in ``__init__`` or on first use, never at module
import, so listing plugins stays fast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ScorerError


class ScorerOptions(BaseModel):
    """Base of every scorer's options (no options by default)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ScoringContext:
    """What the runner hands a scorer before scoring: the run's loaded model and seed."""

    seed: int = 0
    #: the run's :class:`~personajudge.PersonaJudge`, if a model is loaded
    pj: Any = None
    #: the run's :class:`~personajudge.core.config.RunConfig`
    run_config: Any = None


@dataclass
class PairItem:
    """Two responses to one prompt, to be compared on one aspect."""

    prompt: str
    response_a: str
    response_b: str
    aspect: str
    aspect_name: str = ""
    key: str = ""


@dataclass
class PairResult:
    """``value``: score of response A (1 = better, 0.5 = tie, 0 = worse); ``details`` go to the JSONL."""

    value: float
    details: dict[str, Any] = field(default_factory=dict)


def _format_error(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'options'}: {e['msg']}" for e in err.errors())


class Scorer:
    name: ClassVar[str]
    description: ClassVar[str] = ""
    kind: ClassVar[str] = "pointwise"
    Options: ClassVar[type[ScorerOptions]] = ScorerOptions
    #: ``(module, extra)`` pairs that must be importable; checked by :meth:`validate` before any work starts
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, **options: Any):
        self.options = self.validate(options)

    @classmethod
    def validate(cls, options: dict[str, Any]) -> ScorerOptions:
        """Check the options (and, in subclasses, that dependencies are importable) without loading anything."""
        import importlib.util

        for module, extra in cls.requires:
            if importlib.util.find_spec(module) is None:
                raise missing_dependency(cls.name, module, extra)
        try:
            return cls.Options.model_validate(options)
        except ValidationError as err:
            raise ScorerError(f"scorer '{cls.name}': {_format_error(err)}") from None

    @classmethod
    def config_for(cls, options: ScorerOptions) -> dict[str, Any]:
        """What determines the values of a scorer with ``options`` (hashed into the run, so a changed
        scorer never reuses stale scores). Subclasses drop options that only say *where* it runs."""
        return {"name": cls.name, "options": options.model_dump(mode="json")}

    @classmethod
    def identity_for(cls, options: ScorerOptions) -> dict[str, Any] | None:
        """What the scorer resolved to where its options leave it open (a judge model taken from the
        environment): recorded in ``run.json`` and the report, and a change of it is a change of the
        run. Never a credential. Default: None (the options say it all)."""
        return None

    @classmethod
    def config_hash_for(cls, options: ScorerOptions) -> str:
        return hashlib.sha256(json.dumps(cls.config_for(options), sort_keys=True).encode()).hexdigest()[:16]

    def config(self) -> dict[str, Any]:
        return self.config_for(self.options)

    def config_hash(self) -> str:
        return self.config_hash_for(self.options)

    def bind(self, context: ScoringContext) -> None:
        """Receive the run's context before scoring (default: ignore it)."""

    def close(self) -> None:
        """Free models or connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unimplemented(fn):
    """Marks a base method a scorer must override (this one or its batched twin): the plugin manager
    refuses a scorer class that overrides neither when it registers, not after ``eval`` generated."""
    fn.unimplemented = True
    return fn


class PointwiseScorer(Scorer):
    kind = "pointwise"

    @_unimplemented
    def score(self, prompt: str, response: str) -> float:
        raise NotImplementedError(f"scorer '{self.name}' implements neither score nor score_many")

    @_unimplemented
    def score_many(self, items: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of many ``(prompt, response)`` pairs; override to batch."""
        return [float(self.score(p, r)) for p, r in items]


class PairwiseScorer(Scorer):
    kind = "pairwise"

    @_unimplemented
    def compare(self, item: PairItem) -> PairResult:
        raise NotImplementedError(f"scorer '{self.name}' implements neither compare nor compare_many")

    @_unimplemented
    def compare_many(self, items: Sequence[PairItem]) -> list[PairResult]:
        return [self.compare(it) for it in items]


def missing_dependency(scorer: str, module: str, extra: str = "eval") -> ScorerError:
    return ScorerError(
        f"the '{scorer}' scorer needs the Python package '{module}': "
        f'pip install -e ".[{extra}]" in your persona-judge clone'
    )
