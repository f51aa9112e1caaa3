"""Injected faults, outages and latency, in each wire format."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest
from sim_harness import HOST, Simulator

from simulator.urls import base_urls

pytestmark = pytest.mark.timeout(60)

OPENAI_REQUEST = (
    "/openai/v1/chat/completions",
    {"Authorization": "Bearer test-key"},
    {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]},
)
ANTHROPIC_REQUEST = (
    "/anthropic/v1/messages",
    {"x-api-key": "test-key", "anthropic-version": "2023-06-01"},
    {"model": "sim-claude", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]},
)
GEMINI_REQUEST = (
    "/google/v1beta/models/sim-gemini-flash:generateContent",
    {"x-goog-api-key": "test-key"},
    {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
)
FORMATS = {"openai": OPENAI_REQUEST, "anthropic": ANTHROPIC_REQUEST, "gemini": GEMINI_REQUEST}


def send(http: httpx.Client, wire_format: str, fault: str | None = None) -> httpx.Response:
    path, headers, body = FORMATS[wire_format]
    if fault is not None:
        headers = {**headers, "x-simulator-fault": fault}
    return http.post(path, headers=headers, json=body)


def test_rate_limit_openai_body(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(retry_after_s=7)

    response = send(http, "openai", "429")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"]


def test_rate_limit_anthropic_body(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(retry_after_s=7)

    response = send(http, "anthropic", "429")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"]


def test_rate_limit_gemini_body(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(retry_after_s=7)

    response = send(http, "gemini", "429")

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    error = response.json()["error"]
    assert error["code"] == 429
    assert error["status"] == "RESOURCE_EXHAUSTED"
    assert error["message"]
    [retry_info] = error["details"]
    assert retry_info["@type"] == "type.googleapis.com/google.rpc.RetryInfo"
    assert retry_info["retryDelay"] == "7s"


def test_sdks_raise_rate_limit_error(simulator: Simulator) -> None:
    fault = {"x-simulator-fault": "429"}
    openai_url = base_urls(HOST, simulator.port, "openai", "openai")
    anthropic_url = base_urls(HOST, simulator.port, "anthropic", "anthropic")

    with openai.OpenAI(base_url=openai_url, api_key="k", max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(
                model="sim-chat", messages=[{"role": "user", "content": "hi"}], extra_headers=fault
            )
    assert raised.value.response.headers["retry-after"] == "1"

    with anthropic.Anthropic(base_url=anthropic_url, api_key="k", max_retries=0) as client:
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(
                model="sim-claude",
                max_tokens=10,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers=fault,
            )


@pytest.mark.parametrize(
    ("wire_format", "kind"),
    [("openai", "server_error"), ("anthropic", "api_error"), ("gemini", "INTERNAL")],
)
def test_server_error_per_format(http: httpx.Client, wire_format: str, kind: str) -> None:
    response = send(http, wire_format, "500")

    assert response.status_code == 500
    # Gemini names the error kind in "status", the others in "type".
    field = "status" if wire_format == "gemini" else "type"
    assert response.json()["error"][field] == kind
    assert "retry-after" not in response.headers


def test_anthropic_overloaded_is_529(http: httpx.Client) -> None:
    response = send(http, "anthropic", "overloaded")

    assert response.status_code == 529
    assert response.json()["error"]["type"] == "overloaded_error"


def test_anthropic_500_rate_mixes_529(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(fault_rate_500=1.0)

    statuses = {send(http, "anthropic").status_code for _ in range(30)}

    assert statuses == {500, 529}


@pytest.mark.parametrize("wire_format", sorted(FORMATS))
def test_down_gives_503(http: httpx.Client, simulator: Simulator, wire_format: str) -> None:
    simulator.configure(down=True)

    response = send(http, wire_format)

    assert response.status_code == 503
    assert http.get("/_sim/health").status_code == 200


def test_seeded_fault_sequence_repeats(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(fault_rate_429=0.5)

    first = [send(http, "openai").status_code for _ in range(20)]
    http.post("/_sim/reset")
    second = [send(http, "openai").status_code for _ in range(20)]

    assert first == second
    assert set(first) == {200, 429}


def test_fault_header_none_overrides_rate(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(fault_rate_429=1.0)

    assert send(http, "openai").status_code == 429
    assert send(http, "openai", "none").status_code == 200


def test_invalid_fault_header_gives_400(http: httpx.Client) -> None:
    response = send(http, "openai", "teapot")

    assert response.status_code == 400
    assert "x-simulator-fault" in response.json()["error"]["message"]


def test_timeout_fault_hangs_then_answers(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(timeout_hang_s=0.5)

    started = time.monotonic()
    response = send(http, "openai", "timeout")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert elapsed >= 0.5


def test_latency_delays_reply(http: httpx.Client, simulator: Simulator) -> None:
    simulator.configure(latency_ms=300, jitter_ms=100)

    for _ in range(3):
        started = time.monotonic()
        response = send(http, "gemini")
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert elapsed >= 0.2


def test_config_rejects_unknown_field(http: httpx.Client) -> None:
    response = http.post("/_sim/config", json={"latency": 5})

    assert response.status_code == 400
    assert response.json()["error"] == "invalid config"


def test_config_rejects_invalid_rate(http: httpx.Client) -> None:
    response = http.post("/_sim/config", json={"fault_rate_429": 1.5})

    assert response.status_code == 400
    assert http.get("/_sim/config").json()["fault_rate_429"] == 0


def test_config_returns_new_values(http: httpx.Client) -> None:
    response = http.post("/_sim/config", json={"latency_ms": 5, "down": False})

    assert response.status_code == 200
    assert response.json()["latency_ms"] == 5
