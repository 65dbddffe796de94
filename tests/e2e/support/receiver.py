"""A CloudEvents sink as its own process: ``python -m tests.e2e.support.receiver OUT``.

It writes each POST it gets (headers, body, and whether it accepted it) as one JSON line to OUT and answers 202.
While the file OUT.refuse exists, requests of the event types listed in it (one a line) get 503, as a sink that
is down would answer. The port it listens on is written to OUT.port once it listens.
"""

from __future__ import annotations

import base64
import http.server
import json
import sys
from pathlib import Path
from typing import Any


def main(out: Path) -> None:
    refuse = out.with_name(out.name + ".refuse")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                event_type = str(json.loads(body).get("type"))
            except ValueError:
                event_type = ""
            refused = refuse.exists() and event_type in refuse.read_text().split()
            record = {"headers": dict(self.headers.items()), "body": base64.b64encode(body).decode(), "accepted": not refused}
            with out.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
            self.send_response(503 if refused else 202)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Every request is in OUT already."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    out.with_name(out.name + ".port").write_text(str(server.server_address[1]))
    server.serve_forever()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
