"""The fixes of the Ray audit (findings A-I): interrupted start-up, resource precision, a chunk's
error with other chunks still out, warnings under -q, the local instance on 127.0.0.1, row settings
that do not depend on earlier chunks, the "N kept" count after Ctrl-C, Ray's raw notices, addresses.

Tests that need a running Ray use ``local_ray`` (one local instance for the module, on 127.0.0.1
with 2 CPUs, shut down after), as tests/distributed/test_ray.py does; the others fake ``ray.init``
or run in a subprocess of their own, bounded in time.
"""

import json
import os
import signal
import warnings

import pytest

ray = pytest.importorskip("ray")

from bounded import run_bounded
from slow_ray import slow_ray_main

import personajudge.distributed as dist  # noqa: E402
from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.batch import JsonlBatch, local_executor, read_records  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.core.errors import ConfigError, ContextLengthError, PersonaJudgeWarning  # noqa: E402
from personajudge.distributed import RayOptions, ReplicaError, ReplicaPool, Task  # noqa: E402

TOY = ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "8"]


def _write_input(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"prompt number {i} about the sea"}) + "\n")


# -- A: Ctrl-C while ray.init runs ---------------------------------------------------------------
class _FakeRay:
    """Stands in for ``ray.init`` / ``ray.shutdown`` / ``ray.is_initialized``: no Ray is started."""

    def __init__(self, monkeypatch, init):
        self.shutdowns = 0
        self.init_returned = False
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "shutdown", self._shutdown)
        monkeypatch.setattr(ray, "init", lambda **kw: self._init(init))

    def _init(self, init):
        init()
        self.init_returned = True

    def _shutdown(self):
        self.shutdowns += 1


def test_ctrl_c_inside_ray_init_still_shuts_ray_down(monkeypatch):
    """Ray was half-started when the interrupt came: close() must shut it down (the crash at exit)."""

    def interrupted():
        raise KeyboardInterrupt

    fake = _FakeRay(monkeypatch, interrupted)
    with pytest.raises(KeyboardInterrupt):
        with ReplicaPool(build_config({"backend": {"name": "toy"}}), RayOptions()):
            pass
    assert fake.shutdowns == 1


def test_ctrl_c_during_ray_init_is_held_until_it_returns(monkeypatch):
    """A SIGINT that arrives while ray.init runs is delivered after it, then Ray is shut down."""

    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecodes run: an unheld SIGINT raises here
            pass

    fake = _FakeRay(monkeypatch, ctrl_c)
    # Python's own handler, as the CLI has it (an earlier test in the session may have left another)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ReplicaPool(build_config({"backend": {"name": "toy"}}), RayOptions()):
                pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert fake.init_returned and fake.shutdowns == 1


# -- B: resource precision -----------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--cpus-per-replica", "--gpus-per-replica"])
def test_resource_finer_than_rays_unit_is_one_line(tmp_path, capsys, flag):
    inp = tmp_path / "in.jsonl"
    _write_input(inp, 2)
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "-q", "--ray"]
    assert main([*argv, flag, "0.00001"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"personajudge: error: {flag} must have at most 4 decimals (Ray's resource unit is 0.0001), got 1e-05"
    ]
    assert not (tmp_path / "o.jsonl.partial").exists()


@pytest.mark.parametrize("flag", ["--cpus-per-replica", "--gpus-per-replica"])
@pytest.mark.parametrize("value", ["inf", "1e308"])
def test_resource_past_any_node_is_one_line_with_the_reason(tmp_path, capsys, flag, value):
    """Infinity and 1e308 were refused for having more than 4 decimals."""
    inp = tmp_path / "in.jsonl"
    _write_input(inp, 2)
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "-q", "--ray"]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f"{flag} must be at most 1000000 (more than any node has)" in err[0], err


def test_resource_amounts_ray_accepts_pass():
    for value in (0.0001, 0.25, 0.3, 0.1 + 0.2, 1.0, 2.5, 16.0):
        RayOptions(cpus_per_replica=value, gpus_per_replica=value)
    with pytest.raises(ConfigError):
        RayOptions(cpus_per_replica=0.00015)


