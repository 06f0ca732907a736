"""One module per CLI command (a click command named ``command``), registered in :mod:`lorasurgery.cli`,
plus the small rendering helpers the commands share."""
from __future__ import annotations

from ..units import human_size

__all__ = ["human_size"]
