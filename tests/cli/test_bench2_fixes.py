"""``personajudge bench`` and ``bench-serve``: audit 2 findings A-G (notes/audit_bench2.md).

Toy backend and in-process fake servers on 127.0.0.1; no timing is asserted (fake clocks where a cost
matters).
"""

import contextlib
import json

import fake_openai
import pytest

import personajudge.bench as bench
from personajudge.bench.steps import loop_cycle, step_costs
from personajudge.cli import main
from personajudge.core.config import build_config

BENCH = ["bench", "--backend", "toy", "--max-new-tokens", "16", "--repeats", "1", "--no-memory"]


# A: the step cycle is the loop's, in both view orders, per schedule and K


def test_the_cycle_has_both_view_orders_when_roles_alternate():
    """Interleaved, 2 alternating views, λ 4: per 10 tokens, 4 two-row steps in each view order and one
    one-row step in each (the old steps timed only view order 0, 1)."""
    cycle, tokens = loop_cycle(2, 4, "interleaved", "alternate")
    assert tokens == 10
    assert dict(cycle) == {
        ((0, 1, 1), (1, 1, 1)): 4,
        ((1, 1, 1), (0, 1, 0)): 1,
        ((1, 1, 1), (0, 1, 1)): 4,
        ((0, 1, 1), (1, 1, 0)): 1,
    }
    fixed, t = loop_cycle(2, 4, "interleaved", "fixed")
    assert t == 5 and dict(fixed) == {((0, 1, 1), (1, 1, 1)): 4, ((1, 1, 1), (0, 1, 0)): 1}


def test_the_windowed_and_k_view_cycles_are_their_own():
    """Windowed: λ one-view drafts and one verification of λ+1 rows (the judge also feeds the two tokens
    it has pending); 3 views: every view takes part, and a view back from idling feeds what it missed."""
    cycle, tokens = loop_cycle(2, 4, "windowed", "alternate")
    assert tokens == 10
    assert dict(cycle) == {((0, 1, 1),): 4, ((1, 6, 5),): 1, ((1, 1, 1),): 4, ((0, 6, 5),): 1}
    three, t3 = loop_cycle(3, 4, "interleaved", "alternate")
    assert t3 == 15
    assert {v for shape, _ in three for v, _, _ in shape} == {0, 1, 2}
    assert sum(n for shape, n in three if any(c[1] == 1 + 4 + 1 for c in shape)) == 3  # one catch-up per iteration


class _ClockSession:
    """A session whose forward costs depend on the view order: (0, 1) costs 30 ms, (1, 0) 10 ms."""

    n_views = 2

    def __init__(self):
        self.now = 0.0
        self.calls = []

    def forward_many(self, calls):
        import numpy as np

        shape = tuple((c[0], len(c[1]), c[2]) for c in calls)
        self.calls.append(shape)
        if len(calls) == 1:
            self.now += 0.005
        else:
            self.now += 0.030 if calls[0][0] == 0 else 0.010
        return [np.zeros((c[2], 4)) for c in calls]

    def truncate(self, view, length):
        pass


def test_step_costs_weigh_each_step_of_the_cycle():
    s = _ClockSession()
    costs = step_costs(s, [[5] * 10, [6] * 12], lam=4, repeats=3, clock=lambda: s.now)
    assert ((1, 1, 1), (0, 1, 1)) in s.calls  # the other view order is timed too
    assert costs["plain_step_ms"] == pytest.approx(5.0)
    # per 10 tokens: 4 x (0,1) 30 + 1 x (1,0) 10 + 4 x (1,0) 10 + 1 x (0,1) 30
    assert costs["per_token_ms"] == pytest.approx((4 * 30 + 10 + 4 * 10 + 30) / 10)
    assert costs["estimate_ratio"] == pytest.approx(5.0 / 20.0)


