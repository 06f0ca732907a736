"""LoRA algebra without a base checkpoint: merge (LoRA+LoRA), subtract, resize and convert.

Every operation here reads LoRAs, combines them module by module and writes one LoRA through
:func:`lorasurgery.ops.output.write_lora` (metadata, provenance, hashes after the final cast).

* :func:`merge_loras` — ``Σ w_i · w_b,i · ΔW_i`` per module. ``concat`` (default) is exact: each input's
  weight × block weight × alpha/rank is folded into its factors with the balanced √|c| split and the ranks
  are concatenated (``math.md`` §3); each merged module has scale 1 at its total rank before the writer's
  alpha policy (one alpha for the file, the rest folded). ``svd`` gives the optimal rank-N (or rank-rule)
  truncation of the sum, computed from the factors (Householder QR of the shorter stacked factor, the float64
  Gram matrix of the longer one, eigendecomposition of a small float64 core; ``math.md`` §5; see
  :func:`factored_truncation`) so no dense ΔW is formed when every contribution is low-rank. LoHa, LoKr
  and full diffs are densified and truncated with :func:`lorasurgery.linalg.svd_for_rank` (exact or
  randomized, on ``device``).
* :func:`subtract` — ``ΔB − ΔA`` (``math.md`` §4): :func:`merge_loras` with weights (+1, −1).
* :func:`resize` — optimal truncation of one LoRA per module, from its factors; metadata kept.
* :func:`convert` — the same ΔW in another key convention (kohya ⇄ PEFT, fused ⇄ split, swapped halves),
  every input key consumed.

Modules are read one at a time in the calling thread; the input files are memory-mapped and their mappings
are released every 64 MB read, so resident memory stays bounded by the output LoRA plus a few input
tensors. SVD methods decompose modules on a pool of worker threads (one per CPU core by default), each
torch call with one intra-op thread, and collect the results in module order: the bytes written do not
depend on the number of workers.

Target addressing: inputs may address the same weight differently (a kohya FLUX LoRA on the fused ``qkv``,
a diffusers one on ``to_q``/``to_k``/``to_v``). Such modules are brought to one form before combining:
the whole module (every contribution placed in its rows, block-diagonal fuse) when the output format names
the whole module, else its parts (every contribution split onto the parts it covers). Both are exact.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .. import delta as deltas
from ..arch.base import ModelTable, ModuleSpec, Part
from ..blocks import BlockWeights, parse_block_spec
from ..errors import InputError, OutputError, PlanError
from ..formats.dense import module_shape, part_rows, target_rows
from ..formats.keys import looks_like_lora
from ..formats.names import Target
from ..formats.read import LoraIndex, LoraModule, index_lora
from ..formats.write import FORMATS, Piece, fuse, pieces_of
from ..io.dtypes import dtype_name, parse_dtype
from ..io.metadata import title_of
from ..io.reader import open_source
from ..linalg import (RANK_METHODS, canonicalize_signs, resolve_device, retained_fraction, select_rank,
                      svd_for_rank, truncate)
from .inputs import WeightedInput, parse_weighted
from .output import DEFAULT_FORMAT, LoraOutput, write_lora
from .threads import ops_threads

__all__ = [
    "AlgebraReport",
    "RankRule",
    "UnitRow",
    "convert",
    "default_output",
    "merge_loras",
    "resize",
    "subtract",
]

#: Algorithms whose change depends on the base weight: never combined without a base checkpoint.
W_DEPENDENT = frozenset({"ia3", "glora", "oft", "boft"})
#: Input bytes read from one file before its memory mapping is released (bounds resident memory).
RELEASE_BYTES = 64 << 20
#: Smallest σ_k/σ_1 for which :func:`factored_truncation` forms one side as ΔW·v/σ (rounding of ΔW·v is
#: about float32 ε·σ_1 per component, harmless to the product; the bound only keeps factors from blowing up).
_ONE_SIDED = 1e-10
#: Row block of :func:`_gram` (two blocks for the 256 stacked columns of a merge of two rank-128 LoRAs).
_GRAM_BLOCK = 128
#: Singular values at or below this count as zero (an empty module).
_SIGMA_ZERO = float(torch.finfo(torch.float32).tiny)

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclass
class UnitRow:
    """One output module (target) of an operation, for the closing table and ``--json``.

    ``rank_in`` is the input rank (resize) or the sum of the contributing ranks (merge); ``rank_out`` the
    written rank (None when dropped or when the module is not low-rank). ``retained`` is the retained
    Frobenius fraction ``‖ΔW_r‖F / ‖ΔW‖F`` (1.0 for exact methods); ``energy`` its square.
    """

    target: str
    block: str | None
    algo: str
    inputs: int
    rank_in: int | None
    rank_out: int | None
    retained: float | None
    method: str
    note: str = ""

    @property
    def energy(self) -> float | None:
        return None if self.retained is None else self.retained * self.retained

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "block": self.block, "algo": self.algo, "inputs": self.inputs,
                "rank_in": self.rank_in, "rank_out": self.rank_out, "retained_fro": self.retained,
                "retained_energy": self.energy, "method": self.method, "note": self.note}


@dataclass
class AlgebraReport:
    """What an algebra operation did and wrote (plain data; the CLI renders it)."""

    op: str  # "merge", "subtract", "resize", "convert"
    output: Path
    arch: str
    format: str
    dtype: str
    method: str  # "concat", "svd", "resize", "convert"
    inputs: list[dict[str, Any]]
    rows: list[UnitRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    modules: int = 0
    tensors: int = 0
    bytes: int = 0
    model_hash: str = ""
    seconds: float = 0.0
    source_format: str | None = None

    def as_dict(self) -> dict[str, Any]:
        kept = [r.retained for r in self.rows if r.retained is not None and r.rank_out]
        return {
            "op": self.op, "output": str(self.output), "architecture": self.arch, "format": self.format,
            "source_format": self.source_format, "dtype": self.dtype, "method": self.method,
            "inputs": self.inputs, "modules": self.modules, "tensors": self.tensors, "bytes": self.bytes,
            "sshs_model_hash": self.model_hash, "seconds": round(self.seconds, 3),
            "mean_retained_fro": (sum(kept) / len(kept)) if kept else None,
            "min_retained_fro": min(kept) if kept else None,
            "notes": list(self.notes), "dropped": list(self.dropped),
            "rows": [r.as_dict() for r in self.rows],
        }


@dataclass(frozen=True)
class RankRule:
    """How to choose each module's rank in an SVD truncation (``math.md`` §7).

    ``method`` ``fixed`` uses ``rank`` (``conv_rank`` for convolutions with a kernel larger than 1x1);
    the dynamic methods (``sv_ratio``, ``sv_fro``, ``sv_cumulative``) use ``param`` and treat ``rank``
    / ``conv_rank`` as caps. Every rank is further capped by what the module allows,
    ``min(out, in·kh·kw)``, and by the rank of the input delta.
    """

    method: str = "fixed"
    param: float | None = None
    rank: int | None = None
    conv_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "conv_rank"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                flag = "--rank" if name == "rank" else "--conv-rank"
                raise PlanError(f"{flag} must be a whole number of at least 1, got {v!r}.")
        if self.method not in RANK_METHODS:
            raise PlanError(f"unknown rank method {self.method!r}: use one of {', '.join(RANK_METHODS)}.")
        if self.method == "fixed":
            if self.rank is None:
                raise PlanError("a fixed-rank truncation needs --rank N (or a dynamic --rank-method with "
                                "--rank-param).")
            if self.param is not None:
                raise PlanError("--rank-param only applies to the dynamic rank methods (sv_ratio, sv_fro, "
                                "sv_cumulative); with a fixed rank give --rank N alone.")
        else:
            if self.param is None:
                raise PlanError(f"rank method {self.method} needs --rank-param (e.g. 0.9 for sv_fro).")
            select_rank([1.0], self.method, self.param, max_rank=None)  # validates the parameter

    def for_unit(self, conv: bool) -> tuple[str, float, int | None]:
        """(method, parameter, cap) for one module; ``conv`` for kernels larger than 1x1."""
        cap = self.conv_rank if conv and self.conv_rank is not None else self.rank
        if self.method == "fixed":
            assert cap is not None
            return "fixed", float(cap), cap
        assert self.param is not None
        return self.method, float(self.param), cap

    def describe(self) -> str:
        if self.method == "fixed":
            s = f"rank {self.rank}"
        else:
            s = f"{self.method}={self.param:g}" + (f" (max rank {self.rank})" if self.rank else "")
        if self.conv_rank is not None:
            s += f", conv rank {self.conv_rank}"
        return s

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "param": self.param, "rank": self.rank, "conv_rank": self.conv_rank}


# --------------------------------------------------------------------------------------------------
# opening inputs
# --------------------------------------------------------------------------------------------------


def open_lora(path: str | Path, *, what: str = "LoRA", base_hint: bool = True) -> LoraIndex:
    """Open ``path`` as a LoRA: recognised architecture, every key interpreted; else a clear error."""
    path = Path(path)
    src = open_source(path)
    try:
        keys = src.keys()
        if not looks_like_lora(keys):
            from ..arch.detect import detect_checkpoint

            det = detect_checkpoint(src.shapes())
            if det.kind == "checkpoint":
                hint = (" To bake LoRAs into a checkpoint, pass it with --base." if base_hint else "")
                raise InputError(f"is a {det.describe()} checkpoint, not a {what}. lorasurgery expected LoRA "
                                 f"tensors (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*).{hint}", path)
            raise InputError(f"holds no LoRA tensors ({len(keys)} tensors, none named like "
                             "lora_down/lora_up, lora_A/lora_B, hada_* or lokr_*), so it cannot be used as a "
                             f"{what}.", path)
        idx = index_lora(path, source=src)
        if idx.arch is not None and idx.modules:
            better = _best_shaped_table(idx)
            if better is not None:
                idx = index_lora(path, source=src, table=better)
        if idx.arch is None or idx.table is None or not idx.modules:
            raise InputError(f"is a LoRA file, but none of its module names belongs to a supported "
                             f"architecture (SD1.x, SD2.x, SDXL, SD3, FLUX.1); e.g. {keys[0]!r}.", path)
        problems = idx.problems()
        if problems:
            shown = "; ".join(problems[:20])
            more = f" … and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise InputError(f"{len(problems)} of its keys are not part of any {idx.arch} LoRA module, and "
                             f"lorasurgery never drops keys silently: {shown}{more}.", path)
    except BaseException:
        src.close()
        raise
    return idx


@lru_cache(maxsize=None)
def _candidate_tables(arch: str) -> tuple[tuple[ModelTable, Mapping[str, Any]], ...]:
    """(table, module-name lookup) of every model a LoRA of ``arch`` may have been made for: the released
    variants and the tiny demo model (cached)."""
    from ..arch import get_arch
    from ..formats.names import names_of, variant_tables

    spec = get_arch(arch)
    tables = tuple(variant_tables(arch)) + (spec.build(spec.tiny_config()),)
    return tuple((t, names_of(arch, t)) for t in tables)


def _target_dims(mod: ModuleSpec, t: Target) -> tuple[int, int, tuple[int, ...]] | None:
    """(rows, in·kh·kw, kernel) a LoRA on target ``t`` of ``mod`` must have."""
    if mod.transposed:
        return int(mod.shape[1]), int(mod.shape[0]), ()
    rows = int(mod.shape[0])
    if t.parts:
        try:
            sel = [mod.part(p) for p in t.parts]
        except (KeyError, ValueError):
            return None
        rows = sel[-1].stop - sel[0].start
    return rows, int(math.prod(mod.shape[1:])), tuple(int(k) for k in mod.shape[2:])


def _best_shaped_table(idx: LoraIndex) -> ModelTable | None:
    """A table whose module widths match the LoRA better than the name-chosen one, if any.

    Module names identify the architecture but not always its size: SD3 Medium and Large share names for
    their first blocks (and the last block's adaLN rows are stored swapped in diffusers files, so the depth
    matters for reading), SD1/SD2/SDXL diffusers-named LoRAs on few modules share names, and the tiny demo
    models share every name with the released ones. Among the released and tiny tables of every
    architecture whose names match as many modules as the detected one, the table where most modules have
    exactly the LoRA's widths wins (then: most factors of the module's dimensionality); ties keep the
    name-chosen table.
    """
    dims = []
    for m in idx.modules:
        if _w_dependent(m):
            continue
        try:
            d = _meta_delta(m)
        except (InputError, PlanError):
            continue
        if d.out_features is None or d.in_features is None:
            continue
        ndim = max((len(v) for k, v in m.shapes.items() if k in ("lora_down.weight", "lora_up.weight")), default=0)
        dims.append((m.name, int(d.out_features), int(d.in_features), ndim))

    def score(table: ModelTable, names: Mapping[str, Any]) -> tuple[int, int]:
        mods = {mm.key: mm for mm in table.modules}
        hits = same_ndim = 0
        for name, rows, inf, ndim in dims:
            entry = names.get(name)
            mod = mods.get(entry.target.module) if entry is not None else None
            want = _target_dims(mod, entry.target) if mod is not None else None
            if want is not None and want[0] == rows and want[1] == inf:
                hits += 1
                same_ndim += int(ndim == 0 or ndim == (4 if len(mod.shape) == 4 else 2))
        return hits, same_ndim

    top = max(idx.arch_scores.values(), default=0)
    archs = [a for a, v in idx.arch_scores.items() if v == top]
    if idx.arch in archs:
        archs.remove(idx.arch)
    archs.insert(0, idx.arch)
    from ..formats.names import names_of

    current = score(idx.table, names_of(idx.arch, idx.table)) if idx.table is not None else (-1, -1)
    best, best_score = None, current
    for arch in archs:
        for cand, names in _candidate_tables(arch):
            if cand is idx.table:
                continue
            sc = score(cand, names)
            if sc > best_score:
                best, best_score = cand, sc
    return best


def _w_dependent(m: LoraModule) -> str | None:
    if m.algo in W_DEPENDENT:
        return m.algo
    if "dora_scale" in m.keys:
        return f"{m.algo} (DoRA)"
    return None


def _meta_delta(m: LoraModule) -> deltas.Delta:
    metas = {sfx: torch.empty(tuple(shape), device="meta") for sfx, shape in m.shapes.items()}
    return deltas.parse_module(m.name, metas)


def _fit_table(table: ModelTable, indexes: Sequence[LoraIndex]) -> ModelTable:
    """``table`` with module shapes taken from the LoRAs where they differ (tiny and variant models).

    The released-model table fixes names and blocks; the LoRA tensors fix the widths. Inputs that
    disagree on a module's shape are a plan-time error.
    """
    mods = {m.key: m for m in table.modules}
    seen: dict[str, tuple[tuple[int, ...], Path]] = {}
    for idx in indexes:
        for m in idx.modules:
            mod = mods.get(m.target.module)
            if mod is None:
                raise PlanError(f"module {m.name!r} targets {m.target.module}, which the {table.arch} model "
                                "of the first input does not have; the inputs are for different variants.",
                                idx.path)
            if _w_dependent(m):
                continue
            try:
                shape = tuple(module_shape(mod, {m.target: _meta_delta(m)}))
            except PlanError:
                continue
            prev = seen.get(mod.key)
            if prev is None:
                seen[mod.key] = (shape, idx.path)
            elif prev[0] != shape:
                raise PlanError(f"module {mod.key} has shape {prev[0]} in {prev[1].name} but {shape} in "
                                f"{idx.path.name}: the LoRAs were made for differently sized models.", idx.path)
    changed = False
    fitted = []
    for mod in table.modules:
        got = seen.get(mod.key)
        if got is None or tuple(got[0]) == tuple(mod.shape):
            fitted.append(mod)
            continue
        shape = got[0]
        parts = mod.parts
        if parts and not mod.transposed:
            old, new = mod.shape[0], shape[0]
            if any((p.start * new) % old or (p.stop * new) % old for p in parts):
                raise PlanError(f"module {mod.key}: {new} rows do not split into its parts "
                                f"{', '.join(p.name for p in parts)}.")
            parts = tuple(Part(p.name, p.start * new // old, p.stop * new // old, p.names) for p in parts)
        fitted.append(replace(mod, shape=shape, parts=parts))
        changed = True
    return replace(table, modules=tuple(fitted)) if changed else table


def _widest_input_dtype(indexes: Iterable[LoraIndex]) -> torch.dtype:
    """Widest floating dtype among the inputs' LoRA tensors (0-dim alphas ignored); fp16+bf16 → fp32."""
    from ..io.dtypes import ST_TO_TORCH

    seen: set[torch.dtype] = set()
    for idx in indexes:
        shapes = idx.source.shapes()
        for k, st in idx.source.dtypes().items():
            dt = ST_TO_TORCH.get(st)
            if dt is not None and dt.is_floating_point and len(shapes[k]) > 0:
                seen.add(dt)
    if torch.float64 in seen:
        return torch.float64
    if not seen or torch.float32 in seen or {torch.float16, torch.bfloat16} <= seen:
        return torch.float32
    if torch.bfloat16 in seen:
        return torch.bfloat16
    if torch.float16 in seen:
        return torch.float16
    return torch.float32  # fp8 inputs: write float32


