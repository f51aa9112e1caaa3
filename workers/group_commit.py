"""Group commit: many callers' items written by one transaction, one batch at a time.

A caller hands its item over and blocks until the batch that took it has been written.
While one batch is being written, new items gather for the next, so under load each
transaction carries many items, and a lone item is written at once unless the writer
is told to linger.
Threads are greenlets in a gevent worker (Celery's gevent pool patches them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# Seconds the writer waits for new items before it ends; the next item starts another.
IDLE_EXIT_S = 5.0


@dataclass
class _Slot(Generic[Item, Result]):
    item: Item
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    error: BaseException | None = None


class GroupCommit(Generic[Item, Result]):
    """Calls ``write(items)`` for batches of at most ``max_items`` submitted items.

    ``write`` returns one result per item, in order; a result that is an exception is
    raised to that item's caller alone. An exception raised by ``write`` itself is
    raised to every caller of the batch. With ``linger_s`` the writer waits up to that
    long for a batch to fill before it takes one smaller than ``max_items``: fewer and
    larger transactions, for writes whose callers can wait.
    """

    def __init__(
        self,
        write: Callable[[list[Item]], Sequence[Result | BaseException]],
        max_items: int = 256,
        name: str = "group-commit",
        linger_s: float = 0.0,
    ) -> None:
        self._write = write
        self._max_items = max_items
        self._name = name
        self._linger_s = linger_s
        self._pending: list[_Slot[Item, Result]] = []
        self._lock = threading.Condition()
        # Notified, on the same lock, each time the writer finishes a batch.
        self._batch_done = threading.Condition(self._lock)
        self._writing = 0
        # Callers waiting in drain(). While there are any, the writer does not linger.
        self._draining = 0
        self._writer_running = False

    def submit(self, item: Item) -> Result:
        """Write ``item`` with the next batch and return its result."""
        result = self.submit_all([item])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_all(self, items: list[Item]) -> list[Result | BaseException]:
        """Write ``items`` with the next batches; return each one's result or exception."""
        slots = self._enqueue(items)
        for slot in slots:
            slot.done.wait()
        return [slot.error if slot.error is not None else slot.result for slot in slots]  # type: ignore[misc]

    def submit_nowait(self, items: list[Item]) -> None:
        """Write ``items`` with the next batches without waiting. Their results are
        dropped, so ``write`` must log its own failures."""
        self._enqueue(items)

    def drain(self, timeout_s: float) -> bool:
        """Write what is pending without lingering, and wait until every submitted item
        is written; return False on timeout."""
        with self._lock:
            self._draining += 1
            self._lock.notify_all()
            try:
                return self._batch_done.wait_for(
                    lambda: not self._pending and not self._writing, timeout_s
                )
            finally:
                self._draining -= 1

    def _enqueue(self, items: list[Item]) -> list[_Slot[Item, Result]]:
        slots: list[_Slot[Item, Result]] = [_Slot(item) for item in items]
        with self._lock:
            self._pending.extend(slots)
            if self._writer_running:
                self._lock.notify()
            else:
                self._writer_running = True
                threading.Thread(target=self._run, name=self._name, daemon=True).start()
        return slots

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._lock.wait(IDLE_EXIT_S)
                if not self._pending:
                    self._writer_running = False
                    return
                if self._linger_s:
                    # Items that arrive meanwhile join this batch; a full one goes at once.
                    self._lock.wait_for(
                        lambda: len(self._pending) >= self._max_items or self._draining,
                        self._linger_s,
                    )
                batch = self._pending[: self._max_items]
                del self._pending[: self._max_items]
                self._writing = len(batch)
            try:
                self._write_batch(batch)
            finally:
                with self._lock:
                    self._writing = 0
                    self._batch_done.notify_all()

    def _write_batch(self, batch: list[_Slot[Item, Result]]) -> None:
        try:
            results = self._write([slot.item for slot in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name} wrote {len(results)} of {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001  (handed to every caller of the batch)
            results = [exc] * len(batch)
        for slot, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                slot.error = result
            else:
                slot.result = result
            slot.done.set()
