"""Quantities written for people (used by the commands and by error messages)."""
from __future__ import annotations


def human_size(n: float | None) -> str:
    """Byte count for people: ``512 B``, ``1.5 MiB``; ``?`` when unknown."""
    if n is None:
        return "?"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{int(x)} B" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"
