"""A chat-completions server on 127.0.0.1 that answers from a script: try the HTTP backend offline,
test its retries, or count its requests.

    with LoopbackChat(script) as server:          # script(request_json, n) -> Reply
        backend = HttpChat(url=server.url, model="scripted")

`script` gets each request's JSON body and the request's 1-based number and returns a `Reply`:
a status code, a body (a chat-completions JSON text by default, from `answer`), optional headers
and a delay before answering (longer than the client's timeout, it is a timeout).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple


class Reply(NamedTuple):
    status: int = 200
    body: str = ""
    headers: dict | None = None
    delay: float = 0.0


def answer(text: str) -> Reply:
    """A well-formed chat-completions reply whose message is `text`."""
    message = {"role": "assistant", "content": text}
    body = {"id": "loopback", "object": "chat.completion", "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}]}  # fmt: skip
    return Reply(200, json.dumps(body))


class LoopbackChat:
    """The server (see the module docstring); `requests` lists every request body received, in order."""

    def __init__(self, script: Callable[[dict, int], Reply]):
        self.script = script
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the http.server API)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    n = len(server.requests)
                reply = server.script(body, n)
                if reply.delay:
                    time.sleep(reply.delay)
                payload = reply.body.encode()
                try:
                    self.send_response(reply.status)
                    for k, v in (reply.headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): nothing to answer

            def log_message(self, *args):  # keep test output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> LoopbackChat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
