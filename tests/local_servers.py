"""Local servers the tests talk to instead of the real thing's remote end: an HTTP endpoint
recording POSTs (a chat webhook)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

#: Stands for the secret part of a webhook URL (it must never reach a log).
TOKEN = "T0KEN-s3cr3t-path"


class Webhook:
    """An HTTP server on 127.0.0.1 recording each POST; ``status`` and ``delay`` shape replies."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.status = 200
        self.delay = 0.0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append(
                    {"path": self.path, "content_type": self.headers["Content-Type"], "json": json.loads(body)}
                )
                time.sleep(hook.delay)
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
