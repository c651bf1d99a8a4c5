"""Validated configuration for a run.

One pydantic model (:class:`RunConfig`) describes everything a run needs. It is
loadable from TOML and overridable by CLI flags; any invalid value raises
:class:`~personajudge.core.errors.ConfigError` naming the field, so mistakes
surface before a model is loaded.
"""

from __future__ import annotations

import difflib
import numbers
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .files import check_path, read_text, unicode_problem

#: the largest seed: an unsigned 64-bit integer, what torch.manual_seed and numpy generators take
MAX_SEED = 2**64 - 1


#: ``decoding.stop``'s bounds. After every token the emitter looks for each stop string in the text and,
#: when streaming, holds back a tail that may still grow into one (a loop over each string's prefixes), in
#: the engine thread: an unbounded list slows every request in the batch, not only its own. The server
#: takes OpenAI's 4 (``personajudge.serve.schemas.MAX_STOPS``); the API, the CLI and batch files take more.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_seed_span(seed: int, count: int, what: str, error: type[Exception] = ConfigError, hint: str = "") -> None:
    """Refuse ``count`` runs seeded ``seed``, ``seed + 1``, ... (each row, sample or repeat its own) whose
    last seed passes :data:`MAX_SEED`, in one line naming ``what`` the user set (``--seed 5 with
    --samples 3``). Why up front: otherwise the run fails after the model loads, naming ``seeds[i]``,
    a list the user never wrote, or runs a row with a seed that no call accepts."""
    if seed + count - 1 > MAX_SEED:
        raise error(f"{what} goes past the largest seed, {MAX_SEED}{hint}")


#: Defaults of the released Persona-judge code (paper section 5).
PAPER_DEFAULTS = {"lambda": 4, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "max_new_tokens": 128}

RoleSchedule = Literal["alternate", "fixed", "round-robin"]
LoopSchedule = Literal["interleaved", "windowed"]


if TYPE_CHECKING:  # pydantic's model metaclass is not public by name; at run time it is type(BaseModel)
    from pydantic._internal._model_construction import ModelMetaclass as _ModelMeta
else:
    _ModelMeta = type(BaseModel)


#: per-call keyword spellings that a config file spells otherwise
_SPELLINGS = {"lam": ["lambda"]}


#: ggml's GGML_MAX_N_THREADS: more threads make llama.cpp abort (std::bad_alloc) and torch stall; the
#: most ``backend.threads`` takes, and what a Ray replica's thread count is capped at
MAX_THREADS = 512


class TypedErrors(_ModelMeta):
    """Building a model directly (``DecodingConfig(top_p=2)``) raises the class's typed error, one line
    naming the field, instead of pydantic's multi-line ``ValidationError``: these models are public,
    and a plugin or a notebook builds them itself.

    A metaclass, not an ``__init__``: pydantic calls an overridden ``__init__`` from
    ``model_validate`` and from validating a nested model too, where the error must stay a
    ``ValidationError`` with its location (``backend.threads``), which :func:`build_config` and the
    file readers format with where the value came from. A class says what it raises through
    ``typed_error(err, kwargs)``.
    """

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            typed: Callable[[ValidationError, dict[str, Any]], Exception] = cls.typed_error  # type: ignore[attr-defined]
            raise typed(err, kwargs) from None


