"""Tiny randomly initialised transformers models (no download) for the hf backend's tests."""

import torch

from personajudge.backends.hf import HFBackend
from personajudge.core.config import BackendConfig
from personajudge.testing.tokenizers import char_tokenizer


def make_tokenizer():
    """The character-level tokenizer (256 ids) of the tiny models."""
    return char_tokenizer(256)


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
