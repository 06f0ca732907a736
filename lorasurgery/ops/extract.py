"""Extract a LoRA from two checkpoints: ΔW = tuned − base per module, truncated SVD, written as a LoRA.

``extract(base, tuned, out)`` opens both checkpoints (any architecture, any layout; the two may be in
different layouts, e.g. an LDM base and a diffusers-layout fine-tune), compares them tensor by tensor in
the architecture's *reference* layout (:meth:`~lorasurgery.model.Model.get_ref`) and writes a LoRA that
reproduces the difference of every module a LoRA can carry. :func:`plan_extract` does the same planning
from the headers alone (nothing is read) and is what ``--dry-run``-like callers use.

Which modules are extracted (the modules kohya's LoRA network would create, like kohya's
``extract_lora_from_models``):

* always: the default LoRA targets (``ModuleSpec.group == "attn"``): every Linear and 1x1 conv inside the
  SD/SDXL attention transformers, the text encoders' attention and MLP projections, every Linear of the
  FLUX double/single blocks and SD3 joint blocks. Fused weights (FLUX ``qkv``/``linear1``, SD3 ``qkv``,
  OpenCLIP ``in_proj_weight``) are extracted whole; the writer fuses (kohya) or splits (PEFT) them.
* with ``conv_rank``: kohya's LoCon targets too (``group == "locon"``: resnet 3x3 convs and down/upsamplers
  at ``conv_rank``; ``time_emb_proj`` and 1x1 ``conv_shortcut`` at ``rank``), as kohya's ``conv_dim`` does.
* with ``include_extra`` (library only): the remaining targetable weights (``conv_in``/``conv_out``, time
  and label embeddings, FLUX/SD3 top-level layers, ``text_projection``).
* ``text_encoder=False`` leaves every text-encoder module out.

Every other tensor both files hold (norms, biases, embeddings, VAE, the modules left out above) is read
too, and its difference is reported with its size (max |Δ| and Frobenius norm): a LoRA cannot carry it.

Per module (``math.md`` §6-§8): both tensors are upcast to float32 and subtracted, convs flattened to
``(out, in·kh·kw)``; a module whose max |ΔW| is at most ``min_diff`` is skipped (per module, never for a
whole text encoder at once); the SVD back-end is ``exact`` (thin ``torch.linalg.svd``), ``randomized``
(seeded per module, q = max(2k, k + 10) sketch columns, 2 power iterations: measured at most +0.13 %
error over the optimal truncation on FLUX-width modules with slowly decaying spectra, +0.87 % with one,
+0.02 % with three; see ``tests/benchmarks/bench_extract.py``) or ``auto``
(:func:`~lorasurgery.linalg.choose_svd`: randomized while 2q < min(out, in), and always exact for
``sv_cumulative``, which needs the whole spectrum); the rank rule (``fixed``, ``sv_ratio``, ``sv_fro``,
``sv_cumulative``) is applied with the true ‖ΔW‖F and capped by ``rank`` (``conv_rank`` for 3x3 convs)
and by min(out, in·kh·kw) (reported). The singular values go into up (kohya's convention; ``split="sqrt"``
balances them), alpha = rank (scale 1; the kohya writer folds per-module scales so one alpha serves all).
``clamp_quantile`` clamps the factors at that quantile of their values (kohya's option).

On CUDA, same-shaped matrices are decomposed together (one batched SVD or one batched randomized SVD)
while a reader thread loads the next tensors on its own CUDA stream; on the CPU the reader thread forms
the next ΔW while the current one is decomposed. Both inputs are memory-mapped and read one tensor at a
time; the mappings are released every few hundred MB, so memory stays bounded by a few module-sized
buffers whatever the model size (tensors that are only compared are measured in 1M-element chunks). The
inputs' SHA-256 (for the provenance metadata) is computed by one background thread per input while the
extraction runs.

Same inputs, options and seed on the same device type and library versions give a byte-identical file.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..arch.base import ModelTable, ModuleSpec
from ..blocks import BlockWeights, parse_block_spec
from ..delta import LowRank
from ..errors import InputError, OutputError, PlanError
from ..formats.names import Target
from ..formats.write import FORMATS, has_name
from ..io.dtypes import dtype_name, parse_dtype
from ..io.metadata import title_of
from ..linalg import (
    CUDA_SVD_DRIVER,
    RANK_METHODS,
    SVD,
    canonicalize_signs,
    choose_svd,
    clamp_quantile,
    default_sketch_size,
    derive_seed,
    resolve_device,
)
from ..model import Model, open_model
from .output import DEFAULT_EXTRACT_DTYPE, DEFAULT_FORMAT, LoraOutput, write_lora

__all__ = [
    "ExtractOptions",
    "ExtractPlan",
    "ExtractReport",
    "ModuleJob",
    "ModuleResult",
    "OtherDiff",
    "Skip",
    "default_output",
    "extract",
    "plan_extract",
]

SVD_MODES = ("auto", "exact", "randomized")
SPLITS = ("up", "sqrt")
OUTPUT_DTYPES = ("fp16", "bf16", "fp32")

#: Progress callback: ``progress(stage, done, total)`` with stage ``"modules"`` or ``"tensors"``.
Progress = Callable[[str, int, int], None]

# Release the memory maps after this many bytes read, so file-backed pages do not accumulate in RSS.
_RELEASE_BYTES = 512 << 20
# Prefetch depth of the reader thread (modules read ahead of the one being decomposed).
_PREFETCH = 2
# Most matrices per batched GPU decomposition.
_MAX_BATCH = 16
# Elements per chunk when measuring the difference of a tensor that is not extracted (CPU).
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractOptions:
    """Options of :func:`extract` (the CLI's options, plus a few library-only ones).

    Attributes:
        rank: rank of linear and 1x1-conv modules (``fixed``), or their cap (dynamic rules).
        conv_rank: rank (cap) of 3x3 convs; given, kohya's LoCon targets are extracted too.
        rank_method: ``fixed``, ``sv_ratio``, ``sv_fro`` or ``sv_cumulative`` (``math.md`` §7).
        rank_param: the dynamic rule's parameter (ratio > 1; fraction in (0, 1]).
        svd: ``auto``, ``exact`` or ``randomized``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: output dtype ``fp16``/``bf16``/``fp32``; None = the architecture's default.
        text_encoder: extract text-encoder modules too.
        min_diff: skip a module whose max |ΔW| is at most this.
        clamp_quantile: clamp the factors at this quantile of their values (kohya: 0.99); None = off.
        format: ``kohya`` or ``peft``; None = the architecture's default.
        blocks: block-weight spec (``blocks.md``): modules in a block at 0 are skipped, others scaled.
        seed: seed of the randomized SVD (per module via :func:`~lorasurgery.linalg.derive_seed`).
        overwrite: replace an existing output file.
        split: where the singular values go: ``up`` (kohya) or ``sqrt`` (balanced).
        include_extra: also extract targetable weights no LoRA trainer creates by default.
        power_iters: power iterations of the randomized SVD (2: within 0.5 % of the optimal truncation
            error on realistic spectra at a third less work than linalg's default of 4).
    """

    rank: int = 32
    conv_rank: int | None = None
    rank_method: str = "fixed"
    rank_param: float | None = None
    svd: str = "auto"
    device: str = "auto"
    dtype: str | None = None
    text_encoder: bool = True
    min_diff: float = 0.0
    clamp_quantile: float | None = None
    format: str | None = None
    blocks: str | None = None
    seed: int = 0
    overwrite: bool = False
    split: str = "up"
    include_extra: bool = False
    power_iters: int = 2

    def __post_init__(self) -> None:
        def bad(msg: str) -> PlanError:
            return PlanError(msg)

        for name in ("rank", "conv_rank"):
            v = getattr(self, name)
            if v is None and name == "conv_rank":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if self.rank_method not in RANK_METHODS:
            raise bad(f"unknown --rank-method {self.rank_method!r}: use one of {', '.join(RANK_METHODS)}")
        if self.rank_method == "fixed":
            if self.rank_param is not None:
                raise bad("--rank-param only applies to the dynamic rank methods (sv_ratio, sv_fro, sv_cumulative); "
                          "with --rank-method fixed the rank is --rank")
        else:
            p = self.rank_param
            if p is None:
                example = {"sv_ratio": "10", "sv_fro": "0.9", "sv_cumulative": "0.9"}[self.rank_method]
                raise bad(f"--rank-method {self.rank_method} needs --rank-param (e.g. --rank-param {example}); "
                          "--rank is then the cap")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(float(p)):
                raise bad(f"--rank-param must be a finite number, got {p!r}")
            if self.rank_method == "sv_ratio" and not p > 1:
                raise bad(f"sv_ratio keeps singular values above sigma_1 / ratio, so --rank-param must be > 1 "
                          f"(e.g. 2-20), got {p!r}")
            if self.rank_method in ("sv_fro", "sv_cumulative") and not 0 < p <= 1:
                raise bad(f"{self.rank_method} takes a fraction in (0, 1] (e.g. 0.9), got --rank-param {p!r}")
        if self.svd not in SVD_MODES:
            raise bad(f"unknown --svd {self.svd!r}: use one of {', '.join(SVD_MODES)}")
        if self.rank_method == "sv_cumulative" and self.svd == "randomized":
            raise bad("rank rule sv_cumulative needs the whole spectrum (the nuclear norm): use --svd exact or "
                      "auto, not randomized")
        if self.dtype is not None:
            dt = parse_dtype(self.dtype) if isinstance(self.dtype, str) else self.dtype
            if dt not in (torch.float16, torch.bfloat16, torch.float32):
                raise bad(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)} for a LoRA, got {self.dtype!r}")
        if not isinstance(self.min_diff, (int, float)) or isinstance(self.min_diff, bool) or \
                not math.isfinite(float(self.min_diff)) or self.min_diff < 0:
            raise bad(f"--min-diff must be a finite number >= 0, got {self.min_diff!r}")
        q = self.clamp_quantile
        if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.5 < float(q) <= 1):
            raise bad(f"--clamp-quantile must be in (0.5, 1] (kohya uses 0.99), got {q!r}")
        if self.format is not None and self.format not in FORMATS:
            raise bad(f"unknown --format {self.format!r}: use one of {', '.join(FORMATS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad(f"--seed must be an integer, got {self.seed!r}")
        if self.split not in SPLITS:
            raise bad(f"unknown factor split {self.split!r}: use one of {', '.join(SPLITS)}")
        if isinstance(self.power_iters, bool) or not isinstance(self.power_iters, int) or self.power_iters < 1:
            raise bad(f"power_iters must be an integer >= 1, got {self.power_iters!r}")

    def metadata(self, fmt: str, dtype: torch.dtype, blocks: BlockWeights | None) -> dict[str, Any]:
        """The resolved options as written into ``lorasurgery.recipe`` (no paths, no device)."""
        return {
            "operation": "extract", "rank": self.rank, "conv_rank": self.conv_rank,
            "rank_method": self.rank_method, "rank_param": self.rank_param, "svd": self.svd,
            "dtype": dtype_name(dtype), "text_encoder": self.text_encoder, "min_diff": float(self.min_diff),
            "clamp_quantile": self.clamp_quantile, "format": fmt,
            "blocks": blocks.spec if blocks is not None else None, "seed": self.seed, "split": self.split,
            "include_extra": self.include_extra, "power_iters": self.power_iters,
        }


def _options(options: Mapping[str, Any]) -> ExtractOptions:
    known = {f.name for f in fields(ExtractOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PlanError(f"unknown extract option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return ExtractOptions(**options)


# ----------------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleJob:
    """One module to extract."""

    key: str  # module id (reference-layout weight key)
    name: str  # kohya module name (display), else the key
    component: str
    block: str | None
    kind: str  # "linear", "conv1x1", "conv"
    shape: tuple[int, ...]  # reference tensor shape
    m: int  # rows of the matrix decomposed (out features)
    n: int  # columns (in · kh · kw)
    transposed: bool  # the reference tensor stores the Linear weight transposed
    cap: int  # the user's rank (cap) for this module: rank or conv_rank
    k: int  # min(cap, m, n): most triplets the module can use
    svd: str  # "exact" or "randomized"
    weight: float  # block weight (1 without --blocks)


@dataclass(frozen=True)
class Skip:
    """A module that was not extracted, and why (with the size of its difference when it was read)."""

    key: str
    name: str
    component: str
    reason: str
    max_abs: float | None = None
    norm: float | None = None


@dataclass(frozen=True)
class OtherDiff:
    """The difference of a tensor no LoRA in the output carries."""

    key: str
    category: str  # "norm", "bias", "embedding", "vae", "module not extracted", "other"
    shape: tuple[int, ...]
    max_abs: float
    norm: float


@dataclass
class ExtractPlan:
    """What :func:`extract` will do, derived from the two headers alone."""

    base: Path
    tuned: Path
    arch: str
    base_layout: str
    tuned_layout: str
    table: ModelTable
    out: Path
    format: str
    dtype: torch.dtype
    device: torch.device
    options: ExtractOptions
    jobs: list[ModuleJob]
    skipped: list[Skip]  # modules left out by the options (read only to report their difference)
    compare: list[tuple[str, str]]  # (reference key, category) read only to report their difference
    only_in_base: list[str]
    only_in_tuned: list[str]
    notes: list[str]
    batches: list[list[int]]  # job indices, in the order they are read and decomposed
    block_weights: BlockWeights | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": str(self.base), "tuned": str(self.tuned), "arch": self.arch,
            "base_layout": self.base_layout, "tuned_layout": self.tuned_layout, "out": str(self.out),
            "format": self.format, "dtype": dtype_name(self.dtype), "device": str(self.device),
            "modules": [{"key": j.key, "name": j.name, "shape": list(j.shape), "rank_cap": j.k, "svd": j.svd,
                         "weight": j.weight} for j in self.jobs],
            "skipped": [{"key": s.key, "name": s.name, "reason": s.reason} for s in self.skipped],
            "compared_tensors": len(self.compare), "only_in_base": self.only_in_base,
            "only_in_tuned": self.only_in_tuned, "notes": self.notes,
            "batches": [len(b) for b in self.batches],
        }


def default_output(tuned: str | Path, rank: int) -> Path:
    """``<tuned stem>-lora-r<rank>.safetensors`` in the current folder."""
    return Path.cwd() / f"{title_of(tuned)}-lora-r{rank}.safetensors"


def _category(key: str, biases: set[str]) -> str:
    low = key.lower()
    if key in biases:
        return "bias"
    if "first_stage_model." in low or low.startswith("vae."):
        return "vae"
    if "norm" in low or ".ln_" in low or "ln_final" in low or low.endswith((".ln.weight", ".ln.bias")):
        return "norm"
    if "emb" in low or "position" in low or "token" in low or "pos_embed" in low:
        return "embedding"
    if low.endswith(".bias"):
        return "bias"
    return "other"


def _module_reason(mod: ModuleSpec, opts: ExtractOptions, fmt: str, bw: BlockWeights | None) -> str | None:
    if mod.component.startswith("te") and not opts.text_encoder:
        return "text encoder left out (--no-text-encoder)"
    if mod.group == "extra" and not opts.include_extra:
        return "not a default LoRA target (no trainer creates a LoRA module here)"
    if mod.group == "locon" and opts.conv_rank is None:
        return "LoCon target (resnet/sampler layer): extracted only with --conv-rank"
    if mod.kind == "conv" and opts.conv_rank is None:
        return "3x3 conv: extracted only with --conv-rank"
    if not has_name(mod, fmt):
        return f"the {fmt} format has no name for this module (no loader of that format would read it)"
    if bw is not None and bw.weight(mod.block) == 0:
        return f"block {mod.block or 'OTHER'} has weight 0 (--blocks)"
    return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _plan(bm: Model, tm: Model, out: str | Path | None, opts: ExtractOptions) -> ExtractPlan:
    base, tuned = bm.path, tm.path
    if _same_file(base, tuned):
        raise InputError(f"base and tuned are the same file ({base}): there is no difference to extract. "
                         "Pass the checkpoint the fine-tune started from as BASE and the fine-tune as TUNED.", base)
    if bm.arch != tm.arch:
        raise PlanError(f"{base} is a {bm.arch} checkpoint ({bm.layout} layout) but {tuned} is a {tm.arch} "
                        f"checkpoint ({tm.layout} layout): both must be the same architecture (the fine-tune and "
                        "the model it was trained from).")
    table = bm.table
    bkeys, tkeys = bm.ref_keys(), set(tm.ref_keys())
    common = [k for k in bkeys if k in tkeys]
    mismatched = [(k, bm.ref_shape(k), tm.ref_shape(k)) for k in common if bm.ref_shape(k) != tm.ref_shape(k)]
    if mismatched:
        listed = "; ".join(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched[:5])
        raise PlanError(f"{base} and {tuned} are both {bm.arch} checkpoints but of different shapes "
                        f"({len(mismatched)} tensors differ in shape, e.g. {listed}): they are different models "
                        "(e.g. another variant, an inpainting model or a pruned file), so a LoRA cannot describe "
                        "their difference.")
    if not common:
        raise PlanError(f"{base} ({bm.layout} layout) and {tuned} ({tm.layout} layout) have no tensor in common.")
    only_b = [k for k in bkeys if k not in tkeys]
    bset = set(bkeys)
    only_t = [k for k in tm.ref_keys() if k not in bset]

    fmt = opts.format or DEFAULT_FORMAT[bm.arch]
    dtype = (parse_dtype(opts.dtype) if isinstance(opts.dtype, str) else opts.dtype) if opts.dtype is not None \
        else DEFAULT_EXTRACT_DTYPE[bm.arch]
    device = resolve_device(opts.device)
    bw = None
    if opts.blocks:
        depth = table.config.get("depth") if bm.arch == "sd3" else None
        bw = parse_block_spec(opts.blocks, arch=bm.arch, depth=depth, seed=opts.seed)

    common_set = set(common)
    module_keys = {m.key for m in table.modules}
    biases = {m.bias for m in table.modules if m.bias}
    jobs: list[ModuleJob] = []
    skipped: list[Skip] = []
    compare: list[tuple[str, str]] = []
    capped: dict[tuple[int, int], list[str]] = {}
    for mod in table.modules:
        if mod.key not in common_set:
            continue  # absent from one or both files: listed in only_in_base / only_in_tuned
        name = mod.names.get("kohya") or mod.key
        reason = _module_reason(mod, opts, fmt, bw)
        if reason is None:
            for m_, who in ((bm, base), (tm, tuned)):
                dt = m_.ref_dtype(mod.key)
                if not dt.is_floating_point or dt.itemsize == 1:
                    raise PlanError(f"{who}: {mod.key} is stored as {dt}; extraction needs float16, bfloat16, "
                                    "float32 or float64 weights (dequantise fp8/int checkpoints first).")
        if reason is not None:
            skipped.append(Skip(mod.key, name, mod.component, reason))
            compare.append((mod.key, "module not extracted"))
            continue
        shape = tuple(bm.ref_shape(mod.key))
        if mod.transposed:
            m, n = shape[1], shape[0]
        else:
            m, n = shape[0], math.prod(shape[1:])
        cap = opts.conv_rank if mod.kind == "conv" else opts.rank
        assert cap is not None
        k = min(cap, m, n)
        if cap > min(m, n):
            capped.setdefault((cap, min(m, n)), []).append(name)
        method = "exact" if opts.rank_method == "sv_cumulative" else choose_svd((m, n), k, opts.svd, device)
        weight = bw.weight(mod.block) if bw is not None else 1.0
        jobs.append(ModuleJob(mod.key, name, mod.component, mod.block, mod.kind, shape, m, n, mod.transposed,
                              cap, k, method, weight))
    if bw is not None:
        bw.check_present({j.block for j in jobs})
    for key in common:
        if key not in module_keys:
            compare.append((key, _category(key, biases)))
    notes = []
    for (cap, allowed), names in sorted(capped.items()):
        notes.append(f"rank {cap} is more than {len(names)} module(s) allow (min(out, in·kh·kw) = {allowed}): "
                     f"capped at {allowed} ({', '.join(names[:3])}{' …' if len(names) > 3 else ''})")
    if only_b:
        notes.append(f"{len(only_b)} tensors are only in the base (e.g. {only_b[0]}); they are ignored")
    if only_t:
        notes.append(f"{len(only_t)} tensors are only in the tuned checkpoint (e.g. {only_t[0]}); they are ignored")
    out_path = Path(out) if out is not None else default_output(tuned, opts.rank)
    if any(_same_file(out_path, f) for f in [base, tuned, *bm.source.files, *tm.source.files]):
        raise OutputError(f"the output {out_path} is one of the inputs; choose another -o path "
                          "(inputs are never modified)", out_path)
    if out_path.exists() and not opts.overwrite:
        raise OutputError(f"{out_path} exists; pass --overwrite to replace it or choose another -o path", out_path)
    if out_path.is_dir():
        raise OutputError(f"{out_path} is a folder; -o takes the output file's path", out_path)
    return ExtractPlan(base, tuned, bm.arch, bm.layout, tm.layout, table, out_path, fmt, dtype, device, opts, jobs,
                       skipped, compare, only_b, only_t, notes, _batches(jobs, device), bw)


def _batches(jobs: Sequence[ModuleJob], device: torch.device, budget: int = 1 << 27) -> list[list[int]]:
    """Deterministic decomposition batches: one job each on the CPU; on CUDA same-shaped jobs together.

    Jobs of equal (m, n, svd, k) are grouped in plan order into batches of at most ``_MAX_BATCH`` matrices
    and ``budget`` float32 elements; a batch is emitted when full, the rest in order of their first job.
    """
    if device.type != "cuda":
        return [[i] for i in range(len(jobs))]
    out: list[list[int]] = []
    open_: dict[tuple, list[int]] = {}
    first: dict[tuple, int] = {}
    for i, j in enumerate(jobs):
        sig = (j.m, j.n, j.svd, j.k)
        cur = open_.setdefault(sig, [])
        first.setdefault(sig, i)
        cur.append(i)
        if len(cur) >= _MAX_BATCH or (len(cur) + 1) * j.m * j.n > budget:
            out.append(cur)
            open_[sig] = []
            first.pop(sig)
    rest = sorted((first[s], b) for s, b in open_.items() if b)
    out.extend(b for _, b in rest)
    return out


def plan_extract(base: str | Path, tuned: str | Path, out: str | Path | None = None, **options: Any) -> ExtractPlan:
    """Plan an extraction from the two headers alone: which modules, ranks caps, SVD back-ends, skips.

    Raises the same plan-time errors as :func:`extract` (architectures, shapes, options, output path)
    without reading any tensor data.
    """
    opts = _options(options)
    with open_model(base, role="base checkpoint") as bm, open_model(tuned, role="tuned checkpoint") as tm:
        return _plan(bm, tm, out, opts)


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleResult:
    """One extracted module."""

    key: str
    name: str
    component: str
    block: str | None
    shape: tuple[int, ...]
    rank: int
    cap: int  # min(user cap, out, in·kh·kw)
    svd: str  # "exact" or "randomized" (what ran)
    driver: str
    retained: float  # ‖ΔW_r‖² / ‖ΔW‖² of the stored factors (after clamping, if any)
    max_abs: float  # max |ΔW|
    norm: float  # ‖ΔW‖F
    weight: float


@dataclass
class ExtractReport:
    """What :func:`extract` did."""

    plan: ExtractPlan
    modules: list[ModuleResult]
    skipped: list[Skip]
    other_diffs: list[OtherDiff]
    identical_tensors: int  # tensors compared (not extracted) that are bit-identical
    seconds: float
    output: LoraOutput
    hashes: dict[str, str] = field(default_factory=dict)
    # wall seconds: "read" (reader thread forming ΔW and comparing tensors), "decompose" (SVDs, rank rules,
    # factors), "wait" (decomposition waiting for the reader), "hash_wait" (waiting for the SHA-256 after
    # the last module), "write" (the output file)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.output.path

    @property
    def mean_retained(self) -> float:
        """Mean over modules of ‖ΔW_r‖²/‖ΔW‖²."""
        return sum(m.retained for m in self.modules) / len(self.modules) if self.modules else float("nan")

    @property
    def ranks(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for m in self.modules:
            out[m.rank] = out.get(m.rank, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[0]))

    def to_dict(self) -> dict[str, Any]:
        p = self.plan

        def f(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else float(x)

        return {
            "output": str(self.output.path), "bytes": self.output.bytes, "sshs_model_hash": self.output.model_hash,
            "arch": p.arch, "base": {"path": str(p.base), "layout": p.base_layout, "sha256": self.hashes.get("base")},
            "tuned": {"path": str(p.tuned), "layout": p.tuned_layout, "sha256": self.hashes.get("tuned")},
            "format": p.format, "dtype": dtype_name(p.dtype), "device": str(p.device),
            "options": p.options.metadata(p.format, p.dtype, p.block_weights),
            "seconds": round(self.seconds, 3), "mean_retained": f(self.mean_retained),
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "modules": [{"key": m.key, "name": m.name, "component": m.component, "block": m.block,
                         "shape": list(m.shape), "rank": m.rank, "cap": m.cap, "svd": m.svd, "driver": m.driver,
                         "retained": f(m.retained), "max_abs": f(m.max_abs), "norm": f(m.norm),
                         "weight": m.weight} for m in self.modules],
            "skipped": [{"key": s.key, "name": s.name, "component": s.component, "reason": s.reason,
                         "max_abs": f(s.max_abs), "norm": f(s.norm)} for s in self.skipped],
            "other_differences": [{"key": o.key, "category": o.category, "shape": list(o.shape),
                                   "max_abs": f(o.max_abs), "norm": f(o.norm)} for o in self.other_diffs],
            "identical_tensors": self.identical_tensors, "notes": list(p.notes), "timings": dict(self.timings),
        }


# ----------------------------------------------------------------------------------------------------
# Reading (reader thread)
# ----------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _max_abs(d: torch.Tensor) -> float:
    """max |d| in one pass without a temporary (NaN if d holds a NaN, inf if it holds an inf)."""
    if d.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(d)
    return max(-float(lo), float(hi)) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


def _nonfinite_error(key: str, what: str, bm: Model, tm: Model, b: torch.Tensor, t: torch.Tensor) -> InputError:
    bad = []
    for model, x in ((bm, b), (tm, t)):
        n = int((~torch.isfinite(x.float())).sum()) if x.is_floating_point() else 0
        if n:
            bad.append((model.path, n, x.numel()))
    if not bad:  # finite inputs whose float32 difference is not finite cannot happen; report the difference
        return InputError(f"the difference of {key} ({what}) is not finite", tm.path)
    path, n, total = bad[0]
    both = " (the other checkpoint too)" if len(bad) == 2 else ""
    return InputError(f"{path}: tensor {key} ({what}) contains NaN or Inf values ({n} of {total}){both}. The "
                      "checkpoint is damaged or was saved after training diverged; nothing can be extracted from it.",
                      path)


def _schedule(plan: ExtractPlan) -> list[tuple[str, int]]:
    """Reading order: the jobs batch by batch, with the compared tensors spread evenly between batches.

    The compared tensors (norms, VAE, modules left out) only need their difference measured; spreading
    them lets the reader do that while the consumer decomposes, instead of after the last module.
    """
    order: list[tuple[str, int]] = []
    n_b, n_c = len(plan.batches), len(plan.compare)
    c = 0
    for b, batch in enumerate(plan.batches):
        order.extend(("job", i) for i in batch)
        upto = (b + 1) * n_c // n_b
        order.extend(("cmp", j) for j in range(c, upto))
        c = upto
    order.extend(("cmp", j) for j in range(c, n_c))
    return order


class _Reader:
    """Loads ΔW of each job (and the stats of each compared tensor) in a thread, a few items ahead."""

    def __init__(self, plan: ExtractPlan, bm: Model, tm: Model):
        self.plan, self.bm, self.tm = plan, bm, tm
        self.device = plan.device
        # On the CPU one ΔW waits while the next is formed (each is a full float32 matrix in host memory);
        # on CUDA the queue holds device tensors and a deeper prefetch hides more of the reading.
        self.q: queue.Queue = queue.Queue(maxsize=_PREFETCH if self.device.type == "cuda" else 1)
        self.stop = threading.Event()
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.read_bytes = 0
        self.busy = 0.0  # seconds spent reading and forming differences
        self.free: queue.Queue = queue.Queue()  # CPU buffers of finished modules, for reuse
        self.thread = threading.Thread(target=self._run, name="lorasurgery-extract-reader", daemon=True)

    def start(self) -> "_Reader":
        self.thread.start()
        return self

    def _put(self, item: tuple) -> None:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def _pair(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = self.bm.get_ref(key), self.tm.get_ref(key)
        self.read_bytes += b.numel() * b.element_size() + t.numel() * t.element_size()
        return b, t

    def _release(self) -> None:
        """Unmap the inputs now and then so their file pages leave the process's RSS."""
        if self.read_bytes >= _RELEASE_BYTES:
            self.bm.source.close()
            self.tm.source.close()
            self.read_bytes = 0

    def _buffer(self, n: int) -> torch.Tensor:
        """A float32 CPU buffer of at least ``n`` elements, reused from finished modules when possible.

        Fresh multi-hundred-MB allocations are page-faulted and zeroed by the kernel; reusing the few
        buffers in flight made forming ΔW about 30 % faster.
        """
        while True:
            try:
                buf = self.free.get_nowait()
            except queue.Empty:
                return torch.empty(n, dtype=torch.float32)
            if buf.numel() >= n:
                return buf

    def recycle(self, buf: torch.Tensor | None) -> None:
        """Give back a buffer the consumer no longer uses (nothing it returned aliases it)."""
        if buf is not None and self.free.qsize() < 3:
            self.free.put(buf)

    def _diff(self, b: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tuned − base in float32 (the base upcast element by element), and the CPU buffer holding it."""
        if b.dtype == torch.float64:  # float64 checkpoints: computed in float32 like every other dtype
            b = b.to(torch.float32)
        if self.device.type == "cuda":
            d = t.to(device=self.device, dtype=torch.float32, copy=True)  # never a view of the input
            return d.sub_(b.to(self.device)), None
        buf = self._buffer(t.numel())
        d = buf[: t.numel()].view(t.shape)
        d.copy_(t)
        return d.sub_(b), buf

    def _job(self, i: int) -> tuple:
        job = self.plan.jobs[i]
        b, t = self._pair(job.key)
        d, buf = self._diff(b, t)
        max_abs = _max_abs(d)
        if not math.isfinite(max_abs):
            raise _nonfinite_error(job.key, f"module {job.name}", self.bm, self.tm, b, t)
        del b, t
        energy = _energy(d) if max_abs > 0 else 0.0
        if job.transposed:
            d = d.T.contiguous()
            self.recycle(buf)
            buf = None
        else:
            d = d.reshape(job.m, job.n)
        return ("job", i, d, max_abs, energy, buf)

    def _compare(self, key: str, category: str) -> tuple:
        """max |Δ| and ‖Δ‖F of a tensor no job extracts; on the CPU in cache-sized chunks."""
        b, t = self._pair(key)
        shape = tuple(b.shape)
        if t.numel() == 0:
            return ("cmp", key, category, shape, 0.0, 0.0)
        if self.device.type == "cuda":
            d, _ = self._diff(b, t)
            max_abs = _max_abs(d)
            if not math.isfinite(max_abs):
                raise _nonfinite_error(key, category, self.bm, self.tm, b, t)
            return ("cmp", key, category, shape, max_abs, math.sqrt(_energy(d)) if max_abs > 0 else 0.0)
        fb, ft = (b.to(torch.float32) if b.dtype == torch.float64 else b).reshape(-1), t.reshape(-1)
        n = ft.numel()
        chunk = torch.empty(min(n, _CHUNK), dtype=torch.float32)
        max_abs, energy = 0.0, 0.0
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            d = chunk[: stop - start]
            d.copy_(ft[start:stop])
            d.sub_(fb[start:stop])
            m = _max_abs(d)
            if not math.isfinite(m):
                raise _nonfinite_error(key, category, self.bm, self.tm, b, t)
            if m > 0:
                max_abs = max(max_abs, m)
                energy += _energy(d)
        return ("cmp", key, category, shape, max_abs, math.sqrt(energy))

    def _run(self) -> None:
        try:
            ctx = torch.cuda.stream(self.stream) if self.stream is not None else _Null()
            with ctx:
                for kind, x in _schedule(self.plan):
                    t0 = time.perf_counter()
                    if kind == "job":
                        item = self._job(x)
                        if self.stream is not None:
                            self.stream.synchronize()
                    else:
                        item = self._compare(*self.plan.compare[x])
                    self.busy += time.perf_counter() - t0
                    self._put(item)
                    self._release()
            self._put(("done",))
        except _Stop:
            return
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            try:
                self._put(("error", exc))
            except _Stop:
                return

    def items(self):
        while True:
            item = self.q.get()
            if item[0] == "error":
                raise item[1]
            if item[0] == "done":
                return
            yield item

    def close(self) -> None:
        self.stop.set()
        while True:
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        self.thread.join()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Hasher:
    """SHA-256 of each input (provenance), one background thread per input, while the extraction runs."""

    def __init__(self, sources: Sequence[Any]):
        self.sources = list(sources)
        self.hashes: list[str | None] = [None] * len(self.sources)
        self.errors: list[BaseException | None] = [None] * len(self.sources)
        self.threads = [threading.Thread(target=self._one, args=(i,), name=f"lorasurgery-extract-hash-{i}",
                                         daemon=True) for i in range(len(self.sources))]

    def _one(self, i: int) -> None:
        try:
            self.hashes[i] = self.sources[i].sha256()
        except BaseException as exc:  # re-raised by result()
            self.errors[i] = exc

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def result(self) -> list[str]:
        for t in self.threads:
            t.join()
        for e in self.errors:
            if e is not None:
                raise e
        return [h for h in self.hashes if h is not None]


# ----------------------------------------------------------------------------------------------------
# Decomposition
# ----------------------------------------------------------------------------------------------------


def _energy(x: torch.Tensor) -> float:
    """||x||_F**2 in one pass: float32 norms of 4096-element runs, squared and summed in float64.

    About 5e-9 relative error on 66M standard-normal values, where one float32 reduction over the whole
    tensor was measured 1 % off; ~10x faster than upcasting chunks to float64.
    """
    f = x.reshape(-1)
    n = f.numel()
    if n == 0:
        return 0.0
    size = 4096
    full = n - n % size
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if full:
        total += torch.linalg.vector_norm(f[:full].view(-1, size), dim=1).double().square().sum()
    if full < n:
        total += torch.linalg.vector_norm(f[full:]).double().square()
    return float(total)


def _thin_svd(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Thin SVD of a matrix or batch, decomposing the tall orientation; no sign fix.

    Wide matrices are decomposed as their transpose (M^T = U S V^T gives M = V S U^T): LAPACK's and
    cuSOLVER's wide paths are several times slower (and cuSOLVER's gesvd needs m >= n). CUDA uses the
    explicit driver of :data:`~lorasurgery.linalg.CUDA_SVD_DRIVER`; a failure there is retried on the CPU,
    a LAPACK failure in float64.
    """
    wide = M.shape[-2] < M.shape[-1]
    A = M.mT if wide else M
    driver = "lapack-gesdd"
    try:
        if A.device.type == "cuda":
            U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver=CUDA_SVD_DRIVER)
            driver = f"cusolver-{CUDA_SVD_DRIVER}"
            if not bool(torch.isfinite(S).all()):
                raise RuntimeError("non-finite singular values")
        else:
            U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        U, S, Vh = torch.linalg.svd(A.cpu().double(), full_matrices=False)
        U, S, Vh = (x.to(device=M.device, dtype=M.dtype) for x in (U, S, Vh))
        driver = "lapack-gesdd-float64"
    if wide:
        U, Vh = Vh.mT, U.mT
    return U, S, Vh, driver


def _exact(mats: Sequence[torch.Tensor], energies: Sequence[float]) -> list[SVD]:
    """Exact thin SVDs (batched when several same-shaped matrices are on CUDA), sign-canonicalised."""
    batched = len(mats) > 1 and mats[0].device.type == "cuda"
    if batched:
        U, S, Vh, driver = _thin_svd(torch.stack(list(mats)))
        driver += "-batched"
    else:
        parts = [_thin_svd(x) for x in mats]
        U = [p[0] for p in parts]
        S = [p[1] for p in parts]
        Vh = [p[2] for p in parts]
        driver = parts[0][3] if parts else ""
    out = []
    for i in range(len(mats)):
        u, vh = canonicalize_signs(U[i], Vh[i])
        s64 = S[i].double()
        drv = driver if batched else parts[i][3]
        # the true energy from the matrix (the sum of sigma^2 differs from it only by rounding)
        out.append(SVD(u.contiguous(), S[i].contiguous(), vh.contiguous(), True, energies[i], float(s64.sum()),
                       "exact", drv))
    return out


def _randomized(mats: Sequence[torch.Tensor], k: int, keys: Sequence[str], energies: Sequence[float], *,
                seed: int, power_iters: int) -> list[SVD]:
    """Randomized top-k SVDs (``math.md`` §6.1) of same-shaped matrices, batched, sign-canonicalised.

    The algorithm and sketch of :func:`~lorasurgery.linalg.svd_randomized`: per module an Omega
    (``n x q``, q = max(2k, k + 10) capped at min(m, n)) drawn on the CPU from ``derive_seed(seed, 0, key)``,
    ``power_iters`` re-orthonormalised power iterations, then the SVD of the small core Q^T M (decomposed
    in its tall orientation). Each result equals ``svd_randomized(M, k, seed=seed, key=key)`` up to
    rounding, on any device and whatever the batch.
    """
    M = torch.stack(list(mats)) if len(mats) > 1 else mats[0].unsqueeze(0)
    b, m, n = M.shape
    k = min(k, m, n)
    q = default_sketch_size(k, m, n)
    omegas = []
    for key in keys:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(derive_seed(seed, 0, key))
        omegas.append(torch.randn(n, q, generator=gen, dtype=torch.float32))
    omega = torch.stack(omegas).to(device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega, mode="reduced").Q
    for _ in range(power_iters):
        Z = torch.linalg.qr(M.mT @ Q, mode="reduced").Q
        Q = torch.linalg.qr(M @ Z, mode="reduced").Q
    Uc, S, Vh, driver = _thin_svd(Q.mT @ M)
    if b > 1:
        driver += "-batched"
    U = Q @ Uc
    U, S, Vh = U[..., :k], S[..., :k], Vh[..., :k, :]
    U, Vh = canonicalize_signs(U, Vh)
    complete = k == min(m, n)
    out = []
    for i in range(b):
        s64 = S[i].double()
        out.append(SVD(U[i].contiguous(), S[i].contiguous(), Vh[i].contiguous(), complete, energies[i],
                       float(s64.sum()) if complete else None, "randomized", driver))
    return out


class _SingleThread:
    """Run small decompositions with one intra-op thread, restoring the setting afterwards.

    For matrices of a few thousand elements the LAPACK/BLAS calls (QR, SVD) take microseconds on one
    thread but can take milliseconds when the thread pool is woken (badly so on a loaded machine): a
    QR of a 32 x 14 matrix was measured at 8 us on one thread and 12 ms on two. Only the speed depends
    on this; the results do not.
    """

    LIMIT = 1 << 18  # elements per batch below which one thread is used

    def __init__(self, elements: int, device: torch.device):
        self.active = device.type == "cpu" and elements <= self.LIMIT
        self.saved = 0

    def __enter__(self) -> None:
        if self.active:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.set_num_threads(self.saved)


def _decompose(jobs: Sequence[ModuleJob], mats: Sequence[torch.Tensor], energies: Sequence[float],
               opts: ExtractOptions) -> list[SVD]:
    """Decompose one batch (same shape and back-end; one matrix on the CPU)."""
    if jobs[0].svd == "exact":
        return _exact(mats, energies)
    return _randomized(mats, jobs[0].k, [j.key for j in jobs], energies, seed=opts.seed,
                       power_iters=opts.power_iters)


def _factors(job: ModuleJob, res: SVD, d: torch.Tensor, opts: ExtractOptions) -> tuple[LowRank, ModuleResult] | None:
    param: float = job.cap if opts.rank_method == "fixed" else float(opts.rank_param)  # type: ignore[arg-type]
    r = res.select_rank(opts.rank_method, param, max_rank=job.cap)  # type: ignore[arg-type]
    if r == 0:
        return None
    up, down = res.truncate(r, split=opts.split)  # type: ignore[arg-type]
    energy = res.total_energy
    if opts.clamp_quantile is not None:
        up, down = clamp_quantile(up, down, float(opts.clamp_quantile), split=opts.split)  # type: ignore[arg-type]
        err = float(torch.linalg.vector_norm(d - up @ down, dtype=torch.float64)) ** 2
        retained = max(0.0, 1.0 - err / energy) if energy > 0 else 1.0
    else:
        retained = res.retained_fraction(r) ** 2
    if job.weight != 1.0:
        up = up * job.weight
    up, down = up.float().cpu(), down.float().cpu()
    if len(job.shape) == 4:
        up = up.reshape(job.m, r, 1, 1)
        down = down.reshape((r,) + tuple(job.shape[1:]))
    delta = LowRank(up=up.contiguous(), down=down.contiguous(), alpha=float(r))
    result = ModuleResult(job.key, job.name, job.component, job.block, job.shape, r, job.k, res.method, res.driver,
                          retained, 0.0, math.sqrt(max(energy, 0.0)), job.weight)
    return delta, result


# ----------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------


def extract(base: str | Path, tuned: str | Path, out: str | Path | None = None, *,
            progress: Progress | None = None, **options: Any) -> ExtractReport:
    """Extract a LoRA holding ``tuned − base`` and write it to ``out``; see the module docstring.

    Args:
        base, tuned: checkpoints (``.safetensors`` file, sharded set or diffusers folder) of one
            architecture; their layouts may differ.
        out: output path; None = ``<tuned stem>-lora-r<rank>.safetensors`` in the current folder.
        progress: optional callback ``progress(stage, done, total)``, stage ``"modules"`` or ``"tensors"``.
        **options: the fields of :class:`ExtractOptions`.

    Returns:
        :class:`ExtractReport` (modules with ranks and retained energy, skipped modules with reasons,
        differences no LoRA carries, timing, the written file).

    Raises:
        InputError: unreadable inputs, a LoRA given as a checkpoint, NaN/Inf weights, identical inputs.
        PlanError: bad options, different architectures or shapes, nothing to extract.
        OutputError: the output exists (without ``overwrite``) or is an input.
    """
    opts = _options(options)
    t0 = time.perf_counter()
    with open_model(base, role="base checkpoint") as bm, open_model(tuned, role="tuned checkpoint") as tm:
        plan = _plan(bm, tm, out, opts)
        hasher = _Hasher([bm.source, tm.source])
        hasher.start()
        items, results, skipped, others, identical, timings = _run(plan, bm, tm, progress)
        _check_something(plan, results, skipped, others)
        _check_cast(items, results, plan)
        t1 = time.perf_counter()
        hashes = hasher.result()
        timings["hash_wait"] = time.perf_counter() - t1
        inputs = [
            {"path": bm.path, "sha256": hashes[0], "size": bm.file_bytes, "role": "base"},
            {"path": tm.path, "sha256": hashes[1], "size": tm.file_bytes, "role": "tuned"},
        ]
        comment = (f"extracted by lorasurgery from {title_of(bm.path)} (base) and {title_of(tm.path)} (tuned): "
                   + (f"rank {opts.rank}" if opts.rank_method == "fixed"
                      else f"{opts.rank_method}={opts.rank_param}, rank cap {opts.rank}")
                   + (f", conv rank {opts.conv_rank}" if opts.conv_rank else ""))
        t2 = time.perf_counter()
        output = write_lora(plan.out, items, plan.table, plan.format, dtype=plan.dtype, inputs=inputs,
                            options=opts.metadata(plan.format, plan.dtype, plan.block_weights), seed=opts.seed,
                            device=str(plan.device), svd=opts.svd, overwrite=opts.overwrite,
                            training_comment=comment)
        timings["write"] = time.perf_counter() - t2
    return ExtractReport(plan, results, skipped, others, identical, time.perf_counter() - t0, output,
                         {"base": hashes[0], "tuned": hashes[1]}, {k: round(v, 3) for k, v in timings.items()})


def _run(plan: ExtractPlan, bm: Model, tm: Model, progress: Progress | None):
    opts = plan.options
    jobs = plan.jobs
    batch_of: dict[int, int] = {i: b for b, batch in enumerate(plan.batches) for i in batch}
    pending: dict[int, list[tuple[int, torch.Tensor, float, float]]] = {}
    remaining = {b: len(batch) for b, batch in enumerate(plan.batches)}
    items: dict[Target, LowRank] = {}
    results: dict[int, ModuleResult] = {}
    skip_by_key = {s.key: s for s in plan.skipped}
    new_skips: dict[int, Skip] = {}
    stats: dict[str, tuple[str, tuple[int, ...], float, float]] = {}
    done_mod = done_cmp = 0
    n_mod, n_cmp = len(jobs), len(plan.compare)
    if progress:
        progress("modules", 0, n_mod)
        progress("tensors", 0, n_cmp)

    busy = waited = 0.0
    bufs: dict[int, list[torch.Tensor | None]] = {}

    def finish(b: int) -> None:
        nonlocal done_mod, busy
        t0 = time.perf_counter()
        entries = pending.pop(b, [])
        live = [e for e in entries if e[2] > opts.min_diff]
        for i, d, mx, _ in entries:
            if mx <= opts.min_diff:
                j = jobs[i]
                why = ("no difference (ΔW = 0)" if mx == 0 else
                       f"max |ΔW| = {mx:.3g} is not above --min-diff {opts.min_diff:g}")
                new_skips[i] = Skip(j.key, j.name, j.component, why, mx, None)
        if live:
            bjobs = [jobs[e[0]] for e in live]
            with _SingleThread(sum(e[1].numel() for e in live), plan.device):
                svds = _decompose(bjobs, [e[1] for e in live], [e[3] for e in live], opts)
                got_all = [_factors(jobs[i], res, d, opts) for (i, d, _, _), res in zip(live, svds)]
            for (i, d, mx, _), res, got in zip(live, svds, got_all):
                if got is None:
                    j = jobs[i]
                    new_skips[i] = Skip(j.key, j.name, j.component, "empty difference (sigma_1 = 0)", mx,
                                        math.sqrt(res.total_energy))
                    continue
                delta, result = got
                items[Target(jobs[i].key)] = delta
                results[i] = replace(result, max_abs=mx)
        done_mod += len(entries)
        busy += time.perf_counter() - t0
        if progress:
            progress("modules", done_mod, n_mod)

    reader = _Reader(plan, bm, tm).start()
    try:
        t_wait = time.perf_counter()
        for item in reader.items():
            if item[0] == "job" and remaining[batch_of[item[1]]] == 1:  # a batch is complete: decompose
                waited += time.perf_counter() - t_wait
            if item[0] == "job":
                _, i, d, mx, energy, buf = item
                if reader.stream is not None:
                    d.record_stream(torch.cuda.current_stream(plan.device))
                b = batch_of[i]
                pending.setdefault(b, []).append((i, d, mx, energy))
                bufs.setdefault(b, []).append(buf)
                remaining[b] -= 1
                if remaining[b] == 0:
                    finish(b)
                    for x in bufs.pop(b):
                        reader.recycle(x)
                    t_wait = time.perf_counter()
            else:
                _, key, category, shape, mx, norm = item
                stats[key] = (category, shape, mx, norm)
                done_cmp += 1
                if progress:
                    progress("tensors", done_cmp, n_cmp)
    finally:
        reader.close()
    skipped = [Skip(s.key, s.name, s.component, s.reason, stats[s.key][2], stats[s.key][3])
               if s.key in stats else s for s in plan.skipped]
    skipped += [new_skips[i] for i in sorted(new_skips)]
    others = [OtherDiff(k, c, shape, mx, norm) for k, (c, shape, mx, norm) in stats.items()
              if mx > 0 and k not in skip_by_key]
    identical = sum(1 for k, (_, _, mx, _) in stats.items() if mx == 0)
    timings = {"read": reader.busy, "decompose": busy, "wait": waited}
    return items, [results[i] for i in sorted(results)], skipped, others, identical, timings


def _check_something(plan: ExtractPlan, results: list[ModuleResult], skipped: list[Skip],
                     others: list[OtherDiff]) -> None:
    if results:
        return
    diffs = [s for s in skipped if s.max_abs] + [o for o in others if o.max_abs]  # type: ignore[misc]
    if not diffs:
        raise InputError(f"{plan.base} and {plan.tuned} hold identical weights: no tensor differs, so there is "
                         "nothing to extract (is TUNED really the fine-tune?).", plan.tuned)
    top = max(diffs, key=lambda x: x.max_abs or 0.0)
    mins = [s for s in skipped if s.reason.startswith(("no difference", "max |ΔW|"))]
    hint = ""
    if mins:
        biggest = max(mins, key=lambda s: s.max_abs or 0.0)
        hint = (f" {len(mins)} extractable modules differ by at most --min-diff {plan.options.min_diff:g} "
                f"(largest max |ΔW| {biggest.max_abs:.3g} in {biggest.name}); lower --min-diff.")
    raise PlanError(f"nothing to extract from {plan.base} and {plan.tuned}: no module a LoRA can carry differs "
                    f"under these options.{hint} The largest difference is in {top.key} (max |Δ| "
                    f"{top.max_abs:.3g}); see the skipped modules (e.g. pass --conv-rank for LoCon layers or drop "
                    "--no-text-encoder).")


def _check_cast(items: Mapping[Target, LowRank], results: list[ModuleResult], plan: ExtractPlan) -> None:
    """Fail, naming the module, when a factor does not fit the output dtype (fp16 overflow)."""
    names = {r.key: r.name for r in results}
    for t, d in items.items():
        for which, x in (("up", d.up), ("down", d.down)):
            if not bool(torch.isfinite(x.to(plan.dtype)).all()):
                raise OutputError(f"the {which} factor of {names.get(t.module, t.module)} does not fit "
                                  f"{dtype_name(plan.dtype)} (values up to {float(x.abs().max()):.3g}); use --dtype "
                                  "bf16 or fp32", plan.out)
