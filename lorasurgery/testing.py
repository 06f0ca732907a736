"""Tiny synthetic models with real key names, for the demo and the tests (nothing is downloaded).

Every generator is driven by the architecture tables: a tiny configuration keeps the real key structure
(only widths and depths shrink), so the files exercise exactly the same detection, key maps and
layouts as released models. Values are seeded per key, so the same call always gives the same bytes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .arch import get_arch
from .arch.base import ModelTable, ModuleSpec
from .delta import LowRank
from .formats.names import Target
from .formats.write import lora_tensors, swap_halves
from .io.writer import write_file


def key_seed(seed: int, key: str) -> int:
    """A 63-bit seed for one tensor, from the global seed and the tensor's key."""
    h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def randn(shape: tuple[int, ...], seed: int, key: str, std: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(key_seed(seed, key))
    return torch.randn(shape, generator=g, dtype=torch.float32) * std


def tiny_table(arch: str, config: Mapping[str, object] | None = None) -> ModelTable:
    spec = get_arch(arch)
    return spec.build(config if config is not None else spec.tiny_config())


def reference_tensors(table: ModelTable, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                      ) -> dict[str, torch.Tensor]:
    """Random tensors for every reference key of ``table`` (checkpoint order)."""
    return {k: randn(tuple(s), seed, k).to(dtype) for k, s in table.tensors.items()}


def to_layout(ref: Mapping[str, torch.Tensor], table: ModelTable, layout: str) -> dict[str, torch.Tensor]:
    """Store reference tensors in another layout of the same model (split rows, swapped halves)."""
    lay = table.layouts[layout]
    out: dict[str, torch.Tensor] = {}
    for rk, t in ref.items():
        entries = lay.key_map.get(rk)
        if not entries:
            continue
        if rk in lay.swapped:
            t = swap_halves(t)
        if rk in lay.transposed:
            t = t.T
        for fk, rows in entries:
            out[fk] = (t if rows is None else t[rows[0]:rows[1]]).clone()
    return out


def tiny_checkpoint(arch: str, layout: str | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    config: Mapping[str, object] | None = None) -> dict[str, torch.Tensor]:
    """A tiny base checkpoint of ``arch`` in ``layout`` (default: the reference layout)."""
    table = tiny_table(arch, config)
    ref = reference_tensors(table, seed=seed, dtype=dtype)
    if layout is None:
        return ref
    return to_layout(ref, table, layout)


def tiny_lora_deltas(table: ModelTable, *, rank: int = 4, alpha: float | None = 2.0, seed: int = 1,
                     groups: Iterable[str] = ("attn",), split_parts: bool = False, std: float = 0.1,
                     components: Iterable[str] | None = None) -> dict[Target, LowRank]:
    """Random low-rank deltas on every module of the given groups (alpha != rank on purpose)."""
    groups = set(groups)
    comps = set(components) if components is not None else None
    out: dict[Target, LowRank] = {}
    for mod in table.modules:
        if mod.group not in groups or (comps is not None and mod.component not in comps):
            continue
        targets = [(Target(mod.key, (p.name,)), p.stop - p.start) for p in mod.parts] if (
            split_parts and mod.parts) else [(Target(mod.key), mod.shape[0] if not mod.transposed else mod.shape[1])]
        for t, rows in targets:
            out[t] = _random_lowrank(mod, rows, rank, alpha, seed, t.id, std)
    return out


def _random_lowrank(mod: ModuleSpec, rows: int, rank: int, alpha: float | None, seed: int, key: str,
                    std: float) -> LowRank:
    if mod.transposed:
        in_shape: tuple[int, ...] = (mod.shape[0],)
    else:
        in_shape = tuple(mod.shape[1:])
    r = max(1, min(rank, rows, int(torch.tensor(in_shape).prod())))
    if len(mod.shape) == 4:
        down = randn((r,) + in_shape, seed, key + ".down", std)
        up = randn((rows, r, 1, 1), seed, key + ".up", std)
    else:
        down = randn((r,) + in_shape, seed, key + ".down", std)
        up = randn((rows, r), seed, key + ".up", std)
    return LowRank(up=up, down=down, alpha=alpha)


def trained_components(table: ModelTable) -> tuple[str, ...]:
    """Components a typical LoRA trains: the denoiser and CLIP text encoders (T5 LoRAs are rare and few
    loaders read them)."""
    return tuple(sorted({m.component for m in table.modules if m.block != "T5"}))


def tiny_lora(arch: str, fmt: str = "kohya", *, rank: int = 4, alpha: float | None = 2.0, seed: int = 1,
              groups: Iterable[str] = ("attn",), split_parts: bool = False, dtype: torch.dtype = torch.float32,
              config: Mapping[str, object] | None = None, components: Iterable[str] | None = None,
              ) -> list[tuple[str, torch.Tensor]]:
    """A tiny LoRA file's tensors for ``arch`` in ``fmt`` ("kohya" or "peft")."""
    table = tiny_table(arch, config)
    items = tiny_lora_deltas(table, rank=rank, alpha=alpha, seed=seed, groups=groups, split_parts=split_parts,
                             components=components if components is not None else trained_components(table))
    return lora_tensors(items, table, fmt, dtype=dtype)


def save(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], path: str | Path,
         metadata: Mapping[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Write tensors to ``path`` (deterministic bytes)."""
    write_file(path, tensors, metadata, overwrite=overwrite)
    return Path(path)


def save_diffusers_folder(tensors: Mapping[str, torch.Tensor], folder: str | Path) -> Path:
    """Write diffusers-layout tensors (``component.key``) as a diffusers pipeline folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text('{"_class_name": "DiffusionPipeline"}\n')
    by_comp: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        comp, _, rest = k.partition(".")
        by_comp.setdefault(comp, {})[rest] = t
    for comp, ts in by_comp.items():
        sub = folder / comp
        sub.mkdir(exist_ok=True)
        (sub / "config.json").write_text("{}\n")
        name = "model.safetensors" if comp.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save(ts, sub / name)
    return folder
