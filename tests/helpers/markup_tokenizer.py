"""A toy tokenizer with special-token markup, for the tests of user text that looks like a control token."""

from personajudge.backends.toy import EOS, ToyTokenizer


class MarkupTokenizer(ToyTokenizer):
    """The toy tokenizer with one piece of special-token markup, ``<eot>``, parsed into EOS (as a real
    tokenizer parses ``<eos>``) unless ``special=False``, and a chat template that closes every turn
    with it -- so the template's markers and a user's look alike in the rendered text."""

    special_texts = frozenset({"<eot>"})
    chat_template = "[role]: content<eot>"

    def encode(self, text, *, add_bos=True, special=True):
        if not special:
            return super().encode(text, add_bos=add_bos)
        ids = []
        for i, piece in enumerate(text.split("<eot>")):
            if i:
                ids.append(EOS)
            ids += super().encode(piece, add_bos=False)
        return ids

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(f"{m['role']}: {m['content']}<eot>" for m in messages) + (
            "assistant:" if add_generation_prompt else ""
        )
