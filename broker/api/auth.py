"""Bearer API key authentication, with a short per-process cache."""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from broker.accounts import KEY_CHANGES_CHANNEL
from broker.errors import AuthenticationFailed
from broker.intake import Principal
from broker.keys import KEY_PREFIX, hash_key
from broker.tables import Account, ApiKey, Wallet, as_utc, utcnow

logger = logging.getLogger(__name__)

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
        # Lookups in flight, by key digest (see _shared_lookup).
        self._lookups: dict[str, asyncio.Future[Principal]] = {}

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
            principal = cached[0]
            if principal.expires_at_s is not None and principal.expires_at_s <= time.time():
                raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
            return principal

        return await self._shared_lookup(key, digest)

    async def _shared_lookup(self, key: str, digest: str) -> Principal:
        """Look the key up, or wait for the lookup of it already in flight.

        When a busy key's cache entry expires, every request in flight misses at
        once. Sharing one lookup keeps that to one query, instead of one query and one
        pooled connection per request, which overflowed the pool and made it open and
        close connections every few seconds.
        """
        pending = self._lookups.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(key, digest))
            self._lookups[digest] = pending
            pending.add_done_callback(lambda done: self._lookup_done(digest, done))
        # Shielded: a request that goes away must not cancel the others' lookup.
        return await asyncio.shield(pending)

    def _lookup_done(self, digest: str, done: asyncio.Future[Principal]) -> None:
        current = self._lookups.get(digest) is done
        if current:
            del self._lookups[digest]
        if done.cancelled():
            return
        # Also marks the error retrieved when every waiting request went away.
        if done.exception() is not None or not current:
            # A lookup that ``forget`` dropped may have read the key before it changed.
            return
        if len(self._cache) >= MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[digest] = (done.result(), time.monotonic() + self.cache_ttl_s)

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
                        ApiKey.monthly_limit_micro_usd,
                        ApiKey.allowed_models,
                        ApiKey.region_pin,
                        Account.price_multiplier_ppm,
                        Wallet.id.label("wallet_id"),
                    )
                    .join(Wallet, Wallet.account_id == ApiKey.account_id)
                    .join(Account, Account.id == ApiKey.account_id)
                    .where(ApiKey.key_hash == digest)
                )
            ).one_or_none()
        if row is None:
            raise incorrect
        if row.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if row.expires_at is not None and as_utc(row.expires_at) <= utcnow():
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        return Principal(
            account_id=row.account_id,
            api_key_id=row.id,
            wallet_id=row.wallet_id,
            expires_at_s=as_utc(row.expires_at).timestamp() if row.expires_at else None,
            monthly_limit_micro_usd=row.monthly_limit_micro_usd,
            allowed_models=tuple(row.allowed_models) if row.allowed_models else None,
            region_pin=row.region_pin,
            price_multiplier_ppm=row.price_multiplier_ppm,
        )

    def forget(self, digest: str) -> None:
        self._cache.pop(digest, None)
        self._lookups.pop(digest, None)

    async def follow_key_changes(self, redis: aioredis.Redis) -> None:
        """Drop a cached key as soon as any process announces it changed (revoked,
        rotated, limits edited). Runs until cancelled."""
        while True:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(KEY_CHANGES_CHANNEL)
                async for message in pubsub.listen():
                    self.forget(message["data"].decode())
            except RedisError as exc:
                logger.warning(
                    "cannot follow API key changes: %s; cached keys expire in %g s",
                    exc,
                    self.cache_ttl_s,
                )
                await asyncio.sleep(1)
            finally:
                await pubsub.aclose()
