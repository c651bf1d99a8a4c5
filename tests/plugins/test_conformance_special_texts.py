"""The conformance kit checks a backend's ``special_texts`` as the contract describes them (core/contract.py):
a set of strings that ``encode`` turns into control tokens, encoded as text with ``special=False``, which
changes nothing else, and none left out. Each broken tokenizer below is the toy one with one mistake; the
kit fails it with a message that names the mistake, and passes a correct one (the toy tokenizer with
``<eot>`` markup, :class:`MarkupTokenizer`)."""

import pytest
from kit_outcomes import run_kit
from markup_tokenizer import MarkupTokenizer

from personajudge.backends.toy import EOS, ToyBackend, ToyTokenizer
from personajudge.core.config import BackendConfig

SPECIAL_TESTS = {
    "test_special_texts_are_encoded_as_text_with_special_false",
    "test_special_false_changes_nothing_else",
    "test_special_texts_list_every_control_text_encode_parses",
}


class ListsPlainText(ToyTokenizer):
    """Lists ``<eot>``, which its encode never parses (the same ids with special on and off)."""

    special_texts = frozenset({"<eot>"})


class IgnoresSpecialFalse(MarkupTokenizer):
    """Parses ``<eot>`` into EOS whatever ``special`` says."""

    def encode(self, text, *, add_bos=True, special=True):
        return super().encode(text, add_bos=add_bos, special=True)


class DropsSpecialText(MarkupTokenizer):
    """With ``special=False``, drops ``<eot>`` instead of encoding it as text."""

    def encode(self, text, *, add_bos=True, special=True):
        return super().encode(text if special else text.replace("<eot>", ""), add_bos=add_bos, special=special)


class LeavesEosOut(MarkupTokenizer):
    """Parses ``<eos>`` into EOS as well as ``<eot>``, but lists only ``<eot>``."""

    def encode(self, text, *, add_bos=True, special=True):
        if not special:
            return super().encode(text, add_bos=add_bos, special=False)
        ids = []
        for i, piece in enumerate(text.split("<eos>")):
            ids += ([EOS] if i else []) + super().encode(piece, add_bos=False)
        return ids


class ListsNoneButParses(LeavesEosOut):
    """Lists no special text at all (an empty set) while encode parses ``<eot>`` and ``<eos>``."""

    special_texts = frozenset()


class AppendsEos(MarkupTokenizer):
    """With ``special=False`` and ``add_bos``, appends the EOS a post-processor would."""

    def encode(self, text, *, add_bos=True, special=True):
        ids = super().encode(text, add_bos=add_bos, special=special)
        return ids + [EOS] if add_bos and not special else ids


class SpecialTextsAsStr(MarkupTokenizer):
    special_texts = "<eot>"


class NoSpecialKeyword(ToyTokenizer):
    """Lists ``<eot>`` with an encode that takes no ``special=``."""

    special_texts = frozenset({"<eot>"})

    def encode(self, text, *, add_bos=True):
        return super().encode(text, add_bos=add_bos)


def toy_with(tokenizer):
    backend = ToyBackend(BackendConfig(name="toy", n_ctx=256))
    backend.tokenizer = tokenizer()
    return backend


BROKEN = {
    "lists a text encode does not parse": (
        ListsPlainText,
        "test_special_texts_are_encoded_as_text_with_special_false",
        "encode does not parse '<eot>' into a control token",
    ),
    "ignores special=False": (
        IgnoresSpecialFalse,
        "test_special_texts_are_encoded_as_text_with_special_false",
        "encode ignores special=False",
    ),
    "drops the text with special=False": (
        DropsSpecialText,
        "test_special_texts_are_encoded_as_text_with_special_false",
        "special=False must encode a listed text as plain text",
    ),
    "leaves <eos> out": (
        LeavesEosOut,
        "test_special_texts_list_every_control_text_encode_parses",
        "encode parses '<eos>' (in the text '<s> </s> <unk> <pad> <bos> <eos>",
    ),
    "lists nothing while parsing": (
        ListsNoneButParses,
        "test_special_texts_list_every_control_text_encode_parses",
        "but special_texts (0 texts) does not list it: a user's text holding it becomes a control token",
    ),
    "appends EOS with special=False": (
        AppendsEos,
        "test_special_false_changes_nothing_else",
        "(an EOS appended); special=False must change only how special_texts are encoded",
    ),
    "special_texts as a str": (SpecialTextsAsStr, None, "special_texts must be a frozenset of non-empty strings"),
    "encode without special=": (NoSpecialKeyword, None, "encode takes no special= keyword"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_kit_fails_a_tokenizer_that_gets_special_texts_wrong_and_says_why(case):
    tokenizer, test, message = BROKEN[case]
    outcomes = run_kit(toy_with(tokenizer))
    failed = {n: m for n, m in outcomes.items() if m not in (None, "skipped")}
    # a malformed special_texts fails every special-text check with the core's own load-time message
    must_fail = {test} if test else SPECIAL_TESTS
    assert must_fail <= set(failed), f"{case}: the kit's failures are {failed}"
    for name in must_fail:
        assert message in failed[name], f"{case}: {name} says {failed[name]!r}"
    assert set(failed) <= SPECIAL_TESTS, f"{case}: other checks failed too: {failed}"


@pytest.mark.parametrize("tokenizer", [MarkupTokenizer, ToyTokenizer], ids=["markup", "toy"])
def test_the_kit_passes_a_tokenizer_that_gets_special_texts_right(tokenizer):
    outcomes = run_kit(toy_with(tokenizer))
    assert {n: m for n, m in outcomes.items() if m not in (None, "skipped")} == {}
    if tokenizer is MarkupTokenizer:  # every special-text check ran
        assert all(outcomes[n] is None for n in SPECIAL_TESTS), outcomes


def test_a_tokenizer_without_special_texts_passes_the_checks():
    """``special_texts`` is optional: a plugin tokenizer without it (and without ``special=``) is not failed."""

    class Plain(ToyTokenizer):
        special_texts = None

        def encode(self, text, *, add_bos=True):
            return super().encode(text, add_bos=add_bos)

    outcomes = run_kit(toy_with(Plain))
    assert {n: outcomes[n] for n in SPECIAL_TESTS} == dict.fromkeys(SPECIAL_TESTS)
