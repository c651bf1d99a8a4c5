"""Preference objects and how a user's words become them."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Preference(BaseModel):
    """One preference: what it means and the text a view's prefix carries.

    ``description`` says what the preference means (shown in listings);
    ``instruction`` is what the encoder puts in front of the prompt. For a
    free-text preference both are the user's text.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0.0, description="Relative weight (used by weighted methods such as mod).")
    aliases: tuple[str, ...] = ()
    source: str = ""

    @field_validator("name", "description", "instruction")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    @classmethod
    def free_text(cls, text: str, weight: float = 1.0) -> "Preference":
        """A preference given as a description (``"explain like I'm five"``)."""
        text = text.strip()
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "custom"
        return cls(name=slug, description=text, instruction=text, weight=weight, source="free text")


def compose(view: list[Preference]) -> str:
    """The prefix text of a view that carries several preferences (multi-objective)."""
    return " ".join(p.instruction for p in view)
