"""Fixes of the second llama.cpp / plugin-author audit (``/work/notes/audit_llama2.md``, items A-I).

A-F: the conformance kit passed plugin backends that are wrong in use, or failed them with numpy's bare
"Not equal to tolerance". Each broken backend below is the audit's (``/tmp/aud3C/kit/broken.py``): a plugin
backend with its own ``Backend`` and ``Session`` classes whose "model" is ``ToyBackend.logits_after(context)``,
a pure function of the whole context (so a leaked or missing token changes the logits), with one plausible
bug. The kit runs on each with ``check_exactness = False`` (as the project's llama.cpp class does): the
checks must catch them without the statistical test, and without a reference model, with a message that says
which method, what was expected and what came back. G-I: README claims and two messages.
"""

import re
from pathlib import Path

import numpy as np
import pytest
from kit_outcomes import Kit, failures, run_kit

import personajudge as pj
from personajudge.backends.llama_cpp import check_model_file
from personajudge.backends.toy import ToyBackend
from personajudge.core.errors import ModelLoadError
from personajudge.core.transforms import not_finite_error
from personajudge.testing import conformance

ROOT = Path(__file__).resolve().parents[2]


# -- the audit's plugin backends (one correct, the others with one bug each) ------------------------------


class Good(pj.Backend):
    name = "ctxmodel"
    description = "context-hashed toy model in a plugin's own classes"
    Session = None  # set below

    def __init__(self, config: pj.BackendConfig | None = None):
        config = config or pj.BackendConfig(name=self.name)
        self.model = ToyBackend(pj.BackendConfig(name="toy"))
        self.tokenizer = self.model.tokenizer
        self.context_length = config.n_ctx or 256

    def rows(self, ctx, n):
        ends = range(len(ctx) - n + 1, len(ctx) + 1)
        if not n:
            return np.empty((0, self.tokenizer.vocab_size), np.float32)
        return np.stack([self.model.logits_after(ctx[:e]) for e in ends])

    def open(self, n_views):
        return type(self).Session(self, n_views)


class GoodSession(pj.Session):
    def __init__(self, backend, n_views):
        super().__init__(n_views, backend.context_length, backend.tokenizer.vocab_size)
        self.b = backend
        self.ctx = [[] for _ in range(n_views)]

    def _forward_many(self, calls):
        out = []
        for view, tokens, n in calls:
            self.ctx[view].extend(tokens)
            out.append(self.b.rows(self.ctx[view], n))
        return out

    def _truncate(self, view, length):
        del self.ctx[view][length:]


Good.Session = GoodSession


def broken(session_cls, name):
    return type(name, (Good,), {"name": name, "Session": session_cls})


class RowsShiftSession(GoodSession):
    """A: each row is the distribution after the previous position (the ``logits[-n-1:-1]`` slip)."""

    def _forward_many(self, calls):
        out = []
        for view, tokens, n in calls:
            ctx = self.ctx[view]
            ctx.extend(tokens)
            out.append(self.b.rows(ctx[:-1], n) if n and len(ctx) > n else self.b.rows(ctx, n))
        return out


class TruncZeroSession(GoodSession):
    """B: ``[:length or None]`` keeps everything for ``length = 0``."""

    def _truncate(self, view, length):
        self.ctx[view] = self.ctx[view][: length or None]


class NoResetSession(GoodSession):
    """C: ``_truncate`` treats ``length >= self.length(view)`` as past the end, so the base class's undo after a
    failed ``_forward_many`` (``self.length(view)`` still the length before the call) does nothing."""

    def _truncate(self, view, length):
        if length >= self.length(view):
            return
        del self.ctx[view][length:]


class ProbsSession(GoodSession):
    """D: the model's softmax output instead of its logits."""

    def _forward_many(self, calls):
        outs = super()._forward_many(calls)
        return [
            np.exp(o - o.max(-1, keepdims=True)) / np.exp(o - o.max(-1, keepdims=True)).sum(-1, keepdims=True)
            if len(o)
            else o
            for o in outs
        ]


class LogProbsSession(GoodSession):
    """Not a bug: log-probabilities are logits up to a constant per row (control for D)."""

    def _forward_many(self, calls):
        outs = super()._forward_many(calls)
        return [
            o - np.log(np.exp(o - o.max(-1, keepdims=True)).sum(-1, keepdims=True)) - o.max(-1, keepdims=True)
            for o in outs
        ]


