"""The fixes of the second Ray audit (findings A-F): a --preferences-file's definitions reach the
replicas, Ray's notices stay out of the JSONL on standard output, config mistakes are found before
Ray starts, Ctrl-C while Ray starts, an unexpected exception in a replica, a docstring's reference.

Tests that need a running Ray use ``local_ray`` (tests/distributed/conftest.py: one local instance
for the module, on 127.0.0.1 with 2 CPUs, shut down after); those about Ray's start fake
``ray.init``; those about signals and Ray's own notices run the CLI in a process of its own (its
own local instance, in its own session), bounded in time and killed with everything it started.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from bounded import sigint_as_at_a_terminal

ray = pytest.importorskip("ray")


import personajudge as pj  # noqa: E402
import personajudge.distributed as dist  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.distributed import RayOptions, ReplicaError, ReplicaPool, Task  # noqa: E402

TIMING = ("wall_time_s", "tokens_per_s")
T = ["--backend", "toy", "--max-new-tokens", "10", "--seed", "3", "--batch-size", "4", "-q"]


def write_input(path, n):
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": f"r{i}", "prompt": f"prompt number {i} about the sea"}
            if i % 3 == 0:
                row["seed"] = 100 + i
            f.write(json.dumps(row) + "\n")


def rows(path):
    return [json.loads(line) for line in open(path)]


def untimed(row):
    return {**row, "stats": {k: v for k, v in row["stats"].items() if k not in TIMING}}


# -- A: a --preferences-file's definitions reach the replicas ------------------------------------
#: The README's preferences file: it defines ``pirate`` and adjusts the built-in ``concise``.
PREFS_TOML = """
[[preferences]]
name = "pirate"
description = "Talk like a pirate"
examples = [{q = "Where is the ship?", a = "Arr, she be in the harbour, matey."},
            {q = "Is it late?", a = "Aye, the moon be up, so off to yer hammock."}]
[[preferences]]
name = "concise"
examples = [{q = "What is 2+2?", a = "4."}]
"""


def test_preferences_file_views_on_ray_equal_local(tmp_path, capsys, local_ray):
    """The README's ``--preferences-file prefs.toml --view pirate,concise --view humor`` on two
    replicas: the rows (settings included) are the local run's, row for row."""
    inp, prefs = tmp_path / "in.jsonl", tmp_path / "prefs.toml"
    write_input(inp, 9)
    prefs.write_text(PREFS_TOML)
    argv = ["generate", "--input", str(inp), *T, "--preferences-file", str(prefs)]
    argv += ["--view", "pirate,concise", "--view", "humor"]
    assert main([*argv, "--output", str(tmp_path / "local.jsonl")]) == 0
    assert main([*argv, "--output", str(tmp_path / "ray.jsonl"), "--ray", "--replicas", "2"]) == 0, (
        capsys.readouterr().err
    )
    local, remote = rows(tmp_path / "local.jsonl"), rows(tmp_path / "ray.jsonl")
    assert len(remote) == 9 and [untimed(r) for r in remote] == [untimed(r) for r in local]
    # the file's definitions were used (not a built-in or free text): its pirate and its concise
    first_view = local[0]["settings"]["views"][0]
    assert [p["description"] for p in first_view][0] == "Talk like a pirate"
    assert first_view[1]["name"] == "concise" and first_view[1]["examples"] == [{"q": "What is 2+2?", "a": "4."}]


def test_replica_config_keeps_the_definitions():
    """The threads filled in for a replica keep the config's class and its excluded fields."""
    from personajudge.cli.options import FileDefinedConfig
    from personajudge.preferences import Preference

    pirate = Preference(name="pirate", description="Talk like a pirate", instruction="Talk like a pirate.")
    base = build_config({"backend": {"name": "llama-cpp"}, "views": [["pirate"], ["humor"]]})
    cfg = FileDefinedConfig.model_validate({**base.model_dump(by_alias=True), "definitions": [pirate]})
    out = dist.replica_config(cfg, 3)
    assert isinstance(out, FileDefinedConfig) and out.definitions == [pirate] and out.backend.threads == 3


