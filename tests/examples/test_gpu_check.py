"""examples/gpu_check.py runs end to end on the CPU with tiny shapes, so the prepared GPU run cannot rot.

The GPU run itself (real shapes, bf16, CUDA tests) needs a GPU; here the same
code paths run on tiny random models: install check, the CUDA test selection
(skipping without a GPU), build, cache check, bench, 3 views, batch 16 vs 1,
the memory step (its sessions' rows; the peaks with torch.cuda's memory calls
faked), the compiled steps' subprocess, the time budget, the order of the
steps, the failures before anything is measured (no wheels), and the JSON and
Markdown reports. ``test_gpu_check_budget.py`` replays the GPU plan against the
time budget and covers the verdicts of steps stopped for time, hung tests and
compiled steps that fell back.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "gpu_check.py"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900, env=env)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_rehearsal_on_the_cpu(tmp_path):
    proc = run(str(tmp_path), "--device", "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["schema"] == "personajudge.gpu_check/2" and rep["ok"] is True and rep["device"] == "cpu"
    assert rep["verdict"] == "ok" and rep["complete"] is True and rep["skipped"] == [] and rep["failed"] == []
    assert rep["fell_back"] == [] and all(r["status"] == "ok" for r in rep["plan"]), rep["plan"]
    import torch

    assert "cuda" in rep["versions"] and rep["versions"]["cuda"] == torch.version.cuda  # None in a CPU build
    assert rep["install"]["project"] == "already importable"
    assert "skipped" in rep["tests"]["summary"] or "passed" in rep["tests"]["summary"]
    assert "skipped" in rep["tests_graphs"]["summary"] or "passed" in rep["tests_graphs"]["summary"]
    assert [r["shape"] for r in rep["shapes"]] == ["tiny-gemma3", "tiny-qwen2"] and not rep["skipped_shapes"]
    for row in rep["shapes"]:
        assert not row["skipped"] and "unfinished" not in row
        # float32 on the CPU: cached and recomputed logits agree to rounding
        assert row["cache_check"]["argmax_agrees"] and row["cache_check"]["max_abs_diff"] < 1e-3
        methods = {r["method"]: r for r in row["bench"]["results"] + row["bench_extra"]["results"]}
        assert set(methods) == {"plain", "persona-judge", "persona-judge-base"}
        assert methods["plain"]["runner"] == "native" and methods["persona-judge"]["runner"] == "core"
        assert all(r["tokens"] == 12 and r["tokens_per_s"] > 0 for r in methods.values())
        assert row["views_3"]["settings"]["views"] == 3 and row["views_3"]["results"][0]["views"] == 3
        assert row["bench_extra"]["steps"]["estimate_ratio"] > 0
        assert row["bench"]["ceiling"] is None and row["bench_extra"]["ceiling"] is None  # no time for it
        assert [r["method"] for r in row["bench_extra"]["results"]] == ["persona-judge-base"]
        b = row["batch"]
        assert b["batch_1"]["prompts"] == 1 and b["batch_16"]["prompts"] == 16
        assert b["batch_16"]["tokens"] == 16 * 12 and b["speedup"] > 0
        # no GPU: no peaks (nothing pretends), but each generation's session holds just its own views
        assert row["memory"]["rows_1_view"] == 1 and row["memory"]["rows_2_view"] == 2
        assert not any(k.startswith("peak") for k in row["memory"])
        assert row["backend"]["device"] == "cpu" and row["backend"]["model"] == f"synthetic:{row['shape']}"
        # the host profile: one request on the engine's batched path, timed, then under both profilers
        pr = row["profile"]
        assert pr["steps"] == 12 and pr["tokens"] >= 12 and pr["ms_per_step"] > 0  # a token or more a step
        host = pr["host_ms_per_step"]
        assert 0 < host["judge"] < host["step"] and 0 < host["forward"] < host["step"]
        assert host["forward"] + host["judge"] <= host["step"]  # both inside the driver's step
        assert pr["aten_ops_per_step"] > 144  # the judge's own 144, plus the forward's
        assert pr["kernel_launches_per_step"] == 0 and pr["device_busy_ms_per_step"] == 0  # no GPU
        assert pr["host_top_self_ms_per_step"] and pr["ops_top_self_cpu_ms_per_step"]
    md = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| tiny-")]
    assert sum(" B | " in line for line in rows) == 2 and sum("True/eager" in line for line in rows) == 2  # 2 tables
    assert sum(line.endswith("| ok |") for line in md.splitlines()) == len(rep["plan"]) == 18  # the plan's steps
    assert md.count("Host profile, tiny-") == 2 and "kernel launches" in md
    for row in rep["shapes"]:  # beside the bench's own persona-judge run: inside the step, or around it
        pj = next(r for r in row["bench"]["results"] if r["method"] == "persona-judge")
        assert f"through the engine with its prompts: {1e3 / pj['tokens_per_s']:.2f} ms a token)" in md
    assert "Targets (issue 17)" in md
    assert "cache Δ / argmax" in md and "/ same |" in md  # the cache check, shown
    assert "graphs: 0 recorded, 0 replayed, 0 skipped (no CUDA graphs on a CPU)" in md  # said so, not failed
    assert "**Verdict: ok**" in md
    for row in rep["shapes"]:  # the compiled run: traced (no code generation on the CPU), timed beside generate
        comp = row["compiled"]
        assert comp["options"]["compile_backend"] == "eager" and comp["compile_fallback"] is None
        assert comp["compile_judge"] == "torch.compile (eager)"  # the batched judge traced too, no fallback
        assert comp["backend"]["cache_implementation"] == "static"
        assert comp["graphs"] == {"recorded": 0, "replayed": 0, "warmup_runs": 0, "skips": 0, "used": False}
        assert {r["method"] for r in comp["results"]} == {"plain", "persona-judge"}
        assert row["targets"]["compiled_persona_judge_over_generate"] > 0


def test_a_crash_mid_shape_keeps_what_was_measured_before_it(tmp_path, monkeypatch):
    """The run saves after every step: a step that never returns (here an interrupt in the batch
    step; on the GPU a segfault, an out-of-memory kill or the time limit) leaves the earlier ones."""
    gpu_check = load_gpu_check()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: nothing in the check catches it, as with a real crash

    monkeypatch.setattr(gpu_check, "batch_speed", crash)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main([str(tmp_path), "--device", "cpu", "--no-tests", "--shapes", "tiny-qwen2"])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = rep["shapes"]
    assert row["unfinished"] == "batch" and "batch" not in row and "compiled" not in row
    assert row["bench"]["results"] and row["memory"]["rows_2_view"] == 2 and row["cache_check"]["argmax_agrees"]
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


def test_the_time_budget_skips_shapes_and_the_run_is_not_ok(tmp_path):
    """Nothing measured is not a success: ``ok`` false, ``complete`` false, exit status 3 (not 1: nothing failed)."""
    proc = run(str(tmp_path), "--device", "cpu", "--no-tests", "--budget-s", "1", "--shapes", "tiny-qwen2")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "INCOMPLETE" in proc.stderr and "tiny-qwen2.cache_check: skipped for time: time budget" in proc.stderr
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["skipped_shapes"] == ["tiny-qwen2"] and rep["shapes"] == [] and rep["tests"] == {}
    assert rep["verdict"] == "incomplete" and rep["ok"] is False and rep["complete"] is False
    assert rep["failed"] == [] and {r["status"] for r in rep["plan"]} == {"skipped for time"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert (
        "Shapes not run (time budget): tiny-qwen2" in md
        and "**Verdict: incomplete** (ok: False, complete: False)" in md
    )


# ----------------------------------------------------------------------------- one run, watched in-process


@contextlib.contextmanager
def fake_cuda_memory(mp):
    """torch.cuda's memory calls answering as on a GPU (the memory step's code path, on the CPU)."""
    import torch

    with mp.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "is_initialized", lambda: False)
        for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
            m.setattr(torch.cuda, name, lambda *a, **k: None)
        m.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 1000 * 2**20)
        m.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 1100 * 2**20)
        yield


def _model_prepacked(backend) -> int:
    """Linear layers whose weights the CPU prepacking emptied (their forward swapped for oneDNN's)."""
    import torch

    return sum(1 for m in backend.model.modules() if type(m) is torch.nn.Linear and m.weight.numel() == 0)


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """One in-process run of both tiny shapes, every step recorded in order; the compiled steps run in
    this process too (their subprocess replaced) so that what they get can be seen. ``views_3`` (an
    optional step) is made to need more time than any budget: the run must then say it is not
    complete, but ok. ``--batch 4``: the labels must follow it. At each memory step, which shapes'
    own models are still alive is recorded (weak references: the run must hold one at a time)."""
    import personajudge.bench
    from personajudge.backends.hf import HFBackend

    gpu_check = load_gpu_check()
    out = tmp_path_factory.mktemp("watched")
    events: list[tuple] = []
    in_memory: list[str] = []
    models: dict[str, weakref.ref] = {}
    mp = pytest.MonkeyPatch()
    try:
        run_bench = personajudge.bench.run_bench

        def spy_bench(cfg, *a, backend=None, methods=None, **kw):
            compiled = backend.compile_mode is not None
            events.append(("bench", backend.describe()["model"], tuple(methods), compiled, _model_prepacked(backend)))
            return run_bench(cfg, *a, backend=backend, methods=methods, **kw)

        mp.setattr(personajudge.bench, "run_bench", spy_bench)
        hf_open = HFBackend.open

        def spy_open(self, n_views):
            if in_memory:
                events.append(("memory-open", in_memory[0], n_views))
            return hf_open(self, n_views)

        mp.setattr(HFBackend, "open", spy_open)
        memory, batch_speed, build = gpu_check.memory, gpu_check.batch_speed, gpu_check.build_backend

        def spy_build(shape, device, **kw):
            backend = build(shape, device, **kw)
            if not kw:  # a shape's own model (the compiled steps build theirs with options)
                models[shape] = weakref.ref(backend.model)
            return backend

        def spy_memory(*a, **kw):
            backend = next(x for x in (*a, *kw.values()) if hasattr(x, "describe") or hasattr(x, "backend"))
            shape = getattr(backend, "backend", backend).describe()["model"]
            events.append(("memory", shape, sorted(s for s, ref in models.items() if ref() is not None)))
            in_memory.append(shape)
            try:
                with fake_cuda_memory(mp):
                    return memory(*a, **kw)
            finally:
                in_memory.clear()

        def spy_batch(*a, **kw):
            events.append(("batch",))
            return batch_speed(*a, **kw)

        mp.setattr(gpu_check, "build_backend", spy_build)
        mp.setattr(gpu_check, "memory", spy_memory)
        mp.setattr(gpu_check, "batch_speed", spy_batch)
        mp.setattr(
            gpu_check,
            "compiled_in_subprocess",
            lambda shapes, device, args, budget: {s: gpu_check.compiled(s, device, args, budget) for s in shapes},
            raising=False,
        )
        mp.setitem(gpu_check.__dict__.setdefault("STEPS", {}), "views_3", ("views", 10_000.0))
        code = gpu_check.main([str(out), "--device", "cpu", "--no-tests", "--batch", "4"])
    finally:
        mp.undo()
    return code, json.loads((out / "gpu_check.json").read_text()), events, (out / "gpu_check.md").read_text()


def test_each_memory_step_opens_a_session_of_just_its_views(watched):
    """After the batch (8 rows here) the 1-view and the 2-view generations must each measure their
    own KV cache: sessions of 1 and 2 rows, not the batch's rows twice."""
    _, rep, events, _ = watched
    opened = [(shape, n) for kind, *rest in events if kind == "memory-open" for shape, n in [rest]]
    assert opened == [(s, n) for s in ("synthetic:tiny-gemma3", "synthetic:tiny-qwen2") for n in (1, 2)]
    for row in rep["shapes"]:
        mem = row["memory"]
        assert mem["rows_1_view"] == 1 and mem["rows_2_view"] == 2
        assert mem["peak_mb_1_view"] == mem["peak_mb_2_view"] == 1100 and mem["kv_mb_one_view"] > 0
        assert row["targets"]["memory_2_views_within_1.1x"] is True


def test_each_memory_step_holds_its_own_shape_s_model_alone(watched):
    """A released shape's weights must be gone when the next shape measures its memory: its baseline
    and peaks would hold them (1.9 GiB of the 1B in the 7B's, 14 GiB of the 7B in the 270M's)."""
    _, _, events, _ = watched
    alive = [(e[1], e[2]) for e in events if e[0] == "memory"]
    assert alive == [("synthetic:tiny-gemma3", ["tiny-gemma3"]), ("synthetic:tiny-qwen2", ["tiny-qwen2"])]


def test_the_compiled_step_gets_weights_no_cpu_kernel_touched(watched):
    """The shape's own backend has prepacked its Linear layers for oneDNN on the CPU (which inductor
    cannot lower, and which the GPU never runs): the compiled step must time a fresh copy."""
    _, rep, events, _ = watched
    plain = [e for e in events if e[0] == "bench" and not e[3]]
    compiled = [e for e in events if e[0] == "bench" and e[3]]
    assert plain and all(e[4] > 0 for e in plain)  # the negative control: the shape's backend is prepacked
    assert len(compiled) == 2 and all(e[4] == 0 for e in compiled)
    assert all(row["compiled"]["compile_fallback"] is None for row in rep["shapes"])


def test_the_steps_run_in_the_plan_s_order(watched):
    """The targets' measurements on both shapes before anything else, then the first shape's
    persona-judge-base and compiled step (required), then the optional rest."""
    _, rep, events, _ = watched

    def kind(e: tuple) -> str | None:
        if e[0] in ("memory", "batch") or (e[0] == "bench" and e[2] == ("plain", "persona-judge") and not e[3]):
            return f"target {e[1]}" if e[0] != "batch" else "target"
        if e[0] == "bench":
            return f"{'compiled' if e[3] else 'base'} {e[1].removeprefix('synthetic:')}"
        return None

    kinds = [k for k in map(kind, events) if k]
    assert kinds[:6] == ["target synthetic:tiny-gemma3", "target synthetic:tiny-gemma3", "target"] + [
        "target synthetic:tiny-qwen2",
        "target synthetic:tiny-qwen2",
        "target",
    ], kinds
    assert kinds[6:] == ["base tiny-gemma3", "compiled tiny-gemma3", "base tiny-qwen2", "compiled tiny-qwen2"]
    required = [r["step"] for r in rep["plan"] if r["required"]]
    assert required == [
        *(
            f"{s}.{n}"
            for s in ("tiny-gemma3", "tiny-qwen2")
            for n in ("cache_check", "bench", "memory", "batch", "profile")
        ),
        "tiny-gemma3.bench_extra",
        "tiny-gemma3.compiled",
    ]
    assert [r["required"] for r in rep["plan"]] == [True] * len(required) + [False] * (len(rep["plan"]) - len(required))


def test_an_optional_step_skipped_for_time_leaves_the_run_ok_but_not_complete(watched):
    code, rep, _, md = watched
    assert code == 0 and rep["verdict"] == "ok" and rep["ok"] is True and rep["failed"] == []
    assert rep["complete"] is False and rep["skipped_required"] == []
    assert [s.split(":")[0] for s in rep["skipped"]] == ["tiny-qwen2.views_3", "tiny-gemma3.views_3"]
    assert all("skipped for time (optional): time budget" in s for s in rep["skipped"]), rep["skipped"]
    assert "**Verdict: ok** (ok: True, complete: False)" in md


def test_the_batch_labels_follow_the_batch_size(watched):
    """--batch 4: the ratio is batch 4's; the issue's ≥ 8× verdict is for 16 prompts and is not given."""
    _, rep, _, md = watched
    for row in rep["shapes"]:
        t = row["targets"]
        assert t["batch_4_over_1"] == row["batch"]["speedup"] > 0 and row["batch"]["batch_4"]["prompts"] == 4
        assert not any(k.startswith("batch_16") for k in t), t
    assert "batch 4 / 1" in md and "batch 16 / 1" not in md and "(this run: batch 4)" in md


def test_a_released_shape_s_model_is_gone_at_once(tmp_path):
    """Releasing a shape (between shapes, before the tests and the compiled steps) frees its weights
    then and there, not at some later cyclic GC pass (here: none runs, the collector is off)."""
    gpu_check = load_gpu_check()
    args = argparse.Namespace(max_new_tokens=4, repeats=1, batch=2)
    rep: dict = {"shapes": [], "plan": []}
    work = gpu_check.Shapes("cpu", args, gpu_check.Budget(600), rep, lambda: None)
    gc.collect()
    gc.disable()
    try:
        work.run("tiny-qwen2", "bench", True)  # a real step: an engine opened and closed on the backend
        assert "results" in rep["shapes"][0]["bench"], rep["shapes"][0]["bench"]
        ref = weakref.ref(work.current[1].model)
        work.release()
        assert work.current is None and ref() is None
        backend = gpu_check.build_backend("tiny-qwen2", "cpu")  # and no cycle is left for a collector to find
        ref = weakref.ref(backend.model)
        backend.close()
        del backend
        assert ref() is None
    finally:
        gc.enable()


def test_the_compiled_steps_subprocess_is_stopped_at_the_budget(tmp_path):
    """A compile cannot be stopped in-process: its child is, when the budget runs out. The shapes it
    had not finished are then skipped or stopped for time, or not reached: never failed. (Which one
    depends on how far the child got in its half second; ``test_gpu_check_budget.py`` tells them apart.)"""
    gpu_check = load_gpu_check()
    args = argparse.Namespace(out=str(tmp_path), max_new_tokens=4, repeats=1, compile_backend=None)
    res = gpu_check.compiled_in_subprocess(["tiny-qwen2", "tiny-gemma3"], "cpu", args, gpu_check.Budget(0.5))
    for shape in ("tiny-qwen2", "tiny-gemma3"):
        assert len({"skipped", "stopped", "not_reached"} & set(res[shape])) == 1 and "error" not in res[shape], res


# ----------------------------------------------------------------------------- before anything is measured


BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "array_api_compat":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def _bare(tmp_path) -> dict:
    """An environment where ``array_api_compat`` cannot be imported, as on the GPU image (a sitecustomize
    on PYTHONPATH, inherited by the check's re-run)."""
    import os

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCKER)
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    )


