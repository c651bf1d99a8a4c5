"""examples/gpu_check.py against its time budget, and its verdicts: what the one unattended GPU run will say.

- The default plan, replayed on a virtual clock with every step taking exactly
  its estimate (the check's own numbers, nothing measured): what the issue
  needs must be reached within the default budget; an overrun on the 7B must
  cost the compiled step, not the CUDA tests.
- A test run or a compiled step stopped by the budget is skipped for time
  (exit 3), not failed; a shape the compiled steps' process never started is
  not reached.
- A hung CUDA test is named afterwards, with its stack; a test that hangs past
  its own limit fails, named.
- A compiled step that fell back is its own verdict (exit 4), not ok.
- The GPU's details a result needs: CUDA, the driver, the card's memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import types
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_check.py"
TARGETS = ("cache_check", "bench", "memory", "batch", "profile")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_budget_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


# ----------------------------------------------------------------------------- the plan on a virtual clock


class Clock:
    """The check's ``time`` module, on a virtual clock: a step "sleeps" its planned seconds in no time."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    perf_counter = monotonic = time

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def simulate(monkeypatch, out: Path, slow: dict | None = None, argv: tuple = ()) -> tuple[int, dict, list]:
    """``main()`` on the GPU shapes with every step replaced by its planned time on a virtual clock
    (the auditor's replay, without wall-clock time): the start-up :data:`STARTUP_S`, each model's
    build (:data:`BUILD_SHARE` of its shape's estimate), each step its share, each test run its
    :data:`TESTS_S` (at most its time limit), each compiled step its shape's compile estimate (in
    the compiled steps' child, run in this process with its own budget). ``slow``: (shape, step) ->
    how many times its plan that step takes. The plan, the gates, the records and the verdict are
    the check's own."""
    g = load_gpu_check()
    clock = Clock()
    monkeypatch.setattr(g, "time", clock)
    events: list[tuple] = []

    def installed(args, argv):
        clock.sleep(g.STARTUP_S)
        return {"project": "simulated", "started": args.started}

    def build(shape, device, **kw):
        clock.sleep(g.SHAPES[shape][2] * g.BUILD_SHARE)
        events.append(("build", shape))
        model = types.SimpleNamespace(parameters=lambda: iter(()))
        return types.SimpleNamespace(model=model, describe=lambda: {"model": shape}, close=lambda: None)

    def step(self, shape, name):
        self.backend(shape)
        planned = g.SHAPES[shape][2] * g.STEPS[name][1] * (slow or {}).get((shape, name), 1)
        clock.sleep(planned)
        events.append((shape, name))
        return {"simulated_s": planned}

    def compiled(shape, device, args, budget):
        clock.sleep(g.SHAPES[shape][3])
        events.append((shape, "compiled"))
        graphs = {"recorded": 2, "replayed": 300, "warmup_runs": 2, "skips": 0, "used": True}
        return {"results": [], "compile_fallback": None, "compile_judge": "torch.compile (inductor)", "graphs": graphs}

    def bounded(cmd, limit, **kw):
        if "--internal-compiled" in cmd:
            g._internal_compiled(g.parse_args(cmd[2:]), g.Budget(limit))
            return {"rc": 0, "timed_out": False, "stdout": "", "stderr": "", "wall_s": 0.0}
        select = cmd[cmd.index("-k") + 1]
        took = min(limit, g.TESTS_S[select])
        clock.sleep(took)
        events.append(("tests", select))
        out = "tests/backends/test_hf.py::test_x PASSED [100%]\n=== 1 passed ===\n"
        return {"rc": 0, "timed_out": False, "stdout": out, "stderr": "", "wall_s": took}

    monkeypatch.setattr(g, "ensure_installed", installed)
    monkeypatch.setattr(g, "build_backend", build)
    monkeypatch.setattr(g.Shapes, "_step", step)
    monkeypatch.setattr(g, "compiled", compiled)
    monkeypatch.setattr(g, "_run_bounded", bounded)
    code = g.main([str(out), "--device", "cpu", "--shapes", ",".join(g.GPU_SHAPES), *argv])
    return code, json.loads((out / "gpu_check.json").read_text()), events


def _status(rep: dict) -> dict[str, str]:
    return {r["step"]: r["status"] for r in rep["plan"]}


