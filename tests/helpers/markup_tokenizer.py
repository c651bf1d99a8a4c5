"""A toy tokenizer with special-token markup, for the tests of user text that looks like a control token."""

import personajudge as pj
from personajudge.api import _plan_call
from personajudge.backends.toy import EOS, ToyBackend, ToyTokenizer


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


def markup_model(**config):
    """A toy PersonaJudge whose tokenizer is a :class:`MarkupTokenizer`."""
    backend = ToyBackend()
    backend.tokenizer = MarkupTokenizer()
    return pj.PersonaJudge({"backend": {"name": "toy"}, **config}, backend=backend)


def contexts(model, prompt, **call):
    """The token contexts and rendered texts of each view of ``prompt`` under the call's keywords."""
    cfg, meth, views, _ = _plan_call(model.config, call.pop("preferences", None), None, None, call)
    return model.encode_views(prompt, cfg, meth, views), model.render_views(prompt, cfg, meth, views)