def test_a_replica_with_more_cpus_than_ggml_threads_runs_512_threads():
    """A replica reserving 600 CPUs (a big node) got ``backend.threads=600`` in its config, which every
    replica then refused with pydantic's multi-line error: its thread count is capped at 512 instead."""
    from personajudge.distributed import replica_config

    opts = RayOptions(cpus_per_replica=600)
    assert opts.replica_threads == 512
    assert replica_config({"backend": {"name": "llama-cpp"}}, opts.replica_threads).backend.threads == 512
    assert RayOptions(cpus_per_replica=600, threads=8).replica_threads == 8  # an explicit count is kept
    for bad in (0, 513, True, 2.5):
        with pytest.raises(ConfigError, match=f"threads must be between 1 and 512, got {bad}"):
            RayOptions(threads=bad)


def test_ray_refusing_the_amounts_is_a_config_error(local_ray, monkeypatch):
    """What RayOptions does not check and Ray's ``options()`` refuses is one ConfigError, not a traceback."""
    monkeypatch.setattr(dist, "_in_resource_units", lambda value: True)
    cfg = build_config({"backend": {"name": "toy"}})
    with pytest.raises(ConfigError, match="cannot go beyond 0.0001"):
        with ReplicaPool(cfg, RayOptions(cpus_per_replica=0.00001)):
            pass


# -- C: a chunk's error while others are out ------------------------------------------------------
def test_chunk_error_keeps_the_chunks_before_it(local_ray):
    """Chunk 0 (many rows) is still running when chunk 1 (a prompt too long) fails: chunk 0 is
    kept, nothing after the failure is started, and the error is the earliest bad chunk's."""
    cfg = build_config({"backend": {"name": "toy", "n_ctx": 1024}, "decoding": {"max_new_tokens": 48}})
    opts = {"preferences": ["concise", "humor"]}
    slow = Task(0, [f"prompt {i} about the sea" for i in range(48)], list(range(48)), opts)
    bad1 = Task(1, ["word " * 2000], [1], opts)
    bad2 = Task(2, ["word " * 3000], [2], opts)
    later = [Task(k, [f"prompt {k}"], [k], opts) for k in (3, 4)]
    got = []
    with ReplicaPool(cfg, RayOptions(replicas=3, cpus_per_replica=0.5)) as pool:
        with pytest.raises(ReplicaError) as info:
            for out in pool.run([slow, bad1, bad2, *later]):
                got.append(out.task.key)
    assert got == [0] and len(pool.overheads) == 1
    # task 1's error, whichever of the two bad chunks came back first: as locally, where it is the first
    with pytest.raises(ContextLengthError) as local:
        PersonaJudge(cfg).generate_batch(bad1.prompts, seeds=bad1.seeds, **opts)
    assert str(info.value) == str(local.value)


def test_chunks_before_the_bad_line_are_in_the_partial_file(tmp_path, capsys):
    """Through the CLI on its own local instance: rows before the too-long line are kept, as locally."""
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i in range(6):
            prompt = "word " * 2000 if i == 3 else f"prompt number {i} about the sea"
            f.write(json.dumps({"id": f"r{i}", "prompt": prompt}) + "\n")
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "--seed", "0", "-q"]
    argv += ["--n-ctx", "1024", "--batch-size", "1", "--ray", "--replicas", "2"]
    code, out, err = run_bounded(["-m", "personajudge", *argv])
    assert code == 2, err
    assert f"{inp}:4: the prompt of view 0" in err
    kept = [json.loads(line) for line in open(tmp_path / "o.jsonl.partial")][1:]
    assert {"r0", "r1", "r2"} <= {r["id"] for r in kept}
    assert "r3" not in {r["id"] for r in kept}


