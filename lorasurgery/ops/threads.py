"""How many intra-op threads torch may use while an operation runs its own threads beside it."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def ops_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` torch intra-op threads (restored afterwards; None: unchanged).

    Operations that keep other cores busy with their own threads (module workers, a reader and a writer
    thread) lose time when torch's thread pool competes with them for the same cores: idle pool threads
    spin, and small GEMMs and factorisations gain little from splitting. Only the speed depends on this.
    """
    before = torch.get_num_threads()
    if n is None or n >= before:
        yield
        return
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cores_besides(busy: int) -> int:
    """Cores left for the computation when ``busy`` other threads each keep one busy (at least 1)."""
    return max(1, (os.cpu_count() or 1) - busy)
