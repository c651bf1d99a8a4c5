"""A character-level transformers tokenizer of any vocabulary size, built in memory (no download).

For random-weight models in tests and benchmarks: the project's hf tests and
``examples/gpu_check.py`` (which runs on a bare GPU machine where only the
installed package travels) use this one builder. Needs ``tokenizers`` and
``transformers`` (the ``hf`` extra).
"""

from __future__ import annotations

import string
from typing import Any

#: ids 0-3; the printable characters follow, then filler words up to the vocabulary size
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def char_tokenizer(vocab_size: int = 256) -> Any:
    """A ``PreTrainedTokenizerFast``: one id per printable character, ``<bos>`` prepended, filler words
    ``w0, w1, ...`` (decodable ids) up to ``vocab_size``, and a small ``[role] content`` chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    if vocab_size < len(SPECIALS) + len(chars):
        raise ValueError(f"vocab_size must be at least {len(SPECIALS) + len(chars)}, got {vocab_size}")
    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS) - len(chars))]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *chars, *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    return tok
