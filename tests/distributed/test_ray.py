"""Batch generation and evaluation on a local Ray instance (127.0.0.1, 2 CPUs, shut down at the end).

The toy backend proves exactness (rows equal a local run), resuming across the local and Ray paths,
a replica killed mid-chunk (its chunk retried, nothing lost or duplicated) and a model that fails
to load (one line, no hang). One small run uses the embedded Gemma model (marked ``model``).
"""

import json
import os
import re
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from bounded import run_bounded
from slow_ray import slow_ray_main

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.batch import JsonlBatch, local_executor, read_records  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.distributed import RayOptions, ReplicaError, ReplicaPool, Task  # noqa: E402

TOY = ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "12"]
TIMING = ("wall_time_s", "tokens_per_s")


@pytest.fixture(scope="module", autouse=True)
def _every_test_on_local_ray(local_ray):
    """Every test of this module runs against the shared local instance (tests/distributed/conftest.py)."""
    yield


def write_input(path, n, seeds=True):
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": f"r{i}", "prompt": f"prompt number {i} about the sea"}
            if seeds and i % 3 == 0:
                row["seed"] = 100 + i  # a row's own seed beside --seed + index
            f.write(json.dumps(row) + "\n")


def rows(path):
    return [json.loads(x) for x in open(path)]


def untimed(row):
    return {**row, "stats": {k: v for k, v in row["stats"].items() if k not in TIMING}}


def test_toy_ray_equals_local_exactly(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 11)
    common = ["generate", "--input", str(inp), *TOY, "--seed", "7", "--batch-size", "3", "-q"]
    assert main([*common, "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main([*common, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--replicas", "2"]) == 0
    local, remote = rows(tmp_path / "local.jsonl"), rows(tmp_path / "ray.jsonl")
    assert [r["id"] for r in remote] == [f"r{i}" for i in range(11)]  # input order, each once
    assert [untimed(r) for r in remote] == [untimed(r) for r in local]
    assert len({tuple(r["tokens"]) for r in remote}) > 1  # rows differ: a real test of the mapping
    assert not (tmp_path / "ray.jsonl.partial").exists()


