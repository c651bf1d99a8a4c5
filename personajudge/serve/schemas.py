"""Request and response shapes of the OpenAI-compatible API, plus persona-judge's own fields.

Requests accept OpenAI's fields and, beside them, the fields the ``openai``
client sends through ``extra_body`` (``preferences``, ``views``, ``method``,
``lambda``, ``top_k``, ``encoder``, ``roles``, ``schedule``). Fields OpenAI
defines that this server cannot honour (``n`` > 1, ``logprobs``, tools,
penalties) are refused with a 400 naming the field rather than silently
ignored; fields it does not know are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import ErrorDetails

from personajudge.core.config import MAX_STOP_CHARS, DecodingConfig
from personajudge.core.files import unicode_problem
from personajudge.core.result import FinishReason

#: persona-judge's finish reasons in OpenAI's vocabulary ("context": the model's window is full)
FINISH_REASONS: dict[FinishReason, str] = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


#: OpenAI's bound on ``stop``: at most 4 sequences ("Up to 4 sequences where the API will stop"), fewer than
#: the config's ``MAX_STOP_STRINGS``; each at most the config's ``MAX_STOP_CHARS`` characters (a bound of
#: ours: OpenAI names none), checked here to name the field as the request spelled it (a string or a list)
MAX_STOPS = 4
#: OpenAI's upper bound on ``temperature`` (the Python API and the CLI take up to 100)
MAX_TEMPERATURE = 2.0
#: a bound on the lists a request names things with (``preferences``, ``views`` and each view's list, a
#: message's content parts), far above any real request (``--max-views`` is 8 by default), checked before
#: their items are: pydantic validates every item of a list and builds an error for each one that fails,
#: so a 3 MiB list of numbers held the event loop, every request the server had, for 13 to 30 s
MAX_ITEMS = 1024
#: at most this many fields are described in a 400's message (the rest are counted): one bad value per
#: item of a long list made a message as large as the request
MAX_REPORTED = 5


def _at_most(v: Any, limit: int, what: str) -> Any:
    """``v`` unchanged; a ``ValueError`` if it is a list of more than ``limit`` items (a before-validator's
    check: its length is known before pydantic looks at any item)."""
    if isinstance(v, list) and len(v) > limit:
        raise ValueError(f"at most {limit} {what} are allowed, got {len(v)}")
    return v


def _bounded_like(config_field: str, type_: Any, *extra: Any) -> Any:
    """``type_ | None`` with the bounds of ``DecodingConfig.<config_field>``, the field a request field
    becomes: a value the config would refuse is then refused while parsing, as a 400 naming the field
    the client sent (``max_tokens``), not the config's name for it (``decoding.max_new_tokens``).
    ``extra``: OpenAI's tighter bounds, checked after the config's (the last ``le`` is the one that holds)."""
    return Annotated[(type_ | None, *DecodingConfig.model_fields[config_field].metadata, *extra)]


if TYPE_CHECKING:  # what the fields hold; at run time they also carry the config's bounds
    MaxTokens: TypeAlias = int | None
    Temperature: TypeAlias = float | None
    TopP: TypeAlias = float | None
    TopK: TypeAlias = int | None
    Seed: TypeAlias = int | None
    Lambda: TypeAlias = int | None
else:
    MaxTokens = _bounded_like("max_new_tokens", int)
    Temperature = _bounded_like("temperature", float, Field(le=MAX_TEMPERATURE))
    TopP = _bounded_like("top_p", float)
    TopK = _bounded_like("top_k", int)
    Seed = _bounded_like("seed", int)
    Lambda = _bounded_like("lambda_", int)


#: the request models validate strictly, as OpenAI does: a JSON value of the wrong type is a 400 naming
#: the field, not coerced (``"max_tokens": true`` was one token, ``"stream": "yes"`` a stream, ``"seed":
#: "3"`` a seed). Strict still takes an integer for a float (``"temperature": 1``), as JSON has one number
STRICT = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    model: str = Field(..., min_length=1)
    max_tokens: MaxTokens = None
    #: OpenAI's newer name for ``max_tokens`` (chat only there); taken on both endpoints, as the README says
    max_completion_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    seed: Seed = None
    stop: str | list[str] | None = None
    #: OpenAI's type is "boolean or null" (null: false): clients and proxies that send unset fields as null
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = 1
    user: str | None = None
    # persona-judge's own (the openai client's extra_body)
    #: one view each, replacing the server's defaults; ``[]`` drops its default preferences and leaves its
    #: default views (``--view``), as ``preferences=[]`` does in the Python API (``Server.generation_kwargs``)
    preferences: list[str] | str | None = None
    #: ``[]`` is no views (as ``views=[]`` in the Python API): no preferences, unless ``preferences`` gives them
    views: list[list[str] | str] | None = None
    method: str | None = None
    lambda_: Lambda = Field(None, alias="lambda")
    top_k: TopK = None
    encoder: str | None = None
    roles: Literal["alternate", "fixed", "round-robin"] | None = None
    schedule: Literal["interleaved", "windowed"] | None = None
    # OpenAI fields that are refused unless left at their defaults
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    response_format: Any = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice (each with its own seed)")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, v: Any) -> Any:
        return _at_most(v, MAX_STOPS, "stop sequences")

    @field_validator("preferences", mode="before")
    @classmethod
    def _few_preferences(cls, v: Any) -> Any:
        return _at_most(v, MAX_ITEMS, "preferences")

    @field_validator("views", mode="before")
    @classmethod
    def _few_views(cls, v: Any) -> Any:
        for i, group in enumerate(_at_most(v, MAX_ITEMS, "views") if isinstance(v, list) else ()):
            _at_most(group, MAX_ITEMS, f"preferences in view {i + 1}")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(s == "" for s in items):
            raise ValueError("stop strings must not be empty")
        for i, s in enumerate(items):
            if len(s) > MAX_STOP_CHARS:
                which = "the stop string" if isinstance(v, str) else f"stop string {i + 1}"
                raise ValueError(f"{which} has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
        return v

    @field_validator("method", "encoder")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():  # the config refuses it too, but would not name the request field
            raise ValueError("must not be empty")
        return v

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # OpenAI refuses it too: a client that asks for a usage chunk and does not stream has a bug
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first OpenAI feature asked for that this server does not have."""
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported by persona-judge"
        if self.top_logprobs not in (None, 0):
            return "top_logprobs", "logprobs are not supported by persona-judge"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by persona-judge"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by persona-judge (leave it at 0)"
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            return "tools", "tool calls are not supported by persona-judge"
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            return "response_format", 'only response_format {"type": "text"} is supported'
        if self.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return None

    def token_limit(self) -> tuple[int | None, str]:
        """The request's token limit and the field it came from: ``max_completion_tokens`` wins over
        ``max_tokens`` (OpenAI deprecated the latter for it), so an error names the one that counted."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def preference_list(self) -> list[str] | None:
        if self.preferences is None:
            return None
        return [self.preferences] if isinstance(self.preferences, str) else list(self.preferences)

    def view_groups(self) -> list[list[str]] | None:
        if self.views is None:
            return None
        return [[g] if isinstance(g, str) else list(g) for g in self.views]


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _few_parts(cls, v: Any) -> Any:
        return _at_most(v, MAX_ITEMS, "content parts")

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        """Text, as text parts or a string, that UTF-8 can encode: checked here, so that a 400 names the
        message (``messages.2.content``), not the whole list."""
        for part in [{"type": "text", "text": v}] if isinstance(v, str) else v or ():
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            if (problem := unicode_problem(part["text"])) is not None:
                raise ValueError(f"the text {problem}")
        return v

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(..., min_length=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _fits(cls, v: Any, info: ValidationInfo) -> Any:
        """No more messages than the model's context has positions (the server validates with
        ``context={"context_length": ...}``): each takes at least one, and the bound is checked before
        any message is validated (see :data:`MAX_ITEMS`)."""
        n_ctx = (info.context or {}).get("context_length")
        if isinstance(v, list) and n_ctx is not None and len(v) > n_ctx:
            raise ValueError(
                f"{len(v)} messages cannot fit in this model's context of {n_ctx} tokens (each takes at least one)"
            )
        return v

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")  # before: the length is checked before the items are
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("send one prompt per request (a list of prompts is not supported)")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    names: set[str] = set()
    for model in models:
        for name, info in model.model_fields.items():
            names.update(x for x in (name, info.alias) if x)
    return frozenset(names)


#: every field name (and alias) of the request schemas, nested ones included: a ``str`` in a
#: validation error's ``loc`` that is none of these is the tag pydantic gives a union's branch
#: (``str``, ``list[str]``, ``list[dict[str,any]]``), which the client never wrote
_FIELDS = _field_names(ChatCompletionRequest, CompletionRequest, Message, StreamOptions)


def field_error(err: ValidationError) -> tuple[str | None, str]:
    """A request's validation error as ``(param, message)`` in the fields the client sent.

    ``param`` is the field as sent: union tags dropped, list indexes kept (``messages.0.content``).
    A union's value fails once per branch; the client gets one message per field: the branch that
    got furthest (``"stop": [5]`` fails inside the list branch: ``stop.0``), and where branches fail
    at the same place their expectations together ("Input should be a valid string or a valid
    list"), not a message per pydantic branch.
    """
    # errors of one value, keyed by where it sat (its loc up to the first union tag)
    by_site: dict[tuple[int | str, ...], list[tuple[tuple[int | str, ...], ErrorDetails]]] = {}
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        tag = next((i for i, x in enumerate(loc) if isinstance(x, str) and x not in _FIELDS), len(loc))
        clean = tuple(x for x in loc if isinstance(x, int) or x in _FIELDS)
        by_site.setdefault(loc[:tag], []).append((clean, e))
    by_field: dict[tuple[int | str, ...], list[ErrorDetails]] = {}
    for found in by_site.values():
        deepest = max(len(clean) for clean, _ in found)
        for clean, e in found:
            if len(clean) == deepest:
                by_field.setdefault(clean, []).append(e)
    parts, params = [], []
    for clean, details in by_field.items():
        field = ".".join(str(x) for x in clean)
        params.append(field)
        texts = list(dict.fromkeys(d["msg"].removeprefix("Value error, ") for d in details))
        # "Input should be a valid string or a valid list"
        text = texts[0] + "".join(" or " + t.removeprefix("Input should be ") for t in texts[1:])
        got = details[0].get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r:.60})"
        parts.append(f"{field}: {text}{shown}" if field else f"{text}{shown}")
    if len(parts) > MAX_REPORTED:
        parts[MAX_REPORTED:] = [f"and {len(parts) - MAX_REPORTED} more invalid fields"]
    return (params[0] or None) if params else None, "; ".join(parts)


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