def _stub(out: Path) -> dict:
    rep = json.loads((out / "gpu_check.json").read_text())
    assert rep["ok"] is False and rep["complete"] is False and rep["error"]
    assert rep["error"] in (out / "gpu_check.md").read_text()
    return rep


def _install_from(tmp_path, folder: Path, out: Path):
    """The check in a bare environment, with ``folder`` as its wheels."""
    site = tmp_path / "site"
    return run(
        str(out), "--device", "cpu", "--no-tests", "--wheels", str(folder), "--site", str(site), env=_bare(tmp_path)
    )


@pytest.mark.parametrize("wheels", ["missing", "empty"])
def test_no_wheels_is_one_line_naming_make_gpu_wheels_and_carry(tmp_path, wheels):
    """The likeliest mistake on the device: ``.whl`` not carried (it is git-ignored)."""
    folder = tmp_path / "whl"
    if wheels == "empty":
        folder.mkdir()
    out = tmp_path / "out"
    proc = _install_from(tmp_path, folder, out)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "array_api_compat" in err and "make gpu-wheels" in err and 'carry: [".whl"]' in err
    assert ("does not exist" if wheels == "missing" else "holds no wheels") in err
    assert "make gpu-wheels" in _stub(out)["error"]


def test_a_wheel_pip_refuses_is_one_line(tmp_path):
    folder = tmp_path / "whl"
    folder.mkdir()
    (folder / "pydantic_core-2.50.5-cp27-cp27m-win32.whl").write_bytes(b"not for this machine")
    out = tmp_path / "out"
    proc = _install_from(tmp_path, folder, out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "pip could not install the wheels" in proc.stderr and "GPU_PYTHON=" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    _stub(out)


def test_a_module_still_missing_after_the_install_is_named(tmp_path):
    """The wheels installed, but none of them was array_api_compat's: named, after the re-run."""
    folder = tmp_path / "whl"
    folder.mkdir()
    with zipfile.ZipFile(folder / "pjdummy-0.1-py3-none-any.whl", "w") as z:
        z.writestr("pjdummy/__init__.py", "")
        z.writestr("pjdummy-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: pjdummy\nVersion: 0.1\n")
        z.writestr("pjdummy-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("pjdummy-0.1.dist-info/RECORD", "")
    out, site = tmp_path / "out", tmp_path / "site"
    proc = run(
        str(out), "--device", "cpu", "--no-tests", "--wheels", str(folder), "--site", str(site), env=_bare(tmp_path)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "array_api_compat still cannot be imported after installing 1 wheel(s)" in proc.stderr
    assert (site / "pjdummy").is_dir()  # the install itself ran
    assert _stub(out)["install"]["wheels"] == ["pjdummy-0.1-py3-none-any.whl"]


def test_unknown_shape_is_a_usage_error(tmp_path):
    proc = run(str(tmp_path), "--device", "cpu", "--shapes", "gpt-5")
    assert proc.returncode == 2 and "unknown shape" in proc.stderr
