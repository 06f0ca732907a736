"""Writing a LoRA output: tensors in the chosen format, ss_*/modelspec/provenance metadata, hashes.

Shared by every operation that produces a LoRA (extract, merge, subtract, resize, convert), so that all
outputs follow the same rules: deterministic bytes, float32 alphas, hashes computed by the writer on the
final bytes after the cast (``sshs_model_hash``, ``sshs_legacy_hash``), no absolute paths in metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..arch.base import ModelTable
from ..delta import Delta, LowRank
from ..formats.names import Target
from ..formats.write import lora_tensors
from ..io.metadata import lora_metadata, provenance
from ..io.writer import StreamingWriter, TensorSpec

# Default key format per architecture (formats.md §10): SD3 LoRAs load in diffusers only as PEFT.
DEFAULT_FORMAT = {"sd1": "kohya", "sd2": "kohya", "sdxl": "kohya", "sd3": "peft", "flux": "kohya"}
# Suggested output dtype for extraction (formats.md §10).
DEFAULT_EXTRACT_DTYPE = {"sd1": torch.float16, "sd2": torch.float16, "sdxl": torch.float16,
                         "sd3": torch.bfloat16, "flux": torch.bfloat16}


@dataclass
class LoraOutput:
    """What was written."""

    path: Path
    model_hash: str  # sshs_model_hash: sha256 of the data section
    tensors: int
    modules: int
    bytes: int
    dropped: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def _ranks_alphas(tensors: Sequence[tuple[str, torch.Tensor]]) -> tuple[dict[str, int], dict[str, float], set[str]]:
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv: set[str] = set()
    for name, t in tensors:
        for sfx in (".lora_down.weight", ".lora_A.weight"):
            if name.endswith(sfx):
                mod = name[: -len(sfx)]
                ranks[mod] = int(t.shape[0])
                if t.dim() == 4 and tuple(t.shape[2:]) != (1, 1):
                    conv.add(mod)
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(t)
    for mod, r in ranks.items():
        alphas.setdefault(mod, float(r))
    return ranks, alphas, conv


def write_lora(path: str | Path, items: Mapping[Target, Delta], table: ModelTable, fmt: str, *,
               dtype: torch.dtype | None, inputs: Sequence[Mapping[str, Any]], options: Mapping[str, Any],
               seed: int | None = None, device: str = "cpu", svd: str | None = None, title: str | None = None,
               overwrite: bool = False, drop_unsupported: bool = False, extra_metadata: Mapping[str, str] | None = None,
               base_metadata: Mapping[str, str] | None = None, training_comment: str | None = None,
               merged_from: Sequence[str] = ()) -> LoraOutput:
    """Write ``items`` as a LoRA file; see the module docstring.

    ``base_metadata`` (e.g. a resized input's own metadata) is kept, then overridden by the new ss_*,
    modelspec and provenance keys; stale hash keys are always recomputed.
    """
    path = Path(path)
    dropped: list[str] | None = [] if drop_unsupported else None
    tensors = lora_tensors(items, table, fmt, dtype=dtype, dropped=dropped)
    ranks, alphas, conv = _ranks_alphas(tensors)
    meta: dict[str, str] = {}
    if base_metadata:
        meta.update({k: v for k, v in base_metadata.items() if not k.startswith(("sshs_", "lorasurgery."))})
    arch = table.arch
    variant = table.config.get("variant") if isinstance(table.config.get("variant"), str) else None
    lycoris = any(not isinstance(d, LowRank) or getattr(d, "mid", None) is not None for d in items.values())
    meta.update(lora_metadata(
        f"{arch}-{variant}" if variant else arch, ranks or {"-": 1}, alphas or {"-": 1.0}, bool(conv),
        title or path.stem, network_module="lycoris.kohya" if lycoris and fmt == "kohya" else None, conv_modules=conv, merged_from=merged_from, training_comment=training_comment,
        base_model_version=(base_metadata or {}).get("ss_base_model_version") if arch == "sd3" else None))
    meta.update(provenance([dict(i) for i in inputs], options, seed, device=str(device), svd=svd))
    if extra_metadata:
        meta.update(extra_metadata)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    with StreamingWriter(path, specs, meta, overwrite=overwrite, inputs=[i["path"] for i in inputs],
                         fill_sshs_hashes=True, hash_in_thread=True) as w:
        for n, t in tensors:  # built above and never changed: safe to hash in the writer's thread
            w.write(n, t)
    return LoraOutput(path, w.model_hash or "", len(tensors), len(ranks), path.stat().st_size,
                      list(dropped or []), dict(w.metadata))
