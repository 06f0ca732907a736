"""The byte-bounded hand-off queue between pipeline threads."""
from __future__ import annotations

import threading
import time

from lorasurgery.io.handoff import ByteQueue


def test_fifo_and_byte_bound():
    q = ByteQueue(100)
    assert q.put("a", 60) and q.put("b", 40)  # exactly at the limit
    done = threading.Event()

    def producer():
        q.put("c", 10)  # must wait until something is taken
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.2)
    assert not done.is_set()
    assert q.get() == "a"
    t.join(5)
    assert done.is_set()
    assert [q.get(), q.get()] == ["b", "c"]


def test_one_oversized_item_passes_alone():
    q = ByteQueue(10)
    assert q.put("big", 1000)
    stop = threading.Event()
    stop.set()
    assert q.put("next", 1, stop=stop) is False  # waits for room, gives up when stopped
    assert q.get() == "big"
    assert q.put("next", 1)
    assert q.get() == "next"


def test_clear_releases_a_waiting_producer():
    q = ByteQueue(10)
    q.put("x", 10)
    got = []
    t = threading.Thread(target=lambda: got.append(q.put("y", 5)))
    t.start()
    time.sleep(0.1)
    q.clear()
    t.join(5)
    assert got == [True] and q.get() == "y"


def test_a_stopped_producer_appends_nothing():
    q = ByteQueue(100)
    stop = threading.Event()
    stop.set()
    assert q.put("x", 1, stop=stop) is False
    assert q.put("y", 1) and q.get() == "y"
