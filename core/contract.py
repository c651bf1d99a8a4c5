"""The small contract between the backend-neutral core and a model backend.

A backend loads the weights once and opens *sessions*. A session holds one
token context (and KV cache) per view and answers two questions: "append
these tokens to view v and give me the next-token logits at the last n
positions" (one token for a draft step, lambda+1 for a verification) and
"forget view v after position L" (rollback after a rejection). Everything
Persona-judge needs is built from those two calls, so a new backend is one
class with ``forward`` and ``truncate``; ``forward_many`` lets it batch several
views into one model call, which is where most of the speed comes from.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from .errors import ContextLengthError, PluginError, SessionError

if TYPE_CHECKING:
    from .config import BackendConfig

Array = Any


@runtime_checkable
class Tokenizer(Protocol):
    """What the core and the preference encoders need from a tokenizer."""

    vocab_size: int
    eos_token_ids: frozenset[int]
    chat_template: str | None

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special-token markup in ``text`` is parsed."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (only when it has one)."""
        ...


class ForwardCall(NamedTuple):
    """One view's part of a forward: append ``tokens`` to ``view``, return ``n_logits`` rows."""

    view: int
    tokens: Sequence[int]
    n_logits: int = 1


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

    def __init__(self, n_views: int, context_length: int, vocab_size: int | None = None):
        if not isinstance(n_views, int) or n_views < 1:
            raise SessionError(f"a session needs at least one view, got {n_views!r}")
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
            outs = self._forward_many(checked)
            self._check_outputs(checked, outs)
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
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise SessionError(f"truncate length must be a non-negative integer, got {length!r}")
        if length < self._lengths[v]:
            self._truncate(v, length)
            self._lengths[v] = length

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

    def _check_outputs(self, calls: list[ForwardCall], outs: Any) -> None:
        """One ``(n_logits, >= vocab)`` array per call, from the backend: its bugs named here, not deep in the core."""
        name = type(self).__name__
        if not isinstance(outs, Sequence) or len(outs) != len(calls):
            got = f"{len(outs)} results" if isinstance(outs, Sequence) else type(outs).__name__
            raise PluginError(f"{name}._forward_many returned {got} for {len(calls)} call(s); give one per call")
        for c, out in zip(calls, outs):
            shape = getattr(out, "shape", None)
            if shape is None:
                raise PluginError(
                    f"{name}._forward_many returned a {type(out).__name__} for view {c.view}, not an array"
                )
            if (
                len(shape) != 2
                or shape[0] != c.n_logits
                or (self.vocab_size is not None and shape[1] < self.vocab_size)
            ):
                want = f"({c.n_logits}, {'V' if self.vocab_size is None else f'>= {self.vocab_size}'})"
                raise PluginError(
                    f"{name}._forward_many returned logits of shape {tuple(shape)} for view {c.view}; the contract "
                    f"is {want}: the last n_logits positions' rows"
                )

    def _check_open(self) -> None:
        if self._closed:
            raise SessionError("this session is closed; open a new one with backend.open(n_views)")

    def _check_view(self, view: int) -> int:
        if isinstance(view, bool) or not isinstance(view, int) or not 0 <= view < self.n_views:
            raise SessionError(f"view {view!r} is out of range; the session has views 0..{self.n_views - 1}")
        return view

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
            if isinstance(n_logits, bool) or not isinstance(n_logits, int) or not 0 <= n_logits <= len(toks):
                raise SessionError(f"n_logits must be in 0..{len(toks)} for {len(toks)} token(s), got {n_logits!r}")
            if self._lengths[v] + len(toks) > self.context_length:
                raise ContextLengthError(
                    f"view {v} would hold {self._lengths[v] + len(toks)} tokens but the context holds "
                    f"{self.context_length} per view; shorten the prompt or raise the context size (--n-ctx)"
                )
            out.append(ForwardCall(v, toks, n_logits))
        return out


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
