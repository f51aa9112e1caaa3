"""The machine and software a benchmark ran on, recorded with its results."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

from bench.load import PROJECT_DIR, wrk_version

# Python packages whose versions shape the broker's throughput.
KEY_PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "celery",
    "kombu",
    "gevent",
    "redis",
    "SQLAlchemy",
    "psycopg",
    "httpx",
    "orjson",
    "pydantic",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def machine() -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": platform.release(),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def git_commit() -> str:
    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=False
        )
        return completed.stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    # The stored results change with every run and are not code under test.
    changed = git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)bench/results",
        ":(exclude)bench/RESULTS.md",
    )
    return f"{commit} (with uncommitted changes)" if changed else commit


def redis_server_version() -> str:
    try:
        completed = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "not installed"
    for part in completed.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return completed.stdout.strip() or "unknown"


def versions(postgres: str) -> dict[str, str]:
    found = {"python": platform.python_version(), "broker commit": git_commit()}
    for name in KEY_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["redis-server"] = redis_server_version()
    found["PostgreSQL"] = postgres
    found["wrk"] = wrk_version()
    return found
