"""Commit tokens, stop at EOS / length / stop strings, stream safe text.

The emitter is the only place tokens become output, so "tokens after a stop
are never emitted" holds by construction: once it reports the end, every later
push is refused. Streamed text holds back any tail that could still turn into a
stop string, and any incomplete UTF-8 sequence.

Text is decoded incrementally: decoding the whole output after every token
would make a long generation quadratic in its length. And it is decoded only
as often as something reads it: after every token when there are stop
strings or a listener (``on_text``), every :attr:`Emitter.GUARD_EVERY`
tokens when only the repetition guard reads it, and once at the end
otherwise (a chat model's request without stop strings, not streamed). The
result is the same either way: :meth:`Emitter.finish` catches up, and the
guard's cut does not depend on when it looks.

Two rules decide where a response ends besides EOS, length and stop strings
as given; neither changes which token is sampled, only where the output stops:

- A stop string made only of whitespace (``"\n"``, the end of an answer in
  the exemplar format) counts only once the response has some text: a
  response that opens with a newline is not cut to nothing.
- The **repetition guard** (``repeat_lines``, R): the text is cut into
  segments at line ends and at sentence ends (``.``, ``!`` or ``?`` followed
  by whitespace). When R consecutive complete segments are the same up to
  digits, case, punctuation and spacing ("1. Buy milk" / "2. buy milk." are
  the same; blank segments and bare numbers such as "2." are skipped), the
  response ends after the first of them and the repeats are dropped (finish
  reason ``stop``). A small base model's typical failure -- the same line or
  sentence over and over -- then costs one copy, not the rest of the token
  budget; text that merely repeats a phrase is never cut. Streaming holds back a line while it may
  still turn out to be a repeat, so the streamed pieces always concatenate
  to the final text. ``repeat_lines=0`` (the default here) turns it off; the
  API passes ``DecodingConfig.repeat_lines`` (default 3) except for the
  ``reference`` oracle.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .contract import Tokenizer
from .result import FinishReason

#: Where a segment of the repetition guard ends: a newline, or whitespace after a sentence's end.
_BOUNDARY = re.compile(r"\n|(?<=[.!?])\s")


class Emitter:
    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_new_tokens: int,
        stop: Iterable[str] = (),
        eos_token_ids: Iterable[int] | None = None,
        on_text: Callable[[str], None] | None = None,
        repeat_lines: int = 0,
    ):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop]
        self.repeat_lines = repeat_lines
        # repetition guard state: complete lines before _lines_end are scanned; the current run of equal
        # lines has key _run_key, _run_len lines, and its first line ends (at its newline) at _run_cut
        self._lines_end = 0
        self._run_key: str | None = None
        self._run_len = 0
        self._run_cut = 0
        self._last_cut = 0
        self.eos = frozenset(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._streamed = 0
        self._checked = 0  # tokens[:_checked] are decoded into text and seen by the stop strings and the guard
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
        looks = (  # who reads the text now: stop strings or a listener every token, the guard every GUARD_EVERY
            self.stop
            or self.on_text is not None
            or (self.repeat_lines > 0 and len(self.tokens) - self._checked >= self.GUARD_EVERY)
        )
        if looks and self._check():
            return False
        if len(self.tokens) >= self.max_new_tokens:
            self.finish("length")
            return False
        self._stream(final=False)
        return True

    #: Tokens between two looks at the text when only the repetition guard reads it. Looking later
    #: cuts at the same place (the first line of the run); it only lets up to this many tokens more
    #: be computed after a repeat, against a decode per token.
    GUARD_EVERY = 8

    def _check(self) -> bool:
        """Decode the tokens so far and apply the stop strings and the guard; True when the output ends here."""
        text = self._decode()
        self._checked = len(self.tokens)
        cut = self._stop_at(text) if self.stop else -1
        if self.repeat_lines > 0 and _BOUNDARY.search(text, self._lines_end):
            rep = self._repeat_at(text if cut < 0 else text[:cut])
            if rep >= 0:
                cut = rep
        if cut < 0:
            self.text = text
            return False
        # keep the fewest tokens whose text covers everything before the cut. Compared as text, not
        # lengths: a character split across byte tokens decodes, cut short, to one U+FFFD, which
        # would count as the whole character and leave the tokens ending inside it
        kept = text[:cut]
        while self.tokens and self.tokenizer.decode(self.tokens[:-1]).startswith(kept):
            self.tokens.pop()
        self._checked = len(self.tokens)
        self.text = text[:cut]
        self.finish("stop")
        return True

    def _stop_at(self, text: str) -> int:
        """Where the first stop string starts in ``text`` (-1: none); whitespace-only ones after the first text."""
        began = len(text) - len(text.lstrip())
        if began == len(text):  # nothing but whitespace yet
            began = len(text) + 1
        found = (text.find(s, began if s.isspace() else 0) for s in self.stop)
        return min((i for i in found if i >= 0), default=-1)

    @staticmethod
    def line_key(line: str) -> str:
        """What the repetition guard compares: the line without digits, punctuation, case and spacing."""
        return " ".join(re.sub(r"[\W\d_]+", " ", line).split()).casefold()

    def _repeat_at(self, text: str) -> int:
        """Scan the segments completed since the last call; where to cut when a run reaches ``repeat_lines``."""
        while (m := _BOUNDARY.search(text, self._lines_end)) is not None:
            seg = text[self._lines_end : m.start()]
            self._lines_end = m.end()
            key = self.line_key(seg)
            if not key:
                continue  # blank segments and bare numbers neither count nor break a run
            self._last_cut = m.start()
            if key == self._run_key:
                self._run_len += 1
                if self._run_len >= self.repeat_lines:
                    return self._run_cut
            else:
                self._run_key, self._run_len, self._run_cut = key, 1, m.start()
        return -1

    def _held_by_guard(self, end: int) -> int:
        """Streaming: the end of what can be shown while a line may still become a repeat."""
        if self.repeat_lines <= 0 or self._run_key is None:
            return end
        if self._run_len >= 2:  # segments 2.. of a run that may still reach repeat_lines
            return min(end, self._run_cut)
        tail = self.text[self._lines_end : end]
        if not tail.strip() or self._run_key.startswith(self.line_key(tail)):
            # the current segment may turn out to equal the last one: hold it, and the boundary before it
            return min(end, self._last_cut)
        return end

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
        tail = tok.decode(self.tokens[self._anchor :])
        if tail.startswith(self._anchor_text):
            text = self._head + tail[len(self._anchor_text) :]
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
        """End the output with ``reason``, unless the text not yet looked at ends it first (``stop``)."""
        if self.finish_reason is None:
            if self._checked < len(self.tokens) and self._check():
                return
            self.finish_reason = reason
            self._stream(final=True)

    def _stream(self, *, final: bool) -> None:
        if self.on_text is None:
            return
        end = len(self.text)
        if not final:
            while end > self._streamed and self.text[end - 1] == "\ufffd":
                end -= 1
            end = max(self._streamed, self._held_by_guard(end))
            for s in self.stop:  # hold back a tail that may grow into a stop string
                for n in range(min(len(s) - 1, end - self._streamed), 0, -1):
                    if self.text[end - n : end] == s[:n]:
                        end -= n
                        break
        if end > self._streamed:
            self.on_text(self.text[self._streamed : end])
            self._streamed = end
