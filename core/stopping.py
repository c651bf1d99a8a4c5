"""Commit tokens, stop at EOS / length / stop strings, stream safe text.

The emitter is the only place tokens become output, so "tokens after a stop
are never emitted" holds by construction: once it reports the end, every later
push is refused. Streamed text holds back any tail that could still turn into a
stop string, and any incomplete UTF-8 sequence.

Text is decoded incrementally: decoding the whole output after every token
would make a long generation quadratic in its length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .contract import Tokenizer
from .result import FinishReason


class Emitter:
    def __init__(self, tokenizer: Tokenizer, *, max_new_tokens: int, stop: Iterable[str] = (),
                 eos_token_ids: Iterable[int] | None = None, on_text: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop]
        self.eos = frozenset(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._streamed = 0
        # text of tokens[:_ckpt] is _head; tokens[_anchor:_ckpt] decode to _anchor_text
        self._head = ""
        self._anchor = self._ckpt = 0
        self._anchor_text = ""

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.tokens)

    def push(self, token: int) -> bool:
        """Commit one token. Returns False once generation must end."""
        if self.done:
            return False
        if token in self.eos:
            self.finish("eos")
            return False
        self.tokens.append(token)
        text = self._decode()
        if self.stop:
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                # keep the fewest tokens whose text covers everything before the stop string
                while self.tokens and len(self.tokenizer.decode(self.tokens[:-1])) >= cut:
                    self.tokens.pop()
                self.text = text[:cut]
                self.finish("stop")
                return False
        self.text = text
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
            return False
        self._stream(final=False)
        return True

    #: Tokens decoded again in front of the new ones, so that a decoder's rules
    #: at the start of a text (a stripped leading space) do not apply mid-text.
    ANCHOR = 4
    #: New tokens after which the decoded text is frozen into the head.
    WINDOW = 32

    def _decode(self) -> str:
        """``tokenizer.decode(self.tokens)``, decoding only the tokens since the last checkpoint.

        The tail is decoded together with a few frozen tokens before it; when
        that decode does not start with those tokens' own text (a decoder
        whose output is not a concatenation at this point), the whole list is
        decoded instead and the checkpoint restarts.
        """
        tok = self.tokenizer
        tail = tok.decode(self.tokens[self._anchor:])
        if tail.startswith(self._anchor_text):
            text = self._head + tail[len(self._anchor_text):]
        else:
            text = tok.decode(self.tokens)
            self._head, self._anchor, self._ckpt, self._anchor_text = "", 0, 0, ""
        n = len(self.tokens)
        if n - self._ckpt >= self.WINDOW and not text.endswith("\ufffd"):
            anchor = max(0, n - self.ANCHOR)
            anchor_text = tok.decode(self.tokens[anchor:])
            if text.endswith(anchor_text) and "\ufffd" not in anchor_text:
                self._head, self._anchor, self._ckpt, self._anchor_text = text, anchor, n, anchor_text
        return text

    def finish(self, reason: FinishReason) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._stream(final=True)

    def _stream(self, *, final: bool) -> None:
        if self.on_text is None:
            return
        end = len(self.text)
        if not final:
            while end > self._streamed and self.text[end - 1] == "\ufffd":
                end -= 1
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end - self._streamed), 0, -1):
                    if self.text[end - n:end] == s[:n]:
                        end -= n
                        break
        if end > self._streamed:
            self.on_text(self.text[self._streamed:end])
            self._streamed = end
