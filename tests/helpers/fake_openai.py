"""A fake OpenAI-compatible server for the ``bench-serve --url`` tests: a stdlib HTTP server on 127.0.0.1
(a free port) in a thread, whose completions misbehave on demand; stopped, within a bound, by the test.

Modes: ``ok`` (a streamed answer with usage), ``nousage`` (without the usage chunk), ``hang`` (a completion
that never answers, until the test is done), ``fail`` (every completion is a 503), ``fail-after-N`` (the
first N completions answer, the rest are 503s), ``raw:EVENT`` (a stream of that one event, as written,
then ``[DONE]``), ``models:DATA`` (``GET /models`` answers ``{"data": DATA}``).
"""

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "persona-judge"
OVERLOADED = b'{"error": {"message": "the fake server is overloaded", "type": "overloaded"}}'


class FakeOpenAI(BaseHTTPRequestHandler):
    """``GET .../models`` lists :data:`MODEL`; ``POST`` counts itself in ``posts`` and answers by ``mode``.
    Each server gets a subclass of its own (:func:`fake_server`): the class attributes are its state."""

    mode = "ok"
    posts = 0
    release: threading.Event  # set when the test is done: a hanging completion returns

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.endswith("/models") and self.mode.startswith("models:"):
            self._send(200, b'{"object": "list", "data": ' + self.mode.split(":", 1)[1].encode() + b"}")
        elif self.path.endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).encode())
        else:
            self._send(404, b'{"error": {"message": "no such path"}}')

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        cls = type(self)
        cls.posts += 1
        if cls.mode == "hang":
            cls.release.wait(60)  # bounded: the test sets it when it is done
            return
        if cls.mode == "fail" or (cls.mode.startswith("fail-after-") and cls.posts > int(cls.mode.rsplit("-", 1)[1])):
            self._send(503, OVERLOADED)
            return
        if cls.mode.startswith("raw:"):
            self._send(200, f"data: {cls.mode[4:]}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")
            return
        events = [{"choices": [{"index": 0, "delta": {"content": "hi"}}], "persona_judge": {"views": 2}}]
        if cls.mode != "nousage":
            events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, body.encode(), "text/event-stream")


@contextlib.contextmanager
def fake_server(mode: str = "ok") -> Iterator[tuple[str, type[FakeOpenAI]]]:
    """Yield ``(base_url, handler_class)``: the URL ends in ``/v1``; the class's ``posts`` counts completions."""
    handler = type("Handler", (FakeOpenAI,), {"mode": mode, "posts": 0, "release": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        handler.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)
