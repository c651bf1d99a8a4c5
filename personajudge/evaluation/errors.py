"""Errors of the evaluation harness (all :class:`PersonaJudgeError`, so the CLI exits 2 with one line)."""

from __future__ import annotations

from personajudge.core.errors import PersonaJudgeError


class EvalError(PersonaJudgeError):
    """A user mistake in an evaluation (bad flag, bad dataset, bad run directory)."""


class DatasetError(EvalError, ValueError):
    """A prompt file cannot be read or has no usable prompts."""


class RunMismatchError(EvalError):
    """The run directory was started with a different configuration."""


class RunLockedError(EvalError):
    """Another process is writing to the same run directory."""


class ScorerError(EvalError):
    """A scorer is misconfigured, or its optional dependency is missing."""
