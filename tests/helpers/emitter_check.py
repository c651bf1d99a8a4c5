"""A check shared by the backends' tests: the emitter's incremental text equals a full decode."""

from personajudge.core.stopping import Emitter


def assert_incremental_text_matches(tokenizer, token_lists):
    """After every push, ``Emitter.text`` is exactly ``tokenizer.decode`` of all tokens so far,
    and the streamed pieces add up to the final text."""
    for tokens in token_lists:
        pieces = []
        em = Emitter(tokenizer, max_new_tokens=len(tokens) + 1, eos_token_ids=(), on_text=pieces.append)
        for i, t in enumerate(tokens):
            assert em.push(t)
            expected = tokenizer.decode(tokens[: i + 1])
            assert em.text == expected, (i, em.text[-40:], expected[-40:])
        em.finish("length")
        assert "".join(pieces) == em.text
