"""A toy backend: deterministic next-token distributions, no model.

It exists to show the backend contract in the fewest lines and to give the
unit tests a fast, exactly reproducible "model". The vocabulary is a few
dozen characters; the logits after a context are a pure function of that
context (a bigram table plus a context-hashed perturbation), so different
preference prefixes give different but related distributions -- like two
prompted views of one model -- and a rollback followed by re-feeding gives
bit-identical logits.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import Field

from personajudge.core.config import BackendConfig, Options, take_options
from personajudge.core.contract import Backend, ForwardCall, Session
from personajudge.core.errors import ConfigError, SessionError

ALPHABET = " abcdefghijklmnopqrstuvwxyz.,!?'"
EOS = 0


class ToyTokenizer:
    """Characters of :data:`ALPHABET` are tokens 1..N; token 0 is end-of-sequence."""

    chat_template: str | None = None
    special_texts: frozenset[str] = frozenset()  # no text becomes a control token here

    def __init__(self) -> None:
        self.vocab_size = len(ALPHABET) + 1
        self.eos_token_ids = frozenset({EOS})
        self._index = {c: i + 1 for i, c in enumerate(ALPHABET)}

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return [self._index.get(c, self._index["?"]) for c in text.lower()]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(ALPHABET[i - 1] for i in ids if 0 < i <= len(ALPHABET))

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        raise ConfigError("the toy model has no chat template")


class ToySession(Session):
    def __init__(self, backend: ToyBackend, n_views: int):
        super().__init__(n_views, backend.context_length, backend.tokenizer.vocab_size)
        self.backend = backend
        self._ctx: list[list[int]] = [[] for _ in range(n_views)]

    def _forward_many(self, calls: list[ForwardCall]) -> list[np.ndarray]:
        self.backend.forward_calls += 1
        return [self._forward(c.view, list(c.tokens), c.n_logits) for c in calls]

    def _forward(self, view: int, tokens: list[int], n_logits: int) -> np.ndarray:
        ctx = self._ctx[view]
        start = len(ctx)
        ctx.extend(tokens)
        ends = range(start + len(tokens) - n_logits + 1, start + len(tokens) + 1)
        rows = [self.backend.logits_after(ctx[:e]) for e in ends]
        return np.stack(rows) if rows else np.empty((0, self.backend.tokenizer.vocab_size), dtype=np.float32)

    def _truncate(self, view: int, length: int) -> None:
        del self._ctx[view][length:]


class ToyOptions(Options):
    """``backend.options`` of the toy backend."""

    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the bigram table (numpy takes 0..2**32-1).")
    view_strength: float = Field(1.0, ge=0.0, le=1e6, description="Spread of the context-hashed perturbation.")


class ToyBackend(Backend):
    """Options (``backend.options``): ``seed`` of the bigram table, ``view_strength``."""

    name = "toy"
    config_fields = frozenset({"n_ctx"})
    Options = ToyOptions  # backend.options, checked without loading (the Ray driver does, before Ray starts)
    description = "A deterministic toy model over a 33-character vocabulary: the contract in a few lines, and the unit tests' exact oracle."

    def __init__(self, config: BackendConfig | None = None):
        config = config or BackendConfig(name="toy")
        opts = take_options(config, ToyOptions, owner="toy")
        self.seed = opts["seed"]
        self.view_strength = opts["view_strength"]
        self.tokenizer = ToyTokenizer()
        self.context_length = config.n_ctx or 4096
        v = self.tokenizer.vocab_size
        self._bigram = np.random.default_rng(self.seed).normal(0.0, 2.0, size=(v, v)).astype(np.float32)
        self._bigram[:, EOS] -= 4.0  # keep generations from ending at once
        self.forward_calls = 0

    def logits_after(self, context: Sequence[int]) -> np.ndarray:
        """Next-token logits after ``context`` (a pure function of it)."""
        last = context[-1] if context else EOS
        h = zlib.crc32(np.asarray(context, dtype=np.int32).tobytes()) ^ self.seed
        noise = np.random.default_rng(h).normal(0.0, self.view_strength, size=self.tokenizer.vocab_size)
        return self._bigram[last] + noise.astype(np.float32)

    def open(self, n_views: int) -> ToySession:
        if getattr(self, "_closed", False):
            raise SessionError("this toy backend is closed; make a new one")
        return ToySession(self, n_views)

    def close(self) -> None:
        """Nothing to free; closed like any backend, so that code which uses a closed one fails here too."""
        self._closed = True

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": f"toy(seed={self.seed})", "device": "cpu"}
