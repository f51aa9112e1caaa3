"""Memory and file descriptors of the processes under test, read from Linux's /proc."""

from __future__ import annotations

import os
import resource
from pathlib import Path

PROC = Path("/proc")


def _status_kib(pid: int, field: str) -> int:
    """Return a ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), or 0 if it is gone."""
    try:
        text = (PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Return the ids of every living process below ``pid`` (children, theirs, ...)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name in brackets may contain spaces, so split after its end.
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def rss_kib(pid: int) -> int:
    """Return the resident memory (VmRSS) of ``pid`` and its descendants, in KiB."""
    return sum(_status_kib(member, "VmRSS") for member in (pid, *descendants(pid)))


def peak_rss_kib(pid: int) -> int:
    """Return the largest VmHWM (peak resident memory) of ``pid`` and its descendants, in KiB.

    Each process has its own peak, so this is the largest of them, not a peak of the sum.
    """
    return max(_status_kib(member, "VmHWM") for member in (pid, *descendants(pid)))


def open_files(pid: int) -> int:
    """Return how many file descriptors ``pid`` has open (0 if it is gone)."""
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def open_files_limit(pid: int) -> tuple[int, int]:
    """Return the soft and hard RLIMIT_NOFILE of ``pid`` from /proc/<pid>/limits."""
    for line in (PROC / str(pid) / "limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            unlimited = resource.RLIM_INFINITY
            return (
                unlimited if soft == "unlimited" else int(soft),
                unlimited if hard == "unlimited" else int(hard),
            )
    raise ValueError(f"/proc/{pid}/limits has no 'Max open files' line")


def raise_open_files_limit(needed: int) -> dict[str, int | bool]:
    """Raise this process's soft RLIMIT_NOFILE to ``needed`` if it is lower.

    Processes started afterwards inherit the limit. The soft limit can rise only up to
    the hard one without privileges, so a hard limit below ``needed`` raises ValueError.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    record: dict[str, int | bool] = {"needed": needed, "soft": soft, "hard": hard}
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(
                f"{needed} file descriptors are needed, but the hard limit is {hard}; raise it "
                "(ulimit -Hn, or LimitNOFILE in a systemd unit) or measure fewer calls"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        record["raised_to"] = needed
    record["raised"] = "raised_to" in record
    return record
