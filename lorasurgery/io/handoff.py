"""A first-in first-out hand-off between two threads, bounded by the bytes it holds."""
from __future__ import annotations

import threading
from collections import deque
from typing import Any


class ByteQueue:
    """FIFO of ``(item, nbytes)`` between a producer and a consumer thread.

    :meth:`put` waits while the queue is not empty and the item would take it over ``limit`` bytes, so
    one item larger than the limit still passes (alone). Bounding by bytes rather than by count lets a
    pipeline run ahead over many small tensors while a few large ones cannot pile up in memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._cv = threading.Condition()

    def put(self, item: Any, nbytes: int = 0, stop: threading.Event | None = None) -> bool:
        """Append ``item``; returns False without appending when ``stop`` is set (before or while waiting)."""
        with self._cv:
            if stop is not None and stop.is_set():
                return False
            while self._items and self._bytes + nbytes > self.limit:
                if stop is not None and stop.is_set():
                    return False
                self._cv.wait(0.1 if stop is not None else None)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cv.notify_all()
            return True

    def get(self) -> Any:
        """Remove and return the oldest item, waiting for one."""
        with self._cv:
            while not self._items:
                self._cv.wait()
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cv.notify_all()
            return item

    def clear(self) -> None:
        """Drop every waiting item (a producer waiting for room goes on)."""
        with self._cv:
            self._items.clear()
            self._bytes = 0
            self._cv.notify_all()
