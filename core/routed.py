"""A session whose views live on two backends (PAD with a separate reward model).

PAD's personalized reward policy can be its own model. Its view is routed to
a session of that model; every other view stays on the main model. Both must
share the tokenizer, since the same token ids are fed to both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .contract import Session
from .errors import ConfigError


class RoutedSession(Session):
    """Views in ``routed`` go to ``other`` (as its views 0, 1, ...); the rest to ``main``."""

    def __init__(self, main: Session, other: Session, routed: Sequence[int]):
        self.main, self.other = main, other
        self.n_views = main.n_views
        self._map = {v: i for i, v in enumerate(routed)}

    def _target(self, view: int) -> tuple[Session, int]:
        if view in self._map:
            return self.other, self._map[view]
        return self.main, view

    def forward(self, view: int, tokens: Sequence[int], n_logits: int = 1) -> Any:
        return self.forward_many([(view, tokens, n_logits)])[0]

    def forward_many(self, calls):
        groups: dict[int, list[int]] = {0: [], 1: []}
        for i, (v, _, _) in enumerate(calls):
            groups[1 if v in self._map else 0].append(i)
        out: list[Any] = [None] * len(calls)
        for which, idx in groups.items():
            if not idx:
                continue
            session = self.other if which else self.main
            sub = [(self._target(calls[i][0])[1], calls[i][1], calls[i][2]) for i in idx]
            for i, res in zip(idx, session.forward_many(sub)):
                out[i] = res
        widths = {o.shape[-1] for o in out if o is not None and o.shape[0]}
        if len(widths) > 1:
            raise ConfigError(f"the reward model's vocabulary ({max(widths)} vs {min(widths)} entries) differs from "
                              "the model's; PAD needs both to share one tokenizer")
        return out

    def truncate(self, view: int, length: int) -> None:
        s, v = self._target(view)
        s.truncate(v, length)

    def length(self, view: int) -> int:
        s, v = self._target(view)
        return s.length(v)

    def close(self) -> None:
        self.other.close()
        self.main.close()
