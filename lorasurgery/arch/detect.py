"""Recognise a file from its header: LoRA or checkpoint, architecture, layout, key format.

Checkpoints are matched against every layout of every architecture's released-model table: the layout
whose keys cover most of the file wins, its keys are brought back to the reference layout (fused tensors
re-assembled from split parts), and the architecture's own ``config_from_shapes`` must accept them — that
both confirms the architecture and derives the concrete model (levels, depths, widths, variants) so that
pruned, inpainting, refiner and tiny models work. LoRAs are recognised by their module names
(:mod:`lorasurgery.formats.read`). Nothing is guessed silently: ambiguity and unknown files are reported.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Mapping

from . import ARCH_NAMES, get_arch
from .base import Layout, ModelTable

Shape = tuple[int, ...]


@dataclass
class Detection:
    """What a file is, with the evidence used."""

    kind: str  # "lora", "checkpoint" or "unknown"
    arch: str | None = None
    layout: str | None = None  # checkpoints
    key_format: str | None = None  # LoRAs
    confidence: float = 0.0
    evidence: list[str] = field(default_factory=list)
    config: Mapping[str, object] | None = None
    table: ModelTable | None = None
    ambiguous: list[str] = field(default_factory=list)  # other equally good candidates
    unmapped: list[str] = field(default_factory=list)  # checkpoint keys outside the layout

    def describe(self) -> str:
        if self.kind == "unknown":
            return "unknown (no architecture's keys match)"
        what = f"{self.arch or 'unknown architecture'}"
        what += f", {self.layout} layout" if self.layout else ""
        what += f", {self.key_format} keys" if self.key_format else ""
        return what


def _inverse(layout: Layout) -> dict[str, tuple[str, tuple[int, int] | None]]:
    inv = {}
    for ref, entries in layout.key_map.items():
        for fk, rows in entries:
            inv[fk] = (ref, rows)
    return inv


def layout_inverses(table: ModelTable) -> dict[str, dict[str, tuple[str, tuple[int, int] | None]]]:
    """File key -> (reference key, rows) for every layout of ``table``.

    Besides each layout, every component of a diffusers layout is a layout of its own
    (``diffusers:unet``, ``diffusers:text_encoder`` …) whose keys lack the component prefix: that is
    what a single diffusers component file (``unet/diffusion_pytorch_model.safetensors``) holds.
    """
    out = {}
    for name, lay in table.layouts.items():
        inv = _inverse(lay)
        out[name] = inv
        if name == "diffusers":
            comps: dict[str, dict] = {}
            for fk, hit in inv.items():
                comp, _, rest = fk.partition(".")
                comps.setdefault(comp, {})[rest] = hit
            for comp, sub in comps.items():
                out[f"diffusers:{comp}"] = sub
    return out


@lru_cache(maxsize=None)
def _variant_inverses(arch: str) -> tuple[dict[str, dict[str, tuple[str, tuple[int, int] | None]]], ...]:
    """Layout inverses of every released variant of ``arch`` (main release first)."""
    from ..formats.names import variant_tables

    return tuple(layout_inverses(t) for t in variant_tables(arch))


def to_reference_shapes(shapes: Mapping[str, Shape], inverse: Mapping[str, tuple[str, tuple[int, int] | None]]
                        ) -> dict[str, Shape]:
    """Reference-layout shapes of a file: split tensors are re-assembled along their rows."""
    ref: dict[str, Shape] = {}
    rows_sum: Counter[str] = Counter()
    for fk, shp in shapes.items():
        hit = inverse.get(fk)
        if hit is None:
            continue
        rk, rows = hit
        if rows is None:
            ref[rk] = tuple(shp)
        else:
            rows_sum[rk] += shp[0] if shp else 0
            ref[rk] = (rows_sum[rk],) + tuple(shp[1:])
    return ref


def detect_checkpoint(shapes: Mapping[str, Shape]) -> Detection:
    """Architecture and layout of a checkpoint from its keys and shapes."""
    keys = list(shapes)
    if not keys:
        return Detection("unknown", evidence=["the file holds no tensors"])
    candidates = []
    for arch in ARCH_NAMES:
        for variant, inverses in enumerate(_variant_inverses(arch)):
            for lname, inv in inverses.items():
                hits = sum(1 for k in keys if k in inv)
                if hits:
                    candidates.append((hits, arch, variant, lname))
    candidates.sort(key=lambda c: -c[0])
    accepted = []
    seen: set[tuple[str, str, str]] = set()
    for hits, arch, variant, lname in candidates:
        spec = get_arch(arch)
        ref_shapes = to_reference_shapes(shapes, _variant_inverses(arch)[variant][lname])
        cfg = spec.config_from_shapes(ref_shapes)
        if cfg is None:
            continue
        table = spec.build(cfg)
        inv = layout_inverses(table)[lname]
        mapped = [k for k in keys if k in inv]
        ident = (arch, lname, repr(sorted(map(str, cfg.items()))))
        if ident in seen:
            continue
        seen.add(ident)
        accepted.append((len(mapped), arch, lname, cfg, table, [k for k in keys if k not in inv]))
    if not accepted:
        return Detection("unknown", evidence=[
            "no architecture's checkpoint layout matches these keys"
            + (f" (closest: {candidates[0][1]} {candidates[0][3]}, {candidates[0][0]} of {len(keys)} keys)"
               if candidates else "")])
    accepted.sort(key=lambda a: -a[0])
    n, arch, lname, cfg, table, unmapped = accepted[0]
    ambiguous = [f"{a} {l}" for m, a, l, *_ in accepted[1:] if m == n]
    evidence = [f"{n} of {len(keys)} keys are {arch} keys in the {lname} layout",
                f"derived config: {_short(cfg)}"]
    return Detection("checkpoint", arch, lname, None, n / len(keys), evidence, cfg, table, ambiguous, unmapped)


def _short(cfg: Mapping[str, object]) -> str:
    items = [f"{k}={v}" for k, v in cfg.items() if not isinstance(v, Mapping)]
    return ", ".join(items[:10])


def detect_source(source) -> Detection:
    """Detect a :class:`~lorasurgery.io.reader.TensorSource` (LoRA or checkpoint) from its header."""
    from ..formats.keys import looks_like_lora

    keys = list(source.keys())
    if looks_like_lora(keys):
        from ..formats.read import index_lora

        idx = index_lora(source.path, source=source)
        det = Detection("lora", idx.arch, None, idx.key_format)
        matched = sum(len(m.keys) for m in idx.modules)
        det.confidence = matched / max(1, len(keys))
        det.evidence.append(f"{len(idx.modules)} modules named like {idx.arch or 'no known architecture'} "
                            f"modules ({matched} of {len(keys)} tensors)")
        top = sorted(idx.arch_scores.items(), key=lambda kv: -kv[1])
        tied = [a for a, s in top if s == top[0][1] and a != idx.arch and s > 0] if top else []
        if tied:
            det.ambiguous = tied
            det.evidence.append(f"module names also fit {', '.join(tied)}; decided by layer widths")
        if idx.arch is None:
            det.kind = "lora"
        return det
    return detect_checkpoint(source.shapes())


def detect(path) -> Detection:
    """Open ``path`` (file, sharded set or diffusers folder) and detect it from its header alone."""
    from ..io.reader import open_source

    with open_source(path) as src:
        return detect_source(src)
