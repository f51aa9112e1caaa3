"""Load generators, each run as its own process: wrk with bench/post.lua, or bench/pyload.py.

wrk (C, one event loop per thread) drives the synchronous measurements because on two
shared cores a Python client would itself limit the rate. The Python client drives the
streaming measurement, which needs time to first token, and replaces wrk where wrk is
not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_DIR = BENCH_DIR.parent
LUA_SCRIPT = BENCH_DIR / "post.lua"
RESULT_MARKER = "BENCH_RESULT "
# Seconds wrk waits for one response before it counts a timeout. A queued broker request
# at concurrency 200 takes seconds, and it should be measured rather than dropped.
REQUEST_TIMEOUT_S = 60
# Most wrk threads per run: one per core of the two-core benchmark machine.
MAX_WRK_THREADS = 2


class LoadGeneratorFailed(RuntimeError):
    """The load generator exited with an error or printed no result."""


@dataclass
class LoadResult:
    """One load run against one URL. Latencies are in milliseconds.

    ``requests`` and ``duration_s`` cover the run after its warm-up, so their ratio is
    the steady rate. ``responses``, ``non2xx``, the errors and the percentiles cover the
    whole run.
    """

    tool: str
    url: str
    concurrency: int
    warmup_s: float
    duration_s: float
    requests: int
    responses: int
    non2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    first_failure: str
    command: str

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "requests_per_s": self.requests_per_s}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str:
    if not wrk_available():
        return "not installed"
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    first_line = (completed.stdout or completed.stderr).splitlines()
    return first_line[0].split(" Copyright")[0].strip() if first_line else "unknown"


def wrk_command(
    url: str, body_path: Path, token: str, concurrency: int, duration_s: float, warmup_s: float
) -> list[str]:
    threads = min(MAX_WRK_THREADS, concurrency)
    return [
        "wrk",
        "-t",
        str(threads),
        "-c",
        str(concurrency),
        "-d",
        f"{warmup_s + duration_s:g}s",
        "--timeout",
        f"{REQUEST_TIMEOUT_S}s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(body_path),
        token,
        f"{warmup_s:g}",
    ]


def _printable(argv: list[str], token: str) -> str:
    """Return the command line with the API key replaced by a placeholder."""
    return " ".join("$API_KEY" if part == token else part for part in argv)


@contextmanager
def started_wrk(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    """Start wrk and yield its process; it is killed if the caller leaves early."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wrk_result(
    process: subprocess.Popen[str],
    argv: list[str],
    url: str,
    token: str,
    concurrency: int,
    warmup_s: float,
) -> LoadResult:
    """Wait for a wrk process from ``started_wrk`` and parse its result line."""
    stdout, stderr = process.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if process.returncode != 0 or not lines:
        raise LoadGeneratorFailed(
            f"wrk exited with code {process.returncode} and no result line:\n{stdout}\n{stderr}"
        )
    data = json.loads(lines[-1][len(RESULT_MARKER) :])
    errors = data["connect_errors"] + data["read_errors"] + data["write_errors"]
    return LoadResult(
        tool="wrk",
        url=url,
        concurrency=concurrency,
        warmup_s=warmup_s,
        duration_s=max(data["duration_s"] - warmup_s, 0.0),
        requests=data["counted"],
        responses=data["responses"],
        non2xx=data["non2xx"],
        socket_errors=errors + data["timeouts"],
        p50_ms=data["p50_ms"],
        p90_ms=data["p90_ms"],
        p99_ms=data["p99_ms"],
        first_failure=data["first_failure"],
        command=_printable(argv, token),
    )


def run_wrk(
    url: str,
    body_path: Path,
    token: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
) -> LoadResult:
    argv = wrk_command(url, body_path, token, concurrency, duration_s, warmup_s)
    with started_wrk(argv) as process:
        return wrk_result(process, argv, url, token, concurrency, warmup_s)


def python_client_command(
    url: str,
    body_path: Path,
    token: str,
    concurrency: int,
    *,
    duration_s: float | None = None,
    requests: int | None = None,
    stream: bool = False,
    warmup_s: float = 0.0,
    retries: int = 0,
) -> list[str]:
    argv = [sys.executable, "-m", "bench.pyload", "--url", url, "--body", str(body_path)]
    if retries:
        argv += ["--retries", str(retries)]
    argv += ["--api-key", token, "--concurrency", str(concurrency)]
    if warmup_s:
        argv += ["--warmup", f"{warmup_s:g}"]
    if duration_s is not None:
        argv += ["--duration", f"{duration_s:g}"]
    if requests is not None:
        argv += ["--requests", str(requests)]
    if stream:
        argv.append("--stream")
    return argv


def run_python_client(
    url: str,
    body_path: Path,
    token: str,
    concurrency: int,
    *,
    duration_s: float | None = None,
    requests: int | None = None,
    stream: bool = False,
    warmup_s: float = 0.0,
    retries: int = 0,
) -> dict[str, object]:
    """Run bench/pyload.py in its own process and return its JSON result."""
    argv = python_client_command(
        url,
        body_path,
        token,
        concurrency,
        duration_s=duration_s,
        requests=requests,
        stream=stream,
        warmup_s=warmup_s,
        retries=retries,
    )
    completed = subprocess.run(
        argv, cwd=PROJECT_DIR, capture_output=True, text=True, check=False, timeout=900
    )
    if completed.returncode != 0:
        raise LoadGeneratorFailed(
            f"bench/pyload.py exited with code {completed.returncode}:\n{completed.stderr}"
        )
    data = json.loads(completed.stdout)
    data["command"] = _printable(argv, token)
    return data


def run_sync_load(
    url: str,
    body_path: Path,
    token: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 0.0,
) -> LoadResult:
    """Run synchronous load with wrk, or with the Python client where wrk is missing.

    The run lasts ``warmup_s + duration_s`` seconds; the rate counts the part after the
    warm-up.
    """
    if wrk_available():
        return run_wrk(url, body_path, token, concurrency, duration_s, warmup_s)
    data = run_python_client(
        url, body_path, token, concurrency, duration_s=warmup_s + duration_s, warmup_s=warmup_s
    )
    latency = data["latency_ms"]
    return LoadResult(
        tool="bench/pyload.py",
        url=url,
        concurrency=concurrency,
        warmup_s=warmup_s,
        duration_s=data["counted_duration_s"],
        requests=data["counted"],
        responses=data["requests"],
        non2xx=data["non2xx"],
        socket_errors=data["errors"],
        p50_ms=latency["p50"],
        p90_ms=latency["p90"],
        p99_ms=latency["p99"],
        first_failure=data["first_failure"],
        command=data["command"],
    )
