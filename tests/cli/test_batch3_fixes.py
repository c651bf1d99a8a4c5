"""`generate --input/--output --ray` ended by a second Ctrl-C while Ray starts (third batch audit).

The second Ctrl-C inside ``ray.init`` ends the process with ``os._exit`` (no ``finally`` runs). Before,
that left the ``<output>.partial`` file the run had just made, holding only its settings line, where
the README says a run that stops before its first row leaves no partial file. Now that file is
removed; a partial file that holds rows of an earlier run stays as it was (rerun to continue).

The CLI runs in a subprocess of its own session, with ``ray.init`` replaced by a wait (no Ray starts):
the Ctrl-Cs land while the run is inside it, as with a real ``ray.init`` that hangs
(tests/distributed/test_ray2_fixes.py has that one, against a server that is not Ray).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from bounded import sigint_as_at_a_terminal, until

pytest.importorskip("ray")

import personajudge.batch as batch  # noqa: E402
from personajudge.cli import main  # noqa: E402

TOY = ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "8", "--seed", "3"]
IN_INIT = "test: inside ray.init"

#: The CLI with ``ray.init`` replaced by a minute's wait that says when it has begun.
HANGING_INIT_MAIN = textwrap.dedent(f"""
    import sys, time
    import ray
    def init(**kw):
        print({IN_INIT!r}, file=sys.stderr, flush=True)
        time.sleep(60)
    ray.init = init
    from personajudge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def argv_for(tmp_path, n=4):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": f"tell me about thing {i}"}) + "\n" for i in range(n)))
    return ["generate", "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), *TOY, "--batch-size", "2", "-q"]


def ctrl_c_twice_inside_ray_init(argv):
    """Run the CLI with ``--ray``; once it is inside ray.init, Ctrl-Cs. Returns (status, stderr lines)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_INIT_MAIN, *argv, "--ray"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=sigint_as_at_a_terminal,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        until(lambda: any(IN_INIT in line for line in lines) or proc.poll() is not None, 90, "ray.init's start")
        assert proc.poll() is None, lines
        # Ctrl-C until the process ends (at the second one it sees; two sent at once can arrive as one)
        for _ in range(100):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                pass
        assert proc.poll() is not None, f"still inside ray.init after 100 Ctrl-Cs: {lines}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
    reader.join(10)
    return proc.returncode, lines


def test_second_ctrl_c_in_ray_init_leaves_no_partial_file_the_run_made(tmp_path):
    argv = argv_for(tmp_path)
    status, lines = ctrl_c_twice_inside_ray_init(argv)
    assert status == 130 and lines[-1].strip() == "personajudge: interrupted", lines
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert not (tmp_path / "out.jsonl").exists()


def test_second_ctrl_c_in_ray_init_keeps_the_rows_of_an_earlier_run(tmp_path, capsys, monkeypatch):
    """A partial file holding a chunk of an earlier (local) run stopped by Ctrl-C: byte for byte the same
    after the second Ctrl-C, and the rerun finishes it."""
    argv = argv_for(tmp_path)
    real = batch.JsonlBatch._write

    def write_then_stop(self, chunk, rows):
        real(self, chunk, rows)
        raise KeyboardInterrupt

    monkeypatch.setattr(batch.JsonlBatch, "_write", write_then_stop)
    assert main(argv) == 130
    monkeypatch.setattr(batch.JsonlBatch, "_write", real)
    partial = tmp_path / "out.jsonl.partial"
    before = partial.read_bytes()
    assert before.count(b"\n") == 3  # the settings line and one chunk of two rows
    status, lines = ctrl_c_twice_inside_ray_init(argv)
    assert status == 130, lines
    assert partial.read_bytes() == before
    assert main(argv) == 0
    assert [json.loads(line)["id"] for line in open(tmp_path / "out.jsonl")] == [0, 1, 2, 3]
