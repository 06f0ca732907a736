"""Dense ΔW of a whole module from the canonical pieces that address it (whole module or parts).

Used wherever a module's complete change is needed in the reference layout: baking into a checkpoint,
densifying LoHa/LoKr inputs before an SVD, and the tests that compare conventions.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..arch.base import ModuleSpec
from ..delta import Delta
from ..errors import PlanError
from .names import Target


def module_shape(mod: ModuleSpec, items: Mapping[Target, Delta]) -> tuple[int, ...]:
    """The module's weight shape (reference orientation) as the pieces describe it.

    Pieces may come from a smaller or larger model than the table's (tiny models, variants): the out size
    is taken from the pieces, parts scaled proportionally; the in size and kernel from any piece.
    """
    out = None
    for t, d in items.items():
        if d.out_features is None:
            continue
        if not t.parts:
            out = d.out_features
            break
        covered = sum(mod.part(p).stop - mod.part(p).start for p in t.parts)
        out = d.out_features * mod.shape[0] // covered if not mod.transposed else None
        break
    d0 = next(iter(items.values()))
    inf = d0.in_features
    if out is None or inf is None:
        raise PlanError(f"{mod.key}: the LoRA's tensors do not determine the weight shape; a base checkpoint "
                        "is needed to place this module")
    if mod.transposed:
        return (inf, out)
    if len(mod.shape) == 4:
        kernel = d0.kernel if d0.kernel else (1, 1)
        in_ch = inf // (kernel[0] * kernel[1])
        return (out, in_ch) + tuple(kernel)
    return (out, inf)


def part_rows(mod: ModuleSpec, out_actual: int) -> dict[str, tuple[int, int]]:
    """Row range of every part for a module with ``out_actual`` rows (parts scale with the model)."""
    total = mod.shape[0]
    rows = {}
    for p in mod.parts:
        a, b = p.start * out_actual, p.stop * out_actual
        if a % total or b % total:
            raise PlanError(f"{mod.key}: {out_actual} rows do not split into the parts "
                            f"{', '.join(q.name for q in mod.parts)}")
        rows[p.name] = (a // total, b // total)
    return rows


def target_rows(mod: ModuleSpec, target: Target, out_actual: int) -> tuple[int, int]:
    """Rows of the module weight that ``target`` addresses."""
    if not target.parts:
        return 0, out_actual
    rows = part_rows(mod, out_actual)
    return rows[target.parts[0]][0], rows[target.parts[-1]][1]


def module_dense(mod: ModuleSpec, items: Mapping[Target, Delta], shape: Sequence[int] | None = None
                 ) -> torch.Tensor:
    """Float32 ΔW of ``mod`` in the reference tensor's orientation and ``shape`` (inferred if None).

    Every piece's ΔW goes into the rows its target covers; a transposed reference tensor (OpenCLIP
    ``text_projection``) receives the transpose of the Linear delta.
    """
    shape = tuple(shape) if shape is not None else module_shape(mod, items)
    if mod.transposed:
        lin_shape = (shape[1], shape[0])
        total = torch.zeros(lin_shape, dtype=torch.float32)
        for t, d in items.items():
            total += d.dense(lin_shape)
        return total.T.contiguous()
    total = torch.zeros(shape, dtype=torch.float32)
    for t, d in items.items():
        a, b = target_rows(mod, t, shape[0])
        total[a:b] += d.dense((b - a,) + tuple(shape[1:]))
    return total
