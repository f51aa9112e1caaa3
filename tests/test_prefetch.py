"""The worker's prefetch window, shrunk by the extra jobs of many-job messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kombu.common import QoS

from workers import dispatch


def _consumer(prefetch: int) -> SimpleNamespace:
    return SimpleNamespace(qos=QoS(lambda prefetch_count: None, prefetch))


def test_window_follows_running_extra_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = _consumer(4)
    monkeypatch.setattr(dispatch, "_consumer", consumer)
    share = dispatch._PrefetchShare()

    share.add(3)  # a message of four jobs starts
    assert consumer.qos.value == 1
    share.add(3)  # another starts before the window took effect
    assert consumer.qos.value == 1
    share.add(-3)  # one ends: the other's extra jobs still count
    assert consumer.qos.value == 1
    share.add(-3)
    assert consumer.qos.value == 4

    share.add(1)
    assert consumer.qos.value == 3
    share.add(-1)
    assert consumer.qos.value == 4


def test_reconnected_consumer_starts_full(monkeypatch: pytest.MonkeyPatch) -> None:
    first = _consumer(10)
    monkeypatch.setattr(dispatch, "_consumer", first)
    share = dispatch._PrefetchShare()
    share.add(5)
    assert first.qos.value == 5

    second = _consumer(10)
    monkeypatch.setattr(dispatch, "_consumer", second)
    share.add(2)  # seven extra jobs now run, counted against the new window
    assert second.qos.value == 3
    share.add(-7)
    assert second.qos.value == 10
    assert first.qos.value == 5
