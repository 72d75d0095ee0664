"""A local HTTP server on 127.0.0.1 that serves test avatars, redirects, slow bodies and errors.

Runs in a thread (stdlib `ThreadingHTTPServer`) so it keeps answering while the event loop
under test is busy. Tests allow-list 127.0.0.1/32 explicitly to reach it past the SSRF guard.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Route:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    chunk_bytes: int = 0  # >0: send the body in chunks of this size ...
    chunk_delay_s: float = 0.0  # ... sleeping this long between them (a slow server)
    send_length: bool = True  # False: no Content-Length (the body ends when the connection closes)


class AssetServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                server.requests.append(path)
                route = server.routes.get(path, Route(status=404, body=b"not found"))
                self.send_response(route.status)
                for name, value in route.headers:
                    self.send_header(name, value)
                if route.send_length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if route.chunk_bytes:
                        for start in range(0, len(route.body), route.chunk_bytes):
                            self.wfile.write(route.body[start : start + route.chunk_bytes])
                            self.wfile.flush()
                            time.sleep(route.chunk_delay_s)
                    else:
                        self.wfile.write(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (size/time limit): that is the point of the test
                if not route.send_length:
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="asset-server", daemon=True)

    def start(self) -> AssetServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, path: str, body: bytes, content_type: str = "application/octet-stream") -> str:
        self.routes[path] = Route(body=body, headers=(("Content-Type", content_type),))
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = Route(status=status, headers=(("Location", location),))
        return self.url(path)

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)