def test_ray_resumes_a_local_partial_file(tmp_path, capsys):
    """Interrupted locally after one chunk (no --seed: fresh seeds), finished on Ray: kept rows untouched."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 8, seeds=False)
    cfg = build_config(
        {"backend": {"name": "toy"}, "preferences": ["concise", "humor"], "decoding": {"max_new_tokens": 12}}
    )
    job = JsonlBatch(read_records(inp), cfg, None, batch_size=3, output=str(out), progress=False)

    def stop(done):
        raise KeyboardInterrupt

    with PersonaJudge(cfg) as pj, job, pytest.raises(KeyboardInterrupt):
        job.run(local_executor(pj), on_chunk=stop)
    kept = rows(tmp_path / "out.jsonl.partial")[1:]
    assert len(kept) == 3
    assert (
        main(
            [
                "generate",
                "--input",
                str(inp),
                "--output",
                str(out),
                *TOY,
                "--batch-size",
                "3",
                "-q",
                "--ray",
                "--replicas",
                "2",
            ]
        )
        == 0
    )
    final = rows(out)
    assert [r["id"] for r in final] == [f"r{i}" for i in range(8)]
    for k in kept:  # byte-for-byte the rows of the interrupted run (timings included), not regenerated
        k.pop("fp")
        assert final[[r["id"] for r in final].index(k["id"])] == k
    # every row equals a local generate() of that prompt with the seed it reports
    with PersonaJudge(cfg) as pj:
        for r in final:
            assert pj.generate(r["prompt"], seed=r["stats"]["seed"]).tokens == r["tokens"]


def _tasks(n):
    return [
        Task(i, [f"prompt {i} one", f"prompt {i} two"], [10 * i, 10 * i + 1], {"preferences": ["concise", "humor"]})
        for i in range(n)
    ]


def _expected(cfg, tasks):
    with PersonaJudge(cfg) as pj:
        return {t.key: [r.tokens for r in pj.generate_batch(t.prompts, seeds=t.seeds, **t.options)] for t in tasks}


@pytest.mark.parametrize("restarts", [0, 1], ids=["retried-on-other-replica", "ray-restarts-replica"])
def test_killed_replica_chunk_is_retried(restarts):
    """Replica A is frozen (SIGSTOP) holding a chunk, then SIGKILLed once B has delivered others: the
    chunk it held is run again (on B, or on A restarted by Ray), every chunk arrives exactly once and
    equals a local run."""
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 12}})
    tasks = _tasks(6)
    want = _expected(cfg, tasks)
    with ReplicaPool(cfg, RayOptions(replicas=2, max_restarts=restarts), quiet=True) as pool:
        victim, other = (info["pid"] for info in pool.infos)
        os.kill(victim, signal.SIGSTOP)
        got, pids = {}, []
        try:
            for out in pool.run(tasks):
                assert out.task.key not in got
                got[out.task.key] = [r.tokens for r in out.results]
                pids.append(out.replica_pid)
                if len(got) == 2:
                    os.kill(victim, signal.SIGKILL)
        finally:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert got == want
        assert victim not in pids  # it never finished anything: its chunk was run again elsewhere
        if restarts == 0:
            assert pool.retried == 1 and set(pids) == {other}
        else:
            assert set(pids) - {other}  # the restarted replica (a new process) ran the chunk again


def test_model_that_fails_to_load_is_one_line(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 2)
    t0 = time.monotonic()
    code = main(
        [
            "generate",
            "--input",
            str(inp),
            "--output",
            str(tmp_path / "o.jsonl"),
            "--backend",
            "llama-cpp",
            "--model",
            str(tmp_path / "missing.gguf"),
            "--ray",
            "--replicas",
            "2",
            "-q",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "could not load the model" in err[0] and "missing.gguf" in err[0], err
    assert time.monotonic() - t0 < 120  # not a hang (a generous bound, not a speed claim)


def test_too_many_replicas_for_the_instance_is_refused(tmp_path, capsys):
    cfg = build_config({"backend": {"name": "toy"}})
    with pytest.raises(ReplicaError, match="needs 4 CPUs"):
        with ReplicaPool(cfg, RayOptions(replicas=4), quiet=True):
            pass


def test_ray_flags_need_ray(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 1)
    assert main(["generate", "--input", str(inp), *TOY, "--replicas", "2"]) == 2
    assert "needs --ray" in capsys.readouterr().err
    assert main(["generate", "hello", *TOY, "--ray"]) == 2
    assert "--ray needs --input" in capsys.readouterr().err
    assert main(["generate", "--input", str(inp), *TOY, "--ray", "--replicas", "0"]) == 2
    assert "--replicas" in capsys.readouterr().err


def test_eval_on_ray_equals_local(tmp_path, capsys):
    pytest.importorskip("textstat")
    from personajudge.evaluation import EvalSpec, pair_experiment
    from personajudge.evaluation.runner import run_eval
    from personajudge.evaluation.store import read_rows

    spec = EvalSpec.model_validate(
        dict(
            limit=3,
            methods=["prompt", "persona-judge"],
            experiments=[pair_experiment("concise,informative")],
            scorers=[{"alias": "length", "name": "length"}],
            batch_size=2,
            run={"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 16}},
        )
    )
    run_eval(spec, tmp_path / "local", progress=False, report=False)
    res = run_eval(spec, tmp_path / "ray", progress=False, report=False, ray=RayOptions(replicas=2))
    assert res.generated == 6

    def table(d):
        gens, _ = read_rows(d / "generations.jsonl")
        return sorted((r["key"], r["fp"], r["text"], r["n_tokens"], r["batch"]) for r in gens)

    assert table(tmp_path / "ray") == table(tmp_path / "local")
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["model"]["backend"] == "toy"


@pytest.mark.model
@pytest.mark.slow
def test_embedded_model_on_one_replica_equals_local(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    inp = tmp_path / "in.jsonl"
    prompts = ["Why is the sky blue?", "Name a fruit.", "What is rain?"]
    with open(inp, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt": p}) + "\n")
    common = [
        "generate",
        "--input",
        str(inp),
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "3",
        "--threads",
        "1",
        "--seed",
        "0",
        "-q",
    ]
    assert main([*common, "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main([*common, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--replicas", "1"]) == 0
    assert [r["tokens"] for r in rows(tmp_path / "ray.jsonl")] == [r["tokens"] for r in rows(tmp_path / "local.jsonl")]


def test_importing_personajudge_does_not_import_ray():
    import subprocess
    import sys

    code = (
        "import sys, personajudge, personajudge.cli, personajudge.distributed, personajudge.evaluation.runner; "
        "print('ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


SLOW_RAY_MAIN = slow_ray_main(0.3)


@pytest.mark.slow
def test_driver_killed_and_rerun_resumes(tmp_path, capsys):
    import subprocess
    import sys

    inp, out, ref = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    write_input(inp, 12)
    common = ["generate", "--input", str(inp), *TOY, "--seed", "5", "--batch-size", "2", "-q"]
    assert main([*common, "--output", str(ref)]) == 0
    partial = tmp_path / "out.jsonl.partial"
    argv = [*common, "--output", str(out), "--ray", "--replicas", "1"]
    # Its own Ray instance, in its own process group: everything it started goes down with the kill.
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_RAY_MAIN, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if partial.exists() and len(rows(partial)) >= 3:  # header + 2 rows: one chunk is on disk
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before the kill"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    kept = [r for r in rows(partial) if "fp" in r]
    assert 2 <= len(kept) < 12 and not out.exists()
    assert main(argv) == 0  # rerun: resumes from the partial file on this module's Ray instance
    final = rows(out)
    assert [untimed(r) for r in final] == [untimed(r) for r in rows(ref)]
    for k in kept:
        k.pop("fp")
        assert k in final


# -- addresses, warnings and the end of a failed run ---------------------------------------------------


def _free_port():
    """A port on 127.0.0.1 that nothing listens on: bound, read, closed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _NotRay:
    """Plain TCP servers on 127.0.0.1 that are not Ray: ``talker`` answers one line and hangs up (a
    web server, a database), ``silent`` accepts nothing and says nothing. Closed by the test."""

    def __init__(self):
        import socket
        import threading

        self.talker = socket.create_server(("127.0.0.1", 0))
        self.silent = socket.create_server(("127.0.0.1", 0))

        def serve():
            while True:
                try:
                    conn, _ = self.talker.accept()
                except OSError:  # closed: the test is over
                    return
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"220 hello, this is not Ray\r\n")

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def address(self, which):
        return f"127.0.0.1:{getattr(self, which).getsockname()[1]}"

    def close(self):
        import socket

        self.talker.shutdown(socket.SHUT_RDWR)
        self.talker.close()
        self.silent.close()
        self.thread.join(10)


