"""Claiming delivered jobs: leases in Redis, taken, taken over, or released on failure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from workers import dispatch
from workers.heartbeat import heartbeat_key, worker_identity
from workers.markers import done_key, lease_key

# Database number of the test Redis server that only these tests use.
CLAIMS_REDIS_DB = 12


@pytest.fixture
def client(redis_server: Any) -> Iterator[redis.Redis]:
    connection = redis.Redis(port=redis_server.port, db=CLAIMS_REDIS_DB)
    yield connection
    connection.flushdb()
    connection.close()


def _spec(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "provider": "openai", "region": "us", "deadline": time.time() + 60}


def test_claim_takes_free_and_dead_leases(client: redis.Redis) -> None:
    own = f"us|{worker_identity()}".encode()
    client.set(lease_key("job_dead_holder"), b"us|gone#1")
    client.set(lease_key("job_live_holder"), b"us|alive#2")
    client.set(heartbeat_key("us", "alive#2"), b"1")
    client.set(lease_key("job_done"), b"us|gone#1")
    client.set(done_key("job_done"), b"1")
    names = ["job_free", "job_dead_holder", "job_live_holder", "job_done"]

    claimed = dispatch._claim(SimpleNamespace(redis=client), [_spec(name) for name in names])

    assert [spec["job_id"] for spec, _ in claimed] == ["job_free", "job_dead_holder"]
    assert client.get(lease_key("job_free")) == own
    assert client.get(lease_key("job_dead_holder")) == own
    assert client.get(lease_key("job_live_holder")) == b"us|alive#2"
    assert client.ttl(lease_key("job_free")) > 60


def test_failed_claim_releases_only_own_leases(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.set(lease_key("job_held"), b"us|other#1")

    def lose_redis(*_args: object) -> bool:
        raise redis.ConnectionError("connection lost during the claim")

    # The first job's lease is taken; the take-over of the second then fails.
    monkeypatch.setattr(dispatch, "take_over_lease", lose_redis)
    with pytest.raises(redis.ConnectionError):
        dispatch._claim(SimpleNamespace(redis=client), [_spec("job_free"), _spec("job_held")])

    assert not client.exists(lease_key("job_free"))
    assert client.get(lease_key("job_held")) == b"us|other#1"
