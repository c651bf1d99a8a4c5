"""``personajudge bench``: a stable JSON schema and sane numbers (timings are not asserted)."""

import json

import numpy as np
import pytest

from personajudge.bench import SCHEMA, format_table, run_bench
from personajudge.bench.steps import step_costs
from personajudge.cli import main
from personajudge.core.config import build_config
from personajudge.core.contract import Session
from personajudge.core.errors import ConfigError


def test_report_schema_and_ratios():
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 24, "seed": 3}})
    rep = run_bench(cfg, views=2, repeats=2, progress=False)
    assert rep["schema"] == SCHEMA
    assert set(rep) >= {"machine", "backend", "settings", "results", "memory", "persona_judge_over_reference"}
    rows = {r["method"]: r for r in rep["results"]}
    assert list(rows) == ["plain", "persona-judge", "persona-judge-base", "reference"]
    assert rows["plain"]["ratio_to_plain"] == 1.0 and rows["plain"]["runner"] == "core"  # toy has no sampler
    for r in rows.values():
        assert len(r["runs"]) == 2 and r["tokens_per_s"] > 0 and r["tokens"] == 24
        assert {x["seed"] for x in r["runs"]} == {4, 5}  # the warm-up (seed 3) is not timed
    assert rows["persona-judge"]["views"] == 2 and rows["plain"]["views"] == 1
    assert 0 <= rows["persona-judge"]["acceptance_rate"] <= 1
    assert rep["persona_judge_over_reference"] == pytest.approx(
        rows["persona-judge"]["tokens_per_s"] / rows["reference"]["tokens_per_s"]
    )
    assert "| persona-judge " in format_table(rep)
    steps = rep["steps"]
    assert set(steps) >= {"plain_step_ms", "cycle", "cycle_tokens", "per_token_ms", "estimate_ratio"}
    assert all(s["ms"] > 0 and s["count"] > 0 for s in steps["cycle"]) and steps["per_token_ms"] > 0
    assert rep["ceiling"]["acceptance_rate"] == 1.0 and rep["ceiling"]["tokens_per_s"] > 0
    assert "persona-judge ceiling" in format_table(rep)
    assert rep["ceiling"]["tokens"] == 24 and "of plain, over 24 tokens" in format_table(rep)
    assert run_bench(cfg, views=1, repeats=1, methods=["plain"], progress=False)["steps"] is None
    assert run_bench(cfg, views=2, repeats=1, methods=["plain"], progress=False, steps=False)["steps"] is None


class _Clocked(Session):
    """A session whose steps advance a fake clock by a fixed cost per call and per logits row,
    and which checks that every timed step is rolled back."""

    def __init__(self, per_call, per_row, per_token):
        super().__init__(2, 4096)
        self.now = 0.0
        self.cost = (per_call, per_row, per_token)

    @property
    def len(self):
        return list(self._lengths)

    def _forward_many(self, calls):
        c, r, t = self.cost
        self.now += c + sum(r * n + t * len(toks) for _, toks, n in calls)
        return [np.zeros((n, 8), dtype=np.float32) for _, _, n in calls]

    def _truncate(self, view, length):
        assert length <= self.length(view)


def test_step_costs_and_the_ceiling_they_imply():
    """Costs come out of the clock per step; the step model is the plain step over the interleaved
    schedule's average step at full acceptance (both view orders cost the same here)."""
    s = _Clocked(per_call=0.001, per_row=0.008, per_token=0.002)
    costs = step_costs(s, [[5] * 10, [6] * 12], lam=4, repeats=3, clock=lambda: s.now)
    assert costs["plain_step_ms"] == pytest.approx(11.0)
    ms = {tuple(map(tuple, c["calls"])): c["ms"] for c in costs["cycle"]}
    assert ms[((0, 1, 1), (1, 1, 1))] == ms[((1, 1, 1), (0, 1, 1))] == pytest.approx(21.0)
    assert ms[((1, 1, 1), (0, 1, 0))] == pytest.approx(13.0)
    assert costs["estimate_ratio"] == pytest.approx(11.0 / ((4 * 21.0 + 13.0) / 5))
    assert s.len == [10, 12]  # the prompts stay, every timed step was rolled back
    with pytest.raises(ValueError, match="two views"):
        step_costs(s, [[5] * 10], lam=4)


def test_cli_json_with_memory_probes(capsys):
    assert (
        main(
            [
                "bench",
                "--backend",
                "toy",
                "--max-new-tokens",
                "8",
                "--repeats",
                "1",
                "--views",
                "3",
                "--methods",
                "plain,persona-judge,mod",
                "--json",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rep["results"]] == ["plain", "persona-judge", "mod"]
    mem = rep["memory"]
    assert mem["peak_rss_mib_1_view"] > 0 and mem["peak_rss_mib_3_views"] > 0 and mem["rss_ratio"] > 0
    assert "generation_rss_growth_mib_3_views" in mem


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--views", "0"], "--views"),
        (["--repeats", "0"], "--repeats"),
        (["--methods", "plain,warp"], "unknown method 'warp'"),
        (["--views", "9"], "preferences"),
    ],
)
def test_bad_bench_input_exits_2(argv, needle, capsys):
    assert main(["bench", "--backend", "toy", "--no-memory", *argv]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("cap", ["0", "-5"])
def test_reference_cap_below_one_exits_2_naming_the_flag(cap, capsys):
    """A cap of 0 used to be ignored (the reference ran --max-new-tokens) and -5 slipped past validation."""
    assert main(["bench", "--backend", "toy", "--no-memory", "--reference-max-new-tokens", cap]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--reference-max-new-tokens must be at least 1, got {cap}" in err


@pytest.mark.parametrize("cap", [0, -5])
def test_reference_cap_below_one_is_a_config_error_in_the_api(cap):
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 8}})
    with pytest.raises(ConfigError, match=r"reference_max_new_tokens: .*greater than or equal to 1"):
        run_bench(cfg, methods=["reference"], repeats=1, progress=False, reference_max_new_tokens=cap)


def test_reference_cap_times_that_many_tokens():
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 8, "seed": 0}})
    rep = run_bench(
        cfg, methods=["reference", "plain"], repeats=1, progress=False, steps=False, reference_max_new_tokens=1
    )
    assert {r["method"]: r["tokens"] for r in rep["results"]} == {"reference": 1, "plain": 8}
    assert rep["settings"]["reference_max_new_tokens"] == 1


@pytest.mark.parametrize("methods", ["plain,plain", "plain,mod,mod", ","])
def test_bench_methods_listed_twice_or_none_exit_2(methods, capsys):
    assert main(["bench", "--backend", "toy", "--no-memory", "--methods", methods]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--methods" in err and repr(methods) in err


def test_bench_methods_twice_is_a_config_error_in_the_api():
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    with pytest.raises(ConfigError, match="plain listed twice"):
        run_bench(cfg, methods=["plain", "persona-judge", "plain"], repeats=1, progress=False)
