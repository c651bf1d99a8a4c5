"""The conformance suite a backend must pass, run from the backend author's own pytest.

    # test_my_backend.py
    import pytest
    from personajudge.testing import BackendConformance

    @pytest.fixture(scope="module")
    def backend():
        return MyBackend(personajudge.BackendConfig(name="mine"))

    class TestMyBackend(BackendConformance):
        pass

pytest collects the inherited ``test_*`` methods. They check what the core
relies on, through the public contract only:

- the tokenizer protocol (types, ids in range, ``add_bos`` keyword), and
  ``decode`` inverts ``encode`` up to normalisation:
  ``encode(decode(encode(x))) == encode(x)``;
- special-token text (``special_texts``, optional, so a tokenizer without
  it passes; what keeps a user's ``"<eos>"`` text): a set of strings with an
  ``encode`` that takes ``special=``; each listed text becomes other ids
  than with ``special=False``, which encodes it as text (ids that decode and
  encode back to themselves, no control token); ``special=False`` changes
  nothing else (same ids, BOS and no appended EOS, on text without
  special-token text); and every text ``encode`` parses into a control token
  in the special-looking test text and the chat template's markers is listed;
- shapes: ``forward`` returns ``(n_logits, V)`` finite rows, ``n_logits = 0``
  feeds without logits;
- row order: each of the ``lambda + 1`` rows of a verification window is the
  logits after its own position (a fresh evaluation of that prefix), in
  position order;
- slips that a comparison with the backend's own fresh evaluations cannot
  see, since they agree with the bug: the last row changes with the last
  token (rows one position behind do not); rows are not probabilities (all
  in [0, 1], summing to 1); ``encode`` keeps every id below ``vocab_size`` on
  accented, non-Latin, emoji, special-looking and long text;
- rollback: after ``truncate`` a view gives the logits a fresh evaluation gives
  (a failure says whether it kept one token too few or too many, or none);
  ``truncate(view, 0)`` empties a view (the engine reuses views so); and
  ``_truncate(view, length before the call)`` undoes a ``_forward_many`` the
  base class rolls back after it raised;
- batching: ``forward_many`` returns one output per call *in the order of the
  calls* (also when they are not in view order), each equal to the same call
  made alone; views never see each other's tokens, not even two views at the
  same length with the same last token (a cache keyed by position and last
  token, shared between views, fails here);
- misuse: the same :class:`SessionError` / :class:`ContextLengthError` on
  every backend (the checks live in the Session base class, so a backend that
  implements ``_forward_many``/``_truncate`` gets them for free);
- the batched judge: :func:`~personajudge.core.batched.judge_rows` on the
  backend's own logits arrays, and what its ``compile_kernel`` makes of it,
  decide rows as the judge does on numpy copies;
- exactness: Persona-judge run through *this* backend, with both loop
  schedules (``interleaved`` and ``windowed``), commits tokens whose law
  equals the one computed independently from the backend's own distributions
  (:mod:`personajudge.testing.exactness`), by chi-square. The checks above do
  not depend on it: a backend that sets ``check_exactness = False`` (a noisy
  one, like llama.cpp's CPU build) is still checked for each of them.

Class attributes tune it for a backend's numerics: ``logits_atol`` for
rollback/fresh agreement, ``batch_tv`` for the largest total-variation
distance allowed between a batched row and the same row computed alone (a
CPU llama.cpp build changes logits slightly with the batch shape), which is
also the least total variation the last-token check asks of some pair of
contexts that differ in their last token. No check compares argmaxes, which a
near-tie could flip: logits within a tolerance, or distributions by total
variation. A failure names the method, what was expected and what came back.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from personajudge.core.arrays import array_namespace, like
from personajudge.core.batched import judge_rows
from personajudge.core.contract import Backend, ForwardCall, Session, Tokenizer, special_texts_of
from personajudge.core.errors import ContextLengthError, PersonaJudgeWarning, PluginError, SessionError
from personajudge.core.transforms import SamplingParams

from .exactness import check_backend_exactness

PROMPT = "The quick brown fox jumps over the lazy dog because"
#: a few words: their tokens are the candidate last tokens of the last-token check
LAST_TOKEN_TEXT = " cat window seven yellow run, the."
#: texts for the round trip of ``decode``: capitals, digits and punctuation a tokenizer may normalise
ROUND_TRIP_TEXTS = (PROMPT, "Once upon a time, in a land far away.", "Hello, World! 42 times, isn't it?")
#: texts whose ids are checked against ``vocab_size`` (only the range: a tokenizer may map what it lacks to
#: an unknown token or drop it): other scripts, emoji, what looks like special tokens, symbols, a long text
TOKENIZER_TEXTS = (
    "Ça va? Naïve café, Straße, ¿qué? — «ok» “quotes” ‘single’ … 3½ °C € £ ¥",
    "日本語のテキスト, 中文, 한국어, Русский текст, ελληνικά, עברית, العربية, हिन्दी",
    "emoji: 😹🎉👍🏽 👨‍👩‍👧 🇫🇷 ✓ ✗ ★",
    "<s> </s> <unk> <pad> <bos> <eos> <|endoftext|> <|im_start|>user [INST] {{x}} <start_of_turn>",
    "tabs\tand\nnewlines\r\n  spaces   ~`!@#$%^&*()_+-=[]{}|;:'\",.<>/?\\ 0123456789",
    " ".join([PROMPT] * 30),
)


def to_numpy(x: Any) -> np.ndarray:
    """A logits array of any backend as float64 numpy (torch tensors included, without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def total_variation(a: Any, b: Any) -> float:
    return float(0.5 * np.abs(softmax(to_numpy(a)) - softmax(to_numpy(b))).sum(axis=-1).max())


def logits_difference(got: Any, want: Any, atol: float, tol: str = "logits_atol") -> str | None:
    """None when ``got`` and ``want`` agree within ``atol`` (numpy's ``assert_allclose`` rule, rtol 1e-7), else
    where and by how much they differ, in words: the largest difference against the tolerance (named ``tol``),
    its row and token id with both values, and the rows' total variation (how far apart the distributions are,
    not only single logits)."""
    g, w = np.atleast_2d(to_numpy(got)), np.atleast_2d(to_numpy(want))
    if g.shape != w.shape:
        return f"got an array of shape {g.shape}, expected {w.shape}"
    if g.size == 0:
        return None
    diff = np.abs(g - w)
    bad = ~(diff <= atol + 1e-7 * np.abs(w))  # NaN counts as a difference
    if not bad.any():
        return None
    diff = np.where(np.isnan(diff), np.inf, diff)
    r, t = np.unravel_index(int(np.argmax(diff)), diff.shape)
    tv = total_variation(g, w) if np.isfinite(g).all() and np.isfinite(w).all() else float("nan")
    return (
        f"the logits differ by up to {diff[r, t]:.3g}, past {tol} = {atol} (row {r}, token id {t}: {g[r, t]:.5g} "
        f"here, {w[r, t]:.5g} expected; {int(bad.sum())} of {bad.size} values differ by more), total variation "
        f"{tv:.3g}"
    )


class BackendConformance:
    """Inherit from this in a ``Test...`` class; a ``backend`` fixture (module or class scope) gives the backend."""

    #: largest |difference| between a rolled-back view's logits and a fresh evaluation's
    logits_atol: float = 1e-3
    #: largest total-variation distance between a batched row and the same row alone
    batch_tv: float = 1e-3
    #: largest |difference| between two runs with the *same* batch shapes (exact on a CPU)
    same_shape_atol: float = 1e-5
    #: whether to run the statistical exactness check (it generates a few thousand short sequences)
    check_exactness: bool = True
    #: rows of the verification window checked row by row (lambda + 1 at the default lambda = 4)
    window_rows: int = 5

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def prompt_ids(backend: Backend, text: str = PROMPT) -> list[int]:
        ids = backend.tokenizer.encode(text, add_bos=True)
        assert ids, "the tokenizer encodes a sentence to no tokens"
        return ids

    @staticmethod
    def fresh(backend: Backend, tokens: Sequence[int], n_logits: int = 1) -> np.ndarray:
        with backend.open(1) as s:
            return to_numpy(s.forward(0, list(tokens), n_logits))

    def assert_logits_close(
        self, got: Any, want: Any, what: str, *, atol: float | None = None, tol: str = "logits_atol", hint: str = ""
    ) -> None:
        """``got`` equals ``want`` within ``atol`` (default ``logits_atol``), else a failure that says which
        comparison it was, where the logits differ, by how much, and (``hint``) what the contract says."""
        atol = self.logits_atol if atol is None else atol
        why = logits_difference(got, want, atol, tol)
        if why is not None:
            raise AssertionError(f"{what}: {why}" + (f"; {hint}" if hint else ""))

    def assert_rows_are_positions(self, backend: Backend, ids: Sequence[int], rows: np.ndarray, how: str) -> None:
        """``rows`` (the last ``len(rows)`` positions of ``ids``) each equal a fresh one-row evaluation of their
        own prefix, within ``batch_tv`` (rows computed together against each computed alone: a CPU llama.cpp
        build moves single logits of a window's rows by more than a unit, not their distributions); a failure
        says which position a misplaced row belongs to."""
        n = rows.shape[0]
        ends = [len(ids) - n + 1 + k for k in range(n)]
        want = [self.fresh(backend, ids[:e])[0] for e in ends]
        err = np.array([[total_variation(r, w) for w in want] for r in rows])
        ok = err <= self.batch_tv
        if ok.diagonal().all():
            return
        rule = (
            f"row k of forward(view, tokens, n_logits={n}) must be the next-token logits after the first "
            f"len(context) - {n} + 1 + k tokens, so the last row is the one after the whole context"
        )
        if n > 1 and ok[np.arange(n), n - 1 - np.arange(n)].all():
            raise AssertionError(f"{how}: forward returned its {n} rows in reverse order (last position first); {rule}")
        k = int(np.flatnonzero(~ok.diagonal())[0])
        j = int(np.argmin(err[k]))
        if ok[k, j]:
            raise AssertionError(
                f"{how}: row {k} of {n} holds the logits of position {ends[j]} (row {j}'s), not of position "
                f"{ends[k]}: the rows are out of order; {rule}"
            )
        raise AssertionError(
            f"{how}: row {k} of {n} differs from a fresh one-row evaluation of the first {ends[k]} tokens "
            f"(total variation {err[k, k]:.3g} > batch_tv = {self.batch_tv}) and matches no other position"
        )

    def assert_outputs_follow_calls(self, backend: Backend, calls: Sequence[ForwardCall], outs: Sequence[Any]) -> None:
        """Each output of a ``forward_many`` in a fresh session equals the same call made alone (within
        ``batch_tv``); an output that is another call's says the list came back out of call order."""
        assert len(outs) == len(calls), f"forward_many returned {len(outs)} outputs for {len(calls)} calls"
        fresh = [self.fresh(backend, c.tokens, c.n_logits) for c in calls]
        got = [to_numpy(o) for o in outs]
        tv = np.array([[total_variation(o, f) if o.shape == f.shape else np.inf for f in fresh] for o in got])
        views = [c.view for c in calls]
        for i, c in enumerate(calls):
            if tv[i, i] <= self.batch_tv:
                continue
            j = int(np.argmin(tv[i]))
            if j != i and tv[i, j] <= self.batch_tv:
                raise AssertionError(
                    f"forward_many returned its outputs out of call order: the calls were for views {views}, in this "
                    f"order, and output {i} (the call for view {c.view}) holds the logits of the call for view "
                    f"{calls[j].view}. Return one output per call in the order of the calls, not sorted by view "
                    "or reversed"
                )
            raise AssertionError(
                f"forward_many's output {i} (the call for view {c.view}) differs from the same call made alone in "
                f"a fresh session: total variation {tv[i, i]:.3g} > batch_tv = {self.batch_tv}"
            )

    # -- the tokenizer ---------------------------------------------------------------------------

    def test_tokenizer_protocol(self, backend: Backend) -> None:
        tok = backend.tokenizer
        assert isinstance(tok, Tokenizer), "the tokenizer lacks vocab_size, eos_token_ids, encode, decode, ..."
        assert isinstance(tok.vocab_size, int) and tok.vocab_size > 1, (
            f"tokenizer.vocab_size must be an int > 1 (the number of token ids), got {tok.vocab_size!r}"
        )
        assert isinstance(tok.eos_token_ids, frozenset) and tok.eos_token_ids, "eos_token_ids: a non-empty frozenset"
        bad_eos = [t for t in tok.eos_token_ids if not (isinstance(t, int) and 0 <= t < tok.vocab_size)]
        assert not bad_eos, (
            f"tokenizer.eos_token_ids holds {bad_eos[:5]}, not ints in 0..vocab_size-1 = 0..{tok.vocab_size - 1}"
        )
        assert tok.chat_template is None or isinstance(tok.chat_template, str), (
            f"tokenizer.chat_template must be a str or None, got {type(tok.chat_template).__name__}"
        )
        with_bos = tok.encode(PROMPT, add_bos=True)
        without = tok.encode(PROMPT, add_bos=False)
        self.assert_ids_in_vocabulary(tok, PROMPT, with_bos, "add_bos=True")
        self.assert_ids_in_vocabulary(tok, PROMPT, without, "add_bos=False")
        assert len(with_bos) >= len(without) > 0, (
            f"encode({PROMPT!r}) gave {len(with_bos)} ids with add_bos=True and {len(without)} with add_bos=False; "
            "expected at least one id, and add_bos=True adding (at most) a BOS, never dropping ids"
        )
        text = tok.decode(without)
        assert isinstance(text, str) and text.strip(), (
            f"decode(encode({PROMPT!r}, add_bos=False)) returned {text!r}; expected the text back (a non-empty str)"
        )

    @staticmethod
    def assert_ids_in_vocabulary(tok: Tokenizer, text: str, ids: Sequence[Any], how: str) -> None:
        """Every id ``encode`` returns is an int below ``vocab_size``: the core refuses a larger one as a prompt
        error that blames the user's prompt, and the model has no row for it."""
        for i, t in enumerate(ids):
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool):
                raise AssertionError(
                    f"encode({text!r:.80}, {how}) returned {t!r} (a {type(t).__name__}) at index {i}; "
                    "token ids are ints"
                )
            if not 0 <= t < tok.vocab_size:
                raise AssertionError(
                    f"encode({text!r:.80}, {how}) returned id {t} at index {i}, outside 0..vocab_size-1 = "
                    f"0..{tok.vocab_size - 1}: vocab_size must count every id the tokenizer can return (read "
                    "from the model's vocabulary, not one less or a config field that counts something else); "
                    "such a prompt is refused as a prompt error that blames the user"
                )

    def test_encode_returns_ids_in_the_vocabulary(self, backend: Backend) -> None:
        """Every id of every text a user may send -- punctuation, accents, other scripts, emoji, markup that
        looks like special tokens, long text -- is below ``vocab_size`` (the prompt test sentence is letters
        only, and a tokenizer's highest ids are often its rare characters)."""
        tok = backend.tokenizer
        for text in ROUND_TRIP_TEXTS + TOKENIZER_TEXTS:
            for add_bos in (True, False):
                self.assert_ids_in_vocabulary(tok, text, tok.encode(text, add_bos=add_bos), f"add_bos={add_bos}")

    def test_decode_inverts_encode(self, backend: Backend) -> None:
        """``encode(decode(encode(x))) == encode(x)``: normalisation (lower case, unknown characters) is
        allowed, losing or changing tokens is not -- the emitter, stop strings and every text a user sees
        come from ``decode``."""
        tok = backend.tokenizer
        for x in ROUND_TRIP_TEXTS:
            ids = list(tok.encode(x, add_bos=False))
            text = tok.decode(ids)
            again = list(tok.encode(text, add_bos=False))
            if again != ids:
                k = next((i for i, (u, v) in enumerate(zip(ids, again)) if u != v), min(len(ids), len(again)))
                raise AssertionError(
                    f"decode is not the inverse of encode: ids = encode({x!r}) ({len(ids)} ids) decode to "
                    f"{text!r}, which encodes to {len(again)} ids, different from index {k} on. decode(ids) must "
                    "give back text that encodes to the same ids (up to normalisation): no token dropped, "
                    "shifted or replaced"
                )

    # -- special-token text ----------------------------------------------------------------------

    @staticmethod
    def special_texts(backend: Backend) -> frozenset[str] | None:
        """The tokenizer's ``special_texts`` checked as the core checks them when a backend loads (a failure
        with the core's message), or None for a tokenizer that has no such attribute (it is optional)."""
        tok = backend.tokenizer
        if getattr(tok, "special_texts", None) is None:
            return None
        try:
            return special_texts_of(tok, f"tokenizer {type(tok).__qualname__}")
        except PluginError as err:
            raise AssertionError(str(err)) from None

    def test_special_texts_are_encoded_as_text_with_special_false(self, backend: Backend) -> None:
        """Each text of ``special_texts`` is one ``encode`` turns into control tokens: ``encode(t)`` and
        ``encode(t, special=False)`` differ, and the latter is text (ids that decode and encode back to
        themselves: a control token, which ``decode`` skips, would not come back). The API relies on both
        to keep a user's ``"<eos>"`` from ending the context (:class:`~personajudge.preferences.encoders.UserText`)."""
        texts = self.special_texts(backend)
        if not texts:  # optional: a tokenizer that lists none has its users' text encoded as it is
            return
        tok: Any = backend.tokenizer
        for t in sorted(texts):
            parsed = list(tok.encode(t, add_bos=False))
            plain = list(tok.encode(t, add_bos=False, special=False))
            if parsed == plain:
                shown = tok.decode(plain)
                why = (
                    "encode ignores special=False: the ids decode to "
                    f"{shown!r}, so they hold a control token a user's text must never become"
                    if not shown.strip()
                    else f"encode does not parse {t!r} into a control token (both decode to {shown!r}): list only "
                    "the texts encode turns into control tokens, or parse them when special=True"
                )
                raise AssertionError(
                    f"special_texts lists {t!r}, but encode({t!r}, add_bos=False) gives the same ids {parsed[:8]} "
                    f"with special=True and special=False; {why}"
                )
            shown = tok.decode(plain)
            again = list(tok.encode(shown, add_bos=False, special=False))
            if again != plain or (t.strip() and not shown.strip()):
                raise AssertionError(
                    f"encode({t!r}, add_bos=False, special=False) gave {plain[:8]}, which decode to {shown!r}, "
                    f"which encodes (special=False) to {again[:8]}: special=False must encode a listed text as "
                    "plain text (not dropped, and no control token, which decode would drop)"
                )

    def test_special_false_changes_nothing_else(self, backend: Backend) -> None:
        """On text without special-token text, ``encode(x, add_bos=b, special=False)`` is ``encode(x,
        add_bos=b)``: the same BOS and no EOS appended (the API encodes the user's part of a prompt with
        ``special=False`` and the rest as usual, and joins them)."""
        texts = self.special_texts(backend)
        if not texts:  # optional: a tokenizer that lists none need not take special=
            return
        tok: Any = backend.tokenizer
        for x in ROUND_TRIP_TEXTS + TOKENIZER_TEXTS:
            if any(t in x for t in texts):
                continue
            for add_bos in (True, False):
                want = list(tok.encode(x, add_bos=add_bos))
                got = list(tok.encode(x, add_bos=add_bos, special=False))
                if got != want:
                    k = next((i for i, (u, v) in enumerate(zip(want, got)) if u != v), min(len(want), len(got)))
                    tail = " (an EOS appended)" if got[len(want) :] and got[-1] in tok.eos_token_ids else ""
                    raise AssertionError(
                        f"encode({x!r:.60}, add_bos={add_bos}, special=False) gave {len(got)} ids, "
                        f"encode({x!r:.60}, add_bos={add_bos}) {len(want)}, different from index {k} on{tail}; "
                        "special=False must change only how special_texts are encoded: the same ids elsewhere, "
                        "the same BOS with add_bos, and no EOS a post-processor would append"
                    )

    def test_special_texts_list_every_control_text_encode_parses(self, backend: Backend) -> None:
        """Every control token ``encode`` parses out of text a user may send (the special-looking test text)
        or the chat template writes (its markers) comes from a listed text: a piece of that text between the
        listed ones encodes the same with ``special=False``. An unlisted one would end a user's prompt or
        turn (``"<eos>"`` parsed into EOS) whatever the API does."""
        texts = self.special_texts(backend)
        if texts is None:  # optional: a tokenizer that declares nothing is encoded as it is
            return
        tok: Any = backend.tokenizer
        try:
            tok.encode("a", add_bos=False, special=False)
        except TypeError:  # an empty special_texts needs no special= keyword: nothing to compare with
            return
        probes = [t for t in TOKENIZER_TEXTS if "<" in t]
        if tok.chat_template:
            turns = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"}]
            probes.append(tok.apply_chat_template([*turns, {"role": "user", "content": "Bye"}]))
        listed = re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))) if texts else None

        def parsed(text: str) -> bool:
            return list(tok.encode(text, add_bos=False)) != list(tok.encode(text, add_bos=False, special=False))

        for x in probes:
            for piece in listed.split(x) if listed else [x]:
                if not piece or not parsed(piece):
                    continue
                culprit = next((w for w in piece.split() if parsed(w)), piece)  # the word, where one alone is
                where = "the chat template's rendering" if x is probes[-1] and tok.chat_template else "the text"
                raise AssertionError(
                    f"encode parses {culprit!r:.80} (in {where} {x!r:.80}) into other ids with special=True than "
                    f"with special=False, but special_texts ({len(texts)} texts) does not list it: a user's text "
                    "holding it becomes a control token. List every text encode turns into a control token "
                    "(e.g. '<eos>', '<end_of_turn>')"
                )

    # -- shapes and feeding --------------------------------------------------------------------------

    def test_forward_returns_one_finite_row_per_requested_position(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        n = min(3, len(ids))
        vocab = backend.tokenizer.vocab_size
        with backend.open(1) as s:
            out = to_numpy(s.forward(0, ids, n))
            assert out.ndim == 2 and out.shape[0] == n and out.shape[1] >= vocab, (
                f"forward(view, {len(ids)} tokens, n_logits={n}) returned shape {out.shape}; expected ({n}, >= {vocab})"
            )
            assert np.isfinite(out).all(), (
                f"forward(view, {len(ids)} tokens, n_logits={n}) returned {int((~np.isfinite(out)).sum())} NaN or "
                "infinite logits; every logit must be finite"
            )
            assert s.length(0) == len(ids), f"length(view) is {s.length(0)} after feeding {len(ids)} tokens"
            fed = to_numpy(s.forward(0, ids[:1], 0))
            assert fed.shape[0] == 0, f"forward(view, tokens, n_logits=0) returned {fed.shape[0]} rows, expected none"
            assert s.length(0) == len(ids) + 1, (
                f"length(view) is {s.length(0)} after feeding {len(ids)} tokens, then 1 with n_logits=0"
            )

    def test_forward_returns_logits_not_probabilities(self, backend: Backend) -> None:
        """Rows that are all in [0, 1] and sum to 1 are probabilities (a model's or server's softmax output):
        the core applies its own temperature and softmax, so probabilities as logits sample from an almost
        uniform distribution, with no error anywhere. Log-probabilities are logits (up to a constant per row)."""
        ids = self.prompt_ids(backend)
        rows = self.fresh(backend, ids, min(3, len(ids)))
        sums = rows.sum(axis=-1)
        if rows.size and (rows >= 0).all() and (rows <= 1).all() and np.allclose(sums, 1.0, rtol=0, atol=1e-3):
            raise AssertionError(
                f"forward returned probabilities, not logits: every value of its {rows.shape[0]} rows is in "
                f"[0, 1] and each row sums to 1 (sums {np.round(sums, 4).tolist()}). Return logits (or "
                "log-probabilities): the sampler applies its own softmax, so probabilities give a near-uniform "
                "distribution"
            )

    def test_the_last_row_depends_on_the_last_token(self, backend: Backend) -> None:
        """Contexts that differ only in their last token get different last rows. The other checks compare
        the backend with fresh evaluations *by the same backend*, so rows that all lag one position behind
        (the classic ``logits[-n - 1:-1]`` slip) agree with every one of them; here, such rows are the same
        whatever the last token is, because the model never sees it. Several candidate last tokens, compared
        as distributions (total variation, not argmax: no near-tie can decide it): a non-degenerate model
        moves its next-token distribution by far more than ``batch_tv`` for at least one of them."""
        ids = self.prompt_ids(backend)
        assert len(ids) >= 2, "the tokenizer encodes the test sentence to fewer than 2 tokens"
        base = ids[:-1]
        cands = list(dict.fromkeys([ids[-1], *backend.tokenizer.encode(LAST_TOKEN_TEXT, add_bos=False)]))[:6]
        assert len(cands) >= 3, f"the tokenizer encodes {LAST_TOKEN_TEXT!r} to fewer than 3 distinct ids"
        one_call = [self.fresh(backend, base + [t])[0] for t in cands]
        window = [self.fresh(backend, base + [t], 2)[-1] for t in cands]  # the last row of a two-row window
        tok = backend.tokenizer
        for how, rows in (("forward(view, tokens, 1)", one_call), ("the last row of forward(view, tokens, 2)", window)):
            tv = max(total_variation(rows[i], rows[j]) for i in range(len(rows)) for j in range(i))
            if tv <= self.batch_tv:
                raise AssertionError(
                    f"{how} gave the same next-token distribution for {len(cands)} contexts that differ only in "
                    f"their last token (ids {cands}, {[tok.decode([t]) for t in cands]!r}): largest total "
                    f"variation {tv:.3g} <= batch_tv = {self.batch_tv}. The last row does not depend on the last "
                    "token: are the rows one position behind? Row k of n must be the logits *after* position "
                    "len(context) - n + k, the last token included (logits[-n:], not logits[-n - 1:-1])"
                )

    def test_feed_without_logits_then_one_row_equals_one_call(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        with backend.open(1) as s:
            s.forward(0, ids[:-1], 0)
            split = to_numpy(s.forward(0, ids[-1:], 1))
        self.assert_logits_close(
            split,
            self.fresh(backend, ids),
            f"forward(view, first {len(ids) - 1} tokens, n_logits=0) then forward(view, last token, 1) against "
            f"one forward(view, all {len(ids)} tokens, 1)",
            hint="tokens fed with n_logits=0 must still enter the view's context",
        )

    def test_last_rows_are_the_last_positions(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        rows = self.fresh(backend, ids, 2)
        self.assert_logits_close(
            rows[-1],
            self.fresh(backend, ids)[0],
            f"row 1 (the last) of forward(view, {len(ids)} tokens, n_logits=2) against the only row of "
            f"forward(view, the same tokens, 1)",
            hint="both are the logits after the whole context",
        )
        self.assert_logits_close(
            rows[0],
            self.fresh(backend, ids[:-1])[0],
            f"row 0 of forward(view, {len(ids)} tokens, n_logits=2) against forward(view, the first "
            f"{len(ids) - 1} tokens, 1)",
            hint="row 0 of 2 is the logits after all but the last token",
        )

    def test_every_row_of_a_window_is_its_own_position(self, backend: Backend) -> None:
        """The ``lambda + 1`` rows the windowed schedule verifies a draft with, each against a fresh
        evaluation of its own prefix: whole context in one call, and a window fed after a prefix."""
        ids = self.prompt_ids(backend)
        assert len(ids) >= 2, "the tokenizer encodes the test sentence to fewer than 2 tokens"
        n = min(self.window_rows, len(ids) - 1)
        with backend.open(1) as s:
            whole = to_numpy(s.forward(0, ids, n))
        with backend.open(1) as s:
            s.forward(0, ids[:-n], 1)
            window = to_numpy(s.forward(0, ids[-n:], n))
        self.assert_rows_are_positions(backend, ids, whole, f"one call with n_logits={n}")
        self.assert_rows_are_positions(backend, ids, window, f"a window of {n} tokens fed after a prefix")

    # -- rollback ------------------------------------------------------------------------------------

    def test_truncate_then_refeed_equals_fresh(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        other = self.prompt_ids(backend, " and then the cat sat on the mat")[1:] or ids[1:]
        keep = max(1, len(ids) - 2)
        with backend.open(1) as s:
            s.forward(0, ids, 1)
            s.forward(0, other, 1)
            s.truncate(0, keep)
            assert s.length(0) == keep, f"length(view) is {s.length(0)} after truncate(view, {keep})"
            again = to_numpy(s.forward(0, ids[keep:], 1))
        why = logits_difference(again, self.fresh(backend, ids), self.logits_atol)
        if why is None:
            return
        # which context did the view hold? name the slip, not only the numbers
        held = {
            f"kept {keep - 1} tokens (one too few)": ids[: keep - 1] + ids[keep:],
            f"kept {keep + 1} tokens (one too many)": ids[: keep + 1] + ids[keep:],
            "dropped nothing": ids + other + ids[keep:],
        }
        for slip, ctx in held.items():
            if ctx and logits_difference(again, self.fresh(backend, ctx), self.logits_atol) is None:
                raise AssertionError(
                    f"truncate(view, {keep}) {slip}: feeding the dropped tokens again gave the logits of that "
                    f"context, not of the first {len(ids)} tokens ({why}). truncate(view, k) keeps exactly the "
                    "first k tokens"
                )
        raise AssertionError(
            f"after feeding {len(ids) + len(other)} tokens, truncate(view, {keep}) and feeding the {len(ids) - keep} "
            f"dropped prompt tokens again, the logits differ from a fresh evaluation of the prompt: {why} > "
            f"logits_atol = {self.logits_atol}"
        )

    def test_truncate_to_zero_empties_the_view(self, backend: Backend) -> None:
        """``truncate(view, 0)`` forgets every token: the engine empties a finished request's views this way
        and hands them to the next request, which would otherwise decode after the previous one's tokens, with
        no error (``[:length or None]`` keeps everything for 0). Compared with a fresh session within
        ``logits_atol``, whatever ``check_exactness`` says."""
        old = self.prompt_ids(backend)
        new = self.prompt_ids(backend, "Once upon a time, in a land far away")
        n = min(self.window_rows, len(new))
        with backend.open(2) as s:
            s.forward_many([ForwardCall(0, old, 1), ForwardCall(1, new, 1)])
            s.truncate(0, 0)
            assert s.length(0) == 0, f"length(view) is {s.length(0)} after truncate(view, 0)"
            got = to_numpy(s.forward(0, new, n))
        why = logits_difference(got, self.fresh(backend, new, n), self.logits_atol)
        if why is None:
            return
        if logits_difference(got, self.fresh(backend, old + new, n), self.logits_atol) is None:
            raise AssertionError(
                f"truncate(view, 0) left the view's {len(old)} tokens in place: feeding {len(new)} new tokens after "
                "it gave the logits of the old tokens followed by the new ones, not of the new ones alone "
                f"({why}). truncate(view, 0) must empty the view (the engine reuses a finished request's views "
                "this way; a `[:length or None]` slice or an `if length:` guard skips it)"
            )
        raise AssertionError(
            f"after truncate(view, 0), feeding {len(new)} tokens gave logits that differ from a fresh session fed "
            f"the same tokens: {why}. truncate(view, 0) must leave the view as "
            "a fresh one"
        )

    def test_truncate_undoes_a_forward_many_that_failed(self, backend: Backend) -> None:
        """When ``_forward_many`` raises (or returns outputs the base class refuses), the ``Session`` base
        class calls ``_truncate(view, length before the call)`` for each of its views, ``self.length(view)``
        still being that length; the engine then retries the same tokens request by request. This runs those
        steps directly, as the base class does (no failure needs injecting): the calls written in full (the
        outputs refused) and written for one view only (a failure partway), then the retry."""
        a = self.prompt_ids(backend)
        b = self.prompt_ids(backend, "Once upon a time, in a land far away")
        cont = self.prompt_ids(backend, "to be or not to be that is the question")[1:6] or a[1:3]
        retry = [ForwardCall(0, cont, 1), ForwardCall(1, cont, 1)]
        with backend.open(2) as s:
            s.forward_many([ForwardCall(0, a, 1), ForwardCall(1, b, 1)])
            before = [s.length(0), s.length(1)]
            for written in (retry, retry[:1]):
                s._forward_many(list(written))
                for v in (0, 1):
                    s._truncate(v, before[v])
            got = [to_numpy(x) for x in s.forward_many(retry)]
        with backend.open(2) as s:  # the same calls, without the undone ones
            s.forward_many([ForwardCall(0, a, 1), ForwardCall(1, b, 1)])
            want = [to_numpy(x) for x in s.forward_many(retry)]
        for v in (0, 1):
            why = logits_difference(got[v], want[v], self.logits_atol)
            if why is None:
                continue
            # view 0 was written twice before the retry, view 1 once: the undone tokens kept, the retry on top
            times = 0
            for k in (2, 3):
                ctx = [a, b][v] + cont * (k - 1)
                if logits_difference(got[v], self.fresh(backend, ctx + cont), self.logits_atol) is None:
                    times = k
            raise AssertionError(
                f"_truncate(view, length) did not undo a _forward_many that the base class rolled back: view {v} "
                f"held {before[v]} tokens, a _forward_many wrote {len(cont)} more, _truncate({v}, {before[v]}) "
                f"followed (what the Session base class does when _forward_many raises), and retrying the same "
                "tokens gave "
                + (
                    f"the logits of a context holding them {times} times: the undone tokens stayed"
                    if times
                    else "other logits"
                )
                + f" ({why}). _truncate must drop whatever part of the call was "
                "written even though self.length(view) still says the length before the call (a _truncate that "
                "returns early when length >= self.length(view) skips it), and do nothing where nothing was written"
            )

    # -- batching and isolation -----------------------------------------------------------------------

    def test_forward_many_equals_calls_one_by_one(self, backend: Backend) -> None:
        a = self.prompt_ids(backend)
        b = self.prompt_ids(backend, "Once upon a time, in a land far away")
        with backend.open(2) as s:
            both = s.forward_many([ForwardCall(0, a, 1), ForwardCall(1, b, 2)])
        assert len(both) == 2 and to_numpy(both[1]).shape[0] == 2, (
            f"forward_many of 2 calls (1 and 2 rows) returned {len(both)} outputs of "
            f"{[to_numpy(x).shape[0] for x in both]} rows"
        )
        assert total_variation(both[0], self.fresh(backend, a)) <= self.batch_tv, (
            f"forward_many's output 0 (view 0, {len(a)} tokens, 1 row) differs from the same call made alone in a "
            f"fresh session by more than batch_tv = {self.batch_tv} in total variation"
        )
        assert total_variation(both[1], self.fresh(backend, b, 2)) <= self.batch_tv, (
            f"forward_many's output 1 (view 1, {len(b)} tokens, 2 rows) differs from the same call made alone in a "
            f"fresh session by more than batch_tv = {self.batch_tv} in total variation"
        )

    def test_forward_many_returns_outputs_in_call_order(self, backend: Backend) -> None:
        """Calls not in view order, all with the same number of rows (so shapes cannot tell them apart):
        output i belongs to call i."""
        texts = ("A completely different sentence", "The quick brown fox", "Numbers like one two")
        ctxs = [self.prompt_ids(backend, t) for t in texts]
        for order in ((2, 1, 0), (1, 2, 0)):
            calls = [ForwardCall(v, ctxs[v], 2) for v in order]
            with backend.open(3) as s:
                outs = s.forward_many(calls)
            self.assert_outputs_follow_calls(backend, calls, outs)

    def test_views_do_not_see_each_others_tokens(self, backend: Backend) -> None:
        a = self.prompt_ids(backend)
        b = self.prompt_ids(backend, "Completely different words here")
        with backend.open(3) as s:
            s.forward(1, b, 1)
            s.forward(2, b + a, 1)
            got = to_numpy(s.forward(0, a, 1))
            s.truncate(2, 1)
            got_after = to_numpy(s.forward(0, a[-1:], 1))
        assert total_variation(got, self.fresh(backend, a)) <= self.batch_tv, (
            f"view 0's logits, fed {len(a)} tokens while views 1 and 2 held other tokens, differ from a fresh "
            f"session's by more than batch_tv = {self.batch_tv} in total variation: views see each other's tokens"
        )
        assert total_variation(got_after, self.fresh(backend, a + a[-1:])) <= self.batch_tv, (
            f"after truncate(2, 1) on another view, view 0's next logits differ from a fresh session's by more "
            f"than batch_tv = {self.batch_tv} in total variation: truncating one view changed another"
        )

    def test_views_at_one_position_with_one_last_token_stay_apart(self, backend: Backend) -> None:
        """Two views of one session at the same length, ending in the same token, different before it: each
        gets the logits of its own context (a cache keyed by position and last token and shared between the
        session's views fails here)."""
        a = self.prompt_ids(backend)
        b = self.prompt_ids(backend, "Once upon a time, in a land far away, there lived")
        n = min(len(a), len(b))
        a, b = a[:n], b[: n - 1] + a[n - 1 : n]
        assert n >= 2 and a[:-1] != b[:-1], "the tokenizer encodes two different sentences to the same tokens"
        fresh = [self.fresh(backend, a), self.fresh(backend, b)]
        with backend.open(2) as s:
            one_by_one = [to_numpy(s.forward(0, a, 1)), to_numpy(s.forward(1, b, 1))]
        with backend.open(2) as s:
            batched = [to_numpy(x) for x in s.forward_many([ForwardCall(0, a, 1), ForwardCall(1, b, 1)])]
        for how, got in (("one forward per view", one_by_one), ("one forward_many", batched)):
            for v in (0, 1):
                d = total_variation(got[v], fresh[v])
                if d <= self.batch_tv:
                    continue
                if total_variation(got[v], fresh[1 - v]) <= self.batch_tv:
                    raise AssertionError(
                        f"{how}: view {v} got the logits of view {1 - v}'s context. The two views hold {n} tokens "
                        "each, ending in the same token, with different tokens before it: a cache or KV state "
                        "keyed by (position, last token), or otherwise shared between a session's views, hands "
                        "one view's logits to another. Keep such state per view (or key it by the whole prefix)"
                    )
                raise AssertionError(
                    f"{how}: view {v}'s logits differ from a fresh evaluation of its own tokens (total variation "
                    f"{d:.3g} > batch_tv = {self.batch_tv}) while view {1 - v} holds as many tokens ending in the "
                    "same token: state leaks between the session's views"
                )

    def test_rejected_tokens_leave_no_trace(self, backend: Backend) -> None:
        """Keep 2 of 5 verified tokens: what the 3 rejected ones were must not matter (same shapes: exact)."""
        ids = self.prompt_ids(backend)
        cont = self.prompt_ids(backend, "to be or not to be that is the question")[1:8]
        vocab = backend.tokenizer.vocab_size
        results = []
        for junk in (cont[2:5], [(t * 7 + 3) % vocab for t in cont[2:5]]):
            with backend.open(1) as s:
                s.forward(0, ids, 1)
                s.forward(0, cont[:2] + junk, 5)
                s.truncate(0, len(ids) + 2)
                s.truncate(0, len(ids) + 2)  # idempotent
                results.append(to_numpy(s.forward(0, cont[5:7], 2)))
        self.assert_logits_close(
            results[1],
            results[0],
            "two sessions that differ only in the 3 tokens rolled back by truncate (same calls, same shapes)",
            atol=self.same_shape_atol,
            tol="same_shape_atol",
            hint="tokens dropped by truncate must leave no trace in later logits (a KV cache not cleared past "
            "the truncation point, or state kept outside it)",
        )

    def test_other_views_content_does_not_matter(self, backend: Backend) -> None:
        """Same batch shape, different tokens in every other view: a view's logits must not change."""
        texts = ("The quick brown fox", "A completely different sentence", "Numbers like one two three")
        ctxs = [self.prompt_ids(backend, t) for t in texts]

        def calls(contexts):
            return [ForwardCall(v, c, 1) for v, c in enumerate(contexts)]

        def run(contexts):
            with backend.open(3) as s:
                return [to_numpy(x) for x in s.forward_many(calls(contexts))]

        base = run(ctxs)
        # an output list in the wrong order would change "view v" below with the other views' tokens too:
        # say so, rather than blame isolation
        self.assert_outputs_follow_calls(backend, calls(ctxs), base)
        for v in range(3):
            scrambled = [c if w == v else list(reversed(c)) for w, c in enumerate(ctxs)]
            self.assert_logits_close(
                run(scrambled)[v],
                base[v],
                f"forward_many of 3 calls, view {v}'s output when only the other views' tokens changed",
                atol=self.same_shape_atol,
                tol="same_shape_atol",
                hint="views see each other's tokens (a KV cache or batch state shared between views)",
            )

    # -- misuse: one exception type per mistake, on every backend -------------------------------------

    def test_misuse_raises_the_contract_errors(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        s: Session = backend.open(2)
        try:
            for what, bad in (
                ("forward on view 2 of a 2-view session", lambda: s.forward(2, ids)),
                ("forward on view -1", lambda: s.forward(-1, ids)),
                ("forward with no tokens", lambda: s.forward(0, [])),
                ("forward with n_logits above the number of tokens", lambda: s.forward(0, ids, len(ids) + 1)),
                (
                    "forward with a token id past the vocabulary",
                    lambda: s.forward(0, [backend.tokenizer.vocab_size + 10**6]),
                ),
                ("forward_many with two calls on one view", lambda: s.forward_many([(0, ids, 1), (0, ids, 1)])),
                ("truncate to a negative length", lambda: s.truncate(0, -1)),
                ("length of view 5", lambda: s.length(5)),
            ):
                self.assert_raises(what, SessionError, bad)
            assert s.length(0) == 0 and s.length(1) == 0, (
                f"the refused calls fed tokens: lengths {s.length(0)}, {s.length(1)}, expected 0, 0"
            )
        finally:
            s.close()
        self.assert_raises("forward on a closed session", SessionError, lambda: s.forward(0, ids))

    @staticmethod
    def assert_raises(what: str, error: type[Exception], call: Any) -> None:
        """``call()`` raises ``error``; else a failure naming the misuse and what happened instead."""
        try:
            call()
        except error:
            return
        except Exception as err:
            raise AssertionError(
                f"{what} raised {type(err).__name__} ({err}), not {error.__name__}: the Session base class raises "
                "it; a backend that overrides forward, forward_many, truncate or length skips its checks"
            ) from err
        raise AssertionError(
            f"{what} raised nothing; expected {error.__name__} (from the Session base class's checks: does the "
            "backend override forward, forward_many, truncate or length?)"
        )

    def test_context_overflow_is_a_context_length_error(self, backend: Backend) -> None:
        with backend.open(1) as s:
            too_long = [self.prompt_ids(backend)[0]] * (backend.context_length + 1)
            self.assert_raises(
                f"forward of {len(too_long)} tokens into a view of context_length {backend.context_length}",
                ContextLengthError,
                lambda: s.forward(0, too_long, 1),
            )
            assert s.length(0) == 0, f"a refused overflow fed tokens: length(view) is {s.length(0)}, expected 0"

    # -- the compiled judge ---------------------------------------------------------------------------

    def test_the_batched_judge_decides_this_backends_rows(self, backend: Backend) -> None:
        """``judge_rows`` on the backend's own logits arrays, and what its ``compile_kernel`` makes of it,
        decide every row as ``judge_rows`` does on numpy copies of them."""
        compile_kernel = getattr(backend, "compile_kernel", None)  # a duck-typed backend may lack it
        kernel = judge_rows if compile_kernel is None else compile_kernel(judge_rows)
        g = np.random.default_rng(0)
        ids = self.prompt_ids(backend)
        with warnings.catch_warnings(), backend.open(4) as s:
            warnings.simplefilter("error", PersonaJudgeWarning)  # a kernel that falls back to eager fails here
            rows = s.forward_many([(v, ids[: max(1, len(ids) - v)], 1) for v in range(4)])
            xp = array_namespace(rows[0])
            p, q = xp.concat(rows[:2], axis=0), xp.concat(rows[2:], axis=0)
            p_np, q_np = (to_numpy(x).astype(np.float32) for x in (p, q))
            # the second settings change the support's size: a compiled kernel's shapes turn symbolic there
            for params in (SamplingParams(), SamplingParams(1.0, 5, 1.0), SamplingParams(1.0, 0, 0.95)):
                for _ in range(4):
                    u_np = g.random((2, 3))
                    u = like(p, u_np, xp.float64)
                    want = judge_rows(p_np, q_np, params, u_np[:, 0], u_np[:, 1], u_np[:, 2])
                    for name, fn in (("judge_rows", judge_rows), ("compile_kernel's judge", kernel)):
                        got = to_numpy(fn(p, q, params, u[:, 0], u[:, 1], u[:, 2]))
                        assert np.array_equal(got, want), f"{params}: {name} decided {got}, on numpy {want}"

    # -- exactness ------------------------------------------------------------------------------------

    def test_persona_judge_is_exact_on_this_backend(self, backend: Backend) -> None:
        if not self.check_exactness:
            pytest.skip("check_exactness = False on this conformance class")
        # interleaved steps ask for one or two rows, windowed ones for lambda + 1: both schedules make the same
        # decisions on a conforming backend
        for schedule in ("interleaved", "windowed"):
            p_value, control_p = check_backend_exactness(backend, schedule=schedule)
            assert p_value > 1e-3, (
                f"schedule={schedule!r}: committed tokens do not follow the judge's law (chi-square p = {p_value:.2e})"
            )
            assert control_p < 1e-3, (
                f"schedule={schedule!r}: the negative control was not rejected (p = {control_p:.2e}): "
                "the check has no power"
            )