# -- D: the pool's warnings are warnings, whatever quiet says ------------------------------------
def test_waiting_for_the_cluster_is_a_warning_even_when_quiet(local_ray):
    address = ray.get_runtime_context().gcs_address
    cfg = build_config({"backend": {"name": "toy"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ReplicaError, match="not ready after 1s"):
            with ReplicaPool(cfg, RayOptions(address=address, replicas=3, ready_timeout_s=1.0), quiet=True):
                pass
    texts = [str(w.message) for w in caught if issubclass(w.category, PersonaJudgeWarning)]
    assert len(texts) == 1 and "needs 3 CPUs (the cluster has 2); waiting up to 1s" in texts[0], texts


# -- E, H: the local instance on 127.0.0.1, without Ray's start-up notice ------------------------
LOCAL_POOL = """
import ray
from personajudge.core.config import build_config
from personajudge.distributed import RayOptions, ReplicaPool, Task
cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
with ReplicaPool(cfg, RayOptions(replicas=1)) as pool:
    assert len(list(pool.run([Task(0, ["hi"], [0], {"preferences": ["concise", "humor"]})]))) == 1
    print(ray.get_runtime_context().gcs_address)
    print(*sorted({n["NodeManagerAddress"] for n in ray.nodes()}))
"""


def test_local_instance_is_on_loopback_and_quiet():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    code, out, err = run_bounded(["-c", LOCAL_POOL], env=env)
    assert code == 0, err
    gcs, nodes = out.splitlines()
    assert gcs.startswith("127.0.0.1:") and nodes == "127.0.0.1", out
    assert "Token authentication" not in err and "(raylet)" not in err, err


# -- F: a row's settings do not depend on earlier calls ------------------------------------------
@pytest.mark.model
@pytest.mark.slow
def test_llama_cpp_settings_do_not_depend_on_earlier_calls():
    """Four views grow the context's KV sequences; a later two-view row reports what it did before."""
    cfg = build_config({"backend": {"name": "llama-cpp", "threads": 1}, "decoding": {"max_new_tokens": 2}})
    two = ["concise", "humor"]
    with PersonaJudge(cfg) as pj:
        first = pj.generate("Hello.", preferences=two, seed=0).settings
        pj.generate("Hello.", views=[["concise"], ["humor"], ["expert"], ["friendly"]], seed=0)
        again = pj.generate("Hello.", preferences=two, seed=0).settings
    assert again == first


# -- G: "N of M results are kept" counts what is on disk -----------------------------------------
def test_ctrl_c_inside_an_append_counts_the_rows_written(tmp_path, capsys, monkeypatch):
    """The interrupt lands after the chunk's lines are written (in the fsync): they are kept and counted."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp, 6)
    cfg = build_config(
        {"backend": {"name": "toy"}, "preferences": ["concise", "humor"], "decoding": {"max_new_tokens": 4, "seed": 1}}
    )
    pj = PersonaJudge(cfg)
    job = JsonlBatch(read_records(str(inp)), cfg, batch_size=2, output=str(out), progress=False)
    with job:
        real = job._file.append
        calls = []

        def append_then_interrupt(objs):
            real(objs)
            calls.append(len(objs))
            if len(calls) == 2:  # chunk 0, then chunk 1 is written and the Ctrl-C comes (in its fsync)
                raise KeyboardInterrupt

        monkeypatch.setattr(job._file, "append", append_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            job.run(local_executor(pj))
    rows = [json.loads(line) for line in open(str(out) + ".partial")][1:]
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert f"4 of 6 results are kept in {out}.partial" in capsys.readouterr().err


def test_ctrl_c_inside_the_first_append_keeps_the_file(tmp_path, capsys, monkeypatch):
    """The first chunk's rows on disk when the interrupt comes: the partial file is not removed."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp, 4)
    cfg = build_config(
        {"backend": {"name": "toy"}, "preferences": ["concise", "humor"], "decoding": {"max_new_tokens": 4, "seed": 1}}
    )
    pj = PersonaJudge(cfg)
    job = JsonlBatch(read_records(str(inp)), cfg, batch_size=2, output=str(out), progress=False)
    with pytest.raises(KeyboardInterrupt):
        with job:
            real = job._file.append

            def append_then_interrupt(objs):
                real(objs)
                if any("id" in o for o in objs):
                    raise KeyboardInterrupt

            monkeypatch.setattr(job._file, "append", append_then_interrupt)
            job.run(local_executor(pj))
    assert len(open(str(out) + ".partial").readlines()) == 3  # the settings line and 2 rows
    assert f"2 of 4 results are kept in {out}.partial" in capsys.readouterr().err


# -- I: addresses --------------------------------------------------------------------------------
@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "https://example.org:443", "grpc://127.0.0.1:6379"])
def test_address_with_another_scheme_is_refused_by_name(tmp_path, capsys, address):
    inp = tmp_path / "in.jsonl"
    _write_input(inp, 1)
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "-q", "--ray", address]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    scheme = address.partition("://")[0]
    assert len(err) == 1 and err[0].startswith(
        f"personajudge: error: --ray {address}: {scheme}:// is not a Ray address"
    )
    assert not (tmp_path / "o.jsonl.partial").exists()


