"""Webhook URL checks against server-side request forgery, alone and through the API."""

from __future__ import annotations

import ipaddress
import socket

import httpx
import pytest
from async_support import chat_line, jsonl, upload
from harness import Stack

from broker.url_safety import UnsafeUrl, address_problem, check_url

REJECTED_ALWAYS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "http://169.254.10.1/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://240.0.0.1/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "file:///etc/passwd",
    "gopher://example.com/",
    "ftp://example.com/",
    "http://user:password@example.com/",
    "http:///no-host",
    "not a url",
]
PRIVATE = [
    "http://127.0.0.1:8080/hooks",
    "http://[::1]/",
    "http://10.1.2.3/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd12:3456::1]/",
    "http://[::ffff:127.0.0.1]/",
]


@pytest.mark.parametrize("url", REJECTED_ALWAYS)
def test_url_rejected_even_when_private_allowed(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=True)
    with pytest.raises(UnsafeUrl):
        check_url(url, allow_private=False)


@pytest.mark.parametrize("url", PRIVATE)
def test_private_url_needs_allow_private(url: str) -> None:
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url, allow_private=False)
    assert "address" in str(caught.value)
    assert check_url(url, allow_private=True).url == url


def test_public_address_passes() -> None:
    checked = check_url("https://8.8.8.8:8443/hook?x=1", allow_private=False)
    assert checked.scheme == "https"
    assert checked.port == 8443
    assert checked.addresses == (ipaddress.ip_address("8.8.8.8"),)


def test_metadata_message_names_reason() -> None:
    with pytest.raises(UnsafeUrl) as caught:
        check_url("http://169.254.169.254/", allow_private=True)
    assert "metadata" in str(caught.value)
    assert address_problem(ipaddress.ip_address("2001:4860:4860::8888"), False) is None


def _resolver(*addresses: str):  # noqa: ANN202  (a getaddrinfo stand-in)
    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return getaddrinfo


def test_unresolvable_host_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver())
    with pytest.raises(UnsafeUrl) as caught:
        check_url("http://hooks.example.com/", allow_private=True)
    assert "could not be resolved" in str(caught.value)


def test_host_with_one_private_address_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver("93.184.216.34", "10.0.0.5"))
    with pytest.raises(UnsafeUrl) as caught:
        check_url("https://hooks.example.com/", allow_private=False)
    assert "10.0.0.5" in str(caught.value)


def test_host_resolving_to_metadata_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _resolver("169.254.169.254"))
    with pytest.raises(UnsafeUrl):
        check_url("http://metadata.example.com/", allow_private=True)


def _post(stack: Stack, api_key: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(
        f"{stack.api_url}{path}",
        json=body,
        headers={"authorization": f"Bearer {api_key}"},
        timeout=30,
    )


def test_api_rejects_metadata_urls(stack: Stack) -> None:
    account = stack.new_account()
    response = _post(
        stack,
        account.api_key,
        "/webhook_endpoints",
        {"url": "http://169.254.169.254/latest/meta-data/"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "url"
    assert "metadata" in response.json()["error"]["message"]

    response = _post(stack, account.api_key, "/webhook_endpoints", {"url": "file:///etc/passwd"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "url"

    # This stack allows loopback receivers (BROKER_WEBHOOK_ALLOW_PRIVATE), as tests need.
    response = _post(
        stack, account.api_key, "/webhook_endpoints", {"url": "http://127.0.0.1:9/hooks"}
    )
    assert response.status_code == 201

    job = {
        "endpoint": "/v1/chat/completions",
        "body": chat_line("x")["body"],
        "webhook_url": "http://[fd00:ec2::254]/hook",
    }
    response = _post(stack, account.api_key, "/jobs", job)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "webhook_url"

    file_id = upload(stack.client(account.api_key), jsonl([chat_line("x")]))
    batch = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"webhook_url": "http://169.254.169.254/"},
    }
    response = _post(stack, account.api_key, "/batches", batch)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "metadata.webhook_url"
