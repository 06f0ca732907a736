"""Operation inputs given on the command line as ``PATH[:WEIGHT[:BLOCKS]]``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import PlanError


@dataclass(frozen=True)
class WeightedInput:
    """A LoRA with its user weight (may be negative) and optional per-input block spec."""

    path: Path
    weight: float = 1.0
    blocks: str | None = None

    def __str__(self) -> str:
        s = f"{self.path}:{self.weight:g}"
        return s + (f":{self.blocks}" if self.blocks else "")


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_weighted(text: str) -> WeightedInput:
    """Parse ``PATH``, ``PATH:WEIGHT`` or ``PATH:WEIGHT:BLOCKS``.

    A path that itself contains ``:`` (``C:\\models\\a.safetensors``) is taken whole when what follows
    the last colons is not a weight. An existing file named exactly ``text`` always wins.
    """
    if Path(text).exists():
        return WeightedInput(Path(text))
    head, sep, tail = text.rpartition(":")
    if sep and _number(tail) is not None and head:
        return WeightedInput(Path(head), _number(tail))
    # PATH:WEIGHT:BLOCKS — blocks may contain ':' only inside a file path, which we do not allow here
    first, sep1, rest = text.partition(":")
    while sep1:
        w_text, sep2, blocks = rest.partition(":")
        if sep2 and _number(w_text) is not None and first:
            if not blocks:
                raise PlanError(f"input {text!r}: empty block spec after the weight")
            return WeightedInput(Path(first), _number(w_text), blocks)
        nxt_first, sep1, rest = rest.partition(":")
        first = f"{first}:{nxt_first}"
    if sep and head and _number(tail) is None and Path(head).suffix == ".safetensors":
        raise PlanError(f"input {text!r}: {tail!r} is not a number; write PATH:WEIGHT or PATH:WEIGHT:BLOCKS "
                        "(e.g. style.safetensors:0.8 or style.safetensors:0.8:OUTD)")
    return WeightedInput(Path(text))
