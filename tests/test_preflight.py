"""A missing service gives one line naming what to start, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_broker(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", [("api",), ("worker", "--region", "us"), ("billing-worker",)])
def test_unreachable_redis_named_in_one_line(command: tuple[str, ...], tmp_path: Path) -> None:
    result = run_broker(*command, cwd=tmp_path, env={"BROKER_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "Redis at redis://127.0.0.1:1/0 is unreachable" in result.stderr
    assert "BROKER_REDIS_URL" in result.stderr


def test_unreachable_postgres_named_in_one_line(tmp_path: Path) -> None:
    result = run_broker(
        "migrate",
        cwd=tmp_path,
        env={"BROKER_DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:1/x"},
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "is unreachable" in result.stderr
    assert "secret" not in result.stderr


def test_unmigrated_database_asks_for_migrate(tmp_path: Path) -> None:
    result = run_broker(
        "accounts",
        "create",
        "x",
        cwd=tmp_path,
        env={"BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"},
    )
    assert result.returncode == 2
    assert "Run: broker migrate" in result.stderr
