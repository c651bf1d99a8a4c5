"""``personajudge bench`` and ``python -m personajudge.bench.host``: audit findings D, E, J, K, L2, L3.

On the toy backend; no timing is asserted. Where a mistake must be caught before the model loads, the
loader is replaced by one that fails the test.
"""

import json
import warnings

import pytest
from refuse import refuse_calls

import personajudge.bench as bench
from personajudge.bench import host as host_bench
from personajudge.cli import main
from personajudge.core.config import build_config
from personajudge.core.errors import ConfigError, PersonaJudgeWarning

BENCH = ["bench", "--backend", "toy", "--max-new-tokens", "6", "--repeats", "1", "--no-memory", "--no-steps"]


@pytest.fixture
def no_load(monkeypatch):
    refuse_calls(monkeypatch, bench, "PersonaJudge", "the model was loaded before the mistake was reported")


@pytest.fixture
def made(monkeypatch):
    """Every method the bench instantiates, as (method, options)."""
    calls = []
    real = bench.make_method

    def spy(cfg):
        calls.append((cfg.method, dict(cfg.method_options)))
        return real(cfg)

    monkeypatch.setattr(bench, "make_method", spy)
    return calls


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# D: a fixed number of tokens


def test_stop_is_refused_before_the_model_loads(capsys, no_load):
    assert main([*BENCH, "--stop", "a", "--methods", "plain,persona-judge"]) == 2
    assert "fixed number of tokens" in _one_error_line(capsys)


def test_stop_is_a_config_error_in_the_api(no_load):
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"stop": [" "]}})
    with pytest.raises(ConfigError, match="fixed number of tokens"):
        bench.run_bench(cfg, repeats=1, progress=False)


# E: each method gets its own options


def test_a_method_option_reaches_only_the_methods_that_take_it(capsys, made):
    assert main([*BENCH, "--methods", "plain,persona-judge,pad", "--method-option", "weight=2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rep["results"]] == ["plain", "persona-judge", "pad"]
    assert rep["settings"]["method_options"] == {"pad": {"weight": 2}}
    assert ("pad", {"weight": 2}) in made
    for method, opts in made:
        assert opts == ({"weight": 2} if method == "pad" else {}), (method, opts)


def test_mod_weights_go_to_mod_and_not_to_pad(capsys, made):
    assert main([*BENCH, "--methods", "mod,pad", "--method-option", "weights=[0.7,0.3]", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["settings"]["method_options"] == {"mod": {"weights": [0.7, 0.3]}}
    assert {m for m, o in made if o} == {"mod"} and ("pad", {}) in made


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "plain,persona-judge", "--method-option", "weight=2"], "none of the benched methods"),
        (["--methods", "mod,pad", "--method-option", "weights=[1,1]", "--method-option", "weight=2"], "takes only"),
        (["--methods", "pad", "--method-option", "k=0"], "method_options.k"),
        (["--method", "pad", "--methods", "plain,pad"], "use --methods"),
        (["--method", "mod"], "use --methods"),
    ],
)
def test_method_options_that_fit_no_method_are_refused_before_the_model_loads(argv, needle, capsys, no_load):
    assert main([*BENCH, *argv]) == 2
    assert needle in _one_error_line(capsys)


# J: one view


