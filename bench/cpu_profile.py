"""CPU profile of broker processes under load with py-spy, summarised as top frames.

py-spy is not a project dependency: install it into the project's virtualenv with
``.venv/bin/pip install py-spy`` before running ``bench/run.py --profile-only``. Samples are
taken without pausing the processes (``--nonblocking``) and idle threads are left out,
so a percentage is a share of the samples in which the process was running Python code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.load import PROJECT_DIR, run_sync_load
from bench.stack import BenchStack
from bench.sync_matrix import CHAT_PATH

# Samples per second that py-spy takes of each process.
SAMPLE_RATE = 100
# Frames listed per process and kind (self or inclusive).
TOP_FRAMES = 12
# Code of this project; inclusive times are listed for these files only.
PROJECT_PREFIXES = ("broker/", "workers/")
_LINE_NUMBER = re.compile(r":\d+\)$")


def pyspy_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    """Return ``function (path)`` with site-packages and project prefixes cut off."""
    frame = _LINE_NUMBER.sub(")", frame)
    # The path is the last parenthesised part; a function name may contain " (" too.
    function, _, path = frame.rpartition(" (")
    for marker in ("site-packages/", f"{PROJECT_DIR}/", "/lib/python3.11/"):
        if marker in path:
            return f"{function} ({path.split(marker, 1)[1]}"
    return frame


def summarise(raw_path: Path) -> dict[str, object]:
    """Return the top self and project-inclusive frames of a py-spy raw (collapsed) file."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            if any(f"({prefix}" in frame for prefix in PROJECT_PREFIXES):
                inclusive[frame] += count

    def top(counter: Counter[str]) -> list[dict[str, object]]:
        return [
            {"frame": frame, "samples": count, "share": count / total if total else 0.0}
            for frame, count in counter.most_common(TOP_FRAMES)
        ]

    return {"samples": total, "self": top(self_counts), "project_inclusive": top(inclusive)}


def profile_under_load(
    stack: BenchStack,
    body_path: Path,
    api_key: str,
    *,
    concurrency: int,
    duration_s: int,
    workdir: Path,
    after_run: Callable[[], None],
    log: Callable[[str], None],
    names: Sequence[str] = ("api", "worker-us", "billing"),
) -> dict[str, object]:
    """Profile the named processes while wrk loads the broker; return the summaries."""
    binary = pyspy_binary()
    if binary is None:
        return {"skipped": "py-spy is not installed: run .venv/bin/pip install py-spy"}
    workdir.mkdir(parents=True, exist_ok=True)
    recorders = {}
    for name in names:
        output = workdir / f"{name}.txt"
        argv = [binary, "record", "--pid", str(stack.group.processes[name].pid)]
        argv += ["--duration", str(duration_s), "--rate", str(SAMPLE_RATE), "--format", "raw"]
        argv += ["--nonblocking", "--subprocesses", "--output", str(output)]
        recorders[name] = (
            output,
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
        )
    try:
        url = stack.api_url + CHAT_PATH
        result = run_sync_load(url, body_path, api_key, concurrency, duration_s)
        after_run()
        summaries: dict[str, object] = {}
        for name, (output, process) in recorders.items():
            _, stderr = process.communicate(timeout=duration_s + 60)
            if process.returncode != 0 or not output.exists():
                summaries[name] = {"error": f"py-spy exited with {process.returncode}: {stderr}"}
                continue
            summaries[name] = summarise(output)
        log(f"profiled {', '.join(names)} at {result.requests_per_s:.0f} req/s")
        return {
            "concurrency": concurrency,
            "duration_s": duration_s,
            "requests_per_s": result.requests_per_s,
            "pyspy_command": f"{binary} record --pid <pid> --duration {duration_s} --rate "
            f"{SAMPLE_RATE} --format raw --nonblocking --subprocesses",
            "processes": summaries,
        }
    finally:
        for _, process in recorders.values():
            if process.poll() is None:
                process.kill()
                process.wait()
