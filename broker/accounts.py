"""Accounts, their wallets and their API keys."""

from __future__ import annotations

from sqlalchemy.orm import Session

from broker.ids import new_id
from broker.keys import generate_key, hash_key, visible_prefix
from broker.tables import Account, ApiKey, Wallet


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
