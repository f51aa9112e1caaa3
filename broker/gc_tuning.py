"""Garbage collector settings for the long-running processes: the API and the workers.

CPython collects its youngest generation after every 700 net allocations of container
objects, and a full collection walks every object that survived start-up: the catalog,
SQLAlchemy, Celery and all their modules. At 200 requests in flight the API spent about
a tenth of its time in the collector, and each full collection (about 100 ms) stopped
its event loop. Once a process has started, the objects alive then are frozen, which
takes them out of every collection, and the youngest generation is collected less often.
"""

from __future__ import annotations

import gc

# Net allocations of container objects between two collections of the youngest
# generation. Cyclic garbage lives a little longer; reference counting frees the rest
# at once, as before.
YOUNG_GENERATION_THRESHOLD = 50_000
# Collections of a generation between two of the next one (CPython's default).
OLDER_GENERATION_THRESHOLD = 10


def tune_after_startup() -> None:
    """Freeze the objects alive now and collect less often; call once a process has
    started."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(
        YOUNG_GENERATION_THRESHOLD, OLDER_GENERATION_THRESHOLD, OLDER_GENERATION_THRESHOLD
    )
