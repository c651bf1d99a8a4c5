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

- the tokenizer protocol (types, ids in range, ``add_bos`` keyword);
- shapes: ``forward`` returns ``(n_logits, V)`` finite rows, ``n_logits = 0``
  feeds without logits;
- rollback: after ``truncate`` a view gives the logits a fresh evaluation gives;
- batching: ``forward_many`` over views equals the same calls made one by one,
  and views never see each other's tokens;
- misuse: the same :class:`SessionError` / :class:`ContextLengthError` on
  every backend (the checks live in the Session base class, so a backend that
  implements ``_forward_many``/``_truncate`` gets them for free);
- the batched judge: :func:`~personajudge.core.batched.judge_rows` on the
  backend's own logits arrays, and what its ``compile_kernel`` makes of it,
  decide rows as the judge does on numpy copies;
- exactness: Persona-judge run through *this* backend commits tokens whose law
  equals the one computed independently from the backend's own distributions
  (:mod:`personajudge.testing.exactness`), by chi-square.

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

        def run(contexts):
            with backend.open(3) as s:
                return [to_numpy(x) for x in s.forward_many([ForwardCall(v, c, 1) for v, c in enumerate(contexts)])]

        base = run(ctxs)
        for v in range(3):
            scrambled = [c if w == v else list(reversed(c)) for w, c in enumerate(ctxs)]
            np.testing.assert_allclose(
                run(scrambled)[v], base[v], atol=self.same_shape_atol, err_msg=f"view {v} sees the other views"
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
        p_value, control_p = check_backend_exactness(backend)
        assert p_value > 1e-3, f"committed tokens do not follow the judge's law (chi-square p = {p_value:.2e})"
        assert control_p < 1e-3, f"the negative control was not rejected (p = {control_p:.2e}): the check has no power"