#: ``--ray auto`` where Ray finds no instance (its search of this machine's processes is faked: other
#: Ray instances may run here), through the real ray.init.
AUTO_WITHOUT_CLUSTER = """
import sys
import ray._private.services as services
def find_gcs_addresses():
    return []
find_gcs_addresses.cache_clear = lambda: None  # as Ray's has
services.find_gcs_addresses = find_gcs_addresses
services.find_bootstrap_address = lambda temp_dir: None
from personajudge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_auto_without_a_cluster_names_the_ray_flag(tmp_path):
    inp = tmp_path / "in.jsonl"
    _write_input(inp, 1)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "-q", "--ray", "auto"]
    code, out, err = run_bounded(["-c", AUTO_WITHOUT_CLUSTER, *argv], env=env)
    assert code == 2 and out == "", err
    assert err.splitlines() == [
        "personajudge: error: cannot join the Ray cluster at auto: no running Ray instance found on this "
        "machine (start one with `ray start --head`, or give --ray ADDRESS)"
    ]


# -- J: SIGTERM while a Ray run is out ------------------------------------------------------------
def test_sigterm_after_ray_init_is_exit_143_and_the_handler_is_put_back(monkeypatch):
    """ray.init sets a SIGTERM handler that exits with 15; the pool puts its own over it (SystemExit
    143, as a process killed by SIGTERM shows) and, on close, the handler from before ray.init."""

    def rays_handler():
        def exit_15(signum, frame):  # Ray 2.x's driver handler: sys.exit(signum)
            raise SystemExit(signum)

        signal.signal(signal.SIGTERM, exit_15)

    def terminated():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes run: the handler raises here
            pass
        pytest.fail("SIGTERM was not delivered")

    fake = _FakeRay(monkeypatch, rays_handler)
    monkeypatch.setattr(ray, "cluster_resources", terminated)  # the first call after ray.init
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(SystemExit) as stop:
            with ReplicaPool(build_config({"backend": {"name": "toy"}}), RayOptions()):
                pass
        assert stop.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert fake.init_returned and fake.shutdowns == 1


@pytest.mark.slow
def test_kill_of_a_ray_run_exits_143_and_says_what_is_kept(tmp_path):
    """``kill PID`` of ``generate --input --ray``: exit status 15 (Ray's handler) and a C++ stack dump
    before; now 143, the one line that says how many rows the partial file keeps, nothing of Ray's."""
    import subprocess
    import sys
    import time

    inp, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    partial = tmp_path / "o.jsonl.partial"
    _write_input(inp, 40)
    argv = ["generate", "--input", str(inp), "--output", str(out), *TOY, "--batch-size", "2", "-q", "--ray"]
    err_path = tmp_path / "stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", slow_ray_main(0.3), *argv],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and len(partial.read_text().splitlines()) >= 3:  # header + one chunk
                break
            time.sleep(0.02)
        assert proc.poll() is None, ("the run ended before the kill", err_path.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its Ray instance
        except ProcessLookupError:
            pass
        proc.wait(30)
    kept = len(partial.read_text().splitlines()) - 1
    assert proc.returncode == 143, err_path.read_text()
    assert 2 <= kept < 40 and not out.exists()
    assert err_path.read_text().splitlines() == [
        f"personajudge: {kept} of 40 results are kept in {partial}: rerun the same command to continue"
    ]