def test_the_ceiling_is_persona_judges_loop_at_full_acceptance():
    """Measured with the run's K and schedule, on K copies of the first view: every draft accepted."""
    cfg = build_config(
        {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 12, "seed": 1, "schedule": "windowed"}}
    )
    rep = bench.run_bench(cfg, views=3, repeats=1, methods=["plain", "persona-judge"], progress=False)
    ceil = rep["ceiling"]
    assert ceil["views"] == 3 and ceil["schedule"] == "windowed" and ceil["acceptance_rate"] == 1.0
    assert ceil["ratio_to_plain"] == pytest.approx(ceil["tokens_per_s"] / rep["results"][0]["tokens_per_s"])
    assert rep["steps"]["views"] == 3 and rep["steps"]["schedule"] == "windowed"
    assert "ceiling" in bench.format_table(rep) and "not a bound" in bench.format_table(rep)


# D: the settings that change the numbers are in the report; G2: tokens is an integer


def test_settings_record_schedule_roles_encoder_and_system():
    cfg = build_config(
        {
            "backend": {"name": "toy"},
            "encoder": "instruction",
            "system": "hi",
            "decoding": {"max_new_tokens": 8, "schedule": "windowed", "roles": "fixed", "seed": 0},
        }
    )
    rep = bench.run_bench(cfg, repeats=2, methods=["plain", "persona-judge"], progress=False, steps=False)
    s = rep["settings"]
    assert (s["schedule"], s["roles"], s["encoder"], s["system"]) == ("windowed", "fixed", "instruction", "hi")
    assert s["encoder_options"]["stop"] is False and s["repeat_lines"] == 0
    assert all(type(r["tokens"]) is int for r in rep["results"])  # 2 repeats: no median of 16 and 16 = 16.0
    assert rep["schema"] == "personajudge.bench/2"
    assert "schedule windowed, roles fixed, encoder instruction" in bench.format_table(rep)


def test_auto_encoder_is_recorded_as_what_was_timed():
    rep = bench.run_bench(
        build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}}),
        repeats=1,
        methods=["plain"],
        progress=False,
        steps=False,
    )
    assert rep["settings"]["encoder"] == "plain" and rep["settings"]["roles"] is None
    assert "peak_rss_mib_this_process" in rep["memory"] and "gpu_peak_mib" in rep["memory"]


# C: the reference cap