@pytest.fixture
def not_ray():
    servers = _NotRay()
    try:
        yield servers
    finally:
        servers.close()


def test_address_where_nothing_listens_is_one_line(tmp_path):
    """``--ray 127.0.0.1:PORT`` with nothing there: ray.init alone retries for minutes."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, 1)
    port = _free_port()
    code, out, err = run_bounded(
        ["-m", "personajudge", "generate", "--input", str(inp), *TOY, "--seed", "0", "-q", "--ray", f"127.0.0.1:{port}"]
    )
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"personajudge: error: cannot reach the Ray cluster at 127.0.0.1:{port}: Connection refused"
    ]


def test_address_of_a_server_that_is_not_ray_is_one_line(tmp_path, not_ray):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 1)
    address = not_ray.address("talker")
    code, out, err = run_bounded(
        ["-m", "personajudge", "generate", "--input", str(inp), *TOY, "--seed", "0", "-q", "--ray", address]
    )
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"personajudge: error: cannot reach the Ray cluster at {address}: ")
    assert "does not speak gRPC" in lines[0]


#: ReplicaPool on each address given, in a process of its own (where Ray is not started yet), with
#: a short connect timeout; prints the error's type and text for each.
POOL_ON_ADDRESSES = """
import sys
import personajudge.distributed as d
from personajudge.core.config import build_config
d.CONNECT_TIMEOUT_S = 1.0
cfg = build_config({"backend": {"name": "toy"}})
for address in sys.argv[1:]:
    try:
        with d.ReplicaPool(cfg, d.RayOptions(address=address), quiet=True):
            print("started")
    except Exception as err:
        print(type(err).__name__, "|", err)
