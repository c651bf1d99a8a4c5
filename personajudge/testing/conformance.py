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
- shapes: ``forward`` returns ``(n_logits, V)`` finite rows, ``n_logits = 0``
  feeds without logits;
- row order: each of the ``lambda + 1`` rows of a verification window is the
  logits after its own position (a fresh evaluation of that prefix), in
  position order;
- rollback: after ``truncate`` a view gives the logits a fresh evaluation gives;
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
CPU llama.cpp build changes logits slightly with the batch shape).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from personajudge.core.arrays import array_namespace, like
from personajudge.core.batched import judge_rows
from personajudge.core.contract import Backend, ForwardCall, Session, Tokenizer
from personajudge.core.errors import ContextLengthError, PersonaJudgeWarning, SessionError
from personajudge.core.transforms import SamplingParams

from .exactness import check_backend_exactness

PROMPT = "The quick brown fox jumps over the lazy dog because"
#: texts for the round trip of ``decode``: capitals, digits and punctuation a tokenizer may normalise
ROUND_TRIP_TEXTS = (PROMPT, "Once upon a time, in a land far away.", "Hello, World! 42 times, isn't it?")


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
        assert isinstance(tok.vocab_size, int) and tok.vocab_size > 1
        assert isinstance(tok.eos_token_ids, frozenset) and tok.eos_token_ids, "eos_token_ids: a non-empty frozenset"
        assert all(isinstance(t, int) and 0 <= t < tok.vocab_size for t in tok.eos_token_ids)
        assert tok.chat_template is None or isinstance(tok.chat_template, str)
        with_bos = tok.encode(PROMPT, add_bos=True)
        without = tok.encode(PROMPT, add_bos=False)
        assert all(isinstance(t, int) and 0 <= t < tok.vocab_size for t in with_bos + without)
        assert len(with_bos) >= len(without) > 0
        text = tok.decode(without)
        assert isinstance(text, str) and text.strip()

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

    # -- shapes and feeding --------------------------------------------------------------------------

    def test_forward_returns_one_finite_row_per_requested_position(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        n = min(3, len(ids))
        with backend.open(1) as s:
            out = to_numpy(s.forward(0, ids, n))
            assert out.shape[0] == n and out.shape[1] >= backend.tokenizer.vocab_size
            assert np.isfinite(out).all()
            assert s.length(0) == len(ids)
            assert to_numpy(s.forward(0, ids[:1], 0)).shape[0] == 0  # feed only
            assert s.length(0) == len(ids) + 1

    def test_feed_without_logits_then_one_row_equals_one_call(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        with backend.open(1) as s:
            s.forward(0, ids[:-1], 0)
            split = to_numpy(s.forward(0, ids[-1:], 1))
        np.testing.assert_allclose(split, self.fresh(backend, ids), atol=self.logits_atol)

    def test_last_rows_are_the_last_positions(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        rows = self.fresh(backend, ids, 2)
        np.testing.assert_allclose(rows[-1], self.fresh(backend, ids)[0], atol=self.logits_atol)
        np.testing.assert_allclose(rows[0], self.fresh(backend, ids[:-1])[0], atol=self.logits_atol)

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
            assert s.length(0) == keep
            again = to_numpy(s.forward(0, ids[keep:], 1))
        np.testing.assert_allclose(again, self.fresh(backend, ids), atol=self.logits_atol)

    # -- batching and isolation -----------------------------------------------------------------------

    def test_forward_many_equals_calls_one_by_one(self, backend: Backend) -> None:
        a = self.prompt_ids(backend)
        b = self.prompt_ids(backend, "Once upon a time, in a land far away")
        with backend.open(2) as s:
            both = s.forward_many([ForwardCall(0, a, 1), ForwardCall(1, b, 2)])
        assert len(both) == 2 and to_numpy(both[1]).shape[0] == 2
        assert total_variation(both[0], self.fresh(backend, a)) <= self.batch_tv
        assert total_variation(both[1], self.fresh(backend, b, 2)) <= self.batch_tv

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
        assert total_variation(got, self.fresh(backend, a)) <= self.batch_tv
        assert total_variation(got_after, self.fresh(backend, a + a[-1:])) <= self.batch_tv

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
        np.testing.assert_allclose(results[0], results[1], atol=self.same_shape_atol)

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
            np.testing.assert_allclose(
                run(scrambled)[v],
                base[v],
                atol=self.same_shape_atol,
                err_msg=f"view {v}'s logits changed when only the other views' tokens changed: views see each "
                "other's tokens (a KV cache or batch state shared between views)",
            )

    # -- misuse: one exception type per mistake, on every backend -------------------------------------

    def test_misuse_raises_the_contract_errors(self, backend: Backend) -> None:
        ids = self.prompt_ids(backend)
        s: Session = backend.open(2)
        try:
            for bad in (
                lambda: s.forward(2, ids),
                lambda: s.forward(-1, ids),
                lambda: s.forward(0, []),
                lambda: s.forward(0, ids, len(ids) + 1),
                lambda: s.forward(0, [backend.tokenizer.vocab_size + 10**6]),
                lambda: s.forward_many([(0, ids, 1), (0, ids, 1)]),
                lambda: s.truncate(0, -1),
                lambda: s.length(5),
            ):
                with pytest.raises(SessionError):
                    bad()
            assert s.length(0) == 0 and s.length(1) == 0  # nothing was fed by a refused call
        finally:
            s.close()
        with pytest.raises(SessionError):
            s.forward(0, ids)

    def test_context_overflow_is_a_context_length_error(self, backend: Backend) -> None:
        with backend.open(1) as s:
            with pytest.raises(ContextLengthError):
                s.forward(0, [self.prompt_ids(backend)[0]] * (backend.context_length + 1), 1)
            assert s.length(0) == 0

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
