"""A session whose views live on two backends (PAD with a separate reward model).

PAD's personalized reward policy can be its own model. Its view is routed to
a session of that model; every other view stays on the main model. Both must
share the tokenizer, since the same token ids are fed to both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .contract import ForwardCall, Session
from .errors import ConfigError


class RoutedSession(Session):
    """Views in ``routed`` go to ``other`` (as its views 0, 1, ...); the rest to ``main``."""

    def __init__(self, main: Session, other: Session, routed: Sequence[int]):
        # known before any forward (one of the main model's token ids fed to a smaller reward model
        # failed as "token ids must be in 0..32; view 0 got ...", naming neither model nor tokenizer)
        if main.vocab_size is not None and other.vocab_size is not None and main.vocab_size != other.vocab_size:
            raise _vocab_error(other.vocab_size, main.vocab_size)
        super().__init__(main.n_views, min(main.context_length, other.context_length), main.vocab_size)
        self.main, self.other = main, other
        self._map = {v: i for i, v in enumerate(routed)}

    def _target(self, view: int) -> tuple[Session, int]:
        if view in self._map:
            return self.other, self._map[view]
        return self.main, view

    def _forward_many(self, calls: list[ForwardCall]) -> list[Any]:
        groups: dict[int, list[int]] = {0: [], 1: []}
        for i, c in enumerate(calls):
            groups[1 if c.view in self._map else 0].append(i)
        out: list[Any] = [None] * len(calls)
        for which, idx in groups.items():
            if not idx:
                continue
            session = self.other if which else self.main
            sub = [ForwardCall(self._target(calls[i].view)[1], calls[i].tokens, calls[i].n_logits) for i in idx]
            for i, res in zip(idx, session.forward_many(sub)):
                out[i] = res
        widths = {(which, out[i].shape[-1]) for which, idx in groups.items() for i in idx if out[i].shape[0]}
        if len({w for _, w in widths}) > 1:  # a session that declares no vocab_size: seen in its logits
            mine = dict(widths)
            raise _vocab_error(mine[1], mine[0])
        return out

    def _truncate(self, view: int, length: int) -> None:
        s, v = self._target(view)
        s.truncate(v, length)

    def _close(self) -> None:
        self.other.close()
        self.main.close()


def _vocab_error(reward: int, model: int) -> ConfigError:
    return ConfigError(
        f"the reward model's vocabulary ({reward} entries) differs from the model's ({model}); "
        "PAD needs both to share one tokenizer"
    )
