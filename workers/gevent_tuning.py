"""Adjustments for running httpx under gevent, applied when a worker process starts.

httpcore tests every idle connection of a pool for a server-side close before each
request it queues and after each one it finishes, with ``select.poll()`` and a timeout
of zero. Under gevent's monkey patching that poll is gevent's, which sets up a watcher
and goes through the hub: about 12 µs per connection against 0.6 µs for the system call,
measured on a development machine. With tens of idle connections per upstream host, that
was a fifth of the worker's time inside httpx. httpcore passes a timeout of zero, and a
zero-timeout poll returns at once, so the unpatched call is safe in a greenlet.
"""

from __future__ import annotations

import select
import types

import httpcore._utils


def use_system_poll_for_idle_checks() -> bool:
    """Make httpcore's readability check call the unpatched ``poll``; returns whether it did.

    Does nothing when gevent has not patched ``select``, or when httpcore no longer
    checks through ``select.poll`` (its internals are not an API).
    """
    try:
        from gevent import monkey
    except ImportError:
        return False
    if not monkey.is_module_patched("select") or not hasattr(httpcore._utils, "select"):
        return False
    httpcore._utils.select = types.SimpleNamespace(  # type: ignore[attr-defined]
        poll=monkey.get_original("select", "poll"),
        POLLIN=select.POLLIN,
        select=monkey.get_original("select", "select"),
    )
    return True
