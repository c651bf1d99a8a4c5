"""A session wrapper with no KV cache: the correctness oracle.

Every forward clears the view and re-reads its whole context, batch size one,
the way the released Persona-judge code ran. Slow by design; the ``reference``
method uses it to check that the cached, batched fast path makes the same
decisions.
"""

from __future__ import annotations

from typing import Any

from .contract import ForwardCall, Session


class NoCacheSession(Session):
    def __init__(self, inner: Session):
        super().__init__(inner.n_views, inner.context_length, inner.vocab_size)
        self.inner = inner
        self._tokens: list[list[int]] = [[] for _ in range(inner.n_views)]

    def _forward_many(self, calls: list[ForwardCall]) -> list[Any]:
        out = []
        for view, tokens, n_logits in calls:  # one row at a time, the whole context each time
            ctx = self._tokens[view] + list(tokens)
            self.inner.truncate(view, 0)
            out.append(self.inner.forward(view, ctx, n_logits))
            self._tokens[view] = ctx
        return out

    def _truncate(self, view: int, length: int) -> None:
        self._tokens[view] = self._tokens[view][:length]

    def _close(self) -> None:
        self.inner.close()
