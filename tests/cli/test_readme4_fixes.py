"""README audit 4: the claims a reader can check after bench audit 2 (schema ``personajudge.bench/2``).

The README names every key of ``bench-serve``'s JSON report (its ``settings`` with the server's limits
included), quotes ``bench``'s output lines in the format ``format_table`` prints them, marks the
Hugging Face table that predates the measured ceiling, and says which tests ``make test-fast`` runs.
Each test reads the README and the code side by side, so either one changing alone fails it. Toy
backend only, no server, no timing asserted.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import personajudge.bench as bench
import personajudge.serve.bench as serve_bench
from personajudge.cli.serve import SERVE_MAX_BATCH, SERVE_MAX_QUEUE
from personajudge.core.config import build_config

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(start: str, end: str) -> str:
    """The README's text from ``start`` up to ``end`` (both must be there: a renamed heading fails)."""
    i = README.index(start)
    return README[i : README.index(end, i)]


BENCH_SERVE = _section("**Measured** (`personajudge bench-serve`", "### Batched acceptance")


def _fake_bench_serve(monkeypatch, *, url: str | None) -> dict:
    """run_bench_serve's report with no server and no client: one level whose row is built by the module's
    own ``_row``, and (without ``url``) a "started" server whose limits are recorded."""

    async def level(url, model, c, n, max_tokens, headers, bound):
        return serve_bench._row(
            f"server c={c}", 1.0, [0.5], [0.1], 4, 0, views=[2], acceptance=[0.9], encoders=["exemplar"]
        )

    monkeypatch.setattr(serve_bench, "_level", level)
    monkeypatch.setattr(serve_bench, "check_url", lambda u, **kw: u)
    monkeypatch.setattr(serve_bench, "start_server", lambda flags, **kw: (None, "http://127.0.0.1:1"))
    cfg = build_config({"backend": {"name": "toy"}, "preferences": ["concise", "humor"]})
    return serve_bench.run_bench_serve(
        cfg,
        server_flags=[],
        levels=[1],
        n_requests=1,
        max_tokens=4,
        url=url,
        direct=False,
        progress=False,
        limits={"max_batch": 12, "max_queue": 80},
    )


def test_the_readme_names_every_key_of_the_bench_serve_report(monkeypatch):
    rep = _fake_bench_serve(monkeypatch, url=None)
    keys = set(rep) | set(rep["settings"]) | set(rep["rows"][0])
    unnamed = sorted(k for k in keys if f"`{k}`" not in BENCH_SERVE)
    assert not unnamed, f"bench-serve's JSON keys the README's bench-serve paragraphs do not name: {unnamed}"


def test_the_started_servers_limits_are_recorded_and_null_with_url(monkeypatch):
    started = _fake_bench_serve(monkeypatch, url=None)["settings"]
    assert (started["max_batch"], started["max_queue"]) == (12, 80)
    at_url = _fake_bench_serve(monkeypatch, url="http://127.0.0.1:1/v1")["settings"]
    assert at_url["max_batch"] is None and at_url["max_queue"] is None
    assert "`null` with `--url`" in BENCH_SERVE
    # the encoder the requests ran with, as the server's responses said (README: "the one the requests ran with")
    assert started["encoder"] == "exemplar" and "the one the requests ran with" in BENCH_SERVE


def test_the_serve_defaults_the_readme_says_bench_serve_raises_are_serves():
    text = " ".join(BENCH_SERVE.split())
    m = re.search(r"`--max-batch` is raised from `serve`'s default \((\d+)\).*?`--max-queue` from (\d+) to", text)
    assert m, "the README no longer says what bench-serve raises the limits from"
    assert (int(m.group(1)), int(m.group(2))) == (SERVE_MAX_BATCH, SERVE_MAX_QUEUE)


def test_the_bench_schema_the_readme_quotes_is_the_benchs():
    assert re.findall(r"personajudge\.bench/\d+", README) == [bench.SCHEMA]


def _template(line: str) -> str:
    return re.sub(r"\d+(?:\.\d+)?", "#", line.strip())


def _bench_blocks() -> list[tuple[str, int]]:
    """The README's code blocks of ``bench`` output (those with a step-costs line), with where each ends."""
    fences = re.finditer(r"^```(\w*)\n(.*?)^```$", README, flags=re.S | re.M)
    return [(m.group(2), m.end()) for m in fences if not m.group(1) and "step costs (" in m.group(2)]


@pytest.fixture(scope="module")
def bench_output() -> list[str]:
    """``format_table`` of a real toy run (2 views, lambda 4, steps and ceiling on), with memory figures added
    (the probes are subprocesses: their numbers do not matter here, their line's format does)."""
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 16}})
    rep = bench.run_bench(cfg, repeats=1, progress=False)
    rep["memory"].update(
        {
            "peak_rss_mib_1_view": 592.0,
            "peak_rss_mib_2_views": 603.0,
            "rss_ratio": 1.02,
            "generation_rss_growth_mib_1_view": 19.1,
            "generation_rss_growth_mib_2_views": 30.2,
            "generated_tokens_1_view": 16,
            "generated_tokens_2_views": 16,
        }
    )
    return [_template(line) for line in bench.format_table(rep).splitlines() if line.strip()]


def test_the_readmes_bench_output_is_in_the_format_the_bench_prints(bench_output):
    current = [block for block, _ in _bench_blocks() if "persona-judge ceiling (" in block]
    assert current, "the README quotes no bench output with the measured ceiling"
    for block in current:
        for line in block.splitlines():
            want = _template(line)
            assert any(out.startswith(want) for out in bench_output), f"the bench no longer prints: {line}"


def test_a_quoted_bench_block_without_the_measured_ceiling_says_it_predates_it():
    for block, end in _bench_blocks():
        if "persona-judge ceiling (" not in block:
            assert "predates the measured ceiling" in README[end : end + 400], block


def test_no_steps_skips_both_the_step_costs_and_the_ceiling():
    assert "`--no-steps` skips both" in " ".join(README.split())
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    rep = bench.run_bench(cfg, repeats=1, methods=["plain", "persona-judge"], steps=False, progress=False)
    assert rep["steps"] is None and rep["ceiling"] is None


def test_make_test_fast_leaves_out_the_markers_the_readme_names():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    expr = re.search(r"^test-fast:.*?\n\t.*?-m \"([^\"]+)\"", makefile, flags=re.S | re.M)
    assert expr, "make test-fast no longer selects tests by marker"
    excluded = set(re.findall(r"not (\w+)", expr.group(1)))
    line = next(x for x in README.splitlines() if x.startswith("make test-fast"))
    m = re.search(r"without the ([\w, ]+) markers", line)
    assert m, line
    assert set(re.split(r",\s*|\s+and\s+", m.group(1))) == excluded
