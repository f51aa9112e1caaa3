"""Fixtures that run one simulator process for the session and reset it per test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sim_harness import Simulator, start_simulator, stop_simulator


@pytest.fixture(scope="session")
def simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = start_simulator(tmp_path_factory.mktemp("simulator") / "simulator.log")
    yield simulator
    stop_simulator(simulator)


@pytest.fixture
def simulator(simulator_process: Simulator) -> Iterator[Simulator]:
    """The shared simulator with fresh statistics, and its config restored afterwards."""
    original = httpx.get(f"{simulator_process.url}/_sim/config", timeout=5).json()
    httpx.post(f"{simulator_process.url}/_sim/reset", timeout=5)
    yield simulator_process
    simulator_process.configure(**original)


@pytest.fixture
def http(simulator: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=simulator.url, timeout=10) as client:
        yield client
