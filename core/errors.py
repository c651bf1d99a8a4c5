"""Typed exceptions.

Every mistake a user can make raises a subclass of :class:`PersonaJudgeError`
whose message says what was wrong and what to do; the CLI turns exactly these
into a one-line message and exit status 2, so anything else that escapes is a
bug and keeps its traceback.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Sequence


class PersonaJudgeError(Exception):
    """Base class for user-facing errors (bad input, missing model, ...)."""


class ConfigError(PersonaJudgeError, ValueError):
    """A configuration value is invalid or a config file cannot be read."""


class TooManyViewsError(ConfigError):
    """The backend cannot open a session with that many views (llama.cpp's sequence limit, say).

    Its own type because it is about one request, not the configuration: the
    engine fails only the request that asked (later ones open as before), and
    the server names the field the views came from (``views`` or ``preferences``)."""


#: the environment variable that selects the third-party plugins to load (``none``, or ``a,b``); read
#: by the plugin manager, named here so that every "unknown name" error can point at it
ENV_SELECT = "PERSONAJUDGE_PLUGINS"


def selection_hint() -> str:
    """`` (PERSONAJUDGE_PLUGINS='x' loads only the plugins it names)`` when the variable is set (else ""):
    the likeliest reason a plugin's name, or a name a plugin registers, is missing."""
    select = os.environ.get(ENV_SELECT)
    return f" ({ENV_SELECT}={select!r} loads only the plugins it names)" if select is not None else ""


class UnknownPluginError(PersonaJudgeError, KeyError):
    """A backend, encoder, method or scorer name is not registered."""

    def __init__(self, kind: str, name: str, registered: list[str], hint: str = ""):
        self.kind, self.name, self.registered = kind, name, sorted(registered)
        names = ", ".join(self.registered) or "(none)"
        super().__init__(
            f"unknown {kind} '{name}'{_did_you_mean(name, self.registered)}; registered {kind}s: {names}{hint}"
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


def _did_you_mean(name: str, registered: Sequence[str]) -> str:
    """`` (did you mean llama-cpp?)`` for ``llama_cpp`` (the Python package's spelling), ``Persona-Judge`` or
    a typo: ``-``, ``_`` and case first, then the closest spelling."""
    norm = {n.replace("_", "-").lower(): n for n in registered}
    same = norm.get(str(name).strip().replace("_", "-").lower())
    close = [same] if same is not None else difflib.get_close_matches(str(name), list(registered), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


class PluginError(PersonaJudgeError):
    """A plugin registered something invalid (duplicate name, wrong type) or broke the backend contract."""


class PreferenceError(PersonaJudgeError, ValueError):
    """A preference name, description or file is invalid."""


class UnknownPreferenceError(PreferenceError):
    """A single word that is no registered preference name or alias (a typo, most likely). Its own
    type so that callers can tell an unknown name from an invalid value (the server's
    ``unknown_preference`` against ``invalid_value``)."""


class ModelLoadError(PersonaJudgeError):
    """A model file or id could not be loaded."""


class BackendUnavailableError(PersonaJudgeError):
    """A backend's optional dependency is not installed."""


class ContextLengthError(PersonaJudgeError, ValueError):
    """A prompt (plus prefix) does not fit in the model's context window.

    ``row``: the prompt's index when it is one of a batch call's (``generate_batch``; the message
    then starts ``prompts[row]:``), so a caller that knows where its prompts came from (a JSONL
    file's lines) can say which one with :meth:`located`."""

    def __init__(self, message: str, *, row: int | None = None):
        super().__init__(message if row is None else f"prompts[{row}]: {message}")
        self.reason, self.row = message, row

    def located(self, where: Sequence[str]) -> ContextLengthError:
        """This error with its row named by ``where[row]`` (``path:line``) instead of its index."""
        return self if self.row is None else type(self)(f"{where[self.row]}: {self.reason}")


def in_row(err: PersonaJudgeError, row: int) -> PersonaJudgeError:
    """``err``, raised for one prompt of a batch call, as ``prompts[row]: <message>`` with ``.row`` and
    ``.reason`` (the message alone), as :class:`ContextLengthError` marks its own: "the prompt is empty"
    did not say which of a thousand prompts was. A copy of the same type (see :func:`one_each`)."""
    if isinstance(err, ContextLengthError):
        return type(err)(str(err), row=row)
    c = _copied(err)
    c.args = (f"prompts[{row}]: {err}", *err.args[1:])
    c.row, c.reason = row, str(err)  # type: ignore[attr-defined]
    return c  # type: ignore[return-value]


def located(err: BaseException, where: Sequence[str]) -> BaseException:
    """``err`` marked by :func:`in_row` with its row named by ``where[row]`` (a JSONL file's ``path:line``)
    instead of its index; any other error as it is."""
    row, reason = getattr(err, "row", None), getattr(err, "reason", None)
    if not isinstance(row, int) or not isinstance(reason, str) or not 0 <= row < len(where):
        return err
    if isinstance(err, ContextLengthError):
        return err.located(where)
    c = _copied(err)
    c.args = (f"{where[row]}: {reason}", *c.args[1:])
    c.row = None  # type: ignore[attr-defined]
    return c


class PromptTokenError(ContextLengthError):
    """A prompt encodes to a token id the model has no embedding row for (a tokenizer with added
    tokens, the model's embeddings not resized). A :class:`ContextLengthError` because it is the
    same kind of mistake, a prompt this model cannot take, found at the same place (before a request
    is queued): a batch names its row and file line, the server answers 400 naming the prompt."""


class DeviceError(PersonaJudgeError):
    """The device ran out of memory or is not available."""


class SessionError(PersonaJudgeError, ValueError):
    """A backend session was used against its contract (a view that does not
    exist, ``n_logits`` out of range, a truncation past the end, a closed
    session). The same misuse raises this on every backend: the checks live
    once, in :class:`personajudge.core.contract.Session`."""


class NumericalError(PersonaJudgeError, FloatingPointError):
    """The model produced NaN or infinite logits (a broken model file, an
    overflowing dtype); sampling from them would be silently wrong."""


class ChatTemplateError(PersonaJudgeError, ValueError):
    """The model's chat template (code that comes with the model file) failed to compile or to
    render: a syntax error, its own ``raise_exception(...)``, an error inside it. Not a
    :class:`ConfigError`, so the encoders may retry once with merged turns (templates that insist on
    alternating roles raise on purpose)."""


class ChatTemplateFatalError(ChatTemplateError, ConfigError):
    """The chat template cannot be used at all: it does not compile, or the sandbox stopped it at
    its time or size limit. Also a :class:`ConfigError`, so it is not retried (a runaway template
    would only spend the limit twice)."""


class PersonaJudgeWarning(UserWarning):
    """Something runs, but not as the user probably meant (a single view, an
    ignored option). The CLI prints these as one line each."""


def one_each(err: BaseException, n: int) -> list[BaseException]:
    """``err`` for ``n`` callers, one object each: ``err`` itself, then copies of it.

    Why: a caller marks the error it raises (``generate_batch`` sets ``.row`` and ``.rows``), so
    requests that failed together (a batched step that raised as a whole) must not share one object,
    or a second caller's marks overwrite the first's. A copy keeps the type, the message, the
    attributes, the cause and the traceback, so each caller raises what it would have raised alone.
    A class that cannot be rebuilt from its ``args`` (an ``__init__`` with other parameters) is
    copied without calling ``__init__``; one that cannot be copied at all is shared, as before."""
    return [err] + [_copied(err) for _ in range(n - 1)]


def _copied(err: BaseException) -> BaseException:
    try:
        c = copy.copy(err)
    except Exception:
        try:
            c = type(err).__new__(type(err), *err.args)
            c.__dict__.update(err.__dict__)
        except Exception:  # a ``__new__`` of its own: better shared than a second failure here
            return err
    c.__cause__, c.__context__ = err.__cause__, err.__context__
    c.__suppress_context__ = err.__suppress_context__
    return c.with_traceback(err.__traceback__)