class _Model(BaseModel, metaclass=TypedErrors):
    # allow_inf_nan=False: NaN passes every ge/le bound (all comparisons are False), so it is refused by name
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)

    @classmethod
    def typed_error(cls, err: ValidationError, kwargs: dict[str, Any]) -> Exception:
        return ConfigError(f"invalid {cls.__name__}: {validation_message(err)}")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        """An unknown key is named with the closest known one (``lam`` -> ``lambda``, ``top-k`` ->
        ``top_k``), not pydantic's bare "Extra inputs are not permitted"."""
        if not isinstance(data, dict):
            return data
        known = {a for name, f in cls.model_fields.items() for a in (name, f.alias) if a}
        for key in data:
            if isinstance(key, str) and key not in known:
                spoken = sorted(a for a in known if not a.endswith("_") or a[:-1] not in known)
                close = _SPELLINGS.get(key) or difflib.get_close_matches(key.replace("-", "_"), spoken, n=1)
                hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(spoken)}"
                raise ValueError(f"unknown setting '{key}'; {hint}")
        for name, f in cls.model_fields.items():  # pydantic's lax int takes true as 1
            key = f.alias if f.alias in data else name
            value = data.get(key)
            if isinstance(value, bool | str) and f.annotation in (int, int | None, float, float | None):
                # and its lax number takes the string "5" as 5: a seed given as text would run, reported as
                # the number, while the server (strict) and the CLI (argparse's int) refuse it
                raise ValueError(f"{f.alias or name} must be a number, got {value!r}")
            if isinstance(value, float) and f.annotation in (int, int | None):
                # and its lax int takes 4.0 as 4: a seed of 1.0 ran where a batch row's, an option's and a
                # request's are refused (1e20, beyond an int's digits, was "unable to parse input string")
                raise ValueError(f"{f.alias or name} must be an integer, got {value!r}")
            if isinstance(value, numbers.Integral) and not isinstance(value, int) and f.annotation in (int, int | None):
                # a numpy integer (rng.integers(2**63) as a seed): pydantic's lax int goes through a
                # float, which rounds above 2**53 (another seed, reported as given) or refuses a uint64
                data = {**data, key: int(value)}
        return data

    def __setattr__(self, name: str, value: Any) -> None:
        """``cfg.decoding.top_p = 2`` is checked (``validate_assignment``) and refused as a ConfigError too."""
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(f"invalid {type(self).__name__}: {validation_message(err)}") from None


