"""Reading LoRA files of any convention into the canonical form (target id -> delta), lazily.

:func:`index_lora` reads headers only: it splits every key, recognises the architecture and key format
from the module names (forward-built tables, :mod:`lorasurgery.formats.names`), and records which
tensors make up which module. :meth:`LoraIndex.load` then reads the tensors of one module and returns its
:class:`~lorasurgery.delta.Delta`. Keys that cannot be interpreted are kept in ``unmatched``/``foreign``
with the reason, never dropped silently.
"""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .. import delta as deltas
from ..arch import ARCH_NAMES, real_table
from ..arch.base import ModelTable
from ..errors import InputError
from ..io.reader import TensorSource, open_source
from .keys import SplitKey, split_keys
from .names import NameEntry, Target, best_table, names_for_arch, names_of

SCHEME_TITLES = {
    "kohya": "kohya",
    "kohya-dp": "kohya (diffusers module paths)",
    "peft": "diffusers/PEFT",
    "peft-raw": "raw PEFT (base_model.model.)",
    "comfy": "ComfyUI (diffusion_model.)",
    "bfl": "BFL (bare checkpoint paths)",
    "onetrainer": "OneTrainer (lora_transformer_)",
    "lycoris": "LyCORIS wrapper (lycoris_)",
    "xlabs": "XLabs",
}


@dataclass
class LoraModule:
    """One module of a LoRA file: its name in the file, what it targets, and its tensors."""

    name: str
    target: Target
    scheme: str
    keys: dict[str, str]  # kohya/LyCORIS suffix -> file key
    shapes: dict[str, tuple[int, ...]]
    algo: str
    rank: int | None
    swapped: bool = False  # stored with the two row halves swapped relative to the reference layout


@dataclass
class LoraIndex:
    """A LoRA file recognised from its header."""

    path: Path
    source: TensorSource
    arch: str | None
    table: ModelTable | None  # the model the module names were resolved against
    key_format: str | None  # dominant scheme
    modules: list[LoraModule]
    metadata: dict[str, str]
    unmatched: dict[str, list[str]] = field(default_factory=dict)  # module name -> keys (no target)
    foreign: dict[str, str] = field(default_factory=dict)  # key -> why it is not a delta
    unknown: list[str] = field(default_factory=list)  # keys that fit no LoRA convention
    arch_scores: dict[str, int] = field(default_factory=dict)
    peft_alpha: dict[str, object] = field(default_factory=dict)  # lora_adapter_metadata, if any

    @property
    def all_consumed(self) -> bool:
        return not (self.unmatched or self.foreign or self.unknown)

    def problems(self) -> list[str]:
        """Human-readable lines for every key that was not interpreted."""
        lines = [f"{k}: {why}" for k, why in self.foreign.items()]
        for name, keys in self.unmatched.items():
            lines.extend(f"{k}: module {name!r} is not a module of {self.arch or 'any known architecture'}" for k in keys)
        lines.extend(f"{k}: not a LoRA tensor of any known convention" for k in self.unknown)
        return lines

    def load(self, module: LoraModule, device: str | torch.device = "cpu") -> deltas.Delta:
        """Read one module's tensors and build its delta (alpha from PEFT metadata folded in)."""
        tensors = {sfx: self.source.get(key, device=device) for sfx, key in module.keys.items()}
        if "alpha" not in tensors and "lora_down.weight" in tensors:
            alpha = self._peft_alpha(module, tensors["lora_down.weight"].shape[0])
            if alpha is not None:
                tensors["alpha"] = torch.tensor(alpha, dtype=torch.float32)
        d = deltas.parse_module(module.name, tensors, source=str(self.path))
        return unswap(d, module) if module.swapped else d

    def deltas(self, device: str | torch.device = "cpu") -> Iterator[tuple[LoraModule, deltas.Delta]]:
        for m in self.modules:
            yield m, self.load(m, device)

    def _peft_alpha(self, module: LoraModule, rank: int) -> float | None:
        meta = self.peft_alpha
        if not meta:
            return None
        comp = module.name.split(".", 1)[0] if module.scheme == "peft" else ""
        path = module.name.split(".", 1)[1] if "." in module.name else module.name

        def get(key: str):
            return meta.get(f"{comp}.{key}", meta.get(key))

        alpha = get("lora_alpha")
        pattern = get("alpha_pattern") or {}
        for pat, value in (pattern.items() if isinstance(pattern, dict) else ()):
            if path == pat or path.endswith("." + pat):
                alpha = value
        if alpha is None:
            return None
        alpha = float(alpha)
        if get("use_rslora"):
            alpha = alpha * math.sqrt(rank)  # PEFT rsLoRA scale alpha/sqrt(r) == (alpha*sqrt(r))/r
        return alpha

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "LoraIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


DIFFUSERS_SCHEMES = frozenset({"peft", "peft-raw", "onetrainer", "lycoris", "kohya-dp"})


def unswap(d: deltas.Delta, module: LoraModule) -> deltas.Delta:
    """Bring a delta stored in diffusers row order (adaLN [scale; shift]) to the reference order."""
    from .write import swap_halves

    tensors = dict(d.tensors())
    if d.algo == "lora" and "lora_mid.weight" not in tensors:
        tensors["lora_up.weight"] = swap_halves(tensors["lora_up.weight"])
    elif d.algo == "full":
        tensors["diff"] = swap_halves(tensors["diff"])
        if "diff_b" in tensors:
            tensors["diff_b"] = swap_halves(tensors["diff_b"])
    elif d.algo == "loha" and "hada_t1" not in tensors:
        tensors["hada_w1_a"] = swap_halves(tensors["hada_w1_a"])
        tensors["hada_w2_a"] = swap_halves(tensors["hada_w2_a"])
    else:
        raise InputError(f"module {module.name!r}: a {d.algo} delta on a layer whose shift/scale halves are "
                         "swapped between diffusers and the checkpoint cannot be re-ordered exactly")
    return deltas.parse_module(module.name, tensors)


