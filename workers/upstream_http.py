"""The HTTP client of upstream calls: an httpx client whose plain POSTs skip its extras.

A plain (not streamed) POST is sent straight to the client's transport. An upstream
API call needs none of what ``httpx.Client.send`` adds per request: the cookie jar
(which would also carry one tenant's provider cookies into another's calls), redirect
and auth flows, and URL and header merging. Together they took about a sixth of a
worker's CPU in a profile at 200 concurrent calls. Streams go through the client
itself, whose cookie jar accepts no cookie.
"""

from __future__ import annotations

import ssl
from contextlib import AbstractContextManager
from functools import lru_cache
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx

# Default headers of httpx.Client that plain POSTs send too.
SENT_DEFAULT_HEADERS = ("accept", "accept-encoding", "user-agent")


class UpstreamClient:
    """Sends plain POSTs through its transport and streams through an httpx.Client."""

    def __init__(
        self,
        timeout: httpx.Timeout,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Share ``ssl_context`` among the clients of a process: each context loads its
        own copy of the CA certificates, about 0.85 MiB."""
        self._transport = httpx.HTTPTransport(
            limits=limits, verify=ssl_context if ssl_context is not None else True
        )
        no_cookies = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
        self._client = httpx.Client(timeout=timeout, transport=self._transport, cookies=no_cookies)
        self._headers = {
            name: value
            for name, value in self._client.headers.items()
            if name in SENT_DEFAULT_HEADERS
        }

    def post(
        self, url: str, *, headers: dict[str, str], content: bytes, timeout: float
    ) -> httpx.Response:
        """POST ``content`` and return the response with its body read.

        Raises the same httpx exceptions as ``httpx.Client.post``; ``timeout`` applies
        to each phase of the call, connect included, as it does there.
        """
        request = httpx.Request(
            "POST",
            _parsed_url(url),
            headers={**self._headers, **headers},
            content=content,
            extensions={"timeout": httpx.Timeout(timeout).as_dict()},
        )
        response = self._transport.handle_request(request)
        response.request = request
        try:
            response.read()
        finally:
            response.close()
        return response

    def stream(
        self, method: str, url: str, **kwargs: Any
    ) -> AbstractContextManager[httpx.Response]:
        return self._client.stream(method, url, **kwargs)

    def close(self) -> None:
        self._client.close()


@lru_cache(maxsize=1024)
def _parsed_url(url: str) -> httpx.URL:
    # A worker calls a few endpoint URLs over and over; parsing one costs more than a dict hit.
    return httpx.URL(url)


# Type of the adapters' client argument: tests may pass a plain httpx.Client.
HttpClient = httpx.Client | UpstreamClient
