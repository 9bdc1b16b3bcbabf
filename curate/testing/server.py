"""A small threaded HTTP server on 127.0.0.1 serving fixed responses: the demo's web and the tests' web."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Response:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "image/jpeg"})
    delay: float = 0.0  # seconds before answering
    trickle: float = 0.0  # seconds between body bytes


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Response] = {}
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        response = self.routes.get(self.path)
        if response is None:
            self.send_error(404)
            return
        time.sleep(response.delay)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        try:
            if response.trickle:
                for byte in response.body:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(response.trickle)
            else:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence per-request logging
        pass


class ImageServer:
    """`with ImageServer(routes) as server: server.url("/a.jpg")`; routes can be added while it runs."""

    def __init__(self, routes: dict[str, Response] | None = None) -> None:
        handler = type("Handler", (_Handler,), {"routes": dict(routes or {}), "requests": []})
        self.routes: dict[str, Response] = handler.routes  # type: ignore[attr-defined]
        self.requests: list[str] = handler.requests  # type: ignore[attr-defined] # paths asked for, in order
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve_robots(self, text: str) -> None:
        """The origin's robots.txt (RFC 9309)."""
        self.routes["/robots.txt"] = Response(text.encode(), headers={"Content-Type": "text/plain"})

    def serve_tdmrep(self, rules: list[dict[str, object]]) -> None:
        """The origin's /.well-known/tdmrep.json (W3C TDMRep): a list of {"location", "tdm-reservation", ...}."""
        self.routes["/.well-known/tdmrep.json"] = Response(json.dumps(rules).encode(),
                                                          headers={"Content-Type": "application/json"})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