"""


def test_bad_addresses_raise_replica_error_in_the_api(not_ray):
    port = _free_port()
    addresses = [f"127.0.0.1:{port}", not_ray.address("talker"), not_ray.address("silent"), f"ray://127.0.0.1:{port}"]
    code, out, err = run_bounded(["-c", POOL_ON_ADDRESSES, *addresses])
    assert code == 0, err
    got = [line.split(" | ") for line in out.splitlines()]
    assert [g[0] for g in got] == ["ReplicaError"] * 4, out
    for address, (_, text) in zip(addresses, got):
        assert text.startswith(f"cannot reach the Ray cluster at {address}: "), text
    assert got[0][1].endswith("Connection refused") and got[3][1].endswith("Connection refused")
    assert "does not speak gRPC" in got[1][1]
    assert got[2][1].endswith("no answer within 1s (is Ray running there?)")


def test_threads_are_given_only_to_a_backend_that_reads_them():
    from personajudge.distributed import replica_config

    assert replica_config({"backend": {"name": "toy"}}, 3).backend.threads is None  # config_fields: n_ctx only
    assert replica_config({"backend": {"name": "llama-cpp"}}, 3).backend.threads == 3
    assert replica_config({"backend": {"name": "llama-cpp", "threads": 1}}, 3).backend.threads == 1  # the user's


def test_replica_warnings_are_issued_by_the_driver_once():
    """Two replicas that each warn at load and on every chunk: the driver issues each warning once,
    through its own warnings machinery (so its filters and the CLI's one-line format apply)."""
    import warnings

    from personajudge.core.errors import PersonaJudgeWarning

    tasks = [
        Task(i, [f"prompt {i}"], [i], {"preferences": ["humor"], "views": [["concise"], ["humor"]]}) for i in range(4)
    ]
    cfg = build_config({"backend": {"name": "toy", "threads": 2}, "decoding": {"max_new_tokens": 4}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ReplicaPool(cfg, RayOptions(replicas=2), quiet=True) as pool:
            assert sorted(out.task.key for out in pool.run(tasks)) == [0, 1, 2, 3]
    texts = [str(w.message) for w in caught if issubclass(w.category, PersonaJudgeWarning)]
    assert sorted(texts) == sorted(
        [
            "the toy backend does not use backend.threads=2: ignored",
            "the preferences given alongside views are ignored; the views decide (put every preference into a view)",
        ]
    ), texts
    # the replica's own thread count (its CPUs) is not forced on the toy, which does not read it
    cfg = build_config({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ReplicaPool(cfg, RayOptions(replicas=2), quiet=True) as pool:
            assert len(list(pool.run(_tasks(2)))) == 2
    assert not [w for w in caught if issubclass(w.category, PersonaJudgeWarning)], [str(w.message) for w in caught]


#: The CLI with each chunk slowed down in the replicas, so that a chunk is still out when another one
#: fails and the run stops.
SLOW_CHUNKS_MAIN = slow_ray_main(0.5)


def _own_lines(err):
    """stderr without Ray's start-up notice about its token authentication (Ray's, not a replica's)."""
    return [line for line in err.splitlines() if "Token authentication is enabled" not in line]


def test_cli_on_a_cluster_address_prints_nothing_with_q(tmp_path):
    """Joined to this module's instance by ``127.0.0.1:PORT`` (the probe lets a real Ray through), a
    clean toy run with -q prints nothing: no thread count forced on the toy (which would warn in each
    replica), no per-replica log lines."""
    port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 2)
    argv = ["generate", "--input", str(inp), "--output", str(out), *TOY, "--seed", "0", "-q"]
    code, stdout, err = run_bounded(["-m", "personajudge", *argv, "--ray", f"127.0.0.1:{port}", "--replicas", "2"])
    assert code == 0 and stdout == "" and _own_lines(err) == [], (stdout, err)
    assert [r["id"] for r in rows(out)] == ["r0", "r1"]


def test_failed_run_is_the_warning_once_and_the_error(tmp_path):
    """A local instance of its own (Ray announces retries to such a driver), ``--threads 2`` that
    the toy ignores, and a prompt too long for the context while another chunk is still running:
    stderr is the driver's one-line warning, once for two replicas, and the error; no Ray notice
    that the chunk killed with its replica "will be retried" (which Ray prints on standard output,
    where ``generate`` without ``--output`` writes its JSONL)."""
    inp = tmp_path / "long.jsonl"
    with open(inp, "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "prompt": "word " * (300 if i == 1 else 3)}) + "\n")
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *TOY, "--seed", "0", "-q"]
    argv += ["--threads", "2", "--n-ctx", "128", "--batch-size", "1", "--ray", "--replicas", "2"]
    code, out, err = run_bounded(["-c", SLOW_CHUNKS_MAIN, *argv])
    lines = _own_lines(err)
    assert code == 2 and out == "", out
    assert len(lines) == 2, lines
    assert lines[0] == "personajudge: warning: the toy backend does not use backend.threads=2: ignored"
    # names the line (with this context every row's views are too long: the first to fail is a race)
    assert re.match(rf"personajudge: error: {re.escape(str(inp))}:[1-6]: the prompt of view 0 is ", lines[1]), lines
