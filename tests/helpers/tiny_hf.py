"""Tiny randomly initialised transformers models (no download) for the hf backend's tests."""

import string

import torch

from personajudge.backends.hf import HFBackend
from personajudge.core.config import BackendConfig


def make_tokenizer():
    """A character-level tokenizer (256 ids) with <pad>/<bos>/<eos>/<unk> and a tiny chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    words = [f"w{i}" for i in range(256 - len(specials) - len(chars))]  # decodable filler ids
    vocab = {t: i for i, t in enumerate(specials + chars + words)}
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


def build_tiny(path, arch: str) -> str:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        common.update(
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def build_tiny_backend(path, arch: str = "llama", device: str = "cpu", options: dict | None = None) -> HFBackend:
    """A loaded HFBackend on a freshly built tiny model of ``arch`` (``options``: ``backend.options``)."""
    return HFBackend(BackendConfig(name="hf", model=build_tiny(path, arch), device=device, options=options or {}))