class BackendConfig(_Model):
    """Which backend runs the model, and its options."""

    name: str = "llama-cpp"
    model: str | None = Field(None, description="Path or hub id; None means the backend's default model.")
    device: str | None = Field(None, description="cpu, cuda, cuda:N (hf); ignored by llama-cpp.")
    dtype: str | None = Field(None, description="float32, float16, bfloat16 or auto (hf).")
    threads: int | None = Field(
        None,
        ge=1,
        le=MAX_THREADS,
        description="CPU threads (at most 512: ggml's GGML_MAX_N_THREADS; "
        "llama.cpp aborts and torch stalls with far more).",
    )
    n_ctx: int | None = Field(None, ge=16, description="Context size in tokens.")
    n_gpu_layers: int | None = Field(None, ge=-1, description="Layers offloaded to the GPU (llama-cpp).")
    options: dict[str, Any] = Field(default_factory=dict, description="Backend-specific extra options.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("backend name must not be empty")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        # "" would become the path "." (the current folder) in every backend; None is the default model
        if v is not None and not v.strip():
            raise ValueError("must not be empty; omit it to use the backend's default model")
        return v


class DecodingConfig(_Model):
    """Sampling and acceptance settings; defaults are the paper's."""

    lambda_: int = Field(4, alias="lambda", ge=1, le=64, description="Draft window length.")
    temperature: float = Field(0.7, ge=0.0, le=100.0, description="0 means greedy (so does anything below 1e-5).")
    top_k: int = Field(20, ge=0, description="0 disables top-k.")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    stop: list[str] = Field(default_factory=list, description="Stop strings; text from a stop on is dropped.")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="None draws a fresh seed (reported in the stats); at most 2**64 - 1, what a backend's "
        "generator (torch.manual_seed, numpy) takes: a larger one failed there, after the model loaded.",
    )
    roles: RoleSchedule | None = Field(None, description="Override the method's role schedule.")
    repeat_lines: int = Field(
        3,
        ge=0,
        description="Repetition guard: end the response when this many consecutive lines are the same up to "
        "digits, case, punctuation and spacing (the repeats are dropped, the first kept); 0 turns it off. It "
        "only decides where to stop, never which token is sampled; the reference method always runs without it.",
    )
    schedule: LoopSchedule = Field(
        "interleaved",
        description="interleaved: judge each draft token in the same batched forward as the next draft "
        "step (same decisions, less work); windowed: the literal draft-lambda-then-verify loop.",
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        for i, s in enumerate(v):
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop string {i + 1} has {len(s)} characters; at most {MAX_STOP_CHARS} are allowed")
            _check_unicode(s, f"stop string {i + 1}")
        return v


def _check_unicode(text: str, what: str) -> None:
    """Text that reaches a tokenizer or the output is refused here when it holds a lone surrogate:
    tokenizers fail on it deep inside, and JSON output would not be valid UTF-8."""
    problem = unicode_problem(text)
    if problem is not None:
        raise ValueError(f"{what} {problem}")


class RunConfig(_Model):
    """Everything a generation run needs."""

    backend: BackendConfig = Field(default_factory=BackendConfig)
    method: str = "persona-judge"
    # a table is a preferences file's entry ({name, description, instruction, weight, examples}), read by
    # personajudge.preferences.resolve: what a run's settings report for a file's or a caller's preference
    preferences: list[str | dict[str, Any]] = Field(
        default_factory=list, description="Built-in names, free-text descriptions or preference tables."
    )
    views: list[list[str | dict[str, Any]]] | None = Field(
        None, description="Optional grouping of preferences into views, e.g. [['concise','humor'],['expert']]."
    )
    encoder: str = Field(
        "auto",
        description="Preference encoder; auto picks chat-turn for chat models, else exemplar when every "
        "preference has examples, else plain.",
    )
    encoder_options: dict[str, Any] = Field(default_factory=dict, description="Options of the encoder.")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Options of the method.")
    system: str | None = Field(None, description="Optional system message for chat models.")
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)

    @field_validator("method", "encoder")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("preferences", "views", mode="before")
    @classmethod
    def _entries(cls, v: Any, info: ValidationInfo) -> Any:
        """An entry that is neither text nor a table, named with where it sits: pydantic's own message
        reports each branch of ``str | dict`` (``views.0.0.str: ...; views.0.0.dict[str,any]: ...``).

        A ``Preference`` object (any pydantic model: this layer does not know the class) becomes its
        table, the fields that differ from their defaults, as a preferences file would write it: the
        API takes ``preferences=[Preference(...)]`` in a call, and so does the config."""
        rows = [v] if info.field_name == "preferences" else v
        if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
            return v  # the list shape itself: pydantic's message says it ("Input should be a valid list")
        if any(isinstance(p, BaseModel) for row in rows for p in row):
            rows = [
                [p.model_dump(mode="json", exclude_defaults=True) if isinstance(p, BaseModel) else p for p in r]
                for r in rows
            ]
            v = rows[0] if info.field_name == "preferences" else rows
        for i, row in enumerate(rows):
            for j, p in enumerate(row):
                if not isinstance(p, str | dict):
                    where = f"[{j}]" if info.field_name == "preferences" else f"[{i}][{j}]"
                    raise ValueError(
                        f"entry {where} must be a preference name or description (text) or a preference table, "
                        f"got {p!r:.40}"
                    )
        return v

    @field_validator("views")
    @classmethod
    def _views(cls, v: list[list[str | dict[str, Any]]] | None) -> list[list[str | dict[str, Any]]] | None:
        """``[]`` (no views: what a run's settings report for a method that uses none, such as ``base``)
        and ``[[]]`` (the one view without preferences of a run that has none) are the default, so a
        run can be repeated from its settings; any other view without a preference is a mistake."""
        if v is not None and v in ([], [[]]):
            return None
        if v is not None and any(not [p for p in view if not isinstance(p, str) or p.strip()] for view in v):
            raise ValueError("every view needs at least one preference")
        return v

    @field_validator("system")
    @classmethod
    def _system(cls, v: str | None) -> str | None:
        if v is not None:
            _check_unicode(v, "the system message")
        return v


