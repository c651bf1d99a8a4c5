"""examples/gpu_check.py runs end to end on the CPU with tiny shapes, so the prepared GPU run cannot rot.

The GPU run itself (real shapes, bf16, CUDA tests) needs a GPU; here the same
code paths run on tiny random models: install check, the CUDA test selection
(skipping without a GPU), build, cache check, bench, 3 views, batch 16 vs 1,
the memory step, the time budget, and the JSON and Markdown reports.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900)


def test_gpu_check_rehearsal_on_the_cpu(tmp_path):
    proc = run(str(tmp_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["schema"] == "personajudge.gpu_check/1" and rep["ok"] is True and rep["device"] == "cpu"
    assert rep["install"]["project"] == "already importable"
    assert "skipped" in rep["tests"]["summary"] or "passed" in rep["tests"]["summary"]
    assert "skipped" in rep["tests_graphs"]["summary"] or "passed" in rep["tests_graphs"]["summary"]
    assert [r["shape"] for r in rep["shapes"]] == ["tiny-gemma3", "tiny-qwen2"] and not rep["skipped_shapes"]
    for row in rep["shapes"]:
        assert not row["skipped"] and "unfinished" not in row
        # float32 on the CPU: cached and recomputed logits agree to rounding
        assert row["cache_check"]["argmax_agrees"] and row["cache_check"]["max_abs_diff"] < 1e-3
        methods = {r["method"]: r for r in row["bench"]["results"]}
        assert set(methods) == {"plain", "persona-judge", "persona-judge-base"}
        assert methods["plain"]["runner"] == "native" and methods["persona-judge"]["runner"] == "core"
        assert all(r["tokens"] == 12 and r["tokens_per_s"] > 0 for r in methods.values())
        assert row["views_3"]["settings"]["views"] == 3 and row["views_3"]["results"][0]["views"] == 3
        assert row["bench"]["steps"]["ceiling_ratio"] > 0
        b = row["batch"]
        assert b["batch_1"]["prompts"] == 1 and b["batch_16"]["prompts"] == 16
        assert b["batch_16"]["tokens"] == 16 * 12 and b["speedup"] > 0
        assert row["memory"] is None  # no GPU: nothing to measure, and nothing pretends
        assert row["backend"]["device"] == "cpu" and row["backend"]["model"] == f"synthetic:{row['shape']}"
    md = (tmp_path / "gpu_check.md").read_text()
    assert md.count("| tiny-") == 4 and "Targets (issue 17)" in md  # the main table and the compiled one
    for row in rep["shapes"]:  # the compiled run: traced (no code generation on the CPU), timed beside generate
        comp = row["compiled"]
        assert comp["options"]["compile_backend"] == "eager" and comp["compile_fallback"] is None
        assert comp["compile_judge"] == "torch.compile (eager)"  # the batched judge traced too, no fallback
        assert comp["backend"]["cache_implementation"] == "static"
        assert {r["method"] for r in comp["results"]} == {"plain", "persona-judge"}
        assert row["targets"]["compiled_persona_judge_over_generate"] > 0


def test_a_crash_mid_shape_keeps_what_was_measured_before_it(tmp_path, monkeypatch):
    """The run saves after every step: a step that never returns (here an interrupt in the memory
    step; on the GPU a segfault, an out-of-memory kill or the time limit) leaves the earlier ones."""
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: nothing in the check catches it, as with a real crash

    monkeypatch.setattr(gpu_check, "memory", crash)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main([str(tmp_path), "--device", "cpu", "--no-tests", "--shapes", "tiny-qwen2"])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = rep["shapes"]
    assert row["unfinished"] is True and "memory" not in row and "compiled" not in row
    assert row["bench"]["results"] and row["batch"]["speedup"] > 0 and row["cache_check"]["argmax_agrees"]
    assert "| tiny-qwen2 |" in (tmp_path / "gpu_check.md").read_text()


def test_the_bare_machine_install_path(tmp_path):
    """--reinstall takes the path a GPU image without pydantic takes: pip install --no-index of the
    wheels folder and of the working tree into --site, then a re-run of the script from that copy."""
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    proc = run(
        str(out),
        "--device",
        "cpu",
        "--no-tests",
        "--shapes",
        "tiny-qwen2",
        "--reinstall",
        "--site",
        str(site),
        "--wheels",
        str(wheels),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["install"]["missing_before"] == "(--reinstall)" and rep["install"]["wheels"] == []
    assert rep["install"]["project"].startswith("pip install --no-index")
    assert Path(rep["versions"]["personajudge_from"]).is_relative_to(site.resolve())  # ran from the installed copy
    assert rep["ok"] is True and rep["shapes"][0]["bench"]["results"]


def test_the_time_budget_skips_shapes(tmp_path):
    proc = run(str(tmp_path), "--device", "cpu", "--no-tests", "--budget-s", "1", "--shapes", "tiny-qwen2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["skipped_shapes"] == ["tiny-qwen2"] and rep["shapes"] == [] and rep["tests"] == {}
    assert "tiny-qwen2: time budget" in (tmp_path / "gpu_check.md").read_text()


def test_unknown_shape_is_a_usage_error(tmp_path):
    proc = run(str(tmp_path), "--device", "cpu", "--shapes", "gpt-5")
    assert proc.returncode == 2 and "unknown shape" in proc.stderr