def test_the_default_plan_reaches_what_the_issue_needs_within_the_default_budget(tmp_path, monkeypatch):
    """By the check's own estimates, the default budget reaches: the targets on 1B and 7B, the CUDA
    tests (not graphs), persona-judge-base with the step costs on 1B, the CUDA-graph tests and the
    compiled step on 1B. 270M and the rest come after all of them, only with time left."""
    code, rep, events = simulate(monkeypatch, tmp_path)
    assert rep["settings"]["budget_s"] == 465.0  # the default (README "GPU check": the arithmetic)
    status = _status(rep)
    needed = [f"{s}.{n}" for s in ("gemma3-1b", "qwen2.5-7b") for n in TARGETS]
    needed += ["tests", "gemma3-1b.bench_extra", "tests_graphs", "gemma3-1b.compiled"]
    assert {k: status.get(k) for k in needed} == dict.fromkeys(needed, "ok"), rep["plan"]
    assert [r["step"] for r in rep["plan"] if r["required"]] == needed
    first_optional = next(i for i, r in enumerate(rep["plan"]) if not r["required"])
    assert all(r["required"] for r in rep["plan"][:first_optional])
    assert not any(r["required"] for r in rep["plan"][first_optional:])
    assert code == 0 and rep["verdict"] == "ok" and rep["failed"] == [] and rep["skipped_required"] == []
    assert rep["complete"] is False and any(s.startswith("gemma3-270m.") for s in rep["skipped"])  # no time left
    assert rep["elapsed_s"] <= rep["settings"]["budget_s"]  # each step started with its estimate left
    # the CUDA tests right after the target shapes, before anything of 270M
    tests_at = events.index(("tests", "not graphs"))
    assert events.index(("qwen2.5-7b", "batch")) < tests_at
    assert all(e[-1] != "gemma3-270m" and "gemma3-270m" not in e for e in events[:tests_at])


