"""Findings of the configuration audit of session 22 (a helper following the README as a user), each
checked against the behaviour it asked for; every test here fails on the code before its fix.
"""

from __future__ import annotations

import pytest
from cli_lines import one_line, run_main

import personajudge as pj
from personajudge.core.errors import ConfigError

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
PREFS = ["concise", "humor"]


# ---------------------------------------------------------------- F1: mod weights whose sum overflows


@pytest.mark.parametrize("huge,small", [([1e308, 1e308], [1, 1]), ([1e308, 0.0], [1, 0])])
def test_mod_weights_whose_sum_overflows_are_the_same_mixture_as_small_ones(huge, small):
    """Two weights of 1e308 sum to inf; each weight over the sum was 0, no view was active, and the
    mixture summed an empty list: a raw TypeError (a traceback at the CLI). Only the ratios matter."""
    run = {"preferences": PREFS, "method": "mod", "max_new_tokens": 12, "seed": 4}
    outs = []
    for weights in (small, huge):
        with pj.PersonaJudge({**TOY, "method": "mod", "method_options": {"weights": weights}}) as m:
            outs.append(m.generate("hi", **run).tokens)
    assert outs[0] == outs[1] and len(outs[0]) == 12


def test_huge_weights_from_a_preferences_file_at_the_cli(tmp_path, capsys):
    """``mod``'s default weights are the preferences' ``weight``s, which have no upper bound."""
    entries = "".join(
        f'[[preferences]]\nname = "{n}"\ndescription = "Talk like a {n}"\nweight = 1e308\n' for n in ("pirate", "robot")
    )
    (tmp_path / "p.toml").write_text(entries)
    argv = ["generate", "hi", "--backend", "toy", "--method", "mod", "--preferences-file", str(tmp_path / "p.toml")]
    code, out, err = run_main([*argv, "--max-new-tokens", "3", "--seed", "1"], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert out.strip()


def test_non_finite_mod_weights_are_still_refused():
    with pytest.raises(ConfigError, match="weights"):
        with pj.PersonaJudge({**TOY, "method": "mod", "method_options": {"weights": [float("inf"), 1]}}) as m:
            m.generate("hi", preferences=PREFS)
