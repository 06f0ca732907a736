"""Writing the canonical form (target -> delta) as a kohya or diffusers/PEFT LoRA file.

Rules (``formats.md`` §5 and §10, ``pitfalls.md``):

* kohya: per-architecture names of the tables (SD1/SD2 diffusers paths, SDXL LDM paths, FLUX/SD3
  checkpoint paths with fused ``qkv``/``linear1``); split parts are fused block-diagonally; OpenCLIP
  q/k/v stay split (HF names); alpha is a float32 0-dim tensor, and ONE alpha value is written for every
  low-rank module, each module's remaining scale folded into its factors (diffusers applies the most
  common alpha to modules whose alpha differs).
* PEFT: ``lora_A``/``lora_B`` under the diffusers module paths, the scale folded into the factors so that
  alpha == rank holds for loaders that ignore alpha; fused modules are split into their parts (exact);
  halves swapped where diffusers stores them swapped.
* Factors take the dimensionality of the target module (4-D for convs, 2-D for linears).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .. import delta as deltas
from ..arch.base import ModelTable, ModuleSpec
from ..errors import PlanError
from .dense import module_shape, part_rows
from .names import Target

FORMATS = ("kohya", "peft")


@dataclass
class Piece:
    """A low-rank contribution to some rows of a module: ΔW[rows] += B @ A (scale folded into B)."""

    start: int
    stop: int
    up: torch.Tensor  # (stop - start, R) float32
    down: torch.Tensor  # (R, in_flat) float32


def split_scale(c: float) -> tuple[float, float]:
    """Split a positive factor c between up and down: exact powers of two where possible, else sqrt."""
    if c <= 0:
        raise ValueError("scale must be positive")
    m, e = math.frexp(c)
    if m == 0.5:  # c is a power of two: 2**(e-1)
        k = e - 1
        return 2.0 ** (k - k // 2), 2.0 ** (k // 2)
    r = math.sqrt(c)
    return r, r


def _fold(up: torch.Tensor, down: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    if c == 1.0:
        return up, down
    sign = -1.0 if c < 0 else 1.0
    fu, fd = split_scale(abs(c))
    return up * (sign * fu), down * fd


def _factor_shape(mod: ModuleSpec, rows: int, rank: int, which: str) -> tuple[int, ...]:
    """Shape of an up/down factor for the module's own dimensionality."""
    if mod.transposed:
        in_dim = mod.shape[0]
    else:
        in_dim = mod.shape[1] if len(mod.shape) > 1 else 1
    if which == "up":
        return (rows, rank, 1, 1) if len(mod.shape) == 4 else (rows, rank)
    if len(mod.shape) == 4:
        return (rank, in_dim, mod.shape[2], mod.shape[3])
    return (rank, in_dim)


def pieces_of(mod: ModuleSpec, items: Mapping[Target, deltas.Delta]) -> tuple[int, list[Piece]]:
    """Low-rank pieces of every item addressing ``mod`` (whole or parts), with row offsets."""
    out = module_shape(mod, items)[0]
    rows = part_rows(mod, out) if mod.parts else {}
    pieces = []
    for t, d in sorted(items.items(), key=lambda kv: kv[0].id):
        if not isinstance(d, deltas.LowRank):
            raise PlanError(f"{t.id}: a {d.algo} delta cannot be re-split or fused exactly; "
                            "write it with the naming of its input or resize it to a plain LoRA first")
        b, a = d.factors()
        if t.parts:
            start = rows[t.parts[0]][0]
            stop = rows[t.parts[-1]][1]
        else:
            start, stop = 0, out
        pieces.append(Piece(start, stop, b, a))
    return out, pieces


