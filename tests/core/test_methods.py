"""Method plugins beside Persona-judge: PAD-style and MOD-style decoding."""

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.cli import main
from personajudge.core.errors import ConfigError
from personajudge.core.mod import log_softmax
from personajudge.core.pad import pad_scores

PROMPT = "tell me a story"


@pytest.fixture
def pj(toy):
    return PersonaJudge({"backend": {"name": "toy"}}, backend=toy)


def gen(pj, method, prefs, opts=None, **kw):
    pj.config = pj.config.model_copy(update={"method_options": opts or {}})
    return pj.generate(PROMPT, preferences=prefs, method=method, max_new_tokens=60, **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_pad_with_zero_weight_is_base_decoding(pj, temperature):
    for seed in range(3):
        pad = gen(pj, "pad", ["concise"], {"weight": 0.0}, seed=seed, temperature=temperature)
        base = gen(pj, "base", ["concise"], seed=seed, temperature=temperature)
        assert pad.tokens == base.tokens


def test_pad_with_weight_moves_towards_the_preference_view(pj):
    base = gen(pj, "base", ["concise"], seed=0, temperature=0.0)
    pad = gen(pj, "pad", ["concise"], {"weight": 3.0}, seed=0, temperature=0.0)
    assert pad.tokens != base.tokens


def test_pad_scores_rerank_only_base_top_k():
    g = np.random.default_rng(0)
    base, rm = g.normal(size=50), g.normal(size=50)
    s = pad_scores(base, rm, base, weight=2.0, beta=0.5, k=5)
    top5 = set(np.argsort(base)[-5:])
    assert set(np.nonzero(np.isfinite(s))[0]) == top5
    i = next(iter(top5))
    lb, lr = log_softmax(base), log_softmax(rm)
    assert np.isclose(s[i], lb[i] + 2.0 * 0.5 * (lr[i] - lb[i]))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_mod_with_all_weight_on_one_view_is_that_views_plain_sampling(pj, temperature):
    for seed in range(3):
        mod = gen(pj, "mod", ["concise", "humor"], {"weights": [1.0, 0.0]}, seed=seed, temperature=temperature)
        plain = gen(pj, "prompt", ["concise"], seed=seed, temperature=temperature)
        assert mod.tokens == plain.tokens
        mod2 = gen(pj, "mod", ["concise", "humor"], {"weights": [0.0, 1.0]}, seed=seed, temperature=temperature)
        assert mod2.tokens == gen(pj, "prompt", ["humor"], seed=seed, temperature=temperature).tokens


def test_mod_mixture_differs_from_either_view(pj):
    mix = gen(pj, "mod", ["concise", "humor"], {"weights": [0.5, 0.5]}, seed=1, temperature=0.0)
    a = gen(pj, "prompt", ["concise"], seed=1, temperature=0.0)
    b = gen(pj, "prompt", ["humor"], seed=1, temperature=0.0)
    assert mix.tokens != a.tokens and mix.tokens != b.tokens


def test_mod_bad_weights(pj):
    with pytest.raises(ConfigError, match="weights"):
        gen(pj, "mod", ["concise", "humor"], {"weights": [1.0]}, seed=0)
    with pytest.raises(ConfigError, match="weights"):
        gen(pj, "mod", ["concise", "humor"], {"weights": [-1.0, 2.0]}, seed=0)
    with pytest.raises(
        ConfigError, match="^method_options for 'mod': unknown option.s. colour; its options are weights$"
    ):
        gen(pj, "mod", ["concise", "humor"], {"colour": 1}, seed=0)
    with pytest.raises(
        ConfigError, match="^method_options for 'persona-judge': unknown option.s. weights; it takes none$"
    ):
        gen(pj, "persona-judge", ["concise", "humor"], {"weights": [0.7, 0.3]}, seed=0)


def test_methods_from_the_cli(capsys):
    assert (
        main(
            [
                "generate",
                "hi",
                "--backend",
                "toy",
                "--prefer",
                "concise",
                "--prefer",
                "humor",
                "--method",
                "mod",
                "--method-option",
                "weights=[0.7,0.3]",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "hi",
                "--backend",
                "toy",
                "--prefer",
                "concise",
                "--method",
                "pad",
                "--method-option",
                "weight=2",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    assert main(["generate", "hi", "--backend", "toy", "--method", "pad", "--method-option", "w"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