def test_one_view_warns_and_skips_the_multi_view_rows(capsys):
    assert main([*BENCH, "--views", "1", "--json"]) == 0
    out = capsys.readouterr()
    rep = json.loads(out.out)
    warned = [line for line in out.err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "persona-judge, persona-judge-base, reference" in warned[0]
    assert [r["method"] for r in rep["results"]] == ["plain"]
    assert rep["persona_judge_over_reference"] is None
    assert "persona-judge over reference" not in bench.format_table(rep)


def test_one_view_warning_in_the_api_and_refusal_when_nothing_is_left(no_load):
    cfg = build_config({"backend": {"name": "toy"}})
    with pytest.raises(ConfigError, match="with 1 view"):
        bench.run_bench(cfg, views=1, repeats=1, methods=["persona-judge", "mod"], progress=False)


def test_one_view_warning_is_a_persona_judge_warning():
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    with pytest.warns(PersonaJudgeWarning, match="1 view: skipping reference"):
        rep = bench.run_bench(cfg, views=1, repeats=1, methods=["plain", "reference"], progress=False, steps=False)
    assert [r["method"] for r in rep["results"]] == ["plain"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two views: no warning
        bench.run_bench(cfg, views=2, repeats=1, methods=["plain"], progress=False, steps=False)


def test_one_view_memory_is_probed_once(monkeypatch):
    probes = []

    class Done:
        returncode = 0
        stderr = ""

        def __init__(self, k):
            self.stdout = json.dumps(
                {
                    "views": k,
                    "peak_rss_mib": 50.0,
                    "gpu_peak_mib": None,
                    "rss_after_load_mib": 40.0,
                    "generation_rss_growth_mib": 1.5,
                    "generated_tokens": 4,
                }
            )

    def fake_run(cmd, **kw):
        k = int(cmd[cmd.index("--probe") + 1])
        probes.append(k)
        return Done(k)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    cfg = build_config({"backend": {"name": "toy"}})
    mem = bench.measure_memory(cfg, "hi", 1)
    assert probes == [1]
    assert mem == {"peak_rss_mib_1_view": 50.0, "generation_rss_growth_mib_1_view": 1.5, "generated_tokens_1_view": 4}
    probes.clear()
    assert "rss_ratio" in bench.measure_memory(cfg, "hi", 2) and probes == [1, 2]


# K: side by side


def test_repeats_are_interleaved_after_the_warm_ups(monkeypatch):
    order = []
    real = bench._one

    def spy(pj, cfg, name, prompt, views, seed, *rest):
        order.append((name, seed))
        return real(pj, cfg, name, prompt, views, seed, *rest)

    monkeypatch.setattr(bench, "_one", spy)
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4, "seed": 10}})
    methods = ["plain", "persona-judge", "reference"]
    rep = bench.run_bench(cfg, repeats=2, methods=methods, progress=False, steps=False)
    assert order == [(m, 10 + r) for r in range(3) for m in methods]
    for row in rep["results"]:
        assert [x["seed"] for x in row["runs"]] == [11, 12]  # the warm-ups (seed 10) are not timed


def test_host_bench_steps_the_paths_in_turn(monkeypatch, capsys):
    stepped = []
    real = host_bench.StepDriver.step

    def spy(self):
        stepped.append(id(self))
        return real(self)

    monkeypatch.setattr(host_bench.StepDriver, "step", spy)
    assert host_bench.main(["--numpy", "--steps", "2", "--warmup", "1", "--batch-sizes", "2", "--vocab", "64"]) == 0
    a, b = stepped[0], stepped[1]
    assert a != b and stepped == [a, b] * 3  # warm-up step of each, then the timed steps, alternating


# L2, L3


def test_view_preferences_keep_free_text_whole_and_feed_back():
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    kw = dict(repeats=1, methods=["plain"], progress=False, steps=False)
    rep = bench.run_bench(cfg, preferences=["short, witty answers", "humor"], **kw)
    groups = rep["settings"]["view_preferences"]
    assert groups == [["short, witty answers"], ["humor"]]
    again = bench.run_bench(cfg.model_copy(update={"views": groups}), **kw)
    assert again["settings"]["view_preferences"] == groups


def test_too_many_views_without_preferences_names_the_defaults(capsys, no_load):
    assert main([*BENCH, "--views", "9"]) == 2
    line = _one_error_line(capsys)
    assert "none were given" in line and "--prefer" in line and "got 8" not in line
    assert main([*BENCH, "--views", "3", "--prefer", "concise", "--prefer", "humor"]) == 2
    assert "needs at least 3 preferences, got 2" in _one_error_line(capsys)


def test_a_prompt_that_starts_with_a_dash_reaches_the_memory_probe(capsys):
    """The probe took ``--prompt -hello`` as a flag without its value: the probe failed after all the timed
    runs, a RuntimeError traceback (exit 1), and the report was lost. A real probe, on the toy backend."""
    cfg = {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}}
    mem = bench.measure_memory(build_config(cfg), "-hello", views=2, preferences=["concise", "humor"])
    assert mem["generated_tokens_1_view"] == 4 and mem["peak_rss_mib_1_view"] > 0


def test_a_memory_probe_that_fails_is_one_line(monkeypatch, capsys):
    class Failed:
        returncode = 3
        stdout = ""
        stderr = "Traceback ...\nOSError: the model file is gone\n"

    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: Failed())
    argv = ["bench", "--backend", "toy", "--max-new-tokens", "4", "--repeats", "1", "--no-steps", "--methods", "plain"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "personajudge: error: the memory probe (a fresh process with 1 view(s)) exited with status 3: "
        "OSError: the model file is gone"
    )