def fuse(out: int, pieces: list[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal fuse: one (out, R) up and (R, in) down with B @ A == Σ pieces (exact)."""
    R = sum(p.up.shape[1] for p in pieces)
    up = torch.zeros(out, R, dtype=torch.float32)
    downs = []
    col = 0
    for p in pieces:
        r = p.up.shape[1]
        up[p.start:p.stop, col:col + r] = p.up
        downs.append(p.down)
        col += r
    return up, torch.cat(downs, 0) if len(downs) > 1 else downs[0].clone()


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """Swap the two row halves (adaLN shift/scale order between BFL and diffusers)."""
    h = t.shape[0] // 2
    return torch.cat([t[h:], t[:h]], 0)


def _emit_pair(name: str, mod: ModuleSpec, up: torch.Tensor, down: torch.Tensor, fmt: str,
               dtype: torch.dtype, alpha: float | None) -> list[tuple[str, torch.Tensor]]:
    rank = up.shape[1]
    upt = up.reshape(_factor_shape(mod, up.shape[0], rank, "up")).to(dtype).contiguous()
    dnt = down.reshape(_factor_shape(mod, up.shape[0], rank, "down")).to(dtype).contiguous()
    if fmt == "peft":
        return [(f"{name}.lora_A.weight", dnt), (f"{name}.lora_B.weight", upt)]
    out = [(f"{name}.lora_down.weight", dnt), (f"{name}.lora_up.weight", upt)]
    if alpha is not None:
        out.append((f"{name}.alpha", torch.tensor(float(alpha), dtype=torch.float32)))
    return out


def has_name(mod: ModuleSpec, fmt: str) -> bool:
    """Whether format ``fmt`` can name this module (whole, or through its parts)."""
    scheme = "kohya" if fmt == "kohya" else "diffusers"
    return bool(mod.names.get(scheme)) or bool(mod.parts) and all(p.names.get(scheme) for p in mod.parts)


def lora_tensors(items: Mapping[Target, deltas.Delta], table: ModelTable, fmt: str, *,
                 dtype: torch.dtype | None = None, dropped: list[str] | None = None,
                 ) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a LoRA file holding ``items`` in format ``fmt`` ("kohya" or "peft").

    Tensors are sorted by name, so the same input always gives the same file. ``dtype`` defaults to the
    widest floating dtype of the inputs (alpha stays float32). Modules the format has no name for (e.g.
    ``text_projection`` or a diffusers-less SD2 text-encoder layer in PEFT) raise :class:`PlanError`
    listing them, unless a ``dropped`` list is given: then they are left out and appended to it.
    """
    if fmt not in FORMATS:
        raise PlanError(f"unknown LoRA format {fmt!r}; expected one of {', '.join(FORMATS)}")
    mods = {m.key: m for m in table.modules}
    by_module: dict[str, dict[Target, deltas.Delta]] = defaultdict(dict)
    unnamed: list[str] = []
    for t, d in items.items():
        if t.module not in mods:
            raise PlanError(f"{t.id} is not a module of this {table.arch} model")
        if not has_name(mods[t.module], fmt):
            unnamed.append(t.id)
            continue
        by_module[t.module][t] = d
    if unnamed:
        if dropped is None:
            raise PlanError(
                f"{len(unnamed)} modules have no name in the {fmt} format, so no loader of that format would "
                f"read them: {', '.join(sorted(unnamed)[:20])}{' …' if len(unnamed) > 20 else ''}. "
                "Drop them explicitly (--drop-unsupported) or choose the other format.")
        dropped.extend(sorted(unnamed))
    if dtype is None:
        dtype = _widest(items.values())
    lowrank_groups: list[tuple[ModuleSpec, Mapping[Target, deltas.Delta]]] = []
    passthrough: list[tuple[str, torch.Tensor]] = []
    for key, group in by_module.items():
        mod = mods[key]
        lowrank = all(isinstance(d, deltas.LowRank) and getattr(d, "dora_scale", None) is None
                      for d in group.values())
        if not lowrank:
            if fmt == "peft":
                bad = [f"{t.id} ({d.algo})" for t, d in group.items()]
                raise PlanError("diffusers/PEFT files hold plain low-rank pairs only; these modules are "
                                f"not: {', '.join(bad[:5])}. Write --to kohya, or resize to a plain LoRA first.")
            for t, d in group.items():
                name = _single_name(mod, t, "kohya")
                passthrough.extend((f"{name}.{sfx}", v.to(dtype) if v.is_floating_point() and sfx != "alpha" else v)
                                   for sfx, v in d.tensors().items())
            continue
        lowrank_groups.append((mod, group))
    out: list[tuple[str, torch.Tensor]] = list(passthrough)
    # alpha* from the ranks alone, so that each module's float32 factors are folded, cast and freed in turn
    alpha_star = max((r for mod, group in lowrank_groups for r in _pair_ranks(mod, group, fmt)),
                     default=1) if fmt == "kohya" else None
    for mod, group in lowrank_groups:
        for name, pmod, up, down in _lowrank_pairs(mod, group, fmt):
            rank = up.shape[1]
            if fmt == "kohya":
                c = rank / alpha_star  # loaders apply alpha*/rank; fold the rest into the factors
                up_f, down_f = _fold(up, down, c)
                out.extend(_emit_pair(name, pmod, up_f, down_f, fmt, dtype, float(alpha_star)))
            else:
                out.extend(_emit_pair(name, pmod, up, down, fmt, dtype, None))
    out.sort(key=lambda kv: kv[0])
    return out


def _single_name(mod: ModuleSpec, t: Target, scheme: str) -> str:
    if not t.parts:
        name = mod.names.get(scheme)
    elif len(t.parts) == 1:
        name = mod.part(t.parts[0]).names.get(scheme)
    else:
        name = None
    if not name:
        raise PlanError(f"{t.id} has no {scheme} name; it cannot be written in this format unchanged")
    return name


def _pair_ranks(mod: ModuleSpec, group: Mapping[Target, deltas.Delta], fmt: str) -> list[int]:
    """The ranks of the pairs :func:`_lowrank_pairs` writes for one module, without computing factors."""
    scheme = "kohya" if fmt == "kohya" else "diffusers"
    ranks = {t: int(d.up.shape[1]) for t, d in group.items()}
    if mod.names.get(scheme):
        return [sum(ranks.values())]
    names = [p.name for p in mod.parts]
    out = []
    for i, p in enumerate(mod.parts):
        r = sum(v for t, v in ranks.items()
                if not t.parts or names.index(t.parts[0]) <= i <= names.index(t.parts[-1]))
        if r:
            out.append(r)
    return out


def _lowrank_pairs(mod: ModuleSpec, group: Mapping[Target, deltas.Delta], fmt: str):
    """(name, mod, up, down) for one module: fused or split as the format requires, scale folded."""
    scheme = "kohya" if fmt == "kohya" else "diffusers"
    swap = fmt == "peft" and "diffusers" in mod.swapped_in
    whole_name = mod.names.get(scheme)
    if whole_name:
        # the format names the whole module: fuse whatever parts are present
        if len(group) == 1 and not next(iter(group)).parts:
            d = next(iter(group.values()))
            b, a = d.factors()
        else:
            out, pieces = pieces_of(mod, group)
            b, a = fuse(out, pieces)
        if swap:
            b = swap_halves(b)
        return [(whole_name, mod, b, a)]
    if not mod.parts:
        raise PlanError(f"{mod.key} has no {scheme} name")
    # the format names the parts: split every piece onto the parts it covers (exact)
    out, pieces = pieces_of(mod, group)
    rows = part_rows(mod, out)
    result = []
    for p in mod.parts:
        a0, b0 = rows[p.name]
        ups, downs = [], []
        for pc in pieces:
            lo, hi = max(a0, pc.start), min(b0, pc.stop)
            if lo >= hi:
                continue
            blk = torch.zeros(b0 - a0, pc.up.shape[1])
            blk[lo - a0:hi - a0] = pc.up[lo - pc.start:hi - pc.start]
            ups.append(blk)
            downs.append(pc.down)
        if not ups:
            continue
        name = p.names.get(scheme)
        if not name:
            raise PlanError(f"{mod.key}:{p.name} has no {scheme} name")
        result.append((name, _part_spec(mod, a0, b0), torch.cat(ups, 1), torch.cat(downs, 0)))
    return result


def _part_spec(mod: ModuleSpec, a: int, b: int) -> ModuleSpec:
    from dataclasses import replace

    return replace(mod, shape=(b - a,) + tuple(mod.shape[1:]), parts=())


def _widest(ds: Iterable[deltas.Delta]) -> torch.dtype:
    """Widest floating dtype among the deltas' tensors; fp16 with bf16 gives fp32."""
    seen = {v.dtype for d in ds for v in d.tensors().values() if v.is_floating_point() and v.dim() > 0}
    if torch.float64 in seen:
        return torch.float64
    if torch.float32 in seen or {torch.float16, torch.bfloat16} <= seen or not seen:
        return torch.float32
    return torch.bfloat16 if torch.bfloat16 in seen else torch.float16
