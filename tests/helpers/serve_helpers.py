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

from personajudge.core.processes import dies_with_parent
from personajudge.serve.bench import SERVING_LINE  # the line naming the port the server bound

READY_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=5) as r:
        return json.loads(r.read())


def listens_on(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds the socket listening on TCP ``port`` of this host (None where ``/proc``
    cannot tell): a /health answer alone does not say whose it is."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # sl local_address rem_address st ... inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                listening.add(f"socket:[{fields[9]}]")
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"{fd_dir}/{fd}") in listening:
                return True
    return False


@contextlib.contextmanager
def running_server(flags, log_path, ready_timeout=READY_TIMEOUT_S):
    """Yield ``(base_url, process)``; SIGTERM and a bounded wait afterwards (kill if it hangs).

    The server binds ``--port 0`` itself and its "serving" line says which port it got: a port found free
    here (:func:`free_port`) and bound there later could be taken in between, and then another server
    answering /health on it would be taken for this one. Ready means /health answers ok on that port and
    the process itself listens there (:func:`listens_on`)."""
    cmd = [sys.executable, "-m", "personajudge", "serve", *flags, "--host", "127.0.0.1", "--port", "0"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(  # SIGTERM'd if this process dies: a killed test run leaves no server
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=dies_with_parent(),
        )
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            with open(log_path) as f:
                serving = SERVING_LINE.search(f.read())
            if serving is not None:
                port = int(serving.group(1))
                base = f"http://127.0.0.1:{port}"
                try:
                    if health(base)["status"] == "ok" and listens_on(proc.pid, port) is not False:
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
