"""``pad`` and ``mod`` reduce to the baselines on the real backends too.

pad with w = 0 must equal base decoding, and mod with all weight on one view
must equal that view's plain sampling (same seed): on the embedded model with
llama.cpp and on a tiny randomly initialized transformers model.
"""

import pytest

from personajudge.api import PersonaJudge
from personajudge.core.config import BackendConfig

PROMPT = "Why is the sky blue?"


def check_reductions(pj, temperatures=(0.0, 0.7), n=24):
    def gen(method, prefs, options=None, **kw):
        pj.config = pj.config.model_copy(update={"method_options": options or {}})
        return pj.generate(PROMPT, preferences=prefs, method=method, **kw)

    for temperature in temperatures:
        kw = dict(seed=3, temperature=temperature, max_new_tokens=n)
        pad = gen("pad", ["concise"], {"weight": 0.0}, **kw)
        assert pad.tokens == gen("base", ["concise"], **kw).tokens and len(pad.tokens) > 0
        mod = gen("mod", ["concise", "humor"], {"weights": [1.0, 0.0]}, **kw)
        assert mod.tokens == gen("prompt", ["concise"], **kw).tokens
        guided = gen("pad", ["concise"], {"weight": 2.0}, **kw)
        mixed = gen("mod", ["concise", "humor"], {"weights": [0.5, 0.5]}, **kw)
        assert guided.stats.views == 2 and mixed.stats.views == 2 and guided.tokens and mixed.tokens


@pytest.mark.model
def test_on_the_embedded_model_with_llama_cpp():
    pytest.importorskip("llama_cpp")
    with PersonaJudge(
        {"backend": {"name": "llama-cpp", "threads": 1, "n_ctx": 512}, "encoder_options": {"stop": False}}
    ) as pj:
        check_reductions(pj)


@pytest.mark.hf
def test_on_a_tiny_transformers_model(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_hf import build_tiny

    from personajudge.backends.hf import HFBackend

    backend = HFBackend(BackendConfig(name="hf", model=build_tiny(tmp_path / "llama", "llama"), device="cpu"))
    pj = PersonaJudge({"backend": {"name": "hf"}}, backend=backend)
    check_reductions(pj)


@pytest.mark.hf
def test_pad_with_a_separate_reward_model(tmp_path):
    pytest.importorskip("transformers")
    from tiny_hf import build_tiny

    from personajudge.backends.hf import HFBackend
    from personajudge.core.errors import ConfigError, PersonaJudgeError

    main_dir = build_tiny(tmp_path / "main", "llama")
    backend = HFBackend(BackendConfig(name="hf", model=main_dir, device="cpu"))
    pj = PersonaJudge({"backend": {"name": "hf"}}, backend=backend)

    def pad(options):
        pj.config = pj.config.model_copy(update={"method_options": options})
        return pj.generate(PROMPT, preferences=["concise"], method="pad", temperature=0, max_new_tokens=16, seed=0)

    free = pad({"weight": 2.0})
    # the same weights loaded as a separate reward model: the same re-ranking as the training-free stand-in
    same = pad({"weight": 2.0, "reward_model": {"name": "hf", "model": main_dir, "device": "cpu"}})
    assert same.tokens == free.tokens
    # a different reward model changes the re-ranking; with w = 0 it is never consulted
    other_dir = build_tiny(tmp_path / "rm", "gemma3")  # other architecture and weights, same tokenizer
    other = pad({"weight": 8.0, "reward_model": {"name": "hf", "model": other_dir, "device": "cpu"}})
    assert other.tokens != pad({"weight": 8.0}).tokens
    unused = pad({"weight": 0.0, "reward_model": {"name": "hf", "model": "/nonexistent"}})
    pj.config = pj.config.model_copy(update={"method_options": {}})
    base = pj.generate(PROMPT, preferences=["concise"], method="base", temperature=0, max_new_tokens=16, seed=0)
    assert unused.tokens == base.tokens
    with pytest.raises(ConfigError, match="reward_model"):
        pad({"reward_model": {"name": "hf", "colour": 1}})
    with pytest.raises(PersonaJudgeError, match="adapter|peft"):
        pad({"reward_model": {"name": "hf", "model": main_dir, "options": {"adapter": str(tmp_path / "none")}}})
