"""Accounts, their wallets and their API keys."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.ids import new_id
from broker.keys import generate_key, hash_key, visible_prefix
from broker.tables import Account, ApiKey, Wallet, as_utc, utcnow


def create_account(session: Session, name: str) -> tuple[Account, Wallet]:
    """Create an account with an empty wallet."""
    account = Account(id=new_id("acct"), name=name)
    wallet = Wallet(id=new_id("wal"), account_id=account.id, balance_micro_usd=0, held_micro_usd=0)
    session.add(account)
    session.flush()
    session.add(wallet)
    session.flush()
    return account, wallet


def create_api_key(session: Session, account_id: str, name: str = "") -> tuple[ApiKey, str]:
    """Create a key for an account. Returns the row and the key, which is not stored."""
    if session.get(Account, account_id) is None:
        raise LookupError(f"account {account_id} not found")
    key = generate_key()
    row = ApiKey(
        id=new_id("key"),
        account_id=account_id,
        name=name,
        prefix=visible_prefix(key),
        key_hash=hash_key(key),
    )
    session.add(row)
    session.flush()
    return row, key


# Redis channel on which every API process hears that a key changed, so its cache of
# authenticated keys drops the entry at once rather than when it expires.
KEY_CHANGES_CHANNEL = "broker:keys:changed"


class KeyNotFound(LookupError):
    """No API key with this id belongs to the account."""


def get_key(session: Session, key_id: str, account_id: str | None = None) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None or (account_id is not None and row.account_id != account_id):
        raise KeyNotFound(f"API key {key_id} not found")
    return row


def list_keys(session: Session, account_id: str) -> list[ApiKey]:
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.created_at)
        )
    )


def revoke_key(session: Session, key_id: str, account_id: str | None = None) -> ApiKey:
    """Revoke a key; requests with it get 401 from then on."""
    row = get_key(session, key_id, account_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def rotate_key(session: Session, key_id: str, account_id: str | None = None) -> tuple[ApiKey, str]:
    """Replace a key by a new one with the same name and limits; the old one is revoked."""
    old = revoke_key(session, key_id, account_id)
    new, key = create_api_key(session, old.account_id, old.name)
    new.monthly_limit_micro_usd = old.monthly_limit_micro_usd
    new.allowed_models = old.allowed_models
    new.region_pin = old.region_pin
    new.expires_at = old.expires_at
    return new, key


def update_key(
    session: Session, key_id: str, account_id: str | None = None, **changes: Any
) -> ApiKey:
    """Set a key's limits: any of name, monthly_limit_micro_usd, allowed_models,
    region_pin and expires_at (None clears a limit)."""
    allowed = {"name", "monthly_limit_micro_usd", "allowed_models", "region_pin", "expires_at"}
    unknown = set(changes) - allowed
    if unknown:
        raise ValueError(f"cannot change {sorted(unknown)} on an API key")
    row = get_key(session, key_id, account_id)
    for field, value in changes.items():
        setattr(row, field, value)
    return row


def describe_key(row: ApiKey) -> dict[str, Any]:
    """Return a key's public fields: never its hash or the key itself."""
    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "prefix": row.prefix,
        "account_id": row.account_id,
        "created_at": int(as_utc(row.created_at).timestamp()) if row.created_at else None,
        "revoked_at": int(as_utc(row.revoked_at).timestamp()) if row.revoked_at else None,
        "expires_at": int(as_utc(row.expires_at).timestamp()) if row.expires_at else None,
        "monthly_limit_micro_usd": row.monthly_limit_micro_usd,
        "allowed_models": row.allowed_models,
        "region_pin": row.region_pin,
    }


def announce_key_change(redis_client: Any, key_hash: str) -> None:
    """Tell every API process to forget a cached key (best effort; caches expire anyway)."""
    try:
        redis_client.publish(KEY_CHANGES_CHANNEL, key_hash)
    except Exception:  # noqa: BLE001  (the cache entry still expires within seconds)
        pass