def _resolve_dtype(dtype: str | torch.dtype | None, indexes: Sequence[LoraIndex]) -> torch.dtype:
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() in ("keep", "auto", "")):
        return _widest_input_dtype(indexes)
    dt = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
    if dt not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise PlanError(f"--dtype {dtype_name(dt)}: LoRA factors are written as fp16, bf16, fp32 or fp64.")
    return dt


def _check_format(fmt: str | None, arch: str) -> str:
    if fmt is None:
        return DEFAULT_FORMAT[arch]
    f = fmt.strip().lower()
    if f not in FORMATS:
        raise PlanError(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS)}.")
    return f


def _check_output(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    """The writer's output checks, done before any work (nothing is computed for a refused output)."""
    for inp in inputs:
        try:
            same = out.exists() and inp.exists() and out.samefile(inp)
        except OSError:
            same = False
        if same or out.resolve() == inp.resolve():
            raise OutputError(f"the output would overwrite the input {inp}. lorasurgery never writes over its "
                              "own inputs, even with --overwrite; choose another output path.", out)
    if out.is_dir():
        raise OutputError("the output path is a folder; give a file name ending in .safetensors.", out)
    if out.exists() and not overwrite:
        raise OutputError("the output file already exists. Pass --overwrite to replace it, or choose another "
                          "output path.", out)
    if not out.parent.is_dir():
        raise OutputError(f"the output folder {out.parent} does not exist; create it first.", out)


def default_output(op: str, paths: Sequence[Path], *, rank: RankRule | None = None, fmt: str | None = None,
                   folder: Path | None = None) -> Path:
    """Default output name in the current folder (or ``folder``) when ``-o`` is not given.

    merge: ``<first stem>-merged.safetensors``; subtract: ``<B stem>-minus-<A stem>.safetensors``;
    resize: ``<stem>-r<N>.safetensors`` (``<stem>-<method><param>.safetensors`` for dynamic rules);
    convert: ``<stem>-<format>.safetensors``.
    """
    stems = [title_of(p) for p in paths]
    if op == "merge":
        name = f"{stems[0]}-merged"
    elif op == "subtract":
        name = f"{stems[0]}-minus-{stems[1]}"
    elif op == "resize":
        assert rank is not None
        name = f"{stems[0]}-r{rank.rank}" if rank.method == "fixed" else f"{stems[0]}-{rank.method}{rank.param:g}"
    elif op == "convert":
        name = f"{stems[0]}-{fmt}"
    else:
        raise ValueError(op)
    return (folder or Path.cwd()) / f"{name}.safetensors"


@dataclass
class _Input:
    """One opened input with its weight and resolved block weights."""

    path: Path
    weight: float
    index: LoraIndex
    blocks: BlockWeights | None
    role: str
    loaded: int = 0  # bytes read since the mapping was last released
    hashing: threading.Thread | None = None  # computes the inputs' sha256 while the modules are computed

    def load(self, m: LoraModule) -> deltas.Delta:
        d = self.index.load(m)
        src = self.index.source
        self.loaded += sum(src.info(k).nbytes for k in m.keys.values())
        if self.loaded >= RELEASE_BYTES:
            src.close()  # returned tensors stay valid; the next get() re-opens the file
            self.loaded = 0
        return d

    def provenance(self) -> dict[str, Any]:
        if self.hashing is not None:
            self.hashing.join()
        return {"path": str(self.path), "sha256": self.index.source.sha256(), "size": self.path.stat().st_size
                if self.path.is_file() else self.index.source.total_bytes, "role": self.role, "weight": self.weight}


def _as_weighted(x: WeightedInput | str | Path | tuple) -> WeightedInput:
    if isinstance(x, WeightedInput):
        return x
    if isinstance(x, tuple):
        path, weight, *rest = x
        return WeightedInput(Path(path), float(weight), rest[0] if rest else None)
    if isinstance(x, Path):
        return WeightedInput(x)
    return parse_weighted(str(x))


def _open_inputs(inputs: Sequence[WeightedInput], *, roles: Sequence[str], blocks: Any,
                 what: str = "LoRA") -> tuple[list[_Input], ModelTable]:
    """Open every input, check they share an architecture, fit the table, resolve block weights."""
    opened: list[LoraIndex] = []
    try:
        for wi in inputs:
            if not isinstance(wi.weight, (int, float)) or not math.isfinite(float(wi.weight)):
                raise PlanError(f"input {wi.path}: weight must be a finite number, got {wi.weight!r}.")
            opened.append(open_lora(wi.path, what=what))
        first = opened[0]
        for idx in opened[1:]:
            if idx.arch != first.arch:
                raise PlanError(f"the inputs are for different architectures: {first.path.name} is {first.arch}, "
                                f"{idx.path.name} is {idx.arch}. LoRAs can only be combined with LoRAs of the same "
                                "model family.")
        table = _pick_table(opened)
        table = _fit_table(table, opened)
        mods = {m.key: m for m in table.modules}
        depth = table.config.get("depth") if table.arch == "sd3" else None
        result = []
        for i, (wi, idx) in enumerate(zip(inputs, opened)):
            spec = wi.blocks if wi.blocks is not None else blocks
            bw = None
            if spec is not None and not (isinstance(spec, str) and not spec.strip()):
                present = {mods[m.target.module].block for m in idx.modules}
                source = "--blocks" if wi.blocks is None else f"block weights of {wi.path.name}"
                if isinstance(spec, BlockWeights):
                    spec.check_present(present, source)
                    bw = spec
                else:
                    bw = parse_block_spec(spec, arch=table.arch, depth=depth if isinstance(depth, int) else None,
                                          present_blocks=present, seed=i, source=source)
            result.append(_Input(Path(wi.path), float(wi.weight), idx, bw, roles[i]))
        hashing = _hash_in_background([r.index for r in result])
        for r in result:
            r.hashing = hashing
        return result, table
    except BaseException:
        for idx in opened:
            idx.close()
        raise


def _hash_in_background(indexes: Sequence[LoraIndex]) -> threading.Thread:
    """Compute each input's SHA-256 (cached by its source; needed for the provenance metadata) in a helper
    thread, so that reading and hashing the files overlaps with the computation. A failure is ignored here:
    :meth:`_Input.provenance` computes the hash again and reports it."""
    def run() -> None:
        for idx in indexes:
            try:
                idx.source.sha256()
            except Exception:
                return

    t = threading.Thread(target=run, name="lorasurgery-hash-inputs", daemon=True)
    t.start()
    return t


def _pick_table(opened: Sequence[LoraIndex]) -> ModelTable:
    """The first input's table if it holds every input's targets, else another input's table that does."""
    wanted = {m.target.module for idx in opened for m in idx.modules}
    for idx in opened:
        keys = {m.key for m in idx.table.modules}
        if wanted <= keys:
            return idx.table
    return opened[0].table


def _close(inputs: Sequence[_Input]) -> None:
    for inp in inputs:
        inp.index.close()


# --------------------------------------------------------------------------------------------------
# per-module kernels
# --------------------------------------------------------------------------------------------------


@dataclass
class _Contribution:
    input: int
    module: LoraModule
    factor: float  # user weight × block weight


@dataclass
class _Term:
    """One low-rank contribution ``cb·ca · up @ down`` (factors as stored, any dtype; 2-D views)."""

    up: torch.Tensor  # (rows, r)
    down: torch.Tensor  # (r, in·kh·kw)
    cb: float = 1.0
    ca: float = 1.0


@dataclass
class _Unit:
    """One output target with what contributes to it.

    ``terms`` are the low-rank contributions restricted to the unit's rows; ``dense`` the other
    contributions, each with the target it addresses (the unit's own target, or for differently addressed
    inputs a range of the whole module).
    """

    target: Target
    rows: tuple[int, int]  # rows of the module's (Linear-orientation) weight
    terms: list[_Term]
    dense: list[tuple[Target, deltas.Delta]]
    contribs: list[tuple[int, Target, deltas.Delta]]

    @property
    def rank_in(self) -> int | None:
        ranks = [d.rank for _, _, d in self.contribs if d.rank is not None]
        return sum(ranks) if ranks else None


def _is_lowrank(d: deltas.Delta) -> bool:
    return isinstance(d, deltas.LowRank) and d.dora_scale is None


def _term(d: deltas.LowRank, balance: bool) -> _Term:
    """``d`` (weight and scale c = multiplier·alpha/rank) as a term: √|c| on each factor when ``balance``
    (``math.md`` §3; keeps fp16 factor magnitudes alike), else c on ``down`` (inputs of a truncation: the
    float32 stack is scaled where it is contiguous, see :func:`_stack`). Tucker mids are folded."""
    c = float(d.multiplier) * d.scale
    if d.mid is not None:
        b = deltas.concat_lowrank([d])  # folds the mid, balanced, scale 1
        return _Term(b.up.reshape(b.up.shape[0], -1), b.down.reshape(b.rank, -1))
    up, down = d.up.reshape(d.up.shape[0], -1), d.down.reshape(d.down.shape[0], -1)
    if not balance:
        return _Term(up, down, 1.0, c)
    root = math.sqrt(abs(c))
    return _Term(up, down, root, math.copysign(root, c))


def _stack(terms: Sequence[_Term], device: torch.device | str = "cpu", *, long_row_major: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``B = [cb_1·up_1 | …]`` and ``A = [ca_1·down_1; …]`` on ``device``, so ``B @ A = Σ terms``.

    ``B`` is stored column-major by default (``A`` row-major, so ``Aᵀ`` is column-major too): LAPACK's QR
    then works on them without a transposed copy (about twice as fast for tall factors).
    ``long_row_major`` lays the stacks out for :func:`factored_truncation`, which needs a QR of the shorter
    side only: ``B`` is then row-major (the stored ups' own layout, copied without a transpose) when it is
    the longer side, i.e. has at least as many rows as ``A`` has columns.
    """
    rows, cols = terms[0].up.shape[0], terms[0].down.shape[1]
    R = sum(t.up.shape[1] for t in terms)
    if long_row_major and rows >= cols:
        B = torch.empty(rows, R, dtype=torch.float32, device=device)
    else:
        B = torch.empty(R, rows, dtype=torch.float32, device=device).mT
    A = torch.empty(R, cols, dtype=torch.float32, device=device)
    off = 0
    for t in terms:
        r = t.up.shape[1]
        up = t.up
        if B.stride(0) == 1 and up.dtype != B.dtype:
            # up is transposed in its own dtype, then converted: torch's same-dtype transposing copy is
            # blocked, a converting one is not (5× slower for a 10240-row fp16 up)
            up = up.mT.contiguous().mT
        for dst, src, c in ((B[:, off:off + r], up, t.cb), (A[off:off + r], t.down, t.ca)):
            dst.copy_(src)
            if c != 1.0:
                dst.mul_(c)
        off += r
    return B, A


def _module_units(mod: ModuleSpec, contribs: Sequence[tuple[int, Target, deltas.Delta]], fmt: str, *,
                  by_format: bool = False, balance: bool = True) -> tuple[str, bool, list[_Unit]]:
    """Group one module's (scaled) contributions into output units; returns (form, mixed, units).

    ``mixed``: the inputs address the module differently. Without ``by_format``, inputs that all address
    the module the same way keep their targets (``"aligned"``). Otherwise, and always with ``by_format``
    (SVD truncations, so that every *written* module is the optimal truncation of its own ΔW), a module
    with parts becomes one whole unit (``"fused"``) when the output format names the whole module, else
    one unit per part (``"split"``). ``balance`` splits each contribution's scale √|c| between its factors
    (concat outputs); otherwise the scale goes on ``down`` (inputs of an SVD).
    """
    by_input: dict[int, set[Target]] = defaultdict(set)
    for i, t, _ in contribs:
        by_input[i].add(t)
    target_sets = {frozenset(s) for s in by_input.values()}
    mixed = len(target_sets) > 1
    if not mixed and not (by_format and mod.parts):
        units = []
        for t in sorted(next(iter(target_sets)), key=lambda t: t.id):
            mine = [(i, tt, d) for i, tt, d in contribs if tt == t]
            terms = [_term(d, balance) for _, _, d in mine if _is_lowrank(d)]
            dense = [(tt, d) for _, tt, d in mine if not _is_lowrank(d)]
            out = int(mine[0][2].out_features)
            units.append(_Unit(t, (0, out), terms, dense, mine))
        return "aligned", mixed, units
    # bring every contribution to row-placed pieces of the whole module (exact)
    out = int(mod.shape[0])
    pieces: list[Piece] = []
    for _, t, d in contribs:
        if _is_lowrank(d):
            tm = _term(d, balance)
            bal = deltas.LowRank(up=tm.up.to(torch.float32) * tm.cb, down=tm.down.to(torch.float32) * tm.ca)
            pieces.extend(pieces_of(mod, {t: bal})[1])
    dense_all = [(t, d) for _, t, d in contribs if not _is_lowrank(d)]
    scheme = "kohya" if fmt == "kohya" else "diffusers"
    if mod.names.get(scheme) or not mod.parts:
        terms = [_Term(*fuse(out, pieces))] if pieces else []
        return "fused", mixed, [_Unit(Target(mod.key), (0, out), terms, dense_all, list(contribs))]
    units = []
    rows = part_rows(mod, out)
    for p in mod.parts:
        a0, b0 = rows[p.name]
        terms = []
        for pc in pieces:
            lo, hi = max(a0, pc.start), min(b0, pc.stop)
            if lo >= hi:
                continue
            blk = torch.zeros(b0 - a0, pc.up.shape[1], dtype=torch.float32)
            blk[lo - a0:hi - a0] = pc.up[lo - pc.start:hi - pc.start]
            terms.append(_Term(blk, pc.down))
        touching = [(i, t, d) for i, t, d in contribs if _covers(mod, t, p.name)]
        dense = [(t, d) for _, t, d in touching if not _is_lowrank(d)]
        if terms or dense:
            units.append(_Unit(Target(mod.key, (p.name,)), (a0, b0), terms, dense, touching))
    return "split", mixed, units


def _covers(mod: ModuleSpec, t: Target, part: str) -> bool:
    if not t.parts:
        return True
    names = [p.name for p in mod.parts]
    return names.index(t.parts[0]) <= names.index(part) <= names.index(t.parts[-1])


def _unit_dense(mod: ModuleSpec, unit: _Unit, in_flat: int) -> torch.Tensor:
    """Float32 ΔW of a unit as a ``(rows, in·kh·kw)`` matrix (low-rank pieces and dense contributions)."""
    a0, b0 = unit.rows
    total = torch.zeros(b0 - a0, in_flat, dtype=torch.float32)
    if unit.terms:
        B, A = _stack(unit.terms)
        total += B @ A
    for t, d in unit.dense:
        if t == unit.target:
            total += d.dense((b0 - a0, in_flat))
            continue
        # a differently addressed contribution: it covers a row range of the whole module
        start, stop = target_rows(mod, t, int(mod.shape[0]))
        lo, hi = max(a0, start), min(b0, stop)
        if lo < hi:
            full = d.dense((stop - start, in_flat))
            total[lo - a0:hi - a0] += full[lo - start:hi - start]
    return total


def _shape_lowrank(mod: ModuleSpec, up: torch.Tensor, down: torch.Tensor, rank: int) -> deltas.LowRank:
    """A scale-1 LowRank in the module's dimensionality (4-D factors for convolutions)."""
    up = up.contiguous()
    down = down.contiguous()
    if len(mod.shape) == 4 and not mod.transposed:
        up = up.reshape(up.shape[0], rank, 1, 1)
        down = down.reshape(rank, int(mod.shape[1]), int(mod.shape[2]), int(mod.shape[3]))
    return deltas.LowRank(up=up, down=down, alpha=float(rank))


def _is_conv(mod: ModuleSpec) -> bool:
    return len(mod.shape) == 4 and not mod.transposed and tuple(mod.shape[2:]) != (1, 1)


def _householder(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Householder QR of ``X`` (m, R) without forming Q: (reflectors, tau, R factor (min(m, R), R))."""
    a, tau = torch.geqrf(X)
    return a, tau, a[: tau.shape[0]].triu()


def _apply_q(a: torch.Tensor, tau: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Q[:, :p] @ Y`` for the implicit Q of :func:`_householder` (``Y`` is (p, k))."""
    m, p = a.shape[0], tau.shape[0]
    if p < m:
        Y = torch.cat([Y, Y.new_zeros(m - p, Y.shape[1])], 0)
    return torch.ormqr(a, tau, Y)


def _gram(X: torch.Tensor) -> torch.Tensor:
    """``X Xᵀ`` in float64 for a float32 ``X`` (p, L), p small.

    Products of float32 values are exact in float64, so the Gram matrix carries float64 rounding only (a
    float64 Gram method, ``math.md`` §6.1 and §10). It is built from ``_GRAM_BLOCK``-row blocks of its upper
    triangle and mirrored, three quarters of the work of one full product for p = 256.
    """
    Xd = X.double()
    p, nb = Xd.shape[0], _GRAM_BLOCK
    if p <= nb:
        return Xd @ Xd.mT
    G = Xd.new_empty(p, p)
    for i in range(0, p, nb):
        blk = Xd[i:i + nb] @ Xd[i:].mT
        G[i:i + nb, i:] = blk
        G[i + nb:, i:i + nb] = blk[:, nb:].mT
    return G


def factored_truncation(B: torch.Tensor, A: torch.Tensor, method: str, param: float, max_rank: int | None
                        ) -> tuple[torch.Tensor, torch.Tensor, int, float] | None:
    """Optimal truncation of ``B @ A`` from its factors (``math.md`` §5): (up, down, rank, retained).

    The shorter side gets a Householder QR (``Aᵀ = Q_a R_a`` when ``B`` has at least as many rows as ``A``
    has columns, else ``B = Q_b R_b``) and the longer side only its float64 Gram matrix (:func:`_gram`), about
    half the cost of a second QR. For a tall ΔW, ``ΔW = B R_aᵀ Q_aᵀ``, so the right singular vectors are
    ``Q_a e_i`` with ``e_i`` the eigenvectors of the small float64 ``H = R_a (BᵀB) R_aᵀ`` (eigenvalues σ_i²;
    ``trace H = ‖ΔW‖_F²``); a wide ΔW is the mirror image with ``H = R_b (AAᵀ) R_bᵀ``. Only the kept vectors
    are formed: ``V_k = Q_a E_k`` from the reflectors, and the other side as ``U_k = ΔW V_k / σ`` (two thin
    GEMMs), so the result is exactly ΔW projected on the kept singular subspace (lossless at full rank). The
    rank rule sees the whole spectrum with the exact totals. When the smallest kept σ is below
    ``_ONE_SIDED``·σ_1 (a rank beyond the numerical rank), the division by σ would amplify rounding, and the
    module is computed by :func:`_two_sided_truncation` instead. Signs are canonicalised on the kept vectors
    and Σ is split √Σ into both factors. Returns None when ΔW is zero. ``B`` and ``A`` are float32 on the
    compute device (any layout; :func:`_stack` with ``long_row_major`` makes the cheapest one), as are the
    results. Raises :class:`InputError` for non-finite factors.
    """
    tall = B.shape[0] >= A.shape[1]
    a, tau, R = _householder(A.mT if tall else B)
    G = _gram(B.mT if tall else A)
    R = R.double()
    H = (R @ G @ R.mT).cpu()
    energy = float(H.diagonal().sum())
    if not math.isfinite(energy):  # float32 factors cannot overflow a float64 Gram matrix: a NaN or Inf
        raise InputError("non-finite factors")
    lam, E = torch.linalg.eigh(H)
    S = lam.flip(0).clamp_min(0).sqrt()
    k = select_rank(S, method, param, max_rank=max_rank, total_energy=energy, total_nuclear=float(S.sum()),
                    complete=True)
    if k == 0:
        return None
    if not float(S[k - 1]) > _ONE_SIDED * float(S[0]):
        return _two_sided_truncation(B, A, method, param, max_rank)
    dev, dt = B.device, torch.float32
    Y = _apply_q(a, tau, E[:, -k:].flip(1).to(dev, dt))
    sk = S[:k].to(dev)
    # ΔW·v/σ as B·((A·v)/σ): the division runs on the small (R, k) product, not on the long side
    if tall:
        V = Y
        U = B @ ((A @ V).double() / sk).to(dt)
    else:
        U = Y
        V = A.mT @ ((B.mT @ U).double() / sk).to(dt)
    U, Vh = canonicalize_signs(U, V.mT)
    up, down = truncate(U, sk.to(dt), Vh, k)
    return up, down, k, retained_fraction(S, k, energy)


def _two_sided_truncation(B: torch.Tensor, A: torch.Tensor, method: str, param: float, max_rank: int | None
                          ) -> tuple[torch.Tensor, torch.Tensor, int, float] | None:
    """:func:`factored_truncation` for ranks beyond the numerical rank: both singular bases orthonormal.

    Householder QR of ``B`` and ``Aᵀ``, decomposition of the small core ``C = R_b R_aᵀ`` (:func:`_core_svd`,
    float64 on the CPU), and ``U_k = Q_b U_c[:, :k]``, ``V_k = Q_a V_c[:, :k]`` both applied from the
    reflectors, so no division by a near-zero σ.
    """
    ab, tb, Rb = _householder(B)
    aa, ta, Ra = _householder(A.mT)
    C = (Rb.double() @ Ra.double().mT).cpu()
    S, Uc, Vc, energy = _core_svd(C)
    k = select_rank(S, method, param, max_rank=max_rank, total_energy=energy, total_nuclear=float(S.sum()),
                    complete=True)
    if k == 0:
        return None
    dev, dt = B.device, B.dtype
    U = _apply_q(ab, tb, Uc(k).to(dev, dt))
    Vh = _apply_q(aa, ta, Vc(k).to(dev, dt)).mT
    U, Vh = canonicalize_signs(U, Vh)
    up, down = truncate(U, S[:k].to(dev, dt), Vh, k)
    return up, down, k, retained_fraction(S, k, energy)


def _core_svd(C: torch.Tensor):
    """Singular values and top-k singular vectors of the small float64 core (p1, p2).

    Eigen-decomposition of the smaller Gram matrix (``CᵀC`` or ``CCᵀ``, float64; ``math.md`` §6.1 allows
    Gram methods in float64), about twice as fast as an SVD of the core. The other side's vectors are
    ``C v_i / σ_i``, so that the truncation ``Σ_{i≤k} σ_i u_i v_iᵀ = C·V_k V_kᵀ`` is exactly C projected on
    the top-k eigenvectors (lossless at full rank, whatever the rounding of tiny σ_i). Returns
    ``(S, U(k), V(k), ‖C‖_F²)`` with S non-increasing and ``U(k)``/``V(k)`` giving (p1, k)/(p2, k) vectors.
    Raises :class:`InputError` when C is not finite.
    """
    energy = float((C * C).sum())
    if not math.isfinite(energy):  # float32 factors cannot overflow a float64 ‖C‖², so C has a NaN or Inf
        raise InputError("non-finite factors")
    right = C.shape[1] <= C.shape[0]
    G = C.mT @ C if right else C @ C.mT
    lam, E = torch.linalg.eigh(G)
    lam, E = lam.flip(0), E.flip(1)
    S = lam.clamp_min(0).sqrt()
    inv = torch.where(S > 0, 1.0 / S, torch.zeros_like(S))

    def known(k: int) -> torch.Tensor:
        return E[:, :k]

    def other(k: int) -> torch.Tensor:
        return ((C @ E[:, :k]) if right else (C.mT @ E[:, :k])) * inv[:k]

    return (S, other, known, energy) if right else (S, known, other, energy)


def _truncate(mod: ModuleSpec, unit: _Unit, in_flat: int, rule: RankRule, *, device: torch.device,
              svd_mode: str, seed: int, notes: dict[str, list[str]], inputs: Sequence[_Input]
              ) -> tuple[deltas.LowRank | None, int, float, str]:
    """Optimal truncation of a unit: (LowRank or None when empty, rank, retained fraction, method)."""
    rows = unit.rows[1] - unit.rows[0]
    cap = min(rows, in_flat)
    method, param, max_rank = rule.for_unit(_is_conv(mod))
    if max_rank is not None and max_rank > cap:
        notes["capped"].append(f"{unit.target.id} ({cap})")
        max_rank = cap
        if method == "fixed":
            param = float(cap)
    try:
        if not unit.dense:
            B, A = _stack(unit.terms, device, long_row_major=True)
            res = factored_truncation(B, A, method, param, max_rank)
            if res is None:
                return None, 0, 1.0, "factored svd"
            up, down, k, retained = res
            how = "factored svd"
        else:
            M = _unit_dense(mod, unit, in_flat).to(device)
            svd, k = svd_for_rank(M, method, param, max_rank=max_rank, svd=svd_mode, seed=seed, key=unit.target.id)
            del M
            how = f"dense svd ({svd.method})"
            if k == 0 or float(svd.S[0]) <= _SIGMA_ZERO:
                return None, 0, 1.0, how
            up, down = svd.truncate(k)
            retained = svd.retained_fraction(k)
    except InputError:
        raise _nonfinite(unit, inputs) from None
    return _shape_lowrank(mod, up.to("cpu", torch.float32), down.to("cpu", torch.float32), k), k, retained, how


def _nonfinite(unit: _Unit, inputs: Sequence[_Input]) -> InputError:
    names = ", ".join(sorted({inputs[i].path.name for i, _, _ in unit.contribs}))
    return InputError(f"module {unit.target.id}: an input LoRA ({names}) holds NaN or Inf values in this module, "
                      "so no result can be computed. Nothing was written.")


def _check_finite(d: deltas.Delta, unit: _Unit, inputs: Sequence[_Input]) -> None:
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in d.tensors().values()):
        raise _nonfinite(unit, inputs)


# --------------------------------------------------------------------------------------------------
# the combining engine (merge, subtract and resize share it)
# --------------------------------------------------------------------------------------------------


def _plan_contributions(inputs: Sequence[_Input], table: ModelTable, op: str
                        ) -> tuple[dict[str, list[_Contribution]], int]:
    mods = {m.key: m for m in table.modules}
    refused = []
    for inp in inputs:
        for m in inp.index.modules:
            why = _w_dependent(m)
            if why:
                refused.append(f"{m.name} ({why}) in {inp.path.name}")
    if refused:
        shown = "; ".join(refused[:10]) + (f" … and {len(refused) - 10} more" if len(refused) > 10 else "")
        raise PlanError(
            f"{len(refused)} modules change the weight in a way that depends on the base weight (DoRA, (IA)³, "
            f"GLoRA, OFT/BOFT), so they cannot be {op}d into a LoRA without a base checkpoint: {shown}. Bake "
            "them into the base instead (`lorasurgery merge LORA:W ... --base CHECKPOINT`), and re-extract a "
            "LoRA from the result if you need one (`lorasurgery extract`).")
    groups: dict[str, list[_Contribution]] = defaultdict(list)
    zero = 0
    for i, inp in enumerate(inputs):
        for m in inp.index.modules:
            mod = mods[m.target.module]
            c = inp.weight * (inp.blocks.weight(mod.block) if inp.blocks is not None else 1.0)
            if c == 0.0:
                zero += 1
                continue
            groups[mod.key].append(_Contribution(i, m, c))
    return dict(sorted(groups.items())), zero


@dataclass
class _ModuleResult:
    items: list[tuple[Target, deltas.Delta]]
    rows: list[UnitRow]
    notes: dict[str, list[str]]


def _module_job(mod: ModuleSpec, loaded: list[tuple[int, Target, deltas.Delta]], inputs: Sequence[_Input], *,
                method: str, rule: RankRule | None, fmt: str, device: torch.device, svd_mode: str, seed: int
                ) -> _ModuleResult:
    """Every output unit of one module (pure computation on already loaded deltas; thread-safe)."""
    res = _ModuleResult([], [], defaultdict(list))
    algos = "+".join(sorted({d.algo for _, _, d in loaded}))
    form, mixed, units = _module_units(mod, loaded, fmt, by_format=method == "svd", balance=method == "concat")
    if mixed:
        res.notes["readdressed"].append(f"{mod.key} ({form})")
    for unit in units:
        sources = {i for i, _, _ in unit.contribs}
        first = unit.contribs[0][2]
        in_flat = int(first.in_features) if first.in_features is not None else int(math.prod(mod.shape[1:]))
        if method == "concat":
            d, how, r_out = _concat_unit(mod, unit, form, in_flat)
            retained = 1.0
        else:
            assert rule is not None
            if any(isinstance(d, deltas.Norm) for _, d in unit.dense):
                raise PlanError(f"module {unit.target.id}: norm deltas (w_norm/b_norm) are not matrices and "
                                "cannot be truncated; use --method concat.")
            d, r_out, retained, how = _truncate(mod, unit, in_flat, rule, device=device, svd_mode=svd_mode,
                                                seed=seed, notes=res.notes, inputs=inputs)
        if d is None:
            res.rows.append(UnitRow(unit.target.id, mod.block, algos, len(sources), unit.rank_in, None, None, how,
                                    "empty (all singular values zero): left out"))
            res.notes["empty"].append(unit.target.id)
            continue
        if how != "factored svd":  # the factored path checked its core: orthonormal bases times finite σ
            _check_finite(d, unit, inputs)
        res.items.append((unit.target, d))
        res.rows.append(UnitRow(unit.target.id, mod.block, algos, len(sources), unit.rank_in, r_out, retained, how,
                                f"addressed differently by the inputs ({form})" if mixed else ""))
    return res


def release_freed_memory() -> None:
    """Return freed heap memory to the OS before the output is assembled (glibc ``malloc_trim``).

    Decomposing hundreds of modules leaves freed blocks in the allocator's arenas (one per worker thread);
    trimming them keeps the peak resident size near live data. A no-op where glibc is not the allocator.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_workers(device: torch.device) -> int:
    """Modules computed in parallel: one per CPU core for CPU SVDs, one for CUDA (the GPU is one queue)."""
    if device.type == "cuda":
        return 1
    return max(1, min(os.cpu_count() or 1, 16))


def _combine(inputs: Sequence[_Input], table: ModelTable, *, op: str, method: str, rule: RankRule | None,
             fmt: str, device: torch.device, svd_mode: str, seed: int, progress: Progress | None,
             workers: int | None = None) -> tuple[dict[Target, deltas.Delta], list[UnitRow], list[str]]:
    """Compute every output module; returns (items, rows, notes).

    Tensors are read in the calling thread, one module at a time; with ``workers`` > 1 (SVD methods) the
    modules are decomposed by a pool of threads, at most ``workers + 1`` modules in flight, and the results
    are collected in module order. CPU decompositions always run with one intra-op thread, so the output
    does not depend on the number of workers or cores.
    """
    mods = {m.key: m for m in table.modules}
    groups, zero = _plan_contributions(inputs, table, op)
    n_workers = (workers if workers is not None else default_workers(device)) if method == "svd" else 1
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise PlanError(f"workers must be a whole number of at least 1, got {workers!r}.")
    kwargs = dict(method=method, rule=rule, fmt=fmt, device=device, svd_mode=svd_mode, seed=seed)
    items: dict[Target, deltas.Delta] = {}
    rows: list[UnitRow] = []
    notes: dict[str, list[str]] = defaultdict(list)
    total = len(groups)
    done = 0

    def collect(result: _ModuleResult) -> None:
        nonlocal done
        items.update(result.items)
        rows.extend(result.rows)
        for k, v in result.notes.items():
            notes[k].extend(v)
        done += 1
        if progress is not None:
            progress(done, total, "")

    def jobs() -> Iterator[tuple[ModuleSpec, list]]:
        nonlocal zero, done
        for key, contribs in groups.items():
            loaded = []
            for c in contribs:
                d = inputs[c.input].load(c.module).scaled(c.factor)
                if _is_lowrank(d) and d.scale == 0.0:
                    zero += 1  # alpha 0: loaders apply nothing
                    continue
                loaded.append((c.input, c.module.target, d))
            if loaded:
                yield mods[key], loaded
            else:
                done += 1

    if progress is not None:
        progress(0, total, "")
    # one intra-op thread per call while modules run in parallel threads: small QRs and eigen-
    # decompositions gain little from intra-op threads and lose a lot when several compete for the cores
    with ops_threads(1 if method == "svd" and device.type == "cpu" else None):
        if n_workers == 1:
            for mod, loaded in jobs():
                collect(_module_job(mod, loaded, inputs, **kwargs))
        else:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="lorasurgery") as pool:
                pending: deque = deque()
                try:
                    for mod, loaded in jobs():
                        pending.append(pool.submit(_module_job, mod, loaded, inputs, **kwargs))
                        while len(pending) > n_workers:
                            collect(pending.popleft().result())
                    while pending:
                        collect(pending.popleft().result())
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise
    out_notes = []
    if zero:
        out_notes.append(f"{zero} input modules have weight × block weight 0 and were left out.")
    if notes["capped"]:
        c = notes["capped"]
        out_notes.append(f"the requested rank exceeds what {len(c)} modules allow (min(out, in·kh·kw)); they were "
                         f"capped: {', '.join(c[:5])}{' …' if len(c) > 5 else ''}.")
    if notes["empty"]:
        e = notes["empty"]
        out_notes.append(f"{len(e)} modules came out empty (ΔW = 0) and were left out: "
                         f"{', '.join(e[:5])}{' …' if len(e) > 5 else ''}.")
    if notes["readdressed"]:
        r = notes["readdressed"]
        out_notes.append(f"{len(r)} modules were addressed differently by the inputs (fused vs split names) and "
                         f"were combined exactly in one form: {', '.join(r[:3])}{' …' if len(r) > 3 else ''}.")
    if not items:
        raise PlanError("nothing to write: every module of the result is empty (weights 0, or the inputs cancel "
                        "exactly).")
    return items, rows, out_notes


def _concat_unit(mod: ModuleSpec, unit: _Unit, form: str, in_flat: int
                 ) -> tuple[deltas.Delta, str, int | None]:
    """Exact combination of one unit: rank concatenation, pass-through, or a dense diff."""
    if not unit.dense:
        up, down = _stack(unit.terms)
        rank = int(down.shape[0])
        return _shape_lowrank(mod, up, down, rank), "concat", rank
    if len(unit.dense) == 1 and not unit.terms and form == "aligned":
        d = unit.dense[0][1]
        return d, "pass-through (scaled)", None
    if any(isinstance(d, deltas.Norm) for _, d in unit.dense):
        raise PlanError(f"module {unit.target.id}: norm deltas (w_norm/b_norm) can only be passed through, not "
                        "combined with other changes of the same module.")
    dense = _unit_dense(mod, unit, in_flat)
    if len(mod.shape) == 4 and not mod.transposed:
        dense = dense.reshape(dense.shape[0], *mod.shape[1:])
    bias = None
    for _, d in unit.dense:
        b = d.dense_bias()
        if b is not None:
            bias = b if bias is None else bias + b
    return deltas.Full(diff=dense, diff_b=bias), "dense diff (exact)", None


# --------------------------------------------------------------------------------------------------
# public operations
# --------------------------------------------------------------------------------------------------


def _rule(rank: int | None, rank_method: str | None, rank_param: float | None, conv_rank: int | None
          ) -> RankRule | None:
    if rank is None and rank_method in (None, "fixed") and rank_param is None and conv_rank is None:
        return None
    return RankRule(method=rank_method or "fixed", param=rank_param, rank=rank, conv_rank=conv_rank)


def merge_loras(inputs: Sequence[WeightedInput | str | Path | tuple], out: str | Path | None = None, *,
                method: str = "auto", rank: int | None = None, rank_method: str | None = None,
                rank_param: float | None = None, conv_rank: int | None = None, blocks: Any = None,
                fmt: str | None = None, dtype: str | torch.dtype | None = None, device: str = "auto",
                svd: str = "auto", seed: int = 0, overwrite: bool = False, drop_unsupported: bool = False,
                workers: int | None = None, progress: Progress | None = None, _op: str = "merge",
                _roles: Sequence[str] | None = None) -> AlgebraReport:
    """Merge LoRAs into one LoRA: ``Σ w_i · w_b,i · ΔW_i`` per module (no base checkpoint).

    Args:
        inputs: LoRAs with weights: :class:`WeightedInput`, ``"path[:weight[:blocks]]"`` strings, paths
            (weight 1) or ``(path, weight[, blocks])`` tuples. Weights may be negative.
        out: output file; default ``<first stem>-merged.safetensors`` in the current folder.
        method: ``concat`` (exact, ranks add up), ``svd`` (optimal truncation to ``rank`` or a rank rule) or
            ``auto`` (``svd`` when a rank option is given, else ``concat``).
        rank, rank_method, rank_param, conv_rank: the truncation for ``svd`` (:class:`RankRule`).
        blocks: block-weight spec applied to every input without its own (``path:weight:SPEC``) spec.
        fmt: ``kohya`` or ``peft`` (default per architecture, :data:`~lorasurgery.ops.output.DEFAULT_FORMAT`).
        dtype: output dtype (``fp16``, ``bf16``, ``fp32``); default: the inputs' widest dtype.
        device: where SVDs run (``auto``, ``cpu``, ``cuda[:N]``).
        svd: dense SVD back-end for LoHa/LoKr/full inputs (``auto``, ``exact``, ``randomized``).
        seed: seed of the randomized SVD (dense inputs only).
        drop_unsupported: leave out modules the output format cannot name (reported) instead of failing.
        workers: modules decomposed in parallel (svd; default: one per CPU core, 1 on CUDA).
        progress: ``progress(done, total, key)`` callback over modules.

    Raises:
        PlanError / InputError / OutputError: before anything is written (architectures differ, a
        checkpoint given as a LoRA, W-dependent modules, bad ranks, output exists, ...).
    """
    t0 = time.perf_counter()
    if not inputs:
        raise PlanError("no input LoRAs were given; merge needs at least one PATH[:WEIGHT].")
    winputs = [_as_weighted(x) for x in inputs]
    if method not in ("auto", "concat", "svd"):
        raise PlanError(f"unknown merge method {method!r}: use concat or svd.")
    rule = _rule(rank, rank_method, rank_param, conv_rank)
    if method == "auto":
        method = "svd" if rule is not None else "concat"
    if method == "concat" and rule is not None:
        raise PlanError("--rank, --conv-rank, --rank-method and --rank-param truncate the result and only apply to "
                        "--method svd; the concat merge is exact and keeps every rank.")
    if method == "svd" and rule is None:
        raise PlanError("--method svd needs a target rank: --rank N, or --rank-method sv_fro|sv_ratio|sv_cumulative "
                        "with --rank-param X.")
    if svd not in ("auto", "exact", "randomized"):
        raise PlanError(f"unknown SVD back-end {svd!r}: use auto, exact or randomized.")
    dev = resolve_device(device)
    roles = list(_roles) if _roles is not None else ["lora"] * len(winputs)
    opened, table = _open_inputs(winputs, roles=roles, blocks=blocks)
    try:
        fmt_ = _check_format(fmt, table.arch)
        out_path = Path(out) if out is not None else default_output(_op, [w.path for w in winputs])
        _check_output(out_path, overwrite, [w.path for w in winputs])
        out_dtype = _resolve_dtype(dtype, [i.index for i in opened])
        items, rows, notes = _combine(opened, table, op=_op, method=method, rule=rule, fmt=fmt_, device=dev,
                                      svd_mode=svd, seed=seed, progress=progress, workers=workers)
        prov = [i.provenance() for i in opened]
        release_freed_memory()
        options = {"op": _op, "method": method, "format": fmt_, "dtype": dtype_name(out_dtype),
                   "inputs": [{"path": i.path.name, "weight": i.weight,
                               "blocks": i.blocks.spec if i.blocks is not None else None} for i in opened]}
        if rule is not None:
            options["rank"] = rule.as_dict()
            options["svd"] = svd
        titles = [title_of(i.path, i.index.metadata) for i in opened]
        written = write_lora(out_path, items, table, fmt_, dtype=out_dtype, inputs=prov, options=options,
                             seed=seed if method == "svd" else None, device=str(dev),
                             svd=svd if method == "svd" else None, overwrite=overwrite,
                             drop_unsupported=drop_unsupported, merged_from=titles)
    finally:
        _close(opened)
    return _report(_op, written, table.arch, fmt_, out_dtype, method, opened, rows, notes, t0)


def _report(op: str, written: LoraOutput, arch: str, fmt: str, dtype: torch.dtype, method: str,
            inputs: Sequence[_Input], rows: list[UnitRow], notes: list[str], t0: float,
            source_format: str | None = None) -> AlgebraReport:
    if written.dropped:
        notes = notes + [f"{len(written.dropped)} modules have no name in the {fmt} format and were dropped: "
                         f"{', '.join(written.dropped[:5])}{' …' if len(written.dropped) > 5 else ''}."]
    return AlgebraReport(
        op=op, output=written.path, arch=arch, format=fmt, dtype=dtype_name(dtype), method=method,
        inputs=[{"path": str(i.path), "weight": i.weight, "role": i.role,
                 "blocks": i.blocks.spec if i.blocks is not None else None} for i in inputs],
        rows=rows, notes=notes, dropped=list(written.dropped), modules=written.modules, tensors=written.tensors,
        bytes=written.bytes, model_hash=written.model_hash, seconds=time.perf_counter() - t0,
        source_format=source_format)


def subtract(b: WeightedInput | str | Path, a: WeightedInput | str | Path, out: str | Path | None = None, *,
             rank: int | None = None, rank_method: str | None = None, rank_param: float | None = None,
             conv_rank: int | None = None, blocks: Any = None, fmt: str | None = None,
             dtype: str | torch.dtype | None = None, device: str = "auto", svd: str = "auto", seed: int = 0,
             overwrite: bool = False, drop_unsupported: bool = False, workers: int | None = None,
             progress: Progress | None = None) -> AlgebraReport:
    """The difference LoRA ``ΔB − ΔA`` (``math.md`` §4).

    Exact rank concatenation with A's contribution negated (ranks add up), or, with a rank option, the
    optimal truncation of the difference. Modules in only one input are kept with their sign. Inputs may
    carry weights and block specs (``B.safetensors:1:OUTD``): the result is ``w_B·ΔB − w_A·ΔA``.
    Default output: ``<B stem>-minus-<A stem>.safetensors``.
    """
    wb, wa = _as_weighted(b), _as_weighted(a)
    wa = WeightedInput(wa.path, -wa.weight, wa.blocks)
    return merge_loras([wb, wa], out, method="auto", rank=rank, rank_method=rank_method, rank_param=rank_param,
                       conv_rank=conv_rank, blocks=blocks, fmt=fmt, dtype=dtype, device=device, svd=svd, seed=seed,
                       overwrite=overwrite, drop_unsupported=drop_unsupported, workers=workers, progress=progress,
                       _op="subtract", _roles=["minuend", "subtrahend"])


def _input_format(idx: LoraIndex) -> str:
    kf = idx.key_format or ""
    if kf in ("peft", "peft-raw"):
        return "peft"
    if kf in ("kohya", "kohya-dp"):
        return "kohya"
    return DEFAULT_FORMAT[idx.arch or "sd1"]


def resize(lora: str | Path, out: str | Path | None = None, *, rank: int | None = None,
           rank_method: str | None = None, rank_param: float | None = None, conv_rank: int | None = None,
           fmt: str | None = None, dtype: str | torch.dtype | None = None, device: str = "auto",
           svd: str = "auto", seed: int = 0, overwrite: bool = False, drop_unsupported: bool = False,
           workers: int | None = None, progress: Progress | None = None) -> AlgebraReport:
    """Change the rank of a LoRA: the optimal truncation of every module (``math.md`` §5, §7).

    Low-rank modules are truncated from their factors (no dense ΔW); LoHa, LoKr and full modules are
    densified and truncated (they become plain LoRA pairs). ``rank`` alone is a fixed rank; a dynamic
    ``rank_method`` (``sv_ratio``, ``sv_fro``, ``sv_cumulative``) with ``rank_param`` picks the minimal rank
    per module, with ``rank`` as an optional cap. ``conv_rank`` applies to convolutions with a kernel
    larger than 1x1. Modules that already have a lower rank keep their rank (re-factored, lossless). The
    input metadata is kept; ``ss_network_dim``/``ss_network_alpha`` are rewritten from the new tensors
    (``Dynamic`` when ranks vary) and the hashes recomputed. The output keeps the input's key convention
    (kohya or PEFT) unless ``fmt`` is given. Default output: ``<stem>-r<N>.safetensors``.
    """
    t0 = time.perf_counter()
    rule = _rule(rank, rank_method, rank_param, conv_rank)
    if rule is None:
        raise PlanError("resize needs a target: --rank N, or --rank-method sv_ratio|sv_fro|sv_cumulative with "
                        "--rank-param X (and optionally --rank as a cap).")
    if svd not in ("auto", "exact", "randomized"):
        raise PlanError(f"unknown SVD back-end {svd!r}: use auto, exact or randomized.")
    dev = resolve_device(device)
    path = Path(lora)
    opened, table = _open_inputs([WeightedInput(path)], roles=["lora"], blocks=None)
    try:
        idx = opened[0].index
        fmt_ = _check_format(fmt, table.arch) if fmt is not None else _input_format(idx)
        out_path = Path(out) if out is not None else default_output("resize", [path], rank=rule)
        _check_output(out_path, overwrite, [path])
        out_dtype = _resolve_dtype(dtype, [idx])
        items, rows, notes = _combine(opened, table, op="resize", method="svd", rule=rule, fmt=fmt_, device=dev,
                                      svd_mode=svd, seed=seed, progress=progress, workers=workers)
        old = sorted({r.rank_in for r in rows if r.rank_in is not None})
        old_s = str(old[0]) if len(old) == 1 else (f"{old[0]}-{old[-1]}" if old else "?")
        comment = f"resized by lorasurgery from rank {old_s} to {rule.describe()}"
        release_freed_memory()
        options = {"op": "resize", "rank": rule.as_dict(), "format": fmt_, "dtype": dtype_name(out_dtype), "svd": svd}
        written = write_lora(out_path, items, table, fmt_, dtype=out_dtype, inputs=[opened[0].provenance()],
                             options=options, seed=seed, device=str(dev), svd=svd, overwrite=overwrite,
                             drop_unsupported=drop_unsupported, base_metadata=idx.metadata,
                             training_comment=comment)
        source_format = idx.key_format
    finally:
        _close(opened)
    return _report("resize", written, table.arch, fmt_, out_dtype, "svd", opened, rows, notes, t0, source_format)


def convert(lora: str | Path, out: str | Path | None = None, *, to: str, drop_unsupported: bool = False,
            dtype: str | torch.dtype | None = None, overwrite: bool = False) -> AlgebraReport:
    """Write a LoRA in another key convention with exactly the same ΔW per module.

    ``to`` is ``kohya`` or ``peft``. Inputs may be in any convention lorasurgery reads (kohya, diffusers/PEFT,
    legacy diffusers, ComfyUI/BFL, XLabs, OneTrainer, LyCORIS wrapper); every input key must be interpreted
    (else :class:`InputError` listing the keys). Fusing and splitting of q/k/v (FLUX, SD3, OpenCLIP), the
    adaLN half swap and the alpha rules are those of :func:`lorasurgery.formats.write.lora_tensors`; PEFT
    output folds each module's scale into its factors. Modules the target format cannot name fail the run
    unless ``drop_unsupported`` (then they are listed). The input metadata is kept (hashes recomputed).
    Default output: ``<stem>-<format>.safetensors``; default dtype: the input's.
    """
    t0 = time.perf_counter()
    if to is None:
        raise PlanError("convert needs --to kohya or --to peft.")
    path = Path(lora)
    opened, table = _open_inputs([WeightedInput(path)], roles=["lora"], blocks=None)
    try:
        idx = opened[0].index
        fmt_ = _check_format(to, table.arch)
        out_path = Path(out) if out is not None else default_output("convert", [path], fmt=fmt_)
        _check_output(out_path, overwrite, [path])
        out_dtype = _resolve_dtype(dtype, [idx])
        items: dict[Target, deltas.Delta] = {}
        rows = []
        mods = {m.key: m for m in table.modules}
        for m in idx.modules:
            d = opened[0].load(m)
            items[m.target] = d
            mod = mods[m.target.module]
            rows.append(UnitRow(m.target.id, mod.block, d.algo, 1, d.rank, d.rank, 1.0, "convert",
                                f"from {m.name}"))
        options = {"op": "convert", "format": fmt_, "dtype": dtype_name(out_dtype),
                   "drop_unsupported": bool(drop_unsupported)}
        written = write_lora(out_path, items, table, fmt_, dtype=out_dtype, inputs=[opened[0].provenance()],
                             options=options, device="cpu", overwrite=overwrite, drop_unsupported=drop_unsupported,
                             base_metadata=idx.metadata)
        source_format = idx.key_format
    finally:
        _close(opened)
    return _report("convert", written, table.arch, fmt_, out_dtype, "convert", opened, rows, [], t0, source_format)
