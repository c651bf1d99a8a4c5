"""Preference objects and how a user's words become them.

Both models raise :class:`~personajudge.core.errors.PreferenceError` when built
with an invalid value (``Preference(name="")``, ``weight=-1``, a multi-line
example), one line naming the field, instead of pydantic's multi-line
``ValidationError``: a plugin or a notebook builds them directly. (Validation
through ``model_validate`` keeps pydantic's error, for callers that format it
with the entry it came from, as the preferences-file reader does.)
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personajudge.core.config import TypedErrors, validation_message
from personajudge.core.errors import PreferenceError


class _Typed(BaseModel, metaclass=TypedErrors):
    """Construction (``Preference(...)``) raises :class:`PreferenceError`, one line naming the field
    (see :class:`~personajudge.core.config.TypedErrors`)."""

    @classmethod
    def typed_error(cls, err: ValidationError, kwargs: dict[str, Any]) -> Exception:
        name = kwargs.get("name")
        named = f" {name.strip()[:40]!r}" if isinstance(name, str) and name.strip() else ""
        return PreferenceError(f"invalid {cls.__name__.lower()}{named}: {validation_message(err)}")


class Example(_Typed):
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


class Preference(_Typed):
    """One preference: what it means and the text a view's prefix carries.

    ``description`` says what the preference means (shown in listings);
    ``instruction`` is what the encoder puts in front of the prompt. For a
    free-text preference both are the user's text, and an ``instruction`` left
    out is the ``description``, here as in a preferences file's table. ``examples`` are
    question/answer demonstrations of the preference: a base model imitates
    demonstrations far more readily than it follows an instruction line, so
    the ``exemplar`` encoder shows them (``auto`` picks it for models without
    a chat template when every preference of the run has some).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    description: str = Field(min_length=1)
    instruction: str = Field(min_length=1)
    # strict, as the config's numbers: ``weight = true`` in a file is not 1.0, nor ``"2"`` 2.0
    weight: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        strict=True,
        description="Relative weight (used by weighted methods such as mod).",
    )
    aliases: tuple[str, ...] = ()
    source: str = ""
    examples: tuple[Example, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _instruction_defaults_to_description(cls, data: Any) -> Any:
        if isinstance(data, dict) and "instruction" not in data and "description" in data:
            return {**data, "instruction": data["description"]}
        return data

    @field_validator("name", "description", "instruction")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    def definition(self) -> dict[str, Any]:
        """This preference as a preferences-file table (JSON-able): everything that decides a prompt
        (``name``, ``description``, ``instruction``, ``weight``, ``examples``), not its aliases or source.

        With a ``description`` the table defines the preference outright, so it resolves to the same
        prompt wherever it is read (a preferences file, ``RunConfig.preferences`` / ``views``), even
        where the library holds another preference of that name: what a run's ``settings`` report for
        a preference a file or a caller defined or adjusted. Two preferences with equal definitions
        prompt alike (see :func:`~personajudge.preferences.duplicates`)."""
        return {
            "name": self.name,
            "description": self.description,
            "instruction": self.instruction,
            "weight": self.weight,
            "examples": [{"q": e.q, "a": e.a} for e in self.examples],
        }

    @classmethod
    def free_text(cls, text: str, weight: float = 1.0) -> Preference:
        """A preference given as a description (``"explain like I'm five"``)."""
        if not isinstance(text, str):
            raise PreferenceError(f"a free-text preference is a description (a string), got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise PreferenceError(
                'a free-text preference is empty: give a description such as "explain like I\'m five"'
            )
        slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "custom"
        data = {"name": slug, "description": text, "instruction": text, "weight": weight, "source": "free text"}
        try:
            return cls.model_validate(data)
        except ValidationError as err:  # named by the user's text, not the slug made of it
            raise PreferenceError(f"preference {text[:40]!r}: {validation_message(err)}") from None


#: what may end an instruction as a sentence (a closing quote or bracket after one of them counts too)
_SENTENCE_ENDS = ".!?;:…。！？"


def _as_sentence(text: str) -> str:
    t = text.rstrip()
    if t.rstrip("\"')]»”’")[-1:] in tuple(_SENTENCE_ENDS):
        return t
    return t + "."


def compose(view: list[Preference]) -> str:
    """The prefix text of a view that carries several preferences (multi-objective).

    Each instruction is closed as a sentence before the next: a free-text description or a file's
    ``description = "Talk like a pirate"`` has no final period, and run into the next instruction it
    reads as one garbled sentence ("Talk like a pirate Be concise ..."). One preference is left as written."""
    if len(view) == 1:
        return view[0].instruction
    return " ".join(_as_sentence(p.instruction) for p in view)
