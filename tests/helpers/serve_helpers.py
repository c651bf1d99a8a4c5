"""Start ``personajudge serve`` as a subprocess on 127.0.0.1 for the server tests, and stop it."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_server(flags, log_path, ready_timeout=READY_TIMEOUT_S):
    """Yield ``(base_url, process)``; SIGTERM and a bounded wait afterwards (kill if it hangs)."""
    port = free_port()
    cmd = [sys.executable, "-m", "personajudge", "serve", *flags, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            try:
                if health(base)["status"] == "ok":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server was not ready in {ready_timeout}s:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.1)
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def in_process_server(pj, **kw):
    """``create_app(pj)`` under uvicorn in a thread on 127.0.0.1 (a backend, or a limit, no CLI flag gives);
    stopped after, within a bound. uvicorn and the app are imported here: only the tests that serve need them."""
    import threading

    import uvicorn

    from personajudge.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(pj, reserve=False, **kw), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()
