"""The Python API: load a backend once, generate with any method and preferences.

import personajudge as pj

model = pj.PersonaJudge({"backend": {"name": "llama-cpp"}})
result = model.generate("Why is the sky blue?", preferences=["concise", "humor"])
print(result.text, result.stats.acceptance_rate)
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import functools
import inspect
import numbers
import os
import sys
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping, Sequence
from types import FrameType
from typing import Any

import numpy as np
from pydantic import ValidationError

from personajudge.core.config import (
    BackendConfig,
    DecodingConfig,
    RunConfig,
    build_config,
    check_seed_span,
    load_config_file,
)
from personajudge.core.contract import Backend, check_backend
from personajudge.core.decoding import DecodeRequest, check_contexts
from personajudge.core.errors import (
    ConfigError,
    NumericalError,
    PersonaJudgeError,
    PersonaJudgeWarning,
    in_row,
)
from personajudge.core.result import GenerationResult, Stats
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams
from personajudge.engine import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUE,
    MAX_BATCH,
    Engine,
    EngineClosedError,
    Job,
    check_flag,
    result_of,
)
from personajudge.plugins import get_method, load_backend, preference_library, resolve_encoder
from personajudge.plugins.manager import (
    check_describe,
    check_encoder_views,
    guarded,
    plan_views,
    render_view,
    stop_strings_of,
)
from personajudge.preferences import (
    Preference,
    PreferenceSpec,
    build_views,
    encoder_options,
    named_by,
    normalize_conversation,
    reported,
    warn_duplicates,
)
from personajudge.preferences.encoders import UserText

Prompt = str | list[dict[str, str]]


def make_method(cfg: RunConfig):
    """An instance of the configured method with its options. Options its signature does not take are a
    ``ConfigError`` in the config's words; anything the constructor itself raises, a ``TypeError`` of
    its own code included, is a ``PluginError`` naming a third-party method (:func:`guarded`), since
    the options were right. Without a signature that says (none, or one taking ``**kwargs``), a
    ``TypeError`` counts as a wrong option."""
    cls = get_method(cfg.method)
    options = cfg.method_options
    try:
        sig: inspect.Signature | None = inspect.signature(cls)
    except (TypeError, ValueError):  # a builtin or C class: no signature to bind the options to
        sig = None
    if sig is not None and any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in sig.parameters.values()):
        sig = None  # (**kwargs), or a metaclass's (*a, **k): binding proves nothing about the options
    if sig is not None:
        try:
            sig.bind(**options)
        except TypeError as err:
            params = sig.parameters.values()
            takes = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            unknown = sorted(set(options) - set(takes))
            why = str(err)
            if unknown:
                why = f"unknown option(s) {', '.join(unknown)}; " + (
                    f"its options are {', '.join(takes)}" if takes else "it takes none"
                )
            raise ConfigError(f"method_options for '{cfg.method}': {why}") from None

    def build():
        if sig is not None:
            return cls(**options)
        try:
            return cls(**options)
        except TypeError as err:
            raise ConfigError(f"method_options for '{cfg.method}': {err}") from None

    return guarded("method", cfg.method, cls, " failed to construct:", build)


# The checks of the API's own arguments. The config's fields are checked by pydantic (core/config.py);
# these are the arguments that never pass through it, which would otherwise fail deep inside (a str
# iterated letter by letter, an int where a list is due) as a bare TypeError, or not at all.


def _as_config(config: Any) -> RunConfig:
    """A config: a :class:`RunConfig`, a mapping, or the path of a TOML file as ``--config`` takes it
    (``PersonaJudge("run.toml")``; the README's config examples are files)."""
    if isinstance(config, RunConfig):
        return config
    if config is None or isinstance(config, Mapping):
        return build_config(dict(config or {}))
    if isinstance(config, str | os.PathLike):
        return build_config(load_config_file(config))
    raise ConfigError(f"config must be a mapping, a RunConfig or a TOML file's path, got {type(config).__name__}")


def _count(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r:.40}")
    if maximum is not None and int(value) > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value!r:.40}")
    return int(value)


def _listing(value: Any) -> bool:
    """Whether ``value`` is a collection of items (a str, a mapping or one Preference is one item)."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, Preference))


def _preference_list(value: Any, name: str = "preferences") -> list[PreferenceSpec] | None:
    """The user's preferences as a list; a bare string (or Preference, or table) is *one* preference, as
    in the server's ``preferences``: ``"concise"`` is ``["concise"]``, ``"explain like I'm five"`` one
    free-text one. A table (a mapping) is a preferences file's entry, as a config's ``preferences`` and
    ``views`` take it and a run's ``settings`` report a file's or a caller's preference: so
    ``generate(views=res.settings["views"])`` repeats a run as a config built from the settings does."""
    if value is None:
        return None
    if isinstance(value, (str, Preference, Mapping)):
        return [value]
    if not _listing(value):
        raise ConfigError(f"{name} must be a list of preference names or descriptions, got {type(value).__name__}")
    items = list(value)
    for i, p in enumerate(items):
        if not isinstance(p, (str, Preference, Mapping)):
            raise ConfigError(
                f"{name}[{i}] must be a preference name, a description, a table or a Preference, got {type(p).__name__}"
            )
    return items


def _named_definitions(prefs: list[PreferenceSpec]) -> list[PreferenceSpec]:
    """``prefs`` (one view each) with every :class:`Preference` that a string of the same list names
    (by name or alias, in any case) used as that name's definition instead of as a view of its own:
    ``[Preference(name="pirate", ...), "pirate", "humor"]`` is two views, the object's pirate and humor,
    as ``--preferences-file`` with ``--prefer pirate --prefer humor`` is and as a server reads a
    request's ``preferences``; a repeat of the one preference would add nothing. An object no string
    names stays a view."""
    defs = [p for p in prefs if isinstance(p, Preference)]
    if not defs:
        return prefs
    resolved = named_by(prefs, defs)  # two objects of one name that differ: build_views' PreferenceError
    named = {d.name.lower() for p, d in zip(prefs, resolved) if isinstance(p, str) and isinstance(d, Preference)}
    return [d for p, d in zip(prefs, resolved) if not (isinstance(p, Preference) and p.name.lower() in named)]


_VIEWS_SHAPE = "views is a list of views, each a list of preferences: [['concise', 'humor'], ['expert']]"


def _view_list(value: Any) -> list[list[PreferenceSpec]] | None:
    """The user's views as lists. Refused, not guessed: ``["concise", "humor"]`` (one view of both, or
    two of one each?); use ``preferences=`` for one view per preference."""
    if value is None:
        return None
    if not _listing(value):
        raise ConfigError(f"{_VIEWS_SHAPE}; got {type(value).__name__}")
    groups = list(value)
    for i, g in enumerate(groups):
        if not _listing(g):
            raise ConfigError(f"views[{i}] must be a list of preferences ({_VIEWS_SHAPE}); got {g!r:.40}")
    out = [_preference_list(g, f"views[{i}]") or [] for i, g in enumerate(groups)]
    # [[]] is the one view without preferences that a run with none reports in its settings: no views
    return [] if out == [[]] else out


def _check_config(cfg: RunConfig) -> None:
    """Raise what a run of ``cfg`` would raise for its method, method options, encoder name and
    preferences, without a model: the typed errors ``generate`` raises, before the model loads. The
    rest needs the model (``auto`` picks the encoder by its tokenizer; a prompt may not fit). The
    CLI's config carries the preferences a ``--preferences-file`` defines, which its views may name."""
    _plan_call(cfg, getattr(cfg, "definitions", None), None, None, {})


