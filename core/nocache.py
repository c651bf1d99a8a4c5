"""A session wrapper with no KV cache: the correctness oracle.

Every forward clears the view and re-reads its whole context, batch size one,
the way the released Persona-judge code ran. Slow by design; the ``reference``
method uses it to check that the cached, batched fast path makes the same
decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .contract import Session


class NoCacheSession(Session):
    def __init__(self, inner: Session):
        self.inner = inner
        self.n_views = inner.n_views
        self._tokens: list[list[int]] = [[] for _ in range(inner.n_views)]

    def forward(self, view: int, tokens: Sequence[int], n_logits: int = 1) -> Any:
        ctx = self._tokens[view] + list(tokens)
        self.inner.truncate(view, 0)
        out = self.inner.forward(view, ctx, n_logits)
        self._tokens[view] = ctx
        return out

    def truncate(self, view: int, length: int) -> None:
        self._tokens[view] = self._tokens[view][:length]

    def length(self, view: int) -> int:
        return len(self._tokens[view])

    def close(self) -> None:
        self.inner.close()
