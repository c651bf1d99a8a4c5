"""The conformance kit fails subtly broken backends, each with a message that names what is wrong.

Each broken backend is the toy backend with one mistake a plugin author can make (the audit's
``/tmp/audU/broken.py``). They run with ``check_exactness = False``, as the project's own llama.cpp and hf
classes do: the contract checks must catch them without the statistical test.
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from kit_outcomes import run_kit

from personajudge.backends.toy import ALPHABET, ToyBackend, ToySession, ToyTokenizer
from personajudge.core.config import BackendConfig
from personajudge.testing import BackendConformance
from personajudge.testing.exactness import check_backend_exactness

# -- the broken backends ----------------------------------------------------------------------------------


class RowsReversedSession(ToySession):
    """The rows of a window last-position-first (what the windowed schedule verifies with)."""

    def _forward(self, view, tokens, n_logits):
        out = super()._forward(view, tokens, n_logits)
        return out[::-1] if n_logits > 2 else out


class SortedOutputsSession(ToySession):
    """Computes the calls in view order, and returns the outputs in that order instead of the calls'."""

    def _forward_many(self, calls):
        order = sorted(range(len(calls)), key=lambda i: calls[i].view)
        return [self._forward(calls[i].view, list(calls[i].tokens), calls[i].n_logits) for i in order]


class ReversedOutputsSession(ToySession):
    """Returns the outputs of more than two calls reversed."""

    def _forward_many(self, calls):
        outs = super()._forward_many(calls)
        return outs[::-1] if len(calls) > 2 else outs


class SessionCacheSession(ToySession):
    """A logits cache keyed by (position, last token), shared by the session's views."""

    def __init__(self, backend, n_views):
        super().__init__(backend, n_views)
        self.cache = {}

    def _forward(self, view, tokens, n_logits):
        ctx = self._ctx[view]
        ctx.extend(tokens)
        rows = []
        for end in range(len(ctx) - n_logits + 1, len(ctx) + 1):
            key = (end, ctx[end - 1])
            if key not in self.cache:
                self.cache[key] = self.backend.logits_after(ctx[:end])
            rows.append(self.cache[key])
        return np.stack(rows) if rows else np.empty((0, self.backend.tokenizer.vocab_size), np.float32)


class SortedButCorrectSession(ToySession):
    """Computes the calls in view order (as a backend may to batch them) and returns them in call order."""

    def _forward_many(self, calls):
        outs = [None] * len(calls)
        for i in sorted(range(len(calls)), key=lambda i: calls[i].view):
            outs[i] = self._forward(calls[i].view, list(calls[i].tokens), calls[i].n_logits)
        return outs


class ShiftTokenizer(ToyTokenizer):
    """decode shifts every letter by one."""

    def decode(self, ids):
        return "".join(ALPHABET[i % len(ALPHABET)] for i in ids if 0 < i <= len(ALPHABET))


class DropLastTokenizer(ToyTokenizer):
    """decode drops the last id."""

    def decode(self, ids):
        return super().decode(list(ids)[:-1])


def toy_with(session=None, tokenizer=None):
    backend = ToyBackend(BackendConfig(name="toy", n_ctx=256))
    if session is not None:
        backend.open = lambda n_views: session(backend, n_views)
    if tokenizer is not None:
        backend.tokenizer = tokenizer()
    return backend


BROKEN = {
    "rows reversed": (
        dict(session=RowsReversedSession),
        {"test_every_row_of_a_window_is_its_own_position"},
        "returned its 5 rows in reverse order (last position first)",
    ),
    "outputs sorted by view": (
        dict(session=SortedOutputsSession),
        {"test_forward_many_returns_outputs_in_call_order"},
        "forward_many returned its outputs out of call order",
    ),
    "outputs reversed": (
        dict(session=ReversedOutputsSession),
        {"test_forward_many_returns_outputs_in_call_order", "test_other_views_content_does_not_matter"},
        "forward_many returned its outputs out of call order",
    ),
    "cache shared by views": (
        dict(session=SessionCacheSession),
        {"test_views_at_one_position_with_one_last_token_stay_apart"},
        "view 1 got the logits of view 0's context",
    ),
    "decode shifts letters": (
        dict(tokenizer=ShiftTokenizer),
        {"test_decode_inverts_encode"},
        "decode is not the inverse of encode",
    ),
    "decode drops the last id": (
        dict(tokenizer=DropLastTokenizer),
        {"test_decode_inverts_encode"},
        "decode is not the inverse of encode",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_kit_fails_a_broken_backend_and_says_why(case):
    parts, must_fail, message = BROKEN[case]
    failures = {name: msg for name, msg in run_kit(toy_with(**parts)).items() if msg not in (None, "skipped")}
    assert must_fail <= set(failures), f"{case}: the kit's failures are {failures}"
    # every failure names this mistake: a reversed output list is not blamed on isolation between views
    for name, msg in failures.items():
        assert message in msg, f"{case}: {name} says {msg!r}"


@pytest.mark.parametrize("parts", [{}, dict(session=SortedButCorrectSession)], ids=["toy", "computed in view order"])
def test_the_kit_passes_a_correct_backend(parts):
    outcomes = run_kit(toy_with(**parts))
    assert outcomes["test_persona_judge_is_exact_on_this_backend"] == "skipped"
    assert {n: m for n, m in outcomes.items() if m not in (None, "skipped")} == {}


def test_the_windowed_exactness_run_rejects_reversed_rows():
    """With the exactness check on, the windowed schedule (lambda + 1 rows per forward) rejects rows in the
    wrong order; the same check passes the toy backend (``tests/backends/test_conformance.py``)."""
    p_value, control_p = check_backend_exactness(toy_with(session=RowsReversedSession), schedule="windowed")
    assert p_value < 1e-3 and control_p < 1e-3


def test_a_broken_backend_fails_under_pytest_and_a_correct_one_passes(tmp_path):
    """The kit as an author runs it: pytest collects both classes of one test module."""
    (tmp_path / "test_author.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from personajudge.backends.toy import ToyBackend, ToySession
            from personajudge.core.config import BackendConfig
            from personajudge.testing import BackendConformance

            class SortedSession(ToySession):
                def _forward_many(self, calls):
                    order = sorted(range(len(calls)), key=lambda i: calls[i].view)
                    return [self._forward(calls[i].view, list(calls[i].tokens), calls[i].n_logits) for i in order]

            class SortedBackend(ToyBackend):
                def open(self, n_views):
                    return SortedSession(self, n_views)

            class TestToy(BackendConformance):
                check_exactness = False

                @pytest.fixture(scope="class")
                def backend(self):
                    return ToyBackend(BackendConfig(name="toy"))

            class TestSorted(TestToy):
                @pytest.fixture(scope="class")
                def backend(self):
                    return SortedBackend(BackendConfig(name="toy"))
            """
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-rf"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    n = len([m for m in dir(BackendConformance) if m.startswith("test_")])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert f"1 failed, {2 * n - 3} passed, 2 skipped" in proc.stdout, proc.stdout[-2000:]
    assert "FAILED test_author.py::TestSorted::test_forward_many_returns_outputs_in_call_order" in proc.stdout
    assert "AssertionError: forward_many returned its outputs out of call order" in proc.stdout, proc.stdout[-2000:]
