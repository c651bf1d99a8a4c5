"""``personajudge bench``: a stable JSON schema and sane numbers (timings are not asserted)."""

import json

import pytest

from personajudge.core.config import build_config
from personajudge.plugins.bench import SCHEMA, format_table, run_bench
from personajudge.plugins.cli import main


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
        rows["persona-judge"]["tokens_per_s"] / rows["reference"]["tokens_per_s"])
    assert "| persona-judge " in format_table(rep)


def test_cli_json_with_memory_probes(capsys):
    assert main(["bench", "--backend", "toy", "--max-new-tokens", "8", "--repeats", "1", "--views", "3",
                 "--methods", "plain,persona-judge,mod", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rep["results"]] == ["plain", "persona-judge", "mod"]
    mem = rep["memory"]
    assert mem["peak_rss_mb_1_view"] > 0 and mem["peak_rss_mb_3_views"] > 0 and mem["rss_ratio"] > 0
    assert "generation_rss_growth_mb_3_views" in mem


@pytest.mark.parametrize("argv, needle", [
    (["--views", "0"], "--views"),
    (["--repeats", "0"], "--repeats"),
    (["--methods", "plain,warp"], "unknown method 'warp'"),
    (["--views", "9"], "preferences"),
])
def test_bad_bench_input_exits_2(argv, needle, capsys):
    assert main(["bench", "--backend", "toy", "--no-memory", *argv]) == 2
    assert needle in capsys.readouterr().err
