"""Architectures as data: SD1.x, SD2.x, SDXL, SD3/SD3.5 and FLUX.1.

Each architecture module defines one :class:`~lorasurgery.arch.base.ArchSpec`; this registry finds it by
name. Detection and key maps work from the tables only (see :mod:`lorasurgery.arch.detect`).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

from ..errors import PlanError
from .base import ArchSpec, Layout, ModelTable, ModuleSpec, Part

ARCH_NAMES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux")


@lru_cache(maxsize=None)
def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` called ``name`` (one of :data:`ARCH_NAMES`)."""
    if name not in ARCH_NAMES:
        raise PlanError(f"unknown architecture {name!r}; expected one of {', '.join(ARCH_NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    for value in vars(module).values():
        if isinstance(value, ArchSpec) and value.name == name:
            return value
    raise PlanError(f"architecture module {module.__name__} defines no ArchSpec named {name!r}")


@lru_cache(maxsize=64)
def real_table(name: str) -> ModelTable:
    """The table of the released model of an architecture (cached)."""
    spec = get_arch(name)
    return spec.build(spec.real_config())


__all__ = ["ARCH_NAMES", "ArchSpec", "Layout", "ModelTable", "ModuleSpec", "Part", "get_arch", "real_table"]
