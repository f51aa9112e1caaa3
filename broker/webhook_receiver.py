"""A small webhook receiver on loopback that verifies Standard Webhooks signatures.

The demo and the tests run it in a thread to watch the events the broker sends. It can
respond at once or after a delay (to outlast the sender's timeout), and it can be
stopped and started again on the same port.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError, WebhookVerificationError


@dataclass
class ReceivedEvent:
    webhook_id: str
    payload: dict[str, Any]


@dataclass
class WebhookReceiver:
    """Collects verified events; ``secret`` must be set before events arrive."""

    port: int
    secret: str | None = None
    delay_s: float = 0.0
    events: list[ReceivedEvent] = field(default_factory=list)
    rejected: int = 0
    requests: int = 0
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        """Listen on the port (again); requests are served by a daemon thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver._handle(self, body)

            def log_message(self, *_: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening; connections are refused until ``start``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        with self._lock:
            self.requests += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        try:
            payload = Webhook(self.secret or "").verify(body, dict(handler.headers))
        except (WebhookVerificationError, EmptyWebhookSecretError, ValueError):
            with self._lock:
                self.rejected += 1
            self._reply(handler, 400)
            return
        with self._lock:
            self.events.append(ReceivedEvent(handler.headers["webhook-id"], payload))
        self._reply(handler, 204)

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int) -> None:
        try:
            handler.send_response(status)
            handler.end_headers()
        except OSError:
            pass  # the sender gave up waiting (its timeout) and closed the connection

    def of_type(self, event_type: str) -> list[ReceivedEvent]:
        with self._lock:
            return [event for event in self.events if event.payload.get("type") == event_type]

    def dump(self) -> str:
        with self._lock:
            return json.dumps([event.payload for event in self.events], indent=1)[:2000]