def test_a_reference_cap_above_max_new_tokens_is_refused(capsys):
    assert main([*BENCH, "--no-steps", "--reference-max-new-tokens", "17"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot lengthen" in err[0]


def test_a_reference_cap_without_the_reference_is_refused(capsys, monkeypatch):
    """``--methods plain --reference-max-new-tokens 8`` timed plain and ignored the cap; now refused, before
    anything is timed."""
    import personajudge.cli.bench as bench_cli

    monkeypatch.setattr(bench_cli, "run_bench", lambda *a, **k: pytest.fail("the bench ran"))
    assert main([*BENCH, "--no-steps", "--methods", "plain,persona-judge", "--reference-max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "personajudge: error: --reference-max-new-tokens has no effect: --methods plain,persona-judge does not "
        "time the reference; add reference to --methods or drop the flag"
    ]


def test_a_capped_reference_ratio_says_it_is_not_like_for_like(capsys):
    assert main([*BENCH, "--no-steps", "--methods", "persona-judge,reference", "--reference-max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "NOT like for like: persona-judge over 16 tokens, the reference over 8" in out
    assert (
        main(
            [*BENCH, "--no-steps", "--methods", "persona-judge,reference", "--reference-max-new-tokens", "8", "--json"]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["persona_judge_over_reference_tokens"] == [16, 8]


# B: the memory probes run the timed workload


def test_the_memory_probe_generates_what_the_timed_runs_do(monkeypatch):
    seen = {}
    real = bench.PersonaJudge

    class Spy(real):
        def generate(self, prompt, **kw):
            seen["cfg"], seen["kw"] = self.config, kw
            return super().generate(prompt, **kw)

    monkeypatch.setattr(bench, "PersonaJudge", Spy)
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 24, "seed": 5}})
    out = bench.memory_probe(cfg, "hi", 2)
    assert seen["cfg"].encoder == "plain" and seen["cfg"].encoder_options.get("stop") is False
    assert seen["cfg"].decoding.repeat_lines == 0 and seen["cfg"].decoding.max_new_tokens == 24
    assert seen["kw"]["seed"] == 6  # the first timed run's seed
    assert out["seed"] == 6 and 1 <= out["generated_tokens"] <= 24 and "peak_rss_mib" in out


# bench-serve: E, F, G3, G4, G5


@contextlib.contextmanager
def fake_server(mode):
    """The shared fake (tests/helpers/fake_openai.py), yielding only its URL; httpx is the bench's client."""
    pytest.importorskip("httpx")
    with fake_openai.fake_server(mode) as (url, _):
        yield url


SERVE = ["bench-serve", "--backend", "toy", "--no-direct", "--requests", "2", "--max-tokens", "4", "--json"]


def test_concurrency_listed_twice_is_refused(capsys):
    assert main([*SERVE, "--concurrency", "1,1"]) == 2
    assert "twice" in capsys.readouterr().err


def test_a_server_without_usage_is_not_reported_as_zero_tokens(capsys):
    with fake_server("nousage") as url:
        assert main([*SERVE, "--url", url, "--concurrency", "1"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["tokens"] is None and row["tokens_per_s"] is None and row["requests_without_usage"] == 2
    assert row["views"] == [2]


def test_levels_measured_before_a_failed_level_are_kept(capsys):
    # the c=1 level: one warm-up and two requests; everything after fails
    with fake_server("fail-after-3") as url:
        assert main([*SERVE, "--url", url, "--concurrency", "1,2"]) == 2
    cap = capsys.readouterr()
    rep = json.loads(cap.out)
    assert [r["name"] for r in rep["rows"]] == ["server c=1"] and rep["rows"][0]["tokens"] == 2
    assert rep["failed_level"]["concurrency"] == 2 and "503" in rep["failed_level"]["error"]
    assert "503" in cap.err


def test_batch_and_queue_limits_are_passed_as_given_or_raised_aloud(capsys, monkeypatch):
    pytest.importorskip("fastapi")
    import personajudge.serve.bench as serve_bench

    started = []

    def fake_start(flags, **kw):  # the flags the server would get; no server (the levels are faked too)
        started.append(flags)
        raise SystemExit(0)

    monkeypatch.setattr(serve_bench, "start_server", fake_start)
    with pytest.raises(SystemExit):
        main([*SERVE, "--concurrency", "1,4", "--max-batch", "1"])
    flags = started[-1]
    assert flags[flags.index("--max-batch") + 1] == "1" and flags[flags.index("--max-queue") + 1] == "64"
    err = capsys.readouterr().err
    assert "below concurrency 4" in err
    # F: no preferences: every request would be one view, said before the server starts
    assert "plain sampling" in err
    with pytest.raises(SystemExit):
        main([*SERVE, "--concurrency", "1,12", "--requests", "80"])
    flags = started[-1]
    assert flags[flags.index("--max-batch") + 1] == "12" and flags[flags.index("--max-queue") + 1] == "80"
    err = capsys.readouterr().err
    assert "--max-batch 12" in err and "--max-queue 80" in err


def test_bench_serve_records_the_settings_and_the_limits(capsys):
    with fake_server("ok") as url:
        assert (
            main(
                [
                    *SERVE,
                    "--url",
                    url,
                    "--concurrency",
                    "1",
                    "--view",
                    "concise,humor",
                    "--view",
                    "expert",
                    "--lambda",
                    "3",
                    "--top-k",
                    "5",
                    "--schedule",
                    "windowed",
                ]
            )
            == 0
        )
    st = json.loads(capsys.readouterr().out)["settings"]
    assert st["views"] == 2 and st["view_groups"] == [["concise", "humor"], ["expert"]]
    assert (st["lambda"], st["top_k"], st["schedule"]) == (3, 5, "windowed")
    assert st["max_batch"] is None  # a server at --url: its limits are not known here


def test_the_progress_bar_is_drawn_only_on_a_terminal(capsys):
    """bench wrote its tqdm redraws (``bench:  50%|...``) into a log file; batch mode and eval draw theirs
    only on a terminal, and so does bench now."""
    assert main([*BENCH, "--no-steps", "--methods", "plain"]) == 0
    err = capsys.readouterr().err
    assert "bench:" not in err and "%|" not in err, err
