"""Result and statistics types of one generation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

FinishReason = Literal["eos", "length", "stop", "context"]


class Stats(BaseModel):
    """Per-run counters.

    ``drafted`` counts draft tokens that were judged (up to and including the
    first rejection of each window; tokens a literal window drafts past a
    rejection are waste, not decisions). ``acceptance_rate`` is accepted /
    drafted, None for methods that do not draft.
    """

    method: str = ""
    views: int = 1
    drafted: int = 0
    accepted: int = 0
    iterations: int = 0
    tokens: int = 0
    prompt_tokens: list[int] = Field(default_factory=list, description="Prompt length of each view.")
    forwards: int = 0
    wall_time_s: float = 0.0
    seed: int | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted: how often the judge kept the drafter's token (None when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time, prompt processing included (0.0 before the run)."""
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain JSON-able counters, times rounded to what a clock can tell (ms, 0.1 tok/s)."""
        d = self.model_dump()
        d["wall_time_s"] = round(self.wall_time_s, 3)
        rate = self.acceptance_rate
        d["acceptance_rate"] = None if rate is None else round(rate, 4)
        d["tokens_per_s"] = round(self.tokens_per_s, 1)
        return d


class GenerationResult(BaseModel):
    """What one generation returns: the text, its token ids, why it stopped and its counters.

    ``finish_reason`` is ``eos`` (the model ended), ``length`` (``max_new_tokens``), ``stop`` (a stop
    string; the text is cut before it) or ``context`` (the context window filled). ``settings`` holds
    the effective settings, so a run can be repeated; ``as_dict()`` is the ``--json`` form.
    """

    text: str
    tokens: list[int]
    finish_reason: FinishReason
    stats: Stats
    #: the effective settings (backend, model, method, views, encoder, decoding), when the API knows them
    settings: dict[str, Any] | None = None

    def as_dict(self) -> dict:
        out = {
            "text": self.text,
            "tokens": self.tokens,
            "finish_reason": self.finish_reason,
            "stats": self.stats.as_dict(),
        }
        if self.settings is not None:
            out["settings"] = self.settings
        return out
