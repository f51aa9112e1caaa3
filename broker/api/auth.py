"""Bearer API key authentication, with a short per-process cache."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.errors import AuthenticationFailed
from broker.intake import Principal
from broker.keys import KEY_PREFIX, hash_key
from broker.tables import ApiKey, Wallet, as_utc, utcnow

# Entries kept at most; the cache is cleared when full rather than tracked per entry.
MAX_CACHED_KEYS = 10_000


def _masked(key: str) -> str:
    if len(key) <= 10:
        return "***"
    return f"{key[:8]}***{key[-4:]}"


class KeyAuthenticator:
    """Maps an ``Authorization`` header to the calling account."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], cache_ttl_s: float) -> None:
        self.sessions = sessions
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it in the Authorization header as "
                "'Bearer <key>'.",
                code="missing_api_key",
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("The Authorization header must be 'Bearer <key>'.")

        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]

        principal = await self._lookup(key, digest)
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[digest] = (principal, now + self.cache_ttl_s)
        return principal

    async def _lookup(self, key: str, digest: str) -> Principal:
        incorrect = AuthenticationFailed(f"Incorrect API key provided: {_masked(key)}.")
        if not key.startswith(KEY_PREFIX):
            raise incorrect
        async with self.sessions() as session:
            row = (
                await session.execute(
                    select(
                        ApiKey.id,
                        ApiKey.account_id,
                        ApiKey.revoked_at,
                        ApiKey.expires_at,
                        Wallet.id.label("wallet_id"),
                    )
                    .join(Wallet, Wallet.account_id == ApiKey.account_id)
                    .where(ApiKey.key_hash == digest)
                )
            ).one_or_none()
        if row is None:
            raise incorrect
        if row.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return Principal(account_id=row.account_id, api_key_id=row.id, wallet_id=row.wallet_id)