def _seed_list(seeds: Any, n: int) -> list[int | None] | None:
    """``seeds`` checked by the rule of ``decoding.seed`` itself, one per prompt."""
    if seeds is None:
        return None
    if not _listing(seeds):
        raise ConfigError(f"seeds must be a list of integers >= 0, one per prompt; got {type(seeds).__name__}")
    seeds = list(seeds)
    if len(seeds) != n:
        raise ConfigError(f"got {len(seeds)} seeds for {n} prompts")
    out = []
    for i, s in enumerate(seeds):
        if isinstance(s, bool | str):  # pydantic's lax int takes True as 1 and "1" as 1
            raise ConfigError(f"seeds[{i}] must be an integer >= 0, got {s!r}")
        try:
            out.append(DecodingConfig.model_validate({"seed": s}).seed)
        except ValidationError as err:
            raise ConfigError(f"seeds[{i}]: {err.errors(include_url=False)[0]['msg']} (got {s!r:.40})") from None
    return out


def _ours(frame: FrameType) -> bool:
    name = frame.f_globals.get("__name__", "")
    return isinstance(name, str) and (name == "personajudge" or name.startswith("personajudge."))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` at which a warning issued by the function calling this names the first frame
    outside the personajudge package: the user's line, whatever the entry point.

    A fixed number cannot do that: ``generate``, ``generate_batch``, ``submit``, the generator
    ``stream`` (whose frame's caller is the ``next()`` that resumed it), the one-shot helpers and the
    async generator ``astream`` reach the warning through different numbers of frames. And with
    Python's default filter (once per location) a location inside the library would show only the
    first of a program's warnings. (``warnings.warn(skip_file_prefixes=...)`` does this on 3.12+;
    the project supports 3.11, and the package spans several source folders, so frames are told
    apart by their module's name.) Warnings must be issued in the caller's thread: ``astream``
    plans its request on the event loop's thread for this reason, before handing off to a worker.
    """
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _ours(frame):
        frame, level = frame.f_back, level + 1
    return level


#: the warning for names or descriptions given together with views (in one call, one file, one command line)
IGNORED_NEXT_TO_VIEWS = (
    "the preferences given alongside views are ignored; the views decide (put every preference into a view)"
)


def _warn_degenerate(name: str, meth: Any, ignored: Sequence[Any], user_views: list[list[Any]]) -> None:
    """Say so when a run silently does less than it seems to (one line each; the CLI prints them).
    Each names the caller's line (:func:`_caller_stacklevel`)."""
    if ignored:
        warnings.warn(
            IGNORED_NEXT_TO_VIEWS,
            PersonaJudgeWarning,
            stacklevel=_caller_stacklevel(),
        )
    has_prefs = any(v for v in user_views)
    if has_prefs and not getattr(meth, "uses_preferences", True):
        warnings.warn(
            f"method '{name}' ignores preferences (it is the unpersonalized baseline)",
            PersonaJudgeWarning,
            stacklevel=_caller_stacklevel(),
        )
    min_views = getattr(meth, "min_views", 1)
    if len(user_views) < min_views:
        warnings.warn(
            f"method '{name}' with a single view is plain sampling from that view; give two or more "
            "preferences (one view each) or several --view groups",
            PersonaJudgeWarning,
            stacklevel=_caller_stacklevel(),
        )


#: The keywords a call takes besides ``preferences``, ``views`` and ``method``: the fields of
#: :class:`DecodingConfig` by name, ``lambda`` also as ``lam`` and ``lambda_`` (``lambda`` is a Python
#: keyword, so ``lam=`` is the spelling a call can write), and the encoder and its options.
_LAMBDA_SPELLINGS = ("lam", "lambda_", "lambda")
_CALL_KEYWORDS = (
    *(n for n in DecodingConfig.model_fields if n != "lambda_"),
    *_LAMBDA_SPELLINGS,
    "encoder",
    "encoder_options",
)
#: Per-call numbers pydantic's lax mode would take a bool for (``max_new_tokens=True`` as 1).
_NUMBER_KEYWORDS = ("temperature", "top_k", "top_p", "max_new_tokens", "seed", "repeat_lines", *_LAMBDA_SPELLINGS)


def _call_keywords(decoding: dict[str, Any]) -> dict[str, Any]:
    """A call's keywords checked by name, as dotted config overrides (``decoding.top_k``, ``encoder``).

    A name the call does not take is refused here, in the call's words: passed on, pydantic would
    report ``decoding.system: Extra inputs are not permitted``, a decoding field the user never wrote.
    A run-wide setting (``system``, ``method_options``, the backend's) is named as one that belongs
    in the config; anything else gets the nearest keyword, when one is near."""
    lams = [k for k in _LAMBDA_SPELLINGS if k in decoding]
    if len(lams) > 1:
        raise ConfigError(f"{' and '.join(lams)} are the same setting (the draft window); give one")
    out: dict[str, Any] = {}
    for key, value in decoding.items():
        if key not in _CALL_KEYWORDS:
            raise ConfigError(_not_a_call_keyword(str(key)))
        if key in _NUMBER_KEYWORDS and isinstance(value, bool):  # pydantic's lax int takes True as 1
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if key in ("encoder", "encoder_options"):
            out[key] = value
        else:
            out["decoding.lambda" if key in _LAMBDA_SPELLINGS else f"decoding.{key}"] = value
    return out


def _not_a_call_keyword(key: str) -> str:
    if key == "on_text":
        return (
            "on_text is generate's keyword: stream and astream yield the text themselves, and a "
            "submitted job takes it as job.result(on_text=...)"
        )
    if key in RunConfig.model_fields:
        return (
            f"{key} is not a per-call keyword: it is a setting of the run; set it in the config "
            f"(PersonaJudge({{'{key}': ...}}), or config= of the one-shot helpers)"
        )
    if key in BackendConfig.model_fields or key == "backend_options":
        field = "options" if key == "backend_options" else key
        return (
            f"{key} is not a per-call keyword: the backend is loaded with it; set it in the config's "
            f"backend table (PersonaJudge({{'backend': {{'{field}': ...}}}}))"
        )
    near = difflib.get_close_matches(key, [*_CALL_KEYWORDS, "preferences", "views", "method"], n=1, cutoff=0.6)
    keywords = ", ".join(("preferences", "views", "method", *_CALL_KEYWORDS))
    hint = f"; did you mean {near[0]}?" if near else f"; the keywords are {keywords}"
    return f"{key} is not a per-call keyword{hint}"


def _plan_call(base: RunConfig, preferences, views, method, decoding: dict[str, Any]):
    """What a call asks for, checked and resolved without a model: the run config with the call's
    overrides, the method instance, the user's views, and the free-text preferences given next to views
    (which a warning names as unused).

    ``decoding`` holds the call's other keywords: decoding fields, and ``encoder`` and
    ``encoder_options``, which every entry point (``generate``, ``generate_batch``, ``stream``,
    ``submit``) takes. The one-shot :func:`generate` and :func:`stream` run this before loading the
    model, so a misspelt preference costs no load."""
    given_prefs, given_groups = _preference_list(preferences), _view_list(views)
    overrides = {"method": method, **_call_keywords(decoding)}
    cfg = base
    if any(v is not None for v in overrides.values()):
        cfg = build_config(base.model_dump(by_alias=True), **overrides)
    # a call's views replace the configured preferences too (a server's defaults do not meet a
    # request's views); a call's preferences replace the configured views, one view each, as --prefer
    # replaces a config file's views and a request's preferences the server's -- except definitions
    # (Preference objects the configured views name, or the config's own, a preferences file's that the
    # CLI passes next to --view) and an empty list, which leave the views as they are
    prefs: Sequence[PreferenceSpec] = (
        given_prefs if given_prefs is not None else ([] if given_groups is not None else cfg.preferences)
    )
    groups: Sequence[Sequence[PreferenceSpec]] | None = given_groups if given_groups is not None else cfg.views
    defs = [p for p in getattr(base, "definitions", None) or () if isinstance(p, Preference)]
    if given_groups is None and given_prefs and groups and not _only_definitions(given_prefs, groups, defs):
        groups = None
        prefs = given_prefs = named_by(given_prefs, defs) if defs else given_prefs
    if given_prefs is not None and not groups:
        prefs = _named_definitions(given_prefs)
    meth = make_method(cfg)
    if cfg.encoder != "auto":  # a named encoder and its options are known now (auto's only with the model)
        resolve_encoder(cfg.encoder, None, options=cfg.encoder_options)  # type: ignore[arg-type]
    user_views = build_views(prefs, groups, preference_library())
    # Preference objects next to views define the names the views use (a preferences file's): never
    # "ignored"; names and descriptions next to views are
    unused = [p for p in prefs if not isinstance(p, Preference)] if groups else []
    return cfg, meth, user_views, unused


def _only_definitions(
    prefs: Sequence[PreferenceSpec], groups: Sequence[Sequence[PreferenceSpec]], defs: Sequence[Preference]
) -> bool:
    """Whether a call's ``prefs`` only define what configured views (``groups``) name: every one a
    :class:`Preference` that a view names (by name or alias) or that the config defines (``defs``, a
    ``--preferences-file``'s, which the CLI passes with each call next to ``--view``). Those define
    names; any other preference replaces the views."""
    named = set()
    for g in groups:
        for p in g:
            if isinstance(p, str):
                named.add(p.strip().lower())
            elif isinstance(p, Preference):
                named.add(p.name.lower())
            elif isinstance(p, Mapping) and isinstance(p.get("name"), str):
                named.add(p["name"].lower())
    return all(
        isinstance(p, Preference)
        and (any(p == d for d in defs) or bool({p.name.lower(), *(a.lower() for a in p.aliases)} & named))
        for p in prefs
    )


#: drawn seeds are below this: 2**53, the integers a JSON number parsed as an IEEE double (JavaScript,
#: jq, many dashboards) holds exactly, so a seed reported by the server can be sent back to repeat a run
SEED_BOUND = 2**53
#: why a base seed near the largest fails a batch: what the refusal adds
SEED_PER_ROW = " (row i runs with seed + i; pass seeds= or give each row its own seed)"


def fresh_seed() -> int:
    """A seed drawn from the OS's entropy, in ``[0, SEED_BOUND)``."""
    entropy = np.random.SeedSequence().entropy
    assert isinstance(entropy, int)  # drawn fresh from the OS when none is given
    return entropy % SEED_BOUND


class _Shared:
    """The engine of one backend object and the live :class:`PersonaJudge` objects built on it."""

    def __init__(self, max_batch: int, max_queue: int):
        self.max_batch, self.max_queue = max_batch, max_queue  # the first creator's limits
        self.engine: Engine | None = None
        self.users = 0  #: live PersonaJudge objects on the backend (not closed, not garbage-collected)
        #: the engine stopped last, weakly: it may still be finishing requests, and the next engine waits for it
        self.previous: weakref.ref[Engine] | None = None

    def stopping(self) -> Engine | None:
        """The engine the next one must wait for: the current one when it was closed directly, else the last."""
        if self.engine is not None:
            return self.engine
        return self.previous() if self.previous is not None else None


#: One entry per backend object, keyed weakly by the object itself: sessions of one backend must be
#: driven from one thread (llama.cpp and transformers share model state between them), so every
#: PersonaJudge on that backend submits to the same engine. Guarded by ``_SHARED_LOCK``.
_SHARED: weakref.WeakKeyDictionary[Any, _Shared] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _check_backend(backend: Any) -> None:
    """``backend=`` is a loaded model: what the engine uses of it, checked here (duck-typed plugins welcome)."""
    if isinstance(backend, str):
        raise ConfigError(
            f"backend= takes a loaded backend (personajudge.Backend), got the string {backend!r}; "
            "a backend name goes in the config: {'backend': {'name': ...}}"
        )
    missing = [a for a in ("tokenizer", "context_length", "open") if not hasattr(backend, a)]
    if missing:
        raise ConfigError(
            f"backend= takes a loaded backend (personajudge.Backend), got {type(backend).__name__} "
            f"without {', '.join(missing)}"
        )
    check_backend(backend)  # as load_backend does: its context length and eos ids are read on every request
    if hasattr(backend, "describe"):
        name = getattr(backend, "name", None)
        check_describe(backend, name if isinstance(name, str) else type(backend).__name__)


def _join_backend(pj: PersonaJudge, backend: Any) -> _Shared:
    """Register ``pj`` as a user of ``backend``'s engine entry (made here for the first user)."""
    with _SHARED_LOCK:
        try:
            shared = _SHARED.get(backend)
            if shared is None:
                shared = _SHARED[backend] = _Shared(pj.max_batch, pj.max_queue)
            elif not shared.users and shared.engine is None:  # used before, by objects all gone now
                shared.max_batch, shared.max_queue = pj.max_batch, pj.max_queue
        except TypeError:  # unhashable or not weakly referenceable: this object gets an engine of its own
            shared = _Shared(pj.max_batch, pj.max_queue)
        shared.users += 1
        return shared


def _leave_backend(shared: _Shared) -> Engine | None:
    """Count one user out; the engine to stop when it was the last (called under the lock).

    The entry stays (it goes with the backend, being weakly keyed), holding the stopped engine weakly:
    an engine started later on the backend waits for that one's thread to end.
    """
    shared.users -= 1
    if shared.users:
        return None
    engine, shared.engine = shared.engine, None
    shared.previous = weakref.ref(engine) if engine is not None else None
    return engine


def _abandoned(shared: _Shared) -> None:
    """A :class:`PersonaJudge` was garbage-collected without :meth:`~PersonaJudge.close`.

    When it was the backend's last user, its engine finishes the requests it
    already has (a caller may still hold their jobs) and then stops, without
    waiting here: a finalizer may run on any thread, the engine's included.
    Without this, the idle engine thread would hold the backend, and the
    model's memory, until the process ends.

    Never waits for ``_SHARED_LOCK``: the garbage collector runs finalizers
    in whichever thread allocates, and that may be a thread inside
    ``with _SHARED_LOCK`` (building an engine), which would wait for itself
    for ever. When the lock is taken, a short-lived thread does the work
    once it is free.
    """
    if _SHARED_LOCK.acquire(blocking=False):
        _release(shared, locked=True)
        return
    try:
        threading.Thread(target=_release, args=(shared,), name="personajudge-release", daemon=True).start()
    except RuntimeError:  # the interpreter is shutting down: its threads end with it
        pass


def _release(shared: _Shared, *, locked: bool = False) -> None:
    """:func:`_abandoned`'s work: count the user out under ``_SHARED_LOCK`` (taken here unless ``locked``),
    then let the engine stop once idle."""
    if not locked:
        _SHARED_LOCK.acquire()
    try:
        engine = _leave_backend(shared)
    finally:
        _SHARED_LOCK.release()
    if engine is not None:
        engine.stop_when_idle()


def _batch_results(jobs: list[Job]) -> list[GenerationResult]:
    """Every row's result, in order; a row whose own decoding failed fails alone, named, and no other
    row's result is lost.

    Each row is its own request in the engine, so one row's failure does not stop the others: NaN or
    infinite logits (:class:`NumericalError`: one prompt that overflows float16, say), a backend that
    cannot run that row's forward, a plugin method's bug on that row. Every row is waited for, then
    the error raised carries ``.rows`` (every row's :class:`GenerationResult`, or its own exception
    where it failed) and ``.row`` (the first row that failed), so a caller (the JSONL batch) keeps
    the rows that succeeded. Only NaN rows are summed up in a new :class:`NumericalError` that names
    them (``prompts[i]: ...``, ``.reason``): data, which the JSONL batch records row by row. Any
    other error is raised as itself, its type kept (a ``PluginError`` is a bug to fix, not a row to
    record), ahead of NaN rows. Waiting is on the rows, not on the caller: an interrupt
    (``KeyboardInterrupt`` is no ``Exception``) leaves at once, and the caller cancels every row.
    """
    rows = [_outcome(j) for j in jobs]
    bad = [i for i, r in enumerate(rows) if isinstance(r, BaseException)]
    if not bad:
        return rows
    other = [i for i in bad if not isinstance(rows[i], NumericalError)]
    if other:
        error: Any = rows[other[0]]
        error.row, error.rows = other[0], rows  # every exception takes attributes (BaseException has a __dict__)
        raise error
    first = rows[bad[0]]
    more = f" (and {len(bad) - 1} more row(s): {', '.join(map(str, bad[1:6]))}{', ...' if len(bad) > 6 else ''})"
    numerical = NumericalError(f"prompts[{bad[0]}]: {first}{more if len(bad) > 1 else ''}")
    numerical.row, numerical.reason, numerical.rows = bad[0], str(first), rows  # type: ignore[attr-defined]
    raise numerical


def _outcome(job: Job) -> Any:
    """``job``'s result, or its own error as a value (:meth:`Job.outcome`); an interrupt that reached
    the engine thread (no ``Exception``, so no row's own) is raised at once, as before."""
    out = job.outcome()
    if isinstance(out, BaseException) and not isinstance(out, Exception):
        raise out
    return out


def rows_failed_alone(err: BaseException, n: int) -> list[Any] | None:
    """The ``n`` rows of a ``generate_batch`` call that raised ``err`` (:func:`_batch_results`): each row's
    ``GenerationResult``, or its own exception where it failed (``err.rows``). None when ``err``
    carries no such list: then the call failed as a whole.

    One rule for every executor of a JSONL batch (this process's, a Ray replica's), so a NaN row fails
    alone wherever its chunk runs; after any other row's error the local executor still hands over
    the rows that finished (they are written, and a rerun resumes after them), then stops the run."""
    rows = getattr(err, "rows", None)
    return list(rows) if isinstance(rows, list) and len(rows) == n else None


def executor_results(results: Sequence[Any]) -> list[Any]:
    """A chunk's results as a batch executor yields them: each ``as_dict()``, a row's own exception as is."""
    return [r if isinstance(r, BaseException) else r.as_dict() for r in results]


def _attach_settings(settings: dict[str, Any], res: GenerationResult) -> GenerationResult:
    """``res`` with a copy of the run's ``settings``, its seed the one actually used (drawn when none
    was given). A plain function: a job holds it until it finishes, and a bound method there would
    keep a dropped :class:`PersonaJudge` (and its engine) alive."""
    settings = copy.deepcopy(settings)
    settings["decoding"]["seed"] = res.stats.seed
    res.settings = settings
    return res


def _cancel_queued(queued: asyncio.Future) -> None:
    """Cancel the job an abandoned :meth:`PersonaJudge.astream` queued (see there)."""
    if not queued.cancelled() and queued.exception() is None:
        queued.result()[0].cancel()


class PersonaJudge:
    """A loaded model plus a default :class:`RunConfig`.

    The backend (and its weights) is loaded once in the constructor. Every
    request -- ``generate``, ``generate_batch``, ``stream``, ``astream``, from
    any number of threads -- goes to one :class:`~personajudge.engine.Engine`
    (started on first use), the only code that touches the backend: it runs
    up to ``max_batch`` requests together, one batched forward per step, and
    queues up to ``max_queue`` more. So one object is safe to share between
    threads: each call is decoded as it would be alone (its own seed and
    uniforms), or gets a typed error; where batched kernels change logits
    (llama.cpp, transformers) its tokens can part from a solo run's at a near-tie.

    The engine belongs to the backend object, not to this object: several
    ``PersonaJudge(backend=b)`` on one ``b`` (the server and a Python caller,
    say) share one engine, so ``b`` is still driven by one thread. It takes the
    ``max_batch`` / ``max_queue`` of the first of them; :meth:`close` of one
    leaves it to the others, and the last one's closes it and the backend.
    """

    def __init__(
        self,
        config: RunConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
        *,
        backend: Backend | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        self.config = _as_config(config)
        self.max_batch, self.max_queue = _count("max_batch", max_batch, 1, MAX_BATCH), _count("max_queue", max_queue, 0)
        _check_config(self.config)  # before the model loads: loading is most of the time of a failed run
        if backend is not None:
            _check_backend(backend)
        self.backend = backend if backend is not None else load_backend(self.config.backend)
        self._engine: Engine | None = None  # the backend's engine, once this object has used it
        self._closed = False
        self._shared = _join_backend(self, self.backend)
        self._finalizer = weakref.finalize(self, _abandoned, self._shared)
        self._finalizer.atexit = False  # at exit engine._stop_at_exit stops and joins every engine thread

    @property
    def engine(self) -> Engine:
        """The scheduler that owns the backend: one per backend object, created on first use.

        One closed directly (``engine.close()``, as the server does on shutdown) stays closed for the
        objects that had used it (:class:`~personajudge.engine.EngineClosedError`); an object that
        had not gets a new one.
        """
        with _SHARED_LOCK:
            if self._closed:
                raise EngineClosedError("this PersonaJudge is closed")
            if self._engine is None:
                shared = self._shared
                if shared.engine is None or shared.engine.stats()["closing"]:
                    shared.engine = Engine(
                        self.backend, max_batch=shared.max_batch, max_queue=shared.max_queue, after=shared.stopping()
                    )
                self._engine = shared.engine
            return self._engine

    def close(self, *, keep_backend: bool = False) -> None:
        """Stop using the backend. The last live object on it cancels what is still running, stops
        the engine and frees the model (``keep_backend``: leaves it loaded, for a caller that owns
        it); while others remain, they keep both. A second call does nothing."""
        keep_backend = check_flag("keep_backend", keep_backend)
        with _SHARED_LOCK:
            if self._closed:
                return
            self._closed = True
            self._finalizer.detach()
            engine = _leave_backend(self._shared)
            if self._shared.users:
                return
        if engine is not None:
            engine.close()
        if not keep_backend:
            self.backend.close()

    def __enter__(self) -> PersonaJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def settings(self, cfg: RunConfig, views: list[list[Preference]], method: Any = None) -> dict[str, Any]:
        """The effective settings of a run, as reported by ``--json``, batch rows and ``--show-prompt``:
        everything that decides the output after every default, so a run can be repeated from them.

        What the backend says about itself (backend, model, device, ...) and its ``backend_options``;
        the method and its ``method_options``; the views the method uses (none for a method that
        ignores preferences, such as ``base``), each preference as the value that resolves back to it
        in the registry alone (:func:`~personajudge.preferences.reported`: a registered one by name, a
        free-text one by its text, one a file or the caller defined or adjusted as its full table, which
        ``RunConfig.views`` accepts); the encoder ``auto`` resolved to, its ``encoder_options`` and
        the stop strings its format adds (``encoder_stop``); the ``system`` message; and the decoding parameters, with the role
        schedule the method runs (its own unless ``roles`` overrides it) and the repetition guard in
        force. ``method``: the method instance (default: made from ``cfg``).
        """
        d = cfg.decoding
        meth = make_method(cfg) if method is None else method
        tok = self.backend.tokenizer
        encoder = resolve_encoder(cfg.encoder, tok, views)
        used = views if getattr(meth, "uses_preferences", True) else []
        lib = preference_library()
        return {
            **{k: v for k, v in self.backend.describe().items() if v is not None},
            "backend_options": copy.deepcopy(cfg.backend.options),
            "method": cfg.method,
            "method_options": copy.deepcopy(cfg.method_options),
            "views": [[reported(p, lib) for p in v] for v in used],
            "encoder": encoder.name,
            "encoder_options": copy.deepcopy(cfg.encoder_options),
            # the stop strings the encoder's format adds to decoding.stop, which holds the run's own: the
            # merged list in decoding.stop could pass the config's limits (16 strings, 256 characters) and
            # a config rebuilt from it was refused; the encoder adds these again to the same effect
            "encoder_stop": [x for x in self.stop_strings(cfg) if x not in d.stop],
            "system": cfg.system,
            "decoding": {
                "temperature": d.temperature,
                "top_k": d.top_k,
                "top_p": d.top_p,
                "lambda": d.lambda_,
                "max_new_tokens": d.max_new_tokens,
                "roles": d.roles if d.roles is not None else getattr(meth, "roles", None),
                "schedule": d.schedule,
                "stop": list(d.stop),
                "repeat_lines": self._repeat_lines(cfg),
                "seed": d.seed,
            },
        }

    @staticmethod
    def _repeat_lines(cfg: RunConfig) -> int:
        """The repetition guard a run uses: off for the ``reference`` oracle, else ``decoding.repeat_lines``."""
        return 0 if cfg.method == "reference" else cfg.decoding.repeat_lines

    def render_views(
        self, prompt: Prompt, cfg: RunConfig, method, views: list[list[Preference]]
    ) -> list[tuple[str, bool]]:
        """The prompt text of each view ``method`` prompts for the user's ``views``, and whether
        the tokenizer adds BOS to it (what ``--show-prompt`` prints)."""
        return self._render(prompt, cfg, method, views)[0]

    def _render(
        self, prompt: Prompt, cfg: RunConfig, method, views: list[list[Preference]]
    ) -> tuple[list[tuple[str, bool]], UserText]:
        """Each view's rendered text, and the :class:`UserText` that encodes it: the user's
        special-token text stays literal, not a control token."""
        conversation = normalize_conversation(prompt)
        tok = self.backend.tokenizer
        encoder = resolve_encoder(cfg.encoder, tok, views)
        options = encoder_options(encoder, cfg.encoder_options)  # checked, its Options' defaults filled in
        planned = plan_views(method, cfg.method, views)
        user = UserText(tok, conversation, cfg.system, planned)
        rendered = [
            render_view(encoder, v, conversation, tok, system=cfg.system, options=options, user=user) for v in planned
        ]
        return rendered, user

    def resolved_encoder(self, cfg: RunConfig, views: Sequence[Sequence[PreferenceSpec]] | None = None) -> str:
        """The name of the encoder a run uses: ``cfg.encoder``, or what ``auto`` stands for on this model
        and the user's ``views`` (default: the config's preferences/views). ``exemplar`` needs every
        preference to have examples, so ``auto`` decides on the user's views, before a method plans its own:
        ``base``, ``prompt`` and Persona-judge of one run are then encoded alike. ``views`` is a list of
        lists, as ``views=`` of :meth:`generate` takes it: names and descriptions are resolved as there
        (a bad shape is a :class:`ConfigError`, an unknown name a ``PreferenceError``)."""
        if views is None:
            resolved = build_views(cfg.preferences, cfg.views, preference_library())
        elif _listing(views) and all(_listing(v) and all(isinstance(p, Preference) for p in v) for v in views):
            resolved = [[p for p in v if isinstance(p, Preference)] for v in views]  # resolved already
        else:
            groups = _view_list(views) or []
            defs = getattr(cfg, "definitions", None) or []  # a preferences file's, which its views may name
            resolved = build_views(defs, groups, preference_library()) if groups else [[]]
        return resolve_encoder(cfg.encoder, self.backend.tokenizer, resolved).name

    def view_lengths(
        self,
        prompt: Prompt,
        *,
        preferences: PreferenceSpec | Sequence[PreferenceSpec] | None = None,
        views: Sequence[Sequence[PreferenceSpec]] | None = None,
        method: str | None = None,
        **decoding: Any,
    ) -> list[int]:
        """Tokens in each view's prompt as :meth:`generate` would build it for these arguments (the
        method's planned views, the encoder, the chat template), with nothing generated: each must stay
        below the backend's ``context_length``. A view's instructions and few-shot exemplars count, so on
        a small context a preference can leave no room even for a short question; ``serve`` checks its
        default preferences this way at start-up."""
        cfg, meth, user_views = self._prepare(preferences, views, method, decoding)
        return [len(c) for c in self.encode_views(prompt, cfg, meth, user_views)]

    def encode_views(self, prompt: Prompt, cfg: RunConfig, method, views: list[list[Preference]]) -> list[list[int]]:
        """Token contexts of the views ``method`` prompts for the user's ``views``; special-token text in
        the user's strings (``<eos>`` in a message) is encoded as text, the template's markers as tokens."""
        rendered, user = self._render(prompt, cfg, method, views)
        return [user.encode(text, add_bos) for text, add_bos in rendered]

    def generate(
        self,
        prompt: Prompt,
        *,
        preferences: PreferenceSpec | Sequence[PreferenceSpec] | None = None,
        views: Sequence[Sequence[PreferenceSpec]] | None = None,
        method: str | None = None,
        on_text: Callable[[str], None] | None = None,
        **decoding: Any,
    ) -> GenerationResult:
        """Generate one response.

        ``prompt`` is a string or a list of chat messages. ``preferences`` and
        ``views`` replace the config's (names, descriptions, tables as a run's
        ``settings`` report them, or :class:`Preference` objects): ``views``
        replace its preferences and views, and ``preferences`` (one view each, as
        ``--prefer`` and a server request's ``preferences``) replace its
        views too, except :class:`Preference` objects that only define names
        the config's views use, and an empty list, which leaves a config's
        views as they are (``views=[]`` drops them). ``decoding`` takes the fields of
        :class:`DecodingConfig` by name (``temperature``, ``top_k``, ``top_p``,
        ``max_new_tokens``, ``stop``, ``seed``, ``roles``, ``repeat_lines``,
        ``schedule``), its ``lambda`` (the draft window) as ``lam=`` or
        ``lambda_=`` (``lambda`` is a Python keyword); ``encoder`` (a name) and
        ``encoder_options`` override the config's preference encoder. Run-wide
        settings (``system``, ``method_options``, the backend's) are not per-call
        keywords: they go in the config, and passing one is a :class:`ConfigError`
        that says so. A keyword given as ``None`` keeps the config's value (so a
        caller can pass optional fields through: ``seed=None`` on a config with a
        seed uses that seed). ``on_text`` receives text as it is committed. A bare string
        is one preference (``"concise"`` is ``["concise"]``); ``views`` is a
        list of lists (``[["concise", "humor"], ["expert"]]``). Bad arguments
        raise a :class:`ConfigError` (or another ``PersonaJudgeError``) naming them.
        """
        if on_text is not None and not callable(on_text):
            raise ConfigError(
                f"on_text must be callable (it receives each piece of text), got {type(on_text).__name__}"
            )
        cfg, meth, pref_views = self._prepare(preferences, views, method, decoding)
        contexts = self.encode_views(prompt, cfg, meth, pref_views)
        res = self.decode(contexts, cfg, meth, on_text=on_text, prompt=prompt)
        return _attach_settings(self.settings(cfg, pref_views, meth), res)

    def stream(self, prompt: Prompt, **kwargs: Any) -> Generator[str, None, GenerationResult]:
        """Yield the response's text as it is committed (same arguments as :meth:`generate`).

        The pieces concatenate to ``generate(...).text`` for the same seed.
        The finished :class:`GenerationResult` is the generator's return
        value (``StopIteration.value``), for callers that want the stats.
        """
        job, _, _ = self._submit(prompt, kwargs)
        try:
            for ev in job.events():
                if ev[0] == "text":
                    yield ev[1]
                elif ev[0] == "error":
                    raise ev[1]
                elif ev[0] == "done":
                    return ev[1]  # with the run's settings (attached by the job)
            raise RuntimeError("the request's events ended without a result")  # events() ends at done or error
        finally:
            job.cancel()  # a caller that stops early frees the request's KV slots at the next step

    async def astream(self, prompt: Prompt, **kwargs: Any) -> AsyncIterator[str]:
        """``async for piece in model.astream(...)``: :meth:`stream` for asyncio code.

        The event loop is never blocked: encoding runs in a worker thread,
        decoding in the engine, and pieces arrive on the loop as they are
        committed. Leaving the loop early (or cancelling the task) cancels
        the request.
        """
        loop = asyncio.get_running_loop()
        # planned here, in the caller's thread, so that a warning names the caller's `async for` line
        # (a worker thread's stack does not reach it); checking and resolving names is quick
        planned = self._plan(kwargs)
        queued = asyncio.ensure_future(asyncio.to_thread(self._enqueue, prompt, planned, loop))
        try:
            job, _, _ = await asyncio.shield(queued)
        except asyncio.CancelledError:
            # cancelled while the worker thread encodes and queues: the job still gets queued, and
            # nobody would read it; cancel it once it exists (a failed enqueue has nothing to cancel)
            queued.add_done_callback(_cancel_queued)
            raise
        try:
            async for ev in job.aevents():
                if ev[0] == "text":
                    yield ev[1]
                elif ev[0] == "error":
                    raise ev[1]
        finally:
            job.cancel()

    def submit(
        self,
        prompt: Prompt,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        wait: bool = True,
        stream: bool = True,
        label: str = "python",
        **kwargs: Any,
    ) -> Job:
        """Queue one request on the engine; return its :class:`~personajudge.engine.Job` at once.

        Same arguments as :meth:`generate`. Bad arguments raise here, in the
        caller's thread. The job delivers ``("start",)`` when it joins the
        batch, ``("text", piece)`` as text is committed, then ``("done",
        result)`` or ``("error", exception)``: read them with ``job.events()``
        (or ``job.aevents()`` when ``loop`` is given), or wait with
        ``job.result()``; ``job.cancel()`` drops the request at the next step.
        A full queue blocks until there is room, or with ``wait=False``
        raises :class:`~personajudge.engine.QueueFullError` (the server's 429).
        ``stream=False`` sends no ``("text", ...)`` events: the text comes with
        the result, and is decoded only as often as stop strings and the
        repetition guard need it. ``encoder`` (a name) overrides the config's
        preference encoder for this request. ``label`` names the caller for the
        engine's hooks (the server's metrics label a job's latency by it).
        """
        if loop is not None and not isinstance(loop, asyncio.AbstractEventLoop):
            # checked here: the engine thread would find out only when it delivers the first event
            raise ConfigError(f"loop must be an asyncio event loop (or None), got {type(loop).__name__}")
        wait, stream = check_flag("wait", wait), check_flag("stream", stream)  # 'no' is truthy: it would wait
        if not isinstance(label, str):
            raise ConfigError(
                f"label must be a string (it names the caller in the engine's hooks), got {type(label).__name__}"
            )
        return self._submit(prompt, kwargs, loop, wait, stream, label)[0]

    def _submit(
        self,
        prompt: Prompt,
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop | None = None,
        wait: bool = True,
        stream: bool = True,
        label: str = "python",
    ):
        return self._enqueue(prompt, self._plan(kwargs), loop, wait, stream, label)

    def _plan(self, kwargs: dict[str, Any]):
        """:meth:`_prepare` for the keywords of ``stream``/``submit``/``astream``."""
        kwargs = dict(kwargs)
        preferences, views, method = (
            kwargs.pop("preferences", None),
            kwargs.pop("views", None),
            kwargs.pop("method", None),
        )
        return self._prepare(preferences, views, method, kwargs)

    def _enqueue(
        self,
        prompt: Prompt,
        planned: tuple[RunConfig, Any, list[list[Preference]]],
        loop: asyncio.AbstractEventLoop | None = None,
        wait: bool = True,
        stream: bool = True,
        label: str = "python",
    ):
        """Encode a planned request's views and queue it (blocks while the queue is full, unless ``wait=False``)."""
        cfg, meth, pref_views = planned
        contexts = self.encode_views(prompt, cfg, meth, pref_views)
        req = self._request(contexts, cfg, cfg.decoding.seed, prompt=prompt)
        finish = functools.partial(_attach_settings, self.settings(cfg, pref_views, meth))
        job = (
            Job(req, meth, stream=stream, label=label, finish=finish)
            if loop is None
            else Job.for_asyncio(req, meth, loop, stream=stream, label=label, finish=finish)
        )
        return self.engine.submit(job, wait=wait), cfg, pref_views

    def _prepare(self, preferences, views, method, decoding: dict[str, Any]):
        """The run config with per-call overrides, the method instance and the user's views, with the
        encoder ``auto`` resolved on this model (see :func:`_plan_call` for the model-free part)."""
        cfg, meth, user_views, unused = _plan_call(self.config, preferences, views, method, decoding)
        if cfg.encoder == "auto":  # fixed here, so the stop strings and the reported settings agree with it
            cfg = cfg.model_copy(update={"encoder": self.resolved_encoder(cfg, user_views)})
        _warn_degenerate(cfg.method, meth, unused, user_views)
        warn_duplicates(user_views, stacklevel=_caller_stacklevel())
        return cfg, meth, user_views

    def generate_batch(
        self,
        prompts: Sequence[Prompt],
        *,
        preferences: PreferenceSpec | Sequence[PreferenceSpec] | None = None,
        views: Sequence[Sequence[PreferenceSpec]] | None = None,
        method: str | None = None,
        seeds: Sequence[int] | None = None,
        **decoding: Any,
    ) -> list[GenerationResult]:
        """Generate for many prompts at once, as one batch on the device.

        Every prompt runs its own loop (own seed, own acceptance lengths, own
        stopping); each step gathers the forwards of all unfinished prompts
        into one backend call. Row ``i`` is decoded as
        ``generate(prompts[i], seed=seeds[i])`` is, with the same uniforms;
        where the backend's batched kernels give the logits of the same
        context exactly (the toy backend) the outputs are equal. On
        llama.cpp (its quantized CPU kernels differ by up to about one logit
        between batch shapes) and transformers they can part at a near-tie,
        in greedy mode too. ``seeds`` defaults to ``seed + i`` when a seed is
        configured; one call gives the same rows on every run while nothing
        else runs on the backend (beside other callers, rows vary as theirs do). ``prompts``
        is a list (a bare string is refused: it is not a list of prompts);
        ``seeds`` has one integer >= 0 per prompt. A row that fails, fails
        alone: the other rows finish, then the error is raised with every
        row's result, or its own error, in ``.rows`` and the first failed
        row's index in ``.row``. Rows whose logits turned NaN or infinite are
        named in one :class:`NumericalError` (``prompts[i]: ...``); any other
        error (a backend that could not run one row, a plugin's bug) is
        raised as itself, first.
        """
        if not _listing(prompts):
            raise ConfigError(
                f"prompts must be a list of prompts (for one prompt, use generate), got {type(prompts).__name__}"
            )
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if isinstance(p, Mapping):
                raise ConfigError(
                    f"prompts[{i}] is a message, not a prompt: a conversation is one prompt, give [conversation]"
                )
        cfg, meth, pref_views = self._prepare(preferences, views, method, decoding)
        given = _seed_list(seeds, len(prompts))
        if not prompts:
            return []
        if given is None:
            base = cfg.decoding.seed
            if base is not None:
                check_seed_span(
                    base, len(prompts), f"decoding.seed {base} with {len(prompts)} prompts", hint=SEED_PER_ROW
                )
            given = [base + i if base is not None else fresh_seed() for i in range(len(prompts))]
        # every row before any is queued: one too long, or one that cannot be encoded, costs no decoding
        contexts = []
        for i, p in enumerate(prompts):
            try:
                contexts.append(self.encode_views(p, cfg, meth, pref_views))
                self._check_prompt(contexts[-1], p)
            except PersonaJudgeError as err:
                raise in_row(err, i) from None
        reqs = [self._request(c, cfg, s) for c, s in zip(contexts, given)]
        finish = functools.partial(_attach_settings, self.settings(cfg, pref_views, meth))
        # each job runs its own loop; the method object only plans
        jobs = [Job(r, meth, stream=False, finish=finish) for r in reqs]
        engine = self.engine
        try:
            engine.submit_many(jobs)
            return _batch_results(jobs)
        finally:
            for j in jobs:
                j.cancel()

    def stop_strings(self, cfg: RunConfig) -> list[str]:
        """The user's stop strings plus those the encoder's format implies.

        ``encoder_options.stop = false`` drops the latter for every encoder, here, once: the benchmark
        sets it to time a fixed number of tokens, and a plugin encoder need not know about it."""
        tok = self.backend.tokenizer
        enc = resolve_encoder(cfg.encoder, tok)
        options = encoder_options(enc, cfg.encoder_options)
        extra = stop_strings_of(enc, tok, options) if options.get("stop", True) is not False else []
        return list(dict.fromkeys([*cfg.decoding.stop, *extra]))

    def _check_prompt(self, contexts: list[list[int]], prompt: Prompt | None = None) -> None:
        """``check_contexts`` with what the backend knows: its vocabulary (a tokenizer with more tokens
        than the model's embedding fails here, naming the token, not mid-request) and, where it says,
        the model's own maximum context (so a too-long prompt is not told to raise --n-ctx past it);
        with ``prompt``, the size of the user's own text, so a view too long for the encoder's
        exemplars is not told to shorten the prompt."""
        b = self.backend
        tok = b.tokenizer

        def own_tokens() -> int:
            assert prompt is not None
            return sum(len(tok.encode(m["content"], add_bos=False)) for m in normalize_conversation(prompt))

        check_contexts(
            contexts,
            b.context_length,
            model_max=getattr(b, "max_context_length", None),
            vocab_size=tok.vocab_size,
            token_name=getattr(tok, "token_name", None),
            prompt_tokens=own_tokens if prompt is not None else None,
        )

    def _request(
        self,
        contexts: list[list[int]],
        cfg: RunConfig,
        seed: int | None,
        on_text: Callable[[str], None] | None = None,
        prompt: Prompt | None = None,
    ) -> DecodeRequest:
        # a prompt that does not fit is the caller's error, raised here before anything is queued (a
        # method that runs alone would otherwise start, and a server stream begin, before its loop checks)
        self._check_prompt(contexts, prompt)
        d = cfg.decoding
        seed = seed if seed is not None else fresh_seed()
        emitter = Emitter(
            self.backend.tokenizer,
            max_new_tokens=d.max_new_tokens,
            stop=self.stop_strings(cfg),
            repeat_lines=self._repeat_lines(cfg),  # the oracle: off
            on_text=on_text,
        )
        stats = Stats(method=cfg.method, views=len(contexts), prompt_tokens=[len(c) for c in contexts], seed=seed)
        return DecodeRequest(
            contexts=contexts,
            params=SamplingParams(d.temperature, d.top_k, d.top_p),
            lam=d.lambda_,
            rng=np.random.default_rng(seed),
            emitter=emitter,
            context_length=self.backend.context_length,
            roles=d.roles,
            schedule=d.schedule,
            stats=stats,
        )

    _result = staticmethod(result_of)

    def decode(
        self,
        contexts: list[list[int]],
        cfg: RunConfig,
        meth,
        *,
        on_text: Callable[[str], None] | None = None,
        prompt: Prompt | None = None,
    ) -> GenerationResult:
        """Run ``meth`` on already-encoded view contexts (through the engine; ``on_text`` runs in this
        thread). ``prompt``, what they encode, only words the error of a view too long."""
        req = self._request(contexts, cfg, cfg.decoding.seed, prompt=prompt)
        job = self.engine.submit(Job(req, meth, stream=on_text is not None), wait=True)
        try:
            return job.result(on_text)
        finally:
            job.cancel()  # an exception in on_text (or KeyboardInterrupt) stops the request


def generate(
    prompt: Prompt, *, config: RunConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> GenerationResult:
    """One-shot helper: load the configured backend, generate, free it.

    To generate more than once, keep a :class:`PersonaJudge`: loading the
    model is most of a one-shot call's time.
    """
    cfg = _as_config(config)
    _check_call(cfg, kwargs)
    with PersonaJudge(cfg) as pj:
        return pj.generate(prompt, **kwargs)


def stream(
    prompt: Prompt, *, config: RunConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> Generator[str, None, GenerationResult]:
    """One-shot streaming: load the configured backend, yield text as it is committed, free it. The
    finished :class:`GenerationResult` is the generator's return value, as :meth:`PersonaJudge.stream`'s."""
    cfg = _as_config(config)
    _check_call(cfg, kwargs)
    with PersonaJudge(cfg) as pj:
        return (yield from pj.stream(prompt, **kwargs))


def _check_call(cfg: RunConfig, kwargs: dict[str, Any]) -> None:
    """A one-shot call's arguments checked as the call will check them, before the model loads (the
    CLI's ``generate`` too): with the call's views known, the method plans them, and so checks them
    (``mod``'s weights, one per view), and a named encoder checks the planned views (``exemplar``: a
    preference with no examples). The constructor cannot: a later call may bring other views."""
    call = {k: v for k, v in kwargs.items() if k not in ("preferences", "views", "method", "on_text")}
    cfg, meth, user_views, _ = _plan_call(
        cfg, kwargs.get("preferences"), kwargs.get("views"), kwargs.get("method"), call
    )
    planned = plan_views(meth, cfg.method, user_views)
    if cfg.encoder != "auto":  # auto's choice needs the tokenizer (and picks exemplar only when it fits)
        enc = resolve_encoder(cfg.encoder, None)  # type: ignore[arg-type]
        check_encoder_views(enc, planned, encoder_options(enc, cfg.encoder_options))
