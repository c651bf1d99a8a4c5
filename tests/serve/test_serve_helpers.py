"""The server tests' own helper: ``running_server`` yields its own server, never one that answered in its place.

A port found free here (bound to 0, then closed) could be taken before the server binds it; the server
then failed to start, and another server answering /health on that port was taken for it (one
explanation of a CI run where a request ``--max-queue 0`` refuses was answered 200). The server now
binds ``--port 0`` itself and says which port it got.
"""

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import serve_helpers  # noqa: E402


class _Impostor(BaseHTTPRequestHandler):
    """Answers /health as a ready server would, and nothing else."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        body = json.dumps({"status": "ok", "model": "impostor"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_server_that_answers_in_its_place_is_not_taken_for_it(tmp_path, monkeypatch):
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    impostor.daemon_threads = True
    thread = threading.Thread(target=impostor.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    taken = impostor.server_address[1]
    ports = iter([taken])  # were a port "found free" used, the first would be the impostor's
    real_free_port = serve_helpers.free_port
    monkeypatch.setattr(serve_helpers, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        flags = ["--backend", "toy", "--served-model-name", "mine"]
        with serve_helpers.running_server(flags, tmp_path / "server.log") as (base, proc):
            assert not base.endswith(f":{taken}")
            assert serve_helpers.health(base)["model"] == "mine"
            assert serve_helpers.listens_on(proc.pid, int(base.rsplit(":", 1)[1]))
    finally:
        impostor.shutdown()
        impostor.server_close()
        thread.join(10)


def test_listens_on_tells_whose_socket_listens(tmp_path):
    with ThreadingHTTPServer(("127.0.0.1", 0), _Impostor) as here:
        port = here.server_address[1]
        if serve_helpers.listens_on(os.getpid(), port) is None:
            pytest.skip("no /proc to tell from")
        assert serve_helpers.listens_on(os.getpid(), port) is True
        assert serve_helpers.listens_on(os.getppid(), port) is False


def test_bench_serves_started_server_is_its_own_and_binds_the_port_it_names():
    """bench-serve's ``start_server`` has the same rule: the server binds port 0 and names the port in its
    "serving" line; the URL returned is that port, and the child is the process listening there."""
    from personajudge.core.processes import stop_process
    from personajudge.serve.bench import start_server

    proc, base = start_server(["--backend", "toy", "--encoder", "plain", "--served-model-name", "mine"])
    try:
        port = int(base.rsplit(":", 1)[1])
        assert serve_helpers.listens_on(proc.pid, port) is True
        assert serve_helpers.health(base)["model"] == "mine"
    finally:
        stop_process(proc)
