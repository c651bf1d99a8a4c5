"""The small contract between the backend-neutral core and a model backend.

A backend loads the weights once and opens *sessions*. A session holds one
token context (and KV cache) per view and answers two questions: "append
these tokens to view v and give me the next-token logits at the last n
positions" (one token for a draft step, lambda+1 for a verification) and
"forget view v after position L" (rollback after a rejection). Everything
Persona-judge needs is built from those two calls. The public ``forward`` /
``forward_many`` / ``truncate`` of :class:`Session` are template methods that
check every argument and result once; a new backend subclasses it and
implements ``_forward_many`` and ``_truncate`` (and ``_close`` if it holds
resources). ``_forward_many`` receives every view of a step at once, so a
backend can batch them into one model call, which is where most of the speed
comes from.

This module is also where plugin output enters the core, so it is checked
here (:meth:`Session._check_outputs`, :func:`check_tokenizer`): a plugin's
mistake is a :class:`PluginError` naming its class, not an error deep in the
sampler, and logits wider than the vocabulary (an output layer padded to a
multiple of 128) are cut to it, so a padded id is never sampled.
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
import operator
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from .arrays import array_namespace
from .errors import (
    ContextLengthError,
    PersonaJudgeError,
    PersonaJudgeWarning,
    PluginError,
    SessionError,
    TooManyViewsError,
)

if TYPE_CHECKING:
    from .config import BackendConfig

Array = Any


@runtime_checkable
class Tokenizer(Protocol):
    """What the core and the preference encoders need from a tokenizer.

    The three attributes are read-only here (properties), so a plain class attribute satisfies them
    for a type checker too: ``chat_template = None`` in a tokenizer without a template, as in the
    README's example backend, would not match a writable ``str | None``.

    Optional, and what keeps a user's text literal: ``special_texts`` (a frozenset of the strings
    that ``encode`` turns into control tokens, ``"<eos>"``, ``"<end_of_turn>"``) and an ``encode``
    that takes ``special=False`` (those strings encoded as plain text, and with ``add_bos`` no EOS the
    tokenizer's post-processor would append). A tokenizer with both gets special-token text in the
    prompt, the messages, the system text and the preferences encoded as text
    (:class:`personajudge.preferences.encoders.UserText`), while the chat template's and the
    encoder's own markers stay control tokens; one without them is encoded as before. Listing
    ``special_texts`` without an ``encode`` that takes ``special=``, or as anything but a set of
    strings, is a :class:`PluginError` when the backend loads (:func:`special_texts_of`)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def chat_template(self) -> str | None: ...

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special-token markup in ``text`` is parsed (optionally, with a
        ``special: bool = True`` keyword, not parsed when ``special=False``: see the class docstring)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (only when it has one)."""
        ...


def check_backend(owner: Any) -> None:
    """A loaded backend's ``context_length`` and tokenizer (:func:`check_tokenizer`), checked once, as it
    loads: the engine sizes every request by ``context_length``, where a missing or textual one is an
    ``AttributeError`` or ``TypeError`` deep in a request, far from the plugin."""
    registered = getattr(owner, "name", None)
    name = f"'{registered}' ({type(owner).__qualname__})" if isinstance(registered, str) else type(owner).__qualname__
    n = getattr(owner, "context_length", None)
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        got = "no such attribute" if not hasattr(owner, "context_length") else f"{type(n).__name__} {n!r:.60}"
        raise PluginError(
            f"backend {name}.context_length must be a positive int (tokens one view holds; set it in __init__), "
            f"got {got}"
        )
    check_tokenizer(owner)


#: the text a tokenizer encodes and decodes once when its backend loads (:func:`check_tokenizer`)
_PROBE = "Hello, world."


def check_tokenizer(owner: Any) -> None:
    """``owner.tokenizer``'s ``vocab_size`` and ``eos_token_ids``, checked once when a backend loads.

    Both are read on every generated token (the stop check, the sampler's
    bounds), so a wrong one otherwise shows up as a traceback in
    ``core/stopping.py`` or, worse, as a run that silently decodes through the
    model's EOS. ``owner`` is the backend; errors name its class. An empty
    ``eos_token_ids`` is legal (a model may have no end-of-text token) but
    means generation ends only at ``max_new_tokens`` or a stop string, which
    is rarely what the plugin author meant, so it is a warning, not an error.
    """
    registered = getattr(owner, "name", None)
    name = f"'{registered}' ({type(owner).__qualname__})" if isinstance(registered, str) else type(owner).__qualname__
    tok = getattr(owner, "tokenizer", None)
    if tok is None:
        raise PluginError(f"backend {name} has no tokenizer; set self.tokenizer (a personajudge.Tokenizer) in __init__")
    where = f"backend {name}: tokenizer {type(tok).__qualname__}"
    vocab = getattr(tok, "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, numbers.Integral) or vocab < 1:
        raise PluginError(f"{where}.vocab_size must be a positive int, got {vocab!r:.60}")
    vocab = int(vocab)
    eos = getattr(tok, "eos_token_ids", ...)
    if not isinstance(eos, frozenset | set):
        raise PluginError(
            f"{where}.eos_token_ids must be a frozenset of token ids, got "
            f"{'no such attribute' if eos is ... else f'{type(eos).__name__} {eos!r:.60}'}"
        )
    bad = [t for t in eos if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= int(t) < vocab]
    if bad:
        raise PluginError(
            f"{where}.eos_token_ids must be ints in 0..{vocab - 1} (the vocabulary); got {', '.join(map(repr, bad[:5]))}"
        )
    if not eos:
        warnings.warn(
            f"{where}.eos_token_ids is empty: generation stops only at max_new_tokens or a stop string",
            PersonaJudgeWarning,
            stacklevel=3,
        )
    special_texts_of(tok, where)
    _probe_encode_decode(tok, where)


def _probe_encode_decode(tok: Any, where: str) -> None:
    """``encode`` and ``decode`` of a short text, once: a tokenizer that raises, returns a numpy array
    (ambiguous truth values in the context checks) or decodes to bytes would otherwise fail the first
    request with a traceback from the core, not the plugin."""
    try:
        ids = tok.encode(_PROBE, add_bos=False)
    except PersonaJudgeError:  # a typed refusal says what is wrong itself (a closed backend's SessionError)
        raise
    except Exception as err:
        raise PluginError(f"{where}.encode({_PROBE!r}, add_bos=False) raised {type(err).__name__}: {err}") from err
    # ids past the vocabulary are the prompt's error, named with the token when a request holds one (a
    # tokenizer may know tokens a model has no embedding for); here only the type is the plugin's
    if not isinstance(ids, list | tuple) or not all(
        isinstance(t, numbers.Integral) and not isinstance(t, bool) and int(t) >= 0 for t in ids
    ):
        raise PluginError(
            f"{where}.encode({_PROBE!r}, add_bos=False) must return a list of token ids (ints >= 0), "
            f"got {type(ids).__name__} {ids!r:.60}"
        )
    try:
        text = tok.decode([int(t) for t in ids])
    except PersonaJudgeError:
        raise
    except Exception as err:
        raise PluginError(f"{where}.decode(encode({_PROBE!r})) raised {type(err).__name__}: {err}") from err
    if not isinstance(text, str):
        raise PluginError(f"{where}.decode must return str, got {type(text).__name__} {text!r:.60}")


def special_texts_of(tok: Any, where: str | None = None) -> frozenset[str]:
    """``tok.special_texts`` checked (a set of non-empty strings, with an ``encode`` that takes
    ``special=``), or an empty frozenset for a tokenizer that lists none.

    Checked at load (:func:`check_tokenizer`) and again where the user's text is encoded, since a
    slip here is silent otherwise: a str (``"<eot>"``) iterates as its letters, so every ``e``, ``o``
    and ``t`` of a prompt would be cut out of its words, and an ``encode`` without ``special=`` fails
    only on the first prompt that holds special-token text. ``where`` names the tokenizer in the error.
    """
    texts = getattr(tok, "special_texts", None)
    if texts is None:
        return frozenset()
    where = where or f"tokenizer {type(tok).__qualname__}"
    if not isinstance(texts, frozenset | set) or not all(isinstance(t, str) and t for t in texts):
        raise PluginError(
            f"{where}.special_texts must be a frozenset of non-empty strings (the texts encode parses into "
            f"control tokens, e.g. frozenset({{'<eos>'}})), got {type(texts).__name__} {texts!r:.60}"
        )
    if texts and not _takes_special(getattr(tok, "encode", None)):
        raise PluginError(
            f"{where}.encode takes no special= keyword, but the tokenizer lists special_texts: "
            "encode(text, *, add_bos=True, special=True) must encode those texts as plain text when special=False"
        )
    return frozenset(texts)


def _takes_special(fn: Any) -> bool:
    """Whether ``fn`` accepts a ``special=`` keyword (a named parameter or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return callable(fn)
    return any(
        (p.name == "special" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)) or p.kind is p.VAR_KEYWORD
        for p in params
    )


def as_index(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (``operator.index``: a Python or numpy integer,
    not a bool), else None. A view number or truncate length a loop computed with numpy
    (``np.argmax``, ``arr.size``) is as good as an int, in the session and in the engine alike."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class ForwardCall(NamedTuple):
    """One view's part of a forward: append ``tokens`` to ``view``, return ``n_logits`` rows."""

    view: int
    tokens: Sequence[int]
    n_logits: int = 1


#: The most views any session holds. A larger count is a mistake (``serve --max-batch 10**20``), not a
#: workload: refused as :class:`TooManyViewsError`, which the engine answers by sizing down (as for a
#: backend's own limit), before a backend allocates per-view state it could never fill.
MAX_SESSION_VIEWS = 1 << 16


class Session(ABC):
    """Per-request state: one token context and KV cache per view.

    The public methods are template methods: they check every argument once,
    here, so that the same misuse raises the same :class:`SessionError` on
    every backend, keep the per-view lengths, and call the backend's
    ``_forward_many`` / ``_truncate`` with calls already known to be valid.
    A backend implements those two (and ``_close`` if it holds resources).
    """

    n_views: int
    context_length: int
    #: token ids must lie in ``0..vocab_size-1``; None skips the check
    vocab_size: int | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Session:
        """Refuse a subclass that leaves a backend method unimplemented, naming it and the class.

        Python's own refusal is a ``TypeError`` raised from whichever line of
        persona-judge opened the session (the engine's, deep in a request),
        so a plugin author sees a traceback through the core; this says what
        to implement, as a :class:`PluginError` the CLI prints in one line.
        """
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise PluginError(
                f"session class {cls.__qualname__} (module {cls.__module__}) does not implement "
                f"{', '.join(missing)}: a Session subclass implements _forward_many(calls) and _truncate(view, length)"
            )
        return super().__new__(cls)

    def __init__(self, n_views: int, context_length: int, vocab_size: int | None = None):
        if not isinstance(n_views, int) or n_views < 1:
            raise SessionError(f"a session needs at least one view, got {n_views!r}")
        if n_views > MAX_SESSION_VIEWS:  # what a backend says when it cannot hold them: callers size down
            raise TooManyViewsError(f"a session holds at most {MAX_SESSION_VIEWS} views, got {n_views}")
        self.n_views = n_views
        self.context_length = context_length
        self.vocab_size = vocab_size
        self._lengths = [0] * n_views
        self._closed = False

    # -- the contract (callers) -------------------------------------------------------------

    def forward(self, view: int, tokens: Sequence[int], n_logits: int = 1) -> Array:
        """Append ``tokens`` to ``view``; return logits of shape (n_logits, V).

        Row ``i`` holds the next-token logits after the position
        ``len(tokens) - n_logits + i`` of the new tokens, i.e. the rows are the
        last ``n_logits`` positions. ``n_logits`` is between 0 and
        ``len(tokens)``; 0 means "take the tokens, compute no logits" (the
        output projection over a large vocabulary is much of a small model's
        cost, and the core skips it where it does not need the row).
        """
        return self.forward_many([ForwardCall(view, tokens, n_logits)])[0]

    def forward_many(self, calls: Sequence[ForwardCall | tuple[int, Sequence[int], int]]) -> list[Array]:
        """Several ``forward`` calls on *different* views, in one model call where the backend can."""
        checked = self._check_calls(calls)
        if not checked:
            return []
        try:
            outs = self._check_outputs(checked, self._forward_many(checked))
        except BaseException:
            self._undo(checked)
            raise
        for c in checked:
            self._lengths[c.view] += len(c.tokens)
        return outs

    def truncate(self, view: int, length: int) -> None:
        """Forget everything in ``view`` after the first ``length`` tokens (a no-op past the end)."""
        self._check_open()
        v = self._check_view(view)
        n = as_index(length)
        if n is None or n < 0:
            raise SessionError(f"truncate length must be a non-negative integer, got {length!r:.20}")
        if n < self._lengths[v]:
            self._truncate(v, n)
            self._lengths[v] = n

    def length(self, view: int) -> int:
        """Number of tokens ``view`` holds."""
        return self._lengths[self._check_view(view)]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release per-request resources (KV cache sequences); idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what a backend implements --------------------------------------------------------------

    @abstractmethod
    def _forward_many(self, calls: list[ForwardCall]) -> list[Array]:
        """Run checked calls (distinct views, valid ids, room in the context).

        ``self.length(c.view)`` is still each view's length *before* the call;
        the base class adds the new tokens after this returns.
        """

    @abstractmethod
    def _truncate(self, view: int, length: int) -> None:
        """Drop ``view``'s tokens from ``length`` on.

        ``length`` is below the view's length, except after a
        ``_forward_many`` that raised: each of its views is then truncated
        to its length before the call, which must undo whatever part of the
        call the backend had written (and do nothing where it had written
        nothing). The caller may retry the same tokens.
        """

    def _close(self) -> None:  # noqa: B027  (optional hook: most sessions hold nothing)
        """Free what the session holds."""

    # -- the checks, once ---------------------------------------------------------------------

    def _undo(self, calls: list[ForwardCall]) -> None:
        """After a failed ``_forward_many``: every view back to its length before the call.

        A backend may have written some views' tokens before it raised; a
        retry of the same tokens (the engine retries a failed batch request
        by request) would otherwise append them twice and decode from a
        corrupted context, with no error. When even this fails the session
        cannot be trusted, so it is closed: the next call raises.
        """
        try:
            for c in calls:
                self._truncate(c.view, self._lengths[c.view])
        except BaseException:
            self.close()

    def _check_outputs(self, calls: list[ForwardCall], outs: Any) -> list[Array]:
        """One ``(n_logits, >= vocab)`` floating array per call, from the backend: its bugs named here, not
        deep in the core.

        Columns at and above ``vocab_size`` are cut off here, once, as views
        (no copy): a real model's output layer is often padded past its
        tokenizer (Qwen's to a multiple of 128), and those ids must never be
        sampled. Only floating dtypes are logits: bool, str, object and
        complex arrays fail in the sampler's arithmetic (or lose their
        imaginary part), and int arrays are refused rather than cast, since
        integer "logits" are almost always token ids or an un-dequantized
        output returned by mistake.
        """
        name = type(self).__name__
        if not isinstance(outs, Sequence) or len(outs) != len(calls):
            got = f"{len(outs)} result(s)" if isinstance(outs, Sequence) else type(outs).__name__
            raise PluginError(f"{name}._forward_many returned {got} for {len(calls)} call(s); give one per call")
        vocab = self.vocab_size
        cut: list[Array] | None = None
        for i, (c, out) in enumerate(zip(calls, outs)):
            shape = getattr(out, "shape", None)
            if shape is None:
                raise PluginError(
                    f"{name}._forward_many returned a {type(out).__name__} for view {c.view}, not an array"
                )
            if len(shape) != 2 or shape[0] != c.n_logits or (vocab is not None and shape[1] < vocab):
                want = f"({c.n_logits}, {'V' if vocab is None else f'>= {vocab}'})"
                raise PluginError(
                    f"{name}._forward_many returned logits of shape {tuple(shape)} for view {c.view}; the contract "
                    f"is {want}: the last n_logits positions' rows"
                )
            if not _floating(out):
                raise PluginError(
                    f"{name}._forward_many returned logits of dtype {getattr(out, 'dtype', None)} for view {c.view}; "
                    "logits must be a floating dtype (float32, float16, bfloat16, float64)"
                )
            if vocab is not None and shape[1] > vocab:
                if cut is None:
                    cut = list(outs)
                cut[i] = out[:, :vocab]
        if cut is None:
            return outs if isinstance(outs, list) else list(outs)
        return cut

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("this session is closed; open a new one with backend.open(n_views)")

    def _check_view(self, view: int) -> int:
        v = as_index(view)
        if v is None or not 0 <= v < self.n_views:
            raise SessionError(f"view {view!r:.20} is out of range; the session has views 0..{self.n_views - 1}")
        return v

    def _check_calls(self, calls: Sequence[Any]) -> list[ForwardCall]:
        self._check_open()
        out: list[ForwardCall] = []
        seen: set[int] = set()
        for call in calls:
            try:
                view, tokens, n_logits = call
            except (TypeError, ValueError):
                raise SessionError(f"a forward call is (view, tokens, n_logits), got {call!r:.80}") from None
            v = self._check_view(view)
            if v in seen:
                raise SessionError(f"view {v} appears twice in one forward_many call; give each view one call")
            seen.add(v)
            toks = [int(t) for t in tokens]
            if not toks:
                raise SessionError(f"forward on view {v} got no tokens")
            if self.vocab_size is not None and not (0 <= min(toks) and max(toks) < self.vocab_size):
                raise SessionError(
                    f"token ids must be in 0..{self.vocab_size - 1}; view {v} got "
                    f"{min(toks) if min(toks) < 0 else max(toks)}"
                )
            n = as_index(n_logits)
            if n is None or not 0 <= n <= len(toks):
                raise SessionError(f"n_logits must be in 0..{len(toks)} for {len(toks)} token(s), got {n_logits!r:.20}")
            if self._lengths[v] + len(toks) > self.context_length:
                raise ContextLengthError(
                    f"view {v} would hold {self._lengths[v] + len(toks)} tokens but the context holds "
                    f"{self.context_length} per view; shorten the prompt or raise the context size (--n-ctx)"
                )
            out.append(ForwardCall(v, toks, n))
        return out


#: (array type, dtype) -> whether it is a real floating dtype; a backend returns one or two kinds,
#: so after the first forward the check is a dict lookup, not an array-namespace resolution
_FLOATING: dict[tuple[type, Any], bool] = {}


def _floating(out: Array) -> bool:
    dtype = getattr(out, "dtype", None)
    key = (type(out), dtype)
    try:
        known = _FLOATING.get(key)
    except TypeError:  # an unhashable dtype: no array library's
        return False
    if known is None:
        try:
            known = bool(array_namespace(out).isdtype(dtype, "real floating"))
        except (TypeError, ValueError):  # not an array library array-api-compat knows
            known = False
        _FLOATING[key] = known
    return known


class Backend(ABC):
    """A loaded model. Weights are loaded once; every view shares them."""

    #: registered name, e.g. ``"llama-cpp"``
    name: ClassVar[str]
    #: the :class:`~.config.BackendConfig` fields it reads besides ``name`` and ``options`` (None: all);
    #: :func:`~personajudge.plugins.load_backend` warns about the others when they are set, so that
    #: ``--device cuda`` given to a backend without devices is not ignored in silence
    config_fields: ClassVar[frozenset[str] | None] = None

    tokenizer: Tokenizer
    #: maximum tokens one view's context may hold
    context_length: int

    def __init__(self, config: BackendConfig | None = None) -> None:  # noqa: B027  (the signature is the contract)
        """Load the model ``config`` names; :func:`personajudge.plugins.load_backend` calls this."""

    @abstractmethod
    def open(self, n_views: int) -> Session:
        """A fresh session with ``n_views`` empty contexts."""

    def native_generate(
        self, tokens: Sequence[int], *, temperature: float, top_k: int, top_p: float, max_new_tokens: int, seed: int
    ) -> list[int] | None:
        """Plain sampling with the backend's own generator (the benchmark baseline).

        Returns None when the backend has no generator of its own; the
        benchmark then uses the core's plain sampling loop.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """A few facts for reports (model, device, dtype)."""
        return {"backend": self.name}

    def decoding_context(self) -> contextlib.AbstractContextManager[Any]:
        """Entered on the thread that decodes (the engine's) for as long as it runs.

        The sampling algebra runs on the backend's own arrays between
        forwards; a torch backend returns ``torch.inference_mode()`` here so
        that those operations skip autograd's bookkeeping (version counters,
        view tracking) as the forwards do. The default does nothing.
        """
        return contextlib.nullcontext()

    def compile_kernel(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, an array function of the token loop, as this backend runs it fastest.

        The engine passes the batched judge's decision here once
        (:func:`~personajudge.core.batched.judge_rows`: filter, draft, judge
        and residual over every row of a step, some 150 small array
        operations). On a GPU each of them is a kernel launch, and once the
        forward itself is compiled they cost the host about as much as the
        forward does; a torch backend asked to compile returns a compiled
        ``fn``, which fuses them into a few kernels. It must compute the same
        function. The default returns ``fn`` itself.
        """
        return fn

    def close(self) -> None:  # noqa: B027  (optional: a backend without resources keeps this)
        """Free the weights."""