class TruncShortSession(GoodSession):
    """F: an off-by-one truncate that keeps one token too few."""

    def _truncate(self, view, length):
        del self.ctx[view][max(0, length - 1) :]


class VocabTokenizer:
    """The model's tokenizer with a wrong ``vocab_size`` (E)."""

    def __init__(self, inner, vocab_size):
        self.inner = inner
        self.vocab_size = vocab_size
        self.eos_token_ids = inner.eos_token_ids
        self.chat_template = None

    def encode(self, text, *, add_bos=True):
        return self.inner.encode(text, add_bos=add_bos)

    def decode(self, ids):
        return self.inner.decode(ids)

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return self.inner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def with_vocab(delta=None, size=None):
    b = Good(pj.BackendConfig(name="ctxmodel", n_ctx=256))
    b.tokenizer = VocabTokenizer(b.model.tokenizer, size if size is not None else b.model.tokenizer.vocab_size + delta)
    return b


BROKEN = {
    # A: every other check compares the backend with itself, and all rows lag alike
    "A rows one position behind": (
        lambda: broken(RowsShiftSession, "rowsshift")(),
        "test_the_last_row_depends_on_the_last_token",
        "The last row does not depend on the last token: are the rows one position behind?",
    ),
    "B truncate(view, 0) is a no-op": (
        lambda: broken(TruncZeroSession, "trunczero")(),
        "test_truncate_to_zero_empties_the_view",
        "truncate(view, 0) left the view's 51 tokens in place",
    ),
    "C no undo after a failed forward_many": (
        lambda: broken(NoResetSession, "noreset")(),
        "test_truncate_undoes_a_forward_many_that_failed",
        "_truncate(view, length) did not undo a _forward_many that the base class rolled back",
    ),
    "D probabilities": (
        lambda: broken(ProbsSession, "probs")(),
        "test_forward_returns_logits_not_probabilities",
        "forward returned probabilities, not logits",
    ),
    "E vocab_size one too small": (
        lambda: with_vocab(delta=-1),
        "test_encode_returns_ids_in_the_vocabulary",
        "returned id 32 at index 27, outside 0..vocab_size-1 = 0..31",
    ),
    "E vocab_size far too small": (
        lambda: with_vocab(size=20),
        "test_tokenizer_protocol",
        "encode('The quick brown fox jumps over the lazy dog because', add_bos=True) returned id 21 at index 0, "
        "outside 0..vocab_size-1 = 0..19",
    ),
    "F truncate keeps one too few": (
        lambda: broken(TruncShortSession, "truncshort")(),
        "test_truncate_then_refeed_equals_fresh",
        "truncate(view, 49) kept 48 tokens (one too few)",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_kit_fails_the_audits_broken_backends_and_says_why(case):
    make, test, message = BROKEN[case]
    failed = failures(make())
    assert test in failed, f"{case}: the kit passed it; failures: {failed}"
    assert message in failed[test], failed[test]
    for name, msg in failed.items():  # no failure leaves the author with numpy's generic text
        assert "Not equal to tolerance" not in msg and msg.strip(), f"{case}: {name} says {msg!r}"


def test_the_undo_check_names_the_tokens_that_stayed():
    msg = failures(broken(NoResetSession, "noreset")())["test_truncate_undoes_a_forward_many_that_failed"]
    assert "the undone tokens stayed" in msg and "returns early when length >= self.length(view)" in msg, msg


def test_the_rollback_failure_names_the_off_by_one_and_the_numbers():
    """F: which truncate, how many tokens it kept, and the logits that differ (row, token id, both values)."""
    msg = failures(broken(TruncShortSession, "truncshort")())["test_truncate_then_refeed_equals_fresh"]
    assert re.search(r"the logits differ by up to [\d.]+, past logits_atol = 0\.001 \(row 0, token id \d+: ", msg), msg
    assert "truncate(view, k) keeps exactly the first k tokens" in msg


@pytest.mark.parametrize(
    "make",
    [
        lambda: Good(pj.BackendConfig(name="ctxmodel", n_ctx=256)),
        lambda: broken(LogProbsSession, "logprobs")(),
        *[
            (lambda seed=seed: ToyBackend(pj.BackendConfig(name="toy", n_ctx=256, options={"seed": seed})))
            for seed in (0, 1, 7, 123)
        ],
        lambda: ToyBackend(pj.BackendConfig(name="toy", n_ctx=256, options={"view_strength": 0.0})),
    ],
    ids=["plugin ctxmodel", "log-probabilities", "toy seed 0", "toy seed 1", "toy seed 7", "toy seed 123", "bigram"],
)
def test_the_kit_passes_correct_backends(make):
    """The controls: correct backends, log-probabilities instead of logits, toy tables of other seeds, and a
    pure bigram model (logits depend on the last token only, so a leaked context is invisible: no check may
    assume more than the contract)."""
    outcomes = run_kit(make())
    assert outcomes["test_persona_judge_is_exact_on_this_backend"] == "skipped"
    assert {n: m for n, m in outcomes.items() if m not in (None, "skipped")} == {}


def test_the_new_checks_run_with_exactness_off():
    """B-E are caught by their own checks, not only by the chi-square test: the class the audit ran has
    ``check_exactness = False``."""
    assert not Kit.check_exactness
    names = {n for n in dir(Kit) if n.startswith("test_")}
    for _, test, _ in BROKEN.values():
        assert test in names and test != "test_persona_judge_is_exact_on_this_backend"


def test_logits_difference_says_where_and_by_how_much():
    logits_difference = conformance.logits_difference
    want = np.zeros((2, 4))
    got = want.copy()
    got[1, 3] = 0.5
    assert logits_difference(want, want + 1e-4, 1e-3) is None
    msg = logits_difference(got, want, 1e-3)
    assert msg.startswith("the logits differ by up to 0.5, past logits_atol = 0.001 (row 1, token id 3: 0.5 here, 0")
    assert "1 of 8 values differ by more" in msg
    assert logits_difference(np.zeros((1, 4)), want, 1e-3) == "got an array of shape (1, 4), expected (2, 4)"
    nan = want.copy()
    nan[0, 0] = np.nan
    assert logits_difference(nan, want, 1e-3) is not None  # NaN is a difference, not a pass


# -- G: the README's greedy-agreement claim says what the test proves ---------------------------------------


def test_readme_greedy_claim_matches_its_test():
    """The test lets the reference oracle and the fast path part at a near-tie (``assert_same_until_tie``);
    the README says exactly that, names the test, and the test exists and works that way."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### `llama-cpp` (default)")[1].split("\n### ")[0]
    claim = " ".join(section.split("**Numerics.**")[1].split("\n- ")[0].split())
    assert "token for token in greedy mode (tested)" not in claim
    assert "token for token up to a near-tie" in claim and "TIE_EPS" in claim, claim
    name = re.search(r"`(test_\w+)`", claim).group(1)
    tests = (ROOT / "tests/backends/test_llama_cpp.py").read_text(encoding="utf-8")
    body = tests.split(f"def {name}(")[1].split("\ndef ")[0]
    assert 'method="reference"' in body and "assert_same_until_tie(" in body
    assert re.search(r"^TIE_EPS = ", (ROOT / "tests/helpers/llama_checks.py").read_text(encoding="utf-8"), re.M)


# -- I: two messages ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, says, never",
    [
        (b"hello\n", "is not a GGUF file", "truncated"),  # a 6-byte text file was never a GGUF
        (b"GGU", "is truncated (3 bytes)", "not a GGUF file"),  # the start of a GGUF header
        (b"GGUF\x03", "is truncated (5 bytes)", "not a GGUF file"),
        (b"", "is empty (0 bytes)", "not a GGUF file"),
    ],
)
def test_a_short_file_is_called_what_it_is(tmp_path, content, says, never):
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    with pytest.raises(ModelLoadError) as e:
        check_model_file(f)
    assert says in str(e.value) and never not in str(e.value), str(e.value)


def test_the_nan_logits_message_ties_the_dtype_hint_to_backends_with_a_dtype():
    """llama.cpp ignores --dtype (it warns so), so its users must not be told a dtype caused it."""
    msg = str(not_finite_error())
    assert "broken model file" in msg
    assert "on a backend that takes --dtype (hf)" in msg and "try --dtype bfloat16" in msg, msg
