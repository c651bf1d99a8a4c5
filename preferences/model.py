"""Preference objects and how a user's words become them."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Example(BaseModel):
    """One question/answer demonstration of a preference (for the ``exemplar`` encoder).

    Both sides are one line: the exemplar format ends an answer at a newline,
    so a demonstration with a line break would teach the model to stop (or
    run on) in the middle of an answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    q: str = Field(min_length=1, description="The question.")
    a: str = Field(min_length=1, description="The answer, written the way the preference wants it.")

    @field_validator("q", "a")
    @classmethod
    def _one_line(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if "\n" in v or "\r" in v:
            raise ValueError("must be one line (the exemplar format ends an answer at a newline)")
        return v


class Preference(BaseModel):
    """One preference: what it means and the text a view's prefix carries.

    ``description`` says what the preference means (shown in listings);
    ``instruction`` is what the encoder puts in front of the prompt. For a
    free-text preference both are the user's text. ``examples`` are
    question/answer demonstrations of the preference: a base model imitates
    demonstrations far more readily than it follows an instruction line, so
    the ``exemplar`` encoder shows them (``auto`` picks it for models without
    a chat template when every preference of the run has some).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    weight: float = Field(
        1.0, gt=0.0, allow_inf_nan=False, description="Relative weight (used by weighted methods such as mod)."
    )
    aliases: tuple[str, ...] = ()
    source: str = ""
    examples: tuple[Example, ...] = ()

    @field_validator("name", "description", "instruction")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    @classmethod
    def free_text(cls, text: str, weight: float = 1.0) -> Preference:
        """A preference given as a description (``"explain like I'm five"``)."""
        text = text.strip()
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "custom"
        return cls(name=slug, description=text, instruction=text, weight=weight, source="free text")


def compose(view: list[Preference]) -> str:
    """The prefix text of a view that carries several preferences (multi-objective)."""
    return " ".join(p.instruction for p in view)
