"""httpcore's check for closed idle connections, with the system poll under gevent."""

from __future__ import annotations

import subprocess
import sys

# Runs in a fresh interpreter, because monkey patching cannot be undone in this one.
SCRIPT = """
from gevent import monkey
monkey.patch_all()
import socket
import httpcore._utils
from workers.gevent_tuning import use_system_poll_for_idle_checks

assert use_system_poll_for_idle_checks()
assert httpcore._utils.select.poll is monkey.get_original("select", "poll")
ours, theirs = socket.socketpair()
assert not httpcore._utils.is_socket_readable(ours)
theirs.close()
# A closed peer makes the socket readable: the next read returns b"".
assert httpcore._utils.is_socket_readable(ours)
print("ok")
"""


def test_idle_check_sees_closed_peer() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_nothing_changes_without_gevent() -> None:
    import httpcore._utils

    from workers.gevent_tuning import use_system_poll_for_idle_checks

    before = httpcore._utils.select
    assert not use_system_poll_for_idle_checks()
    assert httpcore._utils.select is before