# -- B: Ray's notices never land in the JSONL on standard output ----------------------------------
#: The CLI with each chunk slowed down in the replicas (the actor class is patched before Ray
#: pickles it); each replica writes its pid into the folder named by PJ_PIDS when it runs a chunk.
SLOW_PIDS_MAIN = """
import os, sys, time
import personajudge.distributed as d
real = d.Replica.run
def slow(self, task):
    open(os.path.join(os.environ["PJ_PIDS"], str(os.getpid())), "w").close()
    time.sleep(0.3)
    return real(self, task)
d.Replica.run = slow
from personajudge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def test_raylet_notice_is_not_in_the_results_on_stdout(tmp_path):
    """A replica SIGKILLed mid-run with the results on standard output (no --output): Ray announces
    the retry with a ``(raylet)`` notice, which goes to standard error; every line of standard
    output is a JSON row, all of them, in input order."""
    inp, pids = tmp_path / "in.jsonl", tmp_path / "pids"
    pids.mkdir()
    write_input(inp, 24)
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    argv = ["generate", "--input", str(inp), *T[:-3], "--batch-size", "2", "--prefer", "concise"]
    argv += ["--prefer", "humor", "-q", "--ray", "--replicas", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env["PJ_PIDS"] = str(pids)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", SLOW_PIDS_MAIN, *argv], stdout=out, stderr=err, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            if len(out_path.read_text().splitlines()) >= 2 and os.listdir(pids):
                victim = int(sorted(os.listdir(pids))[0])
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert victim is not None, ("the run ended before the kill", err_path.read_text())
        proc.wait(120)
    finally:
        _kill_group(proc)
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr
    lines = out_path.read_text().splitlines()
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json
    assert [json.loads(line)["id"] for line in lines] == [f"r{i}" for i in range(24)]  # each line JSON
    assert "(raylet)" in stderr  # Ray did announce the death: the test saw the notice it is about


# -- C: config mistakes are found before Ray starts ------------------------------------------------
class _NoRayStart:
    """``ray.init`` that must not be called (recorded; it fails), and a Ray that is not running."""

    def __init__(self, monkeypatch):
        self.inits = 0
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", self._init)
        monkeypatch.setattr(ray, "shutdown", lambda: None)

    def _init(self, **kw):
        self.inits += 1
        raise RuntimeError("ray.init was called")


@pytest.mark.parametrize(
    "mistake",
    [
        ["--encoder", "nosuch"],
        ["--method", "nosuch"],
        ["--method-option", "bogus=1"],
        ["--backend-option", "bogus=1"],
        ["--backend-option", "view_strength=true"],
        ["--encoder", "exemplar", "--config", "ENCOPTS"],
    ],
    ids=["encoder", "method", "method-option", "backend-option", "backend-option-value", "encoder-option"],
)
def test_config_mistake_is_the_local_line_before_ray_starts(tmp_path, capsys, monkeypatch, mistake):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 2)
    (tmp_path / "enc.toml").write_text("[encoder_options]\nbogus = 1\n")
    mistake = [str(tmp_path / "enc.toml") if m == "ENCOPTS" else m for m in mistake]
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *T, *mistake]
    argv += ["--prefer", "concise", "--prefer", "humor"]
    assert main(argv) == 2
    local = capsys.readouterr().err.splitlines()
    assert len(local) == 1 and local[0].startswith("personajudge: error: "), local
    fake = _NoRayStart(monkeypatch)
    assert main([*argv, "--ray", "--replicas", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == local
    assert fake.inits == 0
    assert not (tmp_path / "o.jsonl.partial").exists()


def test_encoder_registered_at_run_time_is_refused_before_ray_starts(monkeypatch):
    """A replica builds its plugins from the installed entry points: one registered in this process
    would be missing there; the driver says so, before Ray starts (it works locally)."""
    mod = type(sys)("pj_ray2_runtime_encoder")

    class Card:
        name = "ray2-card"
        description = "a test encoder registered at run time"

        def render(self, view, conversation, tokenizer, *, system=None, options=None):
            return "Card: " + conversation[-1]["content"] + "\nA:", True

        def stop_strings(self, tokenizer, options=None):
            return ["\n"]

    @pj.hookimpl
    def register_encoders(register):
        register(Card)

    mod.register_encoders = register_encoders
    cfg = build_config(
        {
            "backend": {"name": "toy"},
            "encoder": "ray2-card",
            "preferences": ["concise", "humor"],
            "decoding": {"max_new_tokens": 4, "seed": 1},
        }
    )
    pj.register_plugin(mod)
    try:
        with pj.PersonaJudge(cfg) as local:
            assert local.generate("hi").tokens  # it works in this process
        fake = _NoRayStart(monkeypatch)
        with pytest.raises(ReplicaError) as info:
            with ReplicaPool(cfg, RayOptions(replicas=1)):
                pass
    finally:
        pj.unregister_plugin(mod)
    assert fake.inits == 0
    assert str(info.value).startswith(
        "encoder 'ray2-card' was registered in this process (register_plugin), and Ray's replicas do not have it: "
        "install its plugin as a package with a 'personajudge' entry point"
    )


def test_config_error_in_a_replica_is_not_called_a_model_load_failure(local_ray, monkeypatch):
    """Where the driver's check passes and a replica's fails (a node without the plugin; faked by
    skipping the driver's check), the error names the replica, not a model that failed to load."""
    monkeypatch.setattr(dist, "check_for_replicas", lambda *a, **k: None)
    cfg = build_config({"backend": {"name": "toy"}, "encoder": "nosuch"})
    with pytest.raises(ReplicaError) as info:
        with ReplicaPool(cfg, RayOptions(replicas=1), quiet=True):
            pass
    assert str(info.value).startswith("replica 1 of 1: unknown encoder 'nosuch'; registered encoders: ")


# -- D: Ctrl-C while Ray starts ----------------------------------------------------------------------
def test_ctrl_c_during_a_ray_init_that_fails_is_not_lost(monkeypatch):
    """The held Ctrl-C wins over ray.init's error: the run ends as interrupted, not as 'cannot join'."""

    def init(**kw):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # bytecodes run: an unheld SIGINT raises here
            pass
        raise ConnectionError("Failed to connect to Ray cluster")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ReplicaPool(build_config({"backend": {"name": "toy"}}), RayOptions()):
                pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


class _SilentGrpc:
    """A server on 127.0.0.1 that greets every connection as gRPC does (an HTTP/2 SETTINGS frame) and
    then says nothing: the address probe lets it through, and ``ray.init`` waits on it for minutes."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed: the test is over
                return
            conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            self.conns.append(conn)

    @property
    def address(self):
        return f"127.0.0.1:{self.server.getsockname()[1]}"

    def close(self):
        self.server.close()
        for c in self.conns:
            c.close()
        self.thread.join(10)


#: Ray swaps a 127.0.0.1 address for this machine's node address (its eth0) before it connects;
#: with its "cluster" switch off it keeps the loopback address, so the test talks to 127.0.0.1 only.
_LOOPBACK_ONLY = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_second_ctrl_c_ends_a_hanging_ray_init_at_once(tmp_path):
    """``--ray HOST:PORT`` of a gRPC server that is not Ray: ray.init waits in Ray's C++ code, where no
    Python handler runs. Two Ctrl-Cs end the run at once, as 'interrupted', exit 130."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, 2)
    fake = _SilentGrpc()
    argv = ["generate", "--input", str(inp), "--output", str(tmp_path / "o.jsonl"), *T, "--ray", fake.address]
    proc = subprocess.Popen(
        [sys.executable, "-m", "personajudge", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_at_a_terminal,
        env=_LOOPBACK_ONLY,
    )
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        # Ray's C++ client says it is waiting for the GCS: the process is inside ray.init
        while time.monotonic() < deadline and not any("GCS" in line for line in lines) and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and any("GCS" in line for line in lines), lines
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)  # at once: ray.init alone would retry for minutes
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 20s after the second Ctrl-C: {lines}")
        assert fake.conns, "Ray waited on some other address than the 127.0.0.1 stand-in"
    finally:
        _kill_group(proc)
        fake.close()
    reader.join(10)
    assert proc.returncode == 130, lines
    assert lines[-1].strip() == "personajudge: interrupted", lines


# -- E: an unexpected exception in a replica ---------------------------------------------------------
def test_unexpected_exception_in_a_replica_is_one_line_after_the_chunks_out(local_ray):
    """A chunk that raises an IndexError in the replica (a bug, not a user error: its ``where`` names
    no line for a prompt too long) while a long chunk is still running: the long chunk finishes and
    is yielded, nothing new starts, then one ReplicaError names the replica, the exception and where
    it was raised, without Ray's colour codes."""
    cfg = build_config({"backend": {"name": "toy", "n_ctx": 1024}, "decoding": {"max_new_tokens": 48}})
    opts = {"preferences": ["concise", "humor"]}
    slow = Task(0, [f"prompt {i} about the sea" for i in range(48)], list(range(48)), opts)
    bug = Task(1, ["word " * 3000], [1], opts, where=[])
    later = [Task(k, [f"prompt {k}"], [k], opts) for k in (2, 3)]
    got = []
    with ReplicaPool(cfg, RayOptions(replicas=2), quiet=True) as pool:
        with pytest.raises(ReplicaError) as info:
            for out in pool.run([slow, bug, *later]):
                got.append(out.task.key)
    assert got == [0]  # the chunk still out is kept; the two after the bug never started
    text = str(info.value)
    assert "\x1b" not in text and "\n" not in text
    assert re.fullmatch(r"replica [12] of 2 failed: IndexError: list index out of range \(at errors\.py:\d+\)", text), (
        text
    )


# -- F: run_jsonl's docstring names what exists --------------------------------------------------------
def test_run_jsonl_docstring_names_existing_ray_api():
    import importlib

    from personajudge.batch import run_jsonl

    refs = re.findall(r":(?:func|meth|class):`(personajudge\.distributed\.[\w.]+)`", run_jsonl.__doc__ or "")
    assert refs
    for ref in refs:
        obj = importlib.import_module("personajudge.distributed")
        for part in ref.split(".")[2:]:
            assert hasattr(obj, part), ref
            obj = getattr(obj, part)
