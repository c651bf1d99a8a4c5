"""Result and statistics types of one generation."""

from __future__ import annotations

from typing import Literal

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
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = self.model_dump()
        d["acceptance_rate"] = self.acceptance_rate
        d["tokens_per_s"] = self.tokens_per_s
        return d


class GenerationResult(BaseModel):
    text: str
    tokens: list[int]
    finish_reason: FinishReason
    stats: Stats

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "finish_reason": self.finish_reason,
                "stats": self.stats.as_dict()}
