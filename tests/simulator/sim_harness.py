"""Start, configure and stop a ``python -m simulator`` process on a free local port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
REGION = "test-region"
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Simulator:
    """A running simulator process and the address it listens on."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def configure(self, **changes: object) -> dict:
        response = httpx.post(f"{self.url}/_sim/config", json=changes, timeout=5)
        assert response.status_code == 200, response.text
        return response.json()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_sim/stats", timeout=5).json()


def start_simulator(log_path: Path, *arguments: str) -> Simulator:
    """Start ``python -m simulator`` and wait until /_sim/health responds."""
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulator",
                "--region",
                REGION,
                "--port",
                str(port),
                *arguments,
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    simulator = Simulator(port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if httpx.get(f"{simulator.url}/_sim/health", timeout=1).status_code == 200:
                return simulator
        except httpx.TransportError:
            time.sleep(0.05)
    stop_simulator(simulator)
    pytest.fail(
        f"simulator on port {port} did not become healthy within {STARTUP_TIMEOUT_S:g} s; "
        f"log:\n{log_path.read_text(errors='replace')}"
    )


def stop_simulator(simulator: Simulator) -> None:
    simulator.process.terminate()
    try:
        simulator.process.wait(10)
    except subprocess.TimeoutExpired:
        simulator.process.kill()
        simulator.process.wait(10)
