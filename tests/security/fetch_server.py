"""A small HTTP server for the fetch attacks: it records every request it sees.

Run in-process on a node address (a victim that must never be reached) or, for the
"public" side, inside a network namespace the test creates:
``python -m tests.security.fetch_server ADDRESS PORT LOGFILE``.

Paths: ``/redirect?to=URL`` answers 302 to URL; ``/big`` streams chunks without end (no
Content-Length); ``/huge`` declares a Content-Length of 1 GiB; ``/slow`` drips one byte every
0.2 s; anything else answers ``served <path>``. Each request's path is appended to the log
file (one line each) before it is answered.
"""

from __future__ import annotations

import http.server
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    log_path: Path
    seen: list[str]

    def do_GET(self) -> None:
        self.seen.append(self.path)
        with open(self.log_path, "a") as log:
            log.write(self.path + "\n")
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/redirect":
            target = urllib.parse.parse_qs(url.query)["to"][0]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif url.path in ("/big", "/slow"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" if url.path == "/slow" else b"x" * 65536
            try:
                for _ in range(100_000):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    if url.path == "/slow":
                        time.sleep(0.2)
            except OSError:
                return
        elif url.path == "/huge":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
            try:
                self.wfile.write(b"x" * 65536)
            except OSError:
                return
        else:
            body = f"served {url.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Last-Modified", "Tue, 01 Dec 2026 10:00:00 GMT")
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: str, port: int, log_path: Path) -> None:
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        handler = type("BoundHandler", (Handler,), {"log_path": log_path, "seen": []})
        self.handler: type[Handler] = handler
        super().__init__((address, port), handler)

    @property
    def seen(self) -> list[str]:
        return self.handler.seen


def serve_in_thread(address: str, log_path: Path, port: int = 0) -> Server:
    """A server on ``address`` (a node address) in a daemon thread; ``shutdown`` it."""
    server = Server(address, port, log_path)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    Server(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])).serve_forever()
