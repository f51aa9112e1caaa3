"""Garbage collector settings applied once a process has started."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
import broker.api.app  # the API's imports: objects to freeze
from broker.gc_tuning import tune_after_startup
before = gc.get_threshold()
tune_after_startup()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count()}))
"""


def test_tuning_freezes_startup_objects() -> None:
    # A process of its own, so the test run's collector stays as it is.
    output = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])

    assert result["before"] == [700, 10, 10]
    assert result["after"] == [50_000, 10, 10]
    assert result["frozen"] > 10_000