def validation_message(err: Exception, prefix: str | None = None) -> str:
    """A pydantic ``ValidationError`` as one sentence naming each field and its rule.

    pydantic's own ``str()`` ends with a documentation URL and spreads over
    several lines; users get ``decoding.top_p: Input should be less than or
    equal to 1 (got 3)`` instead. Other exceptions give their first line.
    ``prefix`` is put in front of each field name (``backend.options``).
    """
    if not isinstance(err, ValidationError):
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"] if x != "__root__")
        loc = ".".join(x for x in (prefix, loc) if x)
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r:.60})"
        if e["type"] == "string_type" and isinstance(got, int | float) and not isinstance(got, bool):
            # ``--backend-option revision=1234567`` (VALUE is JSON) or ``revision = 1234567`` in TOML: a commit
            # or tag of digits reads as a number
            key, text = e["loc"][-1] if e["loc"] else "KEY", f"{got!r:.40}"
            shown += f'; to give it as text, quote it: {key}=\'"{text}"\' on the command line, "{text}" in a file'
        parts.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")  # a whole-model rule names no field
    return "; ".join(parts)


class Options(BaseModel):
    """Base of a backend's (or method's) options: one field per option, with its type, default and
    bounds. Strict: ``"2"`` is not 2 and ``1`` is not ``true`` (a TOML or ``--backend-option`` value
    of the wrong type is a mistake, not something to guess at); numbers must be finite. Subclasses
    put the limits of what the library underneath can do into the fields (``le=``, validators), so
    a value it would crash or abort on is refused before anything is loaded."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def take_options(
    config: BackendConfig | dict[str, Any] | None,
    spec: type[Options],
    *,
    owner: str | None = None,
    where: str = "backend.options",
) -> dict[str, Any]:
    """Validate ``config.options`` (or a plain dict) against ``spec``: every option, defaults filled in.

    Unknown names are refused with the list of known ones; a bad value raises
    :class:`ConfigError` as one sentence naming the option and the rule
    (``backend.options.n_batch: Input should be greater than or equal to 1 (got 0)``).
    The one check that three backends used to write out each on their own.
    """
    if isinstance(config, BackendConfig):
        owner = owner or config.name
        options: Any = config.options
    else:
        options = config or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where} must be a table of options, got {type(options).__name__}")
    unknown = sorted(str(k) for k in set(options) - set(spec.model_fields))
    if unknown:
        known = ", ".join(spec.model_fields) or "(none)"
        # the closest known name, as a misspelt config key gets one (cpu_prepak -> cpu_prepack)
        close = [
            c for u in unknown for c in difflib.get_close_matches(u.replace("-", "_"), list(spec.model_fields), n=1)
        ]
        hint = f" (did you mean {', '.join(dict.fromkeys(close))}?)" if close else ""
        raise ConfigError(
            f"{where}: unknown option(s) for {owner or 'this backend'}: {', '.join(unknown)}{hint}; known: {known}"
        )
    try:
        return spec.model_validate(options).model_dump()
    except ValidationError as err:
        raise ConfigError(validation_message(err, prefix=where)) from None


def _format_validation_error(err: ValidationError) -> str:
    return "invalid config: " + validation_message(err)


def build_config(data: dict[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Validate ``data`` merged with dotted ``overrides`` (``decoding.top_k=5``).

    Raises :class:`ConfigError` with the field name on any invalid value.
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of settings, got {type(data).__name__}")
    merged: dict[str, Any] = _deep_copy(data or {})
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        keys = dotted.split(".")
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):  # named by the config's own key: its value is the mistake
                parent = ".".join(keys[: i + 1])
                raise ConfigError(f"invalid config: {parent}: must be a table of settings, got {type(node).__name__}")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML config file into a plain dict (validated by :func:`build_config`). A leading ``~`` is the
    home folder, as in a model path (``--config=~/run.toml`` reaches us unexpanded by the shell)."""
    # Path("") is ".", which would be read as a folder
    p = Path(check_path(path, "config file", ConfigError)).expanduser()
    text = read_text(p, "config file", ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {p} is not valid TOML: {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {p} is nested too deeply") from None


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v)) for k, v in d.items()
    }
