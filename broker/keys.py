"""API key format: random secrets shown once, stored as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "sk-brk-"
# Characters of the key kept in clear for listings (the fixed prefix plus eight more).
VISIBLE_PREFIX_CHARS = len(KEY_PREFIX) + 8


def generate_key() -> str:
    """Return a new API key with 256 bits of randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """Return the stored form of a key.

    A fast hash is enough: keys are 256-bit random strings, so a slow password hash
    would add latency to every request without making a guess any likelier.
    """
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def visible_prefix(key: str) -> str:
    return key[:VISIBLE_PREFIX_CHARS]
