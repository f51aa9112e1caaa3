"""The demo command, run as a user runs it, on a small request file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness import RedisServer

PROJECT_DIR = Path(__file__).resolve().parent.parent
SMALL_REQUESTS = PROJECT_DIR / "examples" / "demo_requests_small.jsonl"


def test_demo_passes_on_small_input(redis_server: RedisServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "BROKER_REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/5",
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "demo",
            "--requests",
            str(SMALL_REQUESTS),
            "--concurrency",
            "8",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo passed" in result.stdout
    assert "ledger: balance" in result.stdout
    assert "MISMATCH" not in result.stdout
    # Every process the demo started has stopped: nothing listens on its log's behalf.
    assert (tmp_path / "var" / "demo-logs" / "api.log").exists()


def test_demo_reports_unreachable_redis(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "BROKER_DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}",
        "BROKER_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Redis at redis://127.0.0.1:1/0 is unreachable" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