def test_the_readme_s_plan_table_is_the_default_plan(tmp_path, monkeypatch):
    """The README's "ends at" column ("GPU check") is the default plan's clock, step group by step group:
    an estimate changed in the script and not in the README fails here."""
    _, rep, _ = simulate(monkeypatch, tmp_path)
    clock, ends = load_gpu_check().STARTUP_S, {}
    for r in rep["plan"]:
        if r["status"] == "ok":  # each took exactly its estimate (the build inside its shape's first step)
            clock += r["took_s"]
            ends[r["step"]] = clock
    last = [f"gemma3-1b.{TARGETS[-1]}", f"qwen2.5-7b.{TARGETS[-1]}", "tests", "gemma3-1b.bench_extra"]
    last += ["tests_graphs", "gemma3-1b.compiled"]
    readme = (SCRIPT.parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| start-up and install |") :]
    rows = [row.split("|") for row in table[: table.index("\n\n")].splitlines()]
    assert [float(row[3]) for row in rows[1:-1]] == [ends[step] for step in last]
    assert float(rows[0][3]) == load_gpu_check().STARTUP_S and rows[-1][3].strip() == "not reached"
    assert f"`--budget-s {load_gpu_check().BUDGET_S:g}`" in readme and f"| {rep['elapsed_s']:g} |" in table


def test_an_overrun_on_the_7b_costs_the_compiled_step_not_the_cuda_tests(tmp_path, monkeypatch):
    """The 7B's batch step takes three times its plan: the CUDA tests and the graph tests still run
    (they come before anything optional), the compiled step is skipped for time, and the run says
    incomplete (exit 3), naming it: not failed."""
    code, rep, events = simulate(monkeypatch, tmp_path, slow={("qwen2.5-7b", "batch"): 3})
    status = _status(rep)
    assert status["tests"] == status["tests_graphs"] == status["gemma3-1b.bench_extra"] == "ok"
    assert status["gemma3-1b.compiled"] == "skipped for time"
    assert code == 3 and rep["verdict"] == "incomplete" and rep["failed"] == []
    assert [s.split(":")[0] for s in rep["skipped_required"]] == ["gemma3-1b.compiled"]
    # what the skipped compile leaves goes to optional steps, all after every required one
    graphs_at = events.index(("tests", "graphs"))
    assert all(i > graphs_at for i, e in enumerate(events) if "gemma3-270m" in e)


def test_a_short_budget_loses_the_compiled_step_first(tmp_path, monkeypatch):
    """What a budget shorter than the default loses, in this order: the compiled step (the last
    required item), then the graph tests; the targets and the CUDA tests stay."""
    _, rep, _ = simulate(monkeypatch, tmp_path, argv=("--budget-s", "400"))
    status = _status(rep)
    assert status["gemma3-1b.compiled"] == "skipped for time" and status["tests_graphs"] == "ok"
    assert all(status[f"{s}.{n}"] == "ok" for s in ("gemma3-1b", "qwen2.5-7b") for n in TARGETS)
    assert status["tests"] == "ok"


# ----------------------------------------------------------------------------- stopped by the budget


def _fake_bounded(g, calls: list):
    """``_run_bounded`` as when the budget stops every child: the compiled steps' child after it marked
    its first shape started, pytest inside a test (its -v line printed, no outcome)."""

    def bounded(cmd, limit, **kw):
        calls.append(cmd)
        if "--internal-compiled" in cmd:
            out = Path(cmd[2])
            out.mkdir(parents=True, exist_ok=True)
            first = cmd[cmd.index("--internal-compiled") + 1].split(",")[0]
            (out / f"{first}.json").write_text(json.dumps(g._started(first)))
            return {
                "rc": -9,
                "timed_out": True,
                "stdout": f"[gpu-check] {first}: compiled steps ...\n",
                "stderr": "",
                "wall_s": limit,
            }
        stdout = "tests/backends/test_hf.py::test_a PASSED  [ 10%]\ntests/backends/test_hf_static.py::test_slow \n"
        return {"rc": -2, "timed_out": True, "stdout": stdout, "stderr": "", "wall_s": limit}

    return bounded


def test_steps_stopped_by_the_budget_are_skipped_for_time_not_failed(tmp_path, monkeypatch):
    g = load_gpu_check()
    calls: list = []
    monkeypatch.setattr(g, "_run_bounded", _fake_bounded(g, calls))
    monkeypatch.setattr(g.Shapes, "_step", lambda self, shape, name: {"stub": True})
    code = g.main([str(tmp_path), "--device", "cpu", "--shapes", "tiny-gemma3,tiny-qwen2"])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    status = _status(rep)
    assert status["tests"] == status["tests_graphs"] == "stopped for time"
    assert status["tiny-gemma3.compiled"] == status["tiny-qwen2.compiled"] == "stopped for time"
    assert code == 3 and rep["verdict"] == "incomplete" and rep["failed"] == [] and rep["complete"] is False
    assert rep["tests"]["unfinished"] == "tests/backends/test_hf_static.py::test_slow" and rep["tests"]["rc"] is None
    assert rep["tests"]["skipped"] == "stopped by the time budget in tests/backends/test_hf_static.py::test_slow"
    comp = next(r for r in rep["shapes"] if r["shape"] == "tiny-gemma3")["compiled"]
    assert comp["stopped"].startswith("the time budget ran out") and "compiled steps ..." in comp["stdout_tail"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "stopped for time: the time budget ran out" in md and "**Verdict: incomplete**" in md


@pytest.mark.parametrize("timed_out", [True, False])
def test_a_shape_the_compiled_steps_process_never_started_is_not_reached(tmp_path, monkeypatch, timed_out):
    """The child marks a shape started before it starts it: a shape without a mark was never reached,
    whether the budget stopped the child (then the started one is stopped for time) or it died (then
    the started one failed)."""
    g = load_gpu_check()
    calls: list = []
    fake = _fake_bounded(g, calls)

    def bounded(cmd, limit, **kw):
        res = fake(cmd, limit)
        return {**res, "timed_out": timed_out, "rc": -9 if timed_out else -11}

    monkeypatch.setattr(g, "_run_bounded", bounded)
    args = argparse.Namespace(out=str(tmp_path), max_new_tokens=4, repeats=1, compile_backend=None)
    res = g.compiled_in_subprocess(["tiny-gemma3", "tiny-qwen2"], "cpu", args, g.Budget(60))
    assert set(res["tiny-qwen2"]) >= {"not_reached"} and "error" not in res["tiny-qwen2"]
    if timed_out:
        assert "stopped" in res["tiny-gemma3"] and "error" not in res["tiny-gemma3"]
    else:
        assert (
            res["tiny-gemma3"]["error"]
            == "the compiled steps' process exited with status -11 in this shape's compiled step"
        )
        assert "exited with status -11 before it started this shape" in res["tiny-qwen2"]["not_reached"]


def test_the_compiled_steps_child_marks_a_shape_before_it_starts_it(tmp_path, monkeypatch):
    g = load_gpu_check()
    seen: list = []

    def compiled(shape, device, args, budget):
        seen.append(json.loads((tmp_path / f"{shape}.json").read_text()))
        return {"results": []}

    monkeypatch.setattr(g, "compiled", compiled)
    args = g.parse_args([str(tmp_path), "--internal-compiled", "tiny-qwen2", "--device", "cpu"])
    assert g._internal_compiled(args, g.Budget(60)) == 0
    assert seen == [g._started("tiny-qwen2")] and "results" in json.loads((tmp_path / "tiny-qwen2.json").read_text())


# ----------------------------------------------------------------------------- a hung CUDA test, named


STUCK = """
import signal, time
import pytest

@pytest.mark.cuda
def test_stuck_in_native_code():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as in a CUDA call: pytest-timeout's alarm waits
    time.sleep(120)
"""

HANGS = """
import time
import pytest

@pytest.mark.cuda
def test_hangs():
    time.sleep(120)

@pytest.mark.cuda
def test_after_it():
    pass
"""


def test_a_test_run_stopped_by_the_budget_names_the_test_it_was_in(tmp_path, monkeypatch):
    """The run is stopped at its limit inside a test pytest-timeout cannot interrupt: the report names
    the test, keeps its stack (pytest's faulthandler_timeout, on stderr), decoded, and the wall time;
    stopped for time, not failed."""
    g = load_gpu_check()
    (tmp_path / "test_stuck.py").write_text(STUCK)
    monkeypatch.setattr(g, "CUDA_TESTS", [str(tmp_path / "test_stuck.py")])
    monkeypatch.setitem(
        g.__dict__.setdefault("HANG_S", {}), "not graphs", 2.0
    )  # (setdefault: a check without it fails below)
    res = g.run_tests(16.0, "not graphs")
    assert res["unfinished"].endswith("test_stuck.py::test_stuck_in_native_code"), res
    assert (
        res["rc"] is None
        and g.tests_status(res) == "stopped for time"
        and "test_stuck_in_native_code" in res["skipped"]
    )
    assert isinstance(res["tail"], str) and "test_stuck_in_native_code" in res["tail"]
    assert "Timeout" in res["stderr_tail"] and "in test_stuck_in_native_code" in res["stderr_tail"], res["stderr_tail"]
    assert res["wall_s"] >= 1 and res["limit_s"] == 16.0 and res["per_test_timeout_s"] == 2.0


def test_a_test_that_hangs_fails_named_and_the_run_goes_on(tmp_path, monkeypatch):
    """Past its own limit (pytest-timeout, set below the run's) a hung test fails, named with the
    reason, and the tests after it still run: a failure, not a budget stop."""
    g = load_gpu_check()
    (tmp_path / "test_hangs.py").write_text(HANGS)
    monkeypatch.setattr(g, "CUDA_TESTS", [str(tmp_path / "test_hangs.py")])
    monkeypatch.setitem(
        g.__dict__.setdefault("HANG_S", {}), "not graphs", 2.0
    )  # (setdefault: a check without it fails below)
    res = g.run_tests(60.0, "not graphs")
    (hung,) = res["failures"]
    assert hung.endswith("test_hangs.py::test_hangs") and "Timeout" in res["failures"][hung], res
    assert res["counts"] == {"failed": 1, "passed": 1} and res["rc"] == 1 and res["unfinished"] is None
    assert g.tests_status(res) == "failed" and "skipped" not in res


def test_timeouts_at_a_limit_the_budget_cut_are_a_budget_stop():
    """When the budget left less than a test's own limit, its timeout is the budget's, not a hang."""
    g = load_gpu_check()
    out = "t.py::test_a FAILED [100%]\nFAILED t.py::test_a - Failed: Timeout (>9.0s) from pytest-timeout.\n"
    cut = g.tests_report(1, out, "", timed_out=False, per_test_s=9.0, hang_s=40.0)
    assert g.tests_status(cut) == "stopped for time" and cut["failures"] == {
        "t.py::test_a": "Failed: Timeout (>9.0s) from pytest-timeout."
    }
    hang = g.tests_report(1, out, "", timed_out=False, per_test_s=40.0, hang_s=40.0)
    assert g.tests_status(hang) == "failed"
    real = g.tests_report(
        1,
        out.replace("Failed: Timeout (>9.0s) from pytest-timeout.", "assert 1 == 2"),
        "",
        timed_out=False,
        per_test_s=9.0,
        hang_s=40.0,
    )
    assert g.tests_status(real) == "failed"


# ----------------------------------------------------------------------------- a compiled step that fell back


def test_a_compiled_step_that_fell_back_is_not_ok(tmp_path, monkeypatch):
    """torch.compile failing (as when inductor cannot compile there): the step runs eager, and the run
    says so, exit 4, not ok, with no "compiled" ratio in the targets."""
    import torch

    g = load_gpu_check()

    def broken_compile(*a, **k):
        raise RuntimeError("simulated: inductor cannot compile here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(
        g,
        "compiled_in_subprocess",
        lambda shapes, device, args, budget: {s: g.compiled(s, device, args, budget) for s in shapes},
    )
    argv = [str(tmp_path), "--device", "cpu", "--no-tests", "--shapes", "tiny-qwen2"]
    code = g.main(argv + ["--max-new-tokens", "3", "--repeats", "1", "--batch", "2"])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 4 and rep["verdict"] == "compiled step fell back" and rep["ok"] is False and rep["failed"] == []
    (fell,) = rep["fell_back"]
    assert fell.startswith("tiny-qwen2.compiled: compile fell back to eager: RuntimeError: simulated"), fell
    (row,) = rep["shapes"]
    assert "compiled_persona_judge_over_generate" not in row["targets"] and row["targets"]["compiled_fell_back"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "**Verdict: compiled step fell back**" in md and "FELL BACK: compile fell back to eager" in md


def test_on_cuda_a_compiled_step_must_replay_graphs():
    g = load_gpu_check()
    base = {"compile_fallback": None, "compile_judge": "torch.compile (inductor)"}
    none = {**base, "graphs": {"recorded": 0, "replayed": 0, "warmup_runs": 3, "skips": 1, "used": False}}
    used = {**base, "graphs": {"recorded": 2, "replayed": 250, "warmup_runs": 2, "skips": 0, "used": True}}
    assert g.compiled_fell_back(none, gpu=True).startswith("no CUDA graphs used (0 recorded, 0 replayed, 1 skipped)")
    assert g.compiled_fell_back(used, gpu=True) is None
    assert g.compiled_fell_back(none, gpu=False) is None  # no CUDA graphs can exist on a CPU
    judge = {**used, "compile_judge": "failed, eager (RuntimeError: x)"}
    assert g.compiled_fell_back(judge, gpu=True).startswith("the judge's compile fell back")
    uncounted = {**base, "graphs": {"unavailable": "ImportError: no cudagraph_trees"}}
    assert g.compiled_fell_back(uncounted, gpu=True).startswith("CUDA graphs could not be counted")
    renamed = {**base, "graphs": {"recorded": None, "replayed": None, "warmup_runs": None, "skips": 0, "used": False}}
    assert g.compiled_fell_back(renamed, gpu=True).startswith("CUDA graphs could not be counted")


# ----------------------------------------------------------------------------- the GPU's details


def test_the_gpu_details_are_recorded(tmp_path, monkeypatch):
    """torch's CUDA, the card's memory and the driver (NVML absent here: from nvidia-smi)."""
    import sys

    import torch

    g = load_gpu_check()
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = "--query-gpu=driver_version" ] && echo "580.159.04"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H100 80GB HBM3")
    props = types.SimpleNamespace(total_memory=81559 * 2**20, major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    info = g.gpu_info(torch)
    assert info == {
        "cuda": "13.0",
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_total_mb": 81559,
        "gpu_capability": "9.0",
        "driver": "580.159.04",
    }
