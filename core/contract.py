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

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

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


class Session(ABC):
    """Per-request state: one token context and KV cache per view."""

    n_views: int

    @abstractmethod
    def forward(self, view: int, tokens: Sequence[int], n_logits: int = 1) -> Array:
        """Append ``tokens`` to ``view``; return logits of shape (n_logits, V).

        Row ``i`` holds the next-token logits after the position
        ``len(tokens) - n_logits + i`` of the new tokens, i.e. the rows are the
        last ``n_logits`` positions. ``n_logits`` is between 0 and
        ``len(tokens)``; 0 means "take the tokens, compute no logits" (the
        output projection over a large vocabulary is much of a small model's
        cost, and the core skips it where it does not need the row).
        """

    def forward_many(self, calls: Sequence[tuple[int, Sequence[int], int]]) -> list[Array]:
        """Several ``forward`` calls on *different* views; backends batch them.

        The default runs them one by one; a backend overrides it to put all of
        them into one model call.
        """
        return [self.forward(v, toks, n) for v, toks, n in calls]

    @abstractmethod
    def truncate(self, view: int, length: int) -> None:
        """Forget everything in ``view`` after the first ``length`` tokens."""

    @abstractmethod
    def length(self, view: int) -> int:
        """Number of tokens ``view`` holds."""

    def close(self) -> None:
        """Release per-request resources (KV cache sequences)."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(ABC):
    """A loaded model. Weights are loaded once; every view shares them."""

    #: registered name, e.g. ``"llama-cpp"``
    name: ClassVar[str]

    tokenizer: Tokenizer
    #: maximum tokens one view's context may hold
    context_length: int

    @abstractmethod
    def open(self, n_views: int) -> Session:
        """A fresh session with ``n_views`` empty contexts."""

    def native_generate(self, tokens: Sequence[int], *, temperature: float, top_k: int, top_p: float,
                        max_new_tokens: int, seed: int) -> list[int] | None:
        """Plain sampling with the backend's own generator (the benchmark baseline).

        Returns None when the backend has no generator of its own; the
        benchmark then uses the core's plain sampling loop.
        """
        return None

    def describe(self) -> dict[str, Any]:
        """A few facts for reports (model, device, dtype)."""
        return {"backend": self.name}

    def close(self) -> None:
        """Free the weights."""