def _group(split: list[SplitKey]) -> dict[str, list[SplitKey]]:
    groups: dict[str, list[SplitKey]] = defaultdict(list)
    for s in split:
        groups[s.module].append(s)
    return groups


def detect_lora_arch(module_names: list[str], shapes: Mapping[str, tuple[int, ...]] | None = None
                     ) -> tuple[str | None, dict[str, int]]:
    """Score every architecture by how many module names it knows; ties broken by in-feature agreement.

    ``shapes`` maps module name -> down/``lora_A`` shape (used for the tie-break: SD1, SD2 and
    diffusers-named SDXL LoRAs share names and differ in cross-attention widths).
    """
    scores: dict[str, int] = {}
    shape_scores: dict[str, int] = {}
    for arch in ARCH_NAMES:
        names = names_for_arch(arch)
        hits = [n for n in module_names if n in names]
        scores[arch] = len(hits)
        if shapes and hits:
            table = {m.key: m for m in real_table(arch).modules}
            agree = 0
            for n in hits:
                shp = shapes.get(n)
                mod = table.get(names[n].target.module)
                if shp is not None and mod is not None and len(shp) >= 2 and len(mod.shape) >= 2:
                    in_real = mod.shape[0] if mod.transposed else math.prod(mod.shape[1:])
                    in_lora = math.prod(shp[1:])
                    agree += int(in_real == in_lora)
            shape_scores[arch] = agree
    best = max(scores.values(), default=0)
    if best == 0:
        return None, scores
    tied = [a for a in ARCH_NAMES if scores[a] == best]
    if len(tied) > 1 and shape_scores:
        top = max(shape_scores.get(a, 0) for a in tied)
        tied = [a for a in tied if shape_scores.get(a, 0) == top]
    return tied[0], scores


def index_lora(path: str | Path, *, arch: str | None = None, source: TensorSource | None = None,
               table: ModelTable | None = None) -> LoraIndex:
    """Recognise a LoRA file from its header (no tensor data read).

    ``table`` resolves module names against a concrete model (the base checkpoint of a bake, a tiny
    model); by default the released variant of the detected architecture that knows most names is used.
    """
    if table is not None:
        arch = table.arch
    src = source or open_source(path)
    keys = list(src.keys())
    shapes_all = src.shapes()
    split, unknown = split_keys(keys)
    groups = _group([s for s in split if not s.foreign])
    foreign = {s.key: s.foreign for s in split if s.foreign}
    down_shapes = {}
    for name, items in groups.items():
        for s in items:
            if s.suffix in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "diff"):
                down_shapes[name] = shapes_all[s.key]
    if arch is None:
        arch, scores = detect_lora_arch(list(groups), down_shapes)
    else:
        scores = {}
    if arch is not None and table is None:
        table = best_table(arch, list(groups))
    names: dict[str, NameEntry] = names_of(arch, table) if arch else {}
    swapped_mods = {m.key for m in table.modules if "diffusers" in m.swapped_in} if table else set()
    modules: list[LoraModule] = []
    unmatched: dict[str, list[str]] = {}
    schemes: Counter[str] = Counter()
    for name, items in groups.items():
        entry = names.get(name)
        if entry is None:
            unmatched[name] = [s.key for s in items]
            continue
        keymap = {s.suffix: s.key for s in items}
        if len(keymap) != len(items):
            dup = [s.key for s in items]
            raise InputError(f"module {name!r} stores the same tensor twice under different spellings: {dup}", path)
        shp = {sfx: tuple(shapes_all[k]) for sfx, k in keymap.items()}
        try:
            algo, rank = deltas.classify_shapes(shp)
        except InputError as exc:
            raise InputError(f"module {name!r}: {exc}", path) from None
        swapped = entry.target.module in swapped_mods and entry.scheme in DIFFUSERS_SCHEMES
        modules.append(LoraModule(name, entry.target, entry.scheme, keymap, shp, algo, rank, swapped))
        schemes[entry.scheme] += 1
    meta = dict(src.metadata or {})
    peft_alpha: dict[str, object] = {}
    if "lora_adapter_metadata" in meta:
        try:
            peft_alpha = json.loads(meta["lora_adapter_metadata"])
        except json.JSONDecodeError:
            raise InputError("header key 'lora_adapter_metadata' is not valid JSON", path) from None
    key_format = schemes.most_common(1)[0][0] if schemes else None
    _check_targets_unique(modules, path)
    return LoraIndex(Path(path), src, arch, table, key_format, modules, meta, unmatched, foreign, unknown, scores, peft_alpha)


def _check_targets_unique(modules: list[LoraModule], path) -> None:
    seen: dict[str, str] = {}
    for m in modules:
        tid = m.target.id
        if tid in seen:
            raise InputError(
                f"modules {seen[tid]!r} and {m.name!r} both address {tid}; a LoRA file must name each "
                "module once (was it concatenated from two files of different conventions?)", path)
        seen[tid] = m.name
