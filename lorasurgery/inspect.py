"""``inspect``: what a file is, from its header (plus, for LoRAs, the few 0-dim alpha tensors).

:func:`inspect_file` returns a plain dict (the ``--json`` output); the CLI renders it with rich. Tensor
data is never read for checkpoints, so the time does not grow with the file size. ``blocks=True`` adds,
for a LoRA, the Frobenius norm of ΔW per block of its architecture's layout (this reads the LoRA).
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch

from .arch.detect import detect_checkpoint
from .formats.keys import looks_like_lora
from .formats.read import SCHEME_TITLES, LoraIndex, index_lora
from .io.reader import open_source

META_PREFIXES = ("ss_", "modelspec.", "lorasurgery.", "sshs_")
LONG_META = 300  # metadata values longer than this are summarised in tables


def _fmt_num(x: float) -> str:
    return f"{x:g}"


def _meta(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in sorted(meta.items()) if k.startswith(META_PREFIXES) or k == "format"}


def inspect_file(path: str | Path, *, blocks: bool = False) -> dict[str, Any]:
    """Describe a LoRA or checkpoint; see the module docstring."""
    with open_source(path) as src:
        keys = src.keys()
        dtypes = Counter(src.dtypes().values())
        report: dict[str, Any] = {
            "path": str(path),
            "files": len(src.files),
            "tensors": len(keys),
            "bytes": src.total_bytes,
            "dtypes": dict(sorted(dtypes.items())),
        }
        if looks_like_lora(keys):
            report["kind"] = "lora"
            idx = index_lora(path, source=src)
            report.update(_lora_report(idx))
            if blocks:
                report["blocks"] = block_norms(idx)
        else:
            det = detect_checkpoint(src.shapes())
            report["kind"] = "checkpoint" if det.kind != "unknown" else "unknown"
            report["architecture"] = det.arch or "unknown"
            report["layout"] = det.layout or "unknown"
            report["confidence"] = round(det.confidence, 4)
            report["evidence"] = det.evidence
            if det.ambiguous:
                report["ambiguous_with"] = det.ambiguous
            if det.table is not None:
                comps = Counter(m.component for m in det.table.modules)
                report["lora_targets"] = dict(sorted(comps.items()))
            report["unmapped_keys"] = len(det.unmapped)
            report["metadata"] = _meta(dict(src.metadata or {}))
            if blocks:
                report["blocks"] = None
        return report


def _lora_report(idx: LoraIndex) -> dict[str, Any]:
    algos = Counter(m.algo for m in idx.modules)
    ranks = Counter(m.rank for m in idx.modules if m.rank is not None)
    alphas: Counter[str] = Counter()
    for m in idx.modules:
        if "alpha" in m.keys:
            a = idx.source.get(m.keys["alpha"])
            alphas[_fmt_num(float(a.float().reshape(-1)[0]))] += 1
        elif m.rank is not None:
            alphas["absent (scale 1)"] += 1
    comps = Counter()
    table = {mod.key: mod for mod in idx.table.modules} if idx.table else {}
    for m in idx.modules:
        mod = table.get(m.target.module)
        comps[mod.component if mod else "?"] += 1
    out: dict[str, Any] = {
        "architecture": idx.arch or "unknown",
        "key_format": SCHEME_TITLES.get(idx.key_format or "", idx.key_format or "unknown"),
        "modules": len(idx.modules),
        "components": dict(sorted(comps.items())),
        "algorithms": dict(sorted(algos.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": dict(sorted(alphas.items())),
        "metadata": _meta(idx.metadata),
    }
    problems = idx.problems()
    if problems:
        out["uninterpreted_keys"] = len(problems)
        out["uninterpreted"] = problems[:20]
    return out


def block_norms(idx: LoraIndex) -> list[dict[str, Any]]:
    """‖ΔW‖_F per block (scale included), in the order of the architecture's full block layout."""
    if idx.arch is None:
        return []
    table = {mod.key: mod for mod in idx.table.modules}
    sq: dict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    for m, d in idx.deltas():
        mod = table[m.target.module]
        block = mod.block or "OTHER"
        sq[block] += delta_sqnorm(d)
        count[block] += 1
    from .blocks import arch_layouts

    order = list(_full_layout_ids(idx.arch, idx.table, arch_layouts)) + ["OTHER"]
    rows = []
    for b in order:
        if b in count or b != "OTHER":
            rows.append({"block": b, "modules": count.get(b, 0), "norm": math.sqrt(sq.get(b, 0.0))})
    return rows


def _full_layout_ids(arch: str, table, arch_layouts) -> list[str]:
    depth = table.config.get("depth") if arch == "sd3" else None
    full, layouts = arch_layouts(arch, depth) if depth else arch_layouts(arch)
    return list(layouts[full]) if isinstance(layouts, dict) else list(full)


def delta_sqnorm(d) -> float:
    """‖ΔW‖_F² of a delta; low-rank deltas use tr((BᵀB)(AAᵀ)) without forming ΔW."""
    from .delta import LowRank

    if isinstance(d, LowRank) and getattr(d, "dora_scale", None) is None:
        b, a = d.factors()
        b64, a64 = b.double(), a.double()
        return float(torch.sum((b64.T @ b64) * (a64 @ a64.T)))
    if d.needs_base:
        return float("nan")
    shape = (d.out_features, d.in_features)
    return float(d.dense(shape).double().pow(2).sum())
