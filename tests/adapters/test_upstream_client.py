"""The workers' upstream client: its plain POSTs against the simulator and a bare server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sim_harness import Simulator
from test_adapter_simulator import ROUTES, base_url, call, chat, user

from broker.processes import free_port
from workers.adapters import openai
from workers.adapters.base import UpstreamTimeout, UpstreamUnreachable
from workers.upstream_http import UpstreamClient

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def upstream() -> Iterator[UpstreamClient]:
    client = UpstreamClient(httpx.Timeout(10.0), httpx.Limits(max_connections=4))
    yield client
    client.close()


class _EchoHandler(BaseHTTPRequestHandler):
    """Replies with the request's headers as JSON and sets a cookie on every reply."""

    def do_POST(self) -> None:  # noqa: N802  (the name http.server looks up)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps({name.lower(): value for name, value in self.headers.items()})
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("set-cookie", "session=tenant-a; Path=/")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_plain_call_matches_httpx_client(
    upstream: UpstreamClient, simulator: Simulator, name: str
) -> None:
    body = chat(user("Name three rivers."))

    with httpx.Client() as plain:
        expected = call(plain, simulator, name, body)
    result = call(upstream, simulator, name, body)

    # Only the reply id differs: the simulator counts its replies.
    assert result.body.pop("id") != expected.body.pop("id")
    assert result.body == expected.body
    assert (result.prompt_tokens, result.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    assert result.prompt_tokens > 0


def test_sends_default_headers_and_no_cookies(upstream: UpstreamClient, echo_url: str) -> None:
    first = upstream.post(
        f"{echo_url}/chat/completions", headers={"x-probe": "1"}, content=b"{}", timeout=5
    ).json()
    second = upstream.post(
        f"{echo_url}/chat/completions", headers={}, content=b"{}", timeout=5
    ).json()

    assert first["x-probe"] == "1"
    assert first["user-agent"].startswith("python-httpx/")
    assert "gzip" in first["accept-encoding"]
    assert first["content-length"] == "2"
    # A provider's cookie must not travel into the next call, which may be another
    # tenant's.
    assert "cookie" not in second


def test_streams_send_no_cookies(upstream: UpstreamClient, echo_url: str) -> None:
    sent = []
    for _ in range(2):
        with upstream.stream("POST", f"{echo_url}/chat/completions", content=b"{}") as response:
            sent.append(json.loads(response.read()))

    assert sent[0]["user-agent"].startswith("python-httpx/")
    assert "cookie" not in sent[1]


def test_timeout_raises_upstream_timeout(upstream: UpstreamClient, simulator: Simulator) -> None:
    simulator.configure(fault_rate_timeout=1.0, timeout_hang_s=20)
    route = ROUTES["openai"]
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout):
        openai.chat_completion(
            upstream,
            base_url(simulator, route),
            "test-key",
            chat(user("Hi")),
            route.upstream_model,
            "public-model",
            0.5,
        )

    assert time.monotonic() - started < 10


def test_refused_connection_raises_unreachable(upstream: UpstreamClient) -> None:
    free = free_port()

    with pytest.raises(UpstreamUnreachable):
        openai.chat_completion(
            upstream, f"http://127.0.0.1:{free}/v1", None, chat(user("Hi")), "m", "m", 2.0
        )
