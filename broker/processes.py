"""Starting and stopping the broker's processes on one machine (demo, tests, bench)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from workers.heartbeat import live_workers

logger = logging.getLogger(__name__)

# Seconds a process gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def broker_command(*args: str) -> list[str]:
    """Return the argv that runs a ``broker`` subcommand with this interpreter."""
    return [sys.executable, "-m", "broker.cli", *args]


class StartupFailed(RuntimeError):
    """A process exited or did not become ready in time."""


@dataclass
class ProcessGroup:
    """Processes started together, logging to files under ``log_dir``, stopped together."""

    log_dir: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115  (closed with the process)
        env = {**os.environ, **self.env, **(extra_env or {})}
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def wait_until(self, name: str, ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
        """Wait until ``ready()`` is true, failing early if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise StartupFailed(
                    f"{name} exited with code {process.returncode}:\n{self.log_tail(name)}"
                )
            try:
                if ready():
                    return
            except (httpx.HTTPError, redis.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise StartupFailed(f"{name} was not ready after {timeout_s:g} s:\n{self.log_tail(name)}")

    def wait_http(self, name: str, url: str, timeout_s: float = 60.0) -> None:
        self.wait_until(name, lambda: httpx.get(url, timeout=2).status_code == 200, timeout_s)

    def wait_worker(
        self, name: str, redis_url: str, pool: str, count: int = 1, timeout_s: float = 60.0
    ) -> None:
        """Wait until ``count`` workers of ``pool`` send heartbeats."""
        client = redis.Redis.from_url(redis_url)
        try:
            self.wait_until(name, lambda: len(live_workers(client, pool)) >= count, timeout_s)
        finally:
            client.close()

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", name, STOP_GRACE_S)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)
