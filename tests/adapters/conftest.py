"""Fixtures that run one simulator process for the adapter tests and reset it per test.

The simulator harness lives next to the simulator's own tests, so its folder is added
to the import path.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simulator"))

from sim_harness import Simulator, start_simulator, stop_simulator  # noqa: E402


@pytest.fixture(scope="session")
def adapter_simulator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    simulator = start_simulator(tmp_path_factory.mktemp("adapter-simulator") / "simulator.log")
    yield simulator
    stop_simulator(simulator)


@pytest.fixture
def simulator(adapter_simulator_process: Simulator) -> Iterator[Simulator]:
    """The shared simulator with fresh state, and its config restored afterwards."""
    url = adapter_simulator_process.url
    original = httpx.get(f"{url}/_sim/config", timeout=5).json()
    httpx.post(f"{url}/_sim/reset", timeout=5)
    yield adapter_simulator_process
    adapter_simulator_process.configure(**original)
