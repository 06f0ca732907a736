"""Bake LoRAs into a base checkpoint: ``W' = W + Σ_i w_i · w_b,i · ΔW_i`` per module (``math.md`` §2).

:func:`plan_bake` reads headers and the (small) LoRAs: every LoRA module is mapped onto the base's own tensors
(``index_lora(path, table=<the base's concrete model>)``), block weights are resolved, each module is loaded
once to check its values are finite and that its shape fits the base. Unmatched keys, a LoRA of another
architecture and shape mismatches are :class:`~lorasurgery.errors.PlanError` here, before anything is written.

:func:`bake` then streams the base: it reads the base **file by file, tensor by tensor, in file order** with
plain sequential reads, hashes every byte as it goes (header and data section: the base's SHA-256 without a
second pass; the hashing runs in a helper thread), and writes each tensor to the output as soon as it is
done, so the output keeps the base's key set, order, dtypes and ``__metadata__``. Tensors no LoRA touches are
copied byte for byte (fp8 included). A touched tensor is upcast to float32 on the compute device, the
deltas are added in their row slices (fused FLUX ``qkv``/``linear1``, SD3 ``qkv``, OpenCLIP ``in_proj``; a
diffusers-layout base stores those parts as separate tensors and each receives its rows; adaLN halves
swapped in diffusers; OpenCLIP ``text_projection`` transposed; 4-D LoRAs on Linear weights and 2-D LoRAs on
1x1 convs reshaped; an inpainting ``conv_in`` with extra input channels gets ΔW zero-padded), and the result
is cast once to the tensor's dtype (or ``dtype``). Low-rank deltas are applied in row chunks, so the extra
memory is a few chunk-sized float32 buffers plus the tensor itself.

Deltas that depend on the base weight (DoRA, (IA)³, GLoRA, OFT/BOFT) are applied with
:meth:`~lorasurgery.delta.Delta.apply` on the running float32 weight, in input order, after the additive
contributions of the same and earlier inputs; block weights and user weights act through
:meth:`~lorasurgery.delta.Delta.scaled` (``W + m·(W'' − W)``). fp8 bases are upcast, added and cast back
(saturating at the fp8 range; ComfyUI scaled-fp8 files are dequantised with their ``scale_weight``).

Checks and reports (:class:`BakeReport`): base tensors with NaN/Inf in a touched module are an error (or, with
``allow_nonfinite``, left unchanged and counted, like non-finite LoRA modules); the fraction of elements
whose ΔW ≠ 0 but whose cast result equals the base value (the delta was below half an ULP); the relative error
of the applied delta on fp8 tensors (warned about once); per module, ‖W' − W‖ against the intended ‖ΔW‖, with
the modules that lost most of their delta listed (``pitfalls.md``: bakes that silently have no effect).
These checks read every element of tensors up to ``SAMPLE_ELEMENTS`` elements and every k-th row of larger
ones (the sums scaled up), so they cost a small fraction of the bake.

Outputs: a single file for a single-file or sharded base; for a diffusers pipeline or component folder, a
folder of the same structure (configs and other non-weight files copied, every weight file baked), written
to a temporary folder beside the output and renamed into place at the end. Provenance metadata
(``lorasurgery.*``: version, the resolved options including every block spec, and every input's name,
SHA-256, size, role and weight) is added to every output file; the base's own metadata is kept.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
import shutil
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..arch import get_arch, real_table
from ..arch.base import ModelTable, ModuleSpec
from ..arch.detect import layout_inverses
from ..blocks import BlockWeights, parse_block_spec
from ..delta import Delta
from ..errors import InputError, OutputError, PlanError
from ..formats.dense import part_rows
from ..formats.keys import looks_like_lora, split_key
from ..formats.names import COMFY_TEXT_ENCODERS, Target
from ..formats.read import LoraIndex, LoraModule, detect_lora_arch, index_lora
from ..formats.write import swap_halves
from ..io.dtypes import dtype_name, parse_dtype
from ..io.metadata import canonical_json, provenance, title_of
from ..io.reader import PICKLE_SUFFIXES, Header, TensorInfo, read_header
from ..io.handoff import ByteQueue
from ..io.writer import StreamingWriter, TensorSpec, _json
from ..linalg import resolve_device
from ..model import Model, open_model
from .inputs import WeightedInput
from .threads import cores_besides, ops_threads

__all__ = ["BakePlan", "BakeReport", "Contribution", "InputPlan", "InputReport", "ModuleCheck", "bake",
           "plan_bake", "OUTPUT_DTYPES"]

#: ``--dtype`` values: ``keep`` (each tensor keeps the base's dtype) or one float dtype for every float tensor.
OUTPUT_DTYPES = ("keep", "fp16", "bf16", "fp32")
#: Row chunks of low-rank bakes hold at most this many float32 elements (4 MiB: the chunk stays in the
#: cache between its upcast, GEMM, checks and downcast; measured 20 % less CPU than 32 MiB chunks).
CHUNK_ELEMENTS = 1 << 20
#: Bytes of base tensors the reader thread may read ahead of the computation, and of results that may wait
#: for the writer thread (at least one tensor each): runs ahead over many small tensors, never piles up
#: large ones. With the writer's 64 MiB hash queue, at most about 320 MiB wait besides the few tensors the
#: threads hold (measured peak RSS 1.15 GiB baking a 4.9 GiB FLUX-width file; ``tests/benchmarks/bench_bake.py``).
READ_AHEAD_BYTES = 1 << 27
WRITE_BEHIND_BYTES = 1 << 27
#: The precision checks of a tensor look at every row up to this many elements, else at every k-th row
#: (about this many elements, scaled up): exact on small tensors, cheap estimates on large ones.
SAMPLE_ELEMENTS = 1 << 16
#: A module whose applied change ‖W' − W‖ is below this fraction of the intended ‖ΔW‖ is reported.
WEAK_RATIO = 0.5
#: How many error lines a message lists before summarising.
LIST_LIMIT = 20

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".gguf", ".h5")


# ------------------------------------------------------------------------------------------------ plan types


@dataclass(frozen=True)
class Contribution:
    """One LoRA module's change to one reference tensor of the base.

    ``rows`` are the rows of the reference tensor it covers (a part of a fused weight covers its slice);
    ``kind`` is ``"weight"`` (ΔW) or ``"bias"`` (``diff_b`` / ``b_norm``); ``multiplier`` = user weight ×
    block weight. ``pad_in`` is set when ΔW has fewer input channels than the base (inpainting ``conv_in``):
    ΔW goes into the first ``pad_in`` channels.
    """

    input: int
    module: str
    target: str
    ref_key: str
    rows: tuple[int, int]
    kind: str
    multiplier: float
    block: str | None
    algo: str
    needs_base: bool
    transposed: bool = False
    pad_in: int | None = None


@dataclass
class InputPlan:
    """One LoRA of the bake, resolved against the base."""

    path: Path
    weight: float
    blocks: BlockWeights
    given_blocks: str | None  # the spec as given (its own or the global one)
    index: LoraIndex
    arch: str | None  # the LoRA's architecture (detected from its own names when something did not fit)
    modules: list[LoraModule]  # modules that are baked (matched, finite, fitting)
    algos: dict[str, int]
    zero_weight: int  # modules whose weight × block weight is 0 (no change)
    unmatched: list[str]  # problem lines (keys not consumed, targets absent, shape mismatches)
    nonfinite: list[str]  # modules skipped for NaN/Inf values (allow_nonfinite)
    block_modules: dict[str, int]  # block id (OTHER for none) -> modules baked
    contributions: list[Contribution]
    notes: list[str]  # warnings about this LoRA (alpha 0 ...)
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class FileJob:
    """How one tensor of the base is produced."""

    key: str  # source key
    info: TensorInfo
    out_dtype: torch.dtype
    ref_key: str | None = None
    rows: tuple[int, int] | None = None  # reference rows this file tensor holds
    swapped: bool = False  # the file stores the reference rows with the halves swapped
    transposed_file: bool = False  # the file tensor is the transpose of the reference tensor
    contributions: tuple[Contribution, ...] = ()
    mode: str = "copy"  # copy | cast | chunk | full | assembled
    scale_key: str | None = None  # ComfyUI scaled-fp8 ``scale_weight`` of this weight


@dataclass
class SourceFile:
    """One file of the base, read sequentially: its header and its tensors (source keys) in data order."""

    path: Path
    relative: str  # path relative to the base's root (its own name for a single file)
    header: Header
    keys: list[str]


@dataclass
class OutFile:
    """One output file: where it goes, its tensors in order, and the base metadata it keeps."""

    relative: str  # path inside the output folder ("" for a single-file output)
    keys: list[str]  # source keys
    names: list[str]  # the tensors' names in this file (a component file's keys lack the component prefix)
    metadata: dict[str, str]


@dataclass
class BakePlan:
    """Everything :func:`bake` needs, found from headers and the LoRAs alone. Close it (or use ``with``)."""

    base: Path
    out: Path
    model: Model
    arch: str
    layout: str
    inputs: list[InputPlan]
    jobs: dict[str, FileJob]
    sources: list[SourceFile]
    files: list[OutFile]
    folder_output: bool
    dtype: torch.dtype | None
    device: torch.device
    allow_unmatched: bool
    allow_nonfinite: bool
    overwrite: bool
    global_blocks: str | None
    options: dict[str, object]
    copy_files: list[str] = field(default_factory=list)  # relative paths copied as they are (folder output)
    skipped_files: list[str] = field(default_factory=list)  # weight files of the folder that are not baked
    warnings: list[str] = field(default_factory=list)

    @property
    def unmatched_count(self) -> int:
        return sum(len(i.unmatched) for i in self.inputs)

    @property
    def touched(self) -> int:
        return sum(1 for j in self.jobs.values() if j.contributions)

    @property
    def total_bytes(self) -> int:
        return sum(j.info.nbytes for j in self.jobs.values())

    def close(self) -> None:
        for i in self.inputs:
            i.index.close()
        self.model.close()

    def __enter__(self) -> "BakePlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ModuleCheck:
    """Intended vs applied change of one reference tensor (``‖ΔW‖`` vs ``‖W' − W‖``)."""

    ref_key: str
    dtype: str
    expected_norm: float
    applied_norm: float
    lost_fraction: float  # elements with ΔW ≠ 0 whose cast result equals the base value

    @property
    def ratio(self) -> float:
        return self.applied_norm / self.expected_norm if self.expected_norm > 0 else 1.0


@dataclass
class InputReport:
    name: str
    path: Path
    weight: float
    blocks: str  # resolved block spec ("" = every block at 1)
    given_blocks: str | None
    arch: str | None
    key_format: str | None
    modules: int  # modules baked
    zero_weight: int
    unmatched: int
    nonfinite: int
    algos: dict[str, int]
    block_table: list[tuple[str, float, int]]  # (block, weight, modules)
    sha256: str
    size: int


@dataclass
class BakeReport:
    """What :func:`bake` did; rendered by :func:`lorasurgery.commands.bake_view.render_bake_report`."""

    base: Path
    out: Path
    arch: str
    layout: str
    device: str
    dtype: str  # "keep" or the output dtype name
    base_sha256: str
    base_bytes: int
    out_files: list[tuple[str, str, int]]  # (relative path or file name, sha256 of the data section, bytes)
    out_bytes: int
    inputs: list[InputReport]
    tensors: int
    tensors_changed: int
    tensors_copied: int  # byte-identical copies
    tensors_cast: int  # untouched, cast to --dtype
    unmatched: list[str]
    unmatched_count: int
    nonfinite_skipped: list[str]
    # Precision checks: exact on tensors up to SAMPLE_ELEMENTS elements, estimated from every k-th row above.
    delta_elements: int  # elements with ΔW ≠ 0
    lost_elements: int  # of those, elements whose cast result equals the base value
    lost_by_dtype: dict[str, tuple[int, int]]  # dtype -> (delta elements, lost)
    fp8_tensors: int
    fp8_relative_error: float | None  # ‖applied − ΔW‖ / ‖ΔW‖ over the fp8 tensors
    saturated: int  # fp8 elements clamped to the format's range
    relative_error: float  # the same over every changed tensor
    weak_modules: list[ModuleCheck]  # applied/expected below WEAK_RATIO, worst first
    checks: int  # modules checked
    warnings: list[str]
    copied_files: list[str]
    skipped_files: list[str]
    seconds: float  # wall time of the bake (plan included when run through bake())
    metadata_keys: list[str]
    plan_seconds: float = 0.0  # of which planning: headers, LoRA reads and checks

    @property
    def out_sha256(self) -> str:
        """SHA-256 of the (first) output file's data section (``sshs_model_hash`` / AutoV3 of a single file)."""
        return self.out_files[0][1] if self.out_files else ""

    @property
    def lost_fraction(self) -> float:
        return self.lost_elements / self.delta_elements if self.delta_elements else 0.0


# -------------------------------------------------------------------------------------------- norm names


def _strip_param(key: str) -> str | None:
    for sfx in (".weight", ".scale"):
        if key.endswith(sfx):
            return key[: -len(sfx)]
    return None


def _conventions(table: ModelTable) -> dict[str, tuple[str, str, str]]:
    """Per component, how its kohya module names are built: ``(kind, kohya prefix, match prefix)``.

    ``kind`` "diffusers": ``<kohya prefix>_<diffusers path>`` for file keys starting with ``match prefix``
    (``unet.``); "ref": ``<kohya prefix>_<reference path after match prefix>``. Found by majority over the
    component's modules, so norms get the names the trainer would give them.
    """
    votes: dict[str, Counter] = defaultdict(Counter)
    for m in table.modules:
        pairs = [(m.names.get("kohya"), m.names.get("diffusers"), m.key)]
        pairs += [(p.names.get("kohya"), p.names.get("diffusers"), None) for p in m.parts]
        for kohya, diff, key in pairs:
            if not kohya:
                continue
            if diff and "." in diff:
                comp, path = diff.split(".", 1)
                tail = "_" + path.replace(".", "_")
                if kohya.endswith(tail) and len(kohya) > len(tail):
                    votes[m.component][("diffusers", kohya[: -len(tail)], comp + ".")] += 1
                    continue
            stem = _strip_param(key) if key else None
            if stem:
                segs = stem.split(".")
                for i in range(len(segs)):
                    tail = "_" + "_".join(segs[i:])
                    if kohya.endswith(tail) and len(kohya) > len(tail):
                        votes[m.component][("ref", kohya[: -len(tail)], ".".join(segs[:i]) + "." if i else "")] += 1
                        break
    return {comp: c.most_common(1)[0][0] for comp, c in votes.items() if c}


@dataclass(frozen=True)
class _NormTarget:
    weight: str  # reference key of the weight (γ)
    bias: str | None  # reference key of the bias (β)
    block: str | None


def norm_names(table: ModelTable) -> dict[str, tuple[_NormTarget, str]]:
    """LoRA module names of the norm layers of ``table`` (LyCORIS ``w_norm``/``b_norm``, full ``diff``).

    Norms are no LoRA *modules* of the tables (no Linear/Conv), so the name tables of
    :mod:`lorasurgery.formats.names` do not list them; LyCORIS's norm modules use the same spellings as its
    other modules, which are derived here forward from the table: kohya names by the component's own
    convention, diffusers/PEFT paths (with the ``lycoris_``, ``lora_unet_``, ``lora_transformer_`` and
    ``base_model.model.`` variants) and ComfyUI ``diffusion_model.`` / bare checkpoint paths.
    """
    modules = list(table.modules)
    module_biases = {m.bias for m in modules if m.bias}
    module_keys = {m.key for m in modules}
    dmap = table.layouts["diffusers"].key_map if "diffusers" in table.layouts else {}
    convs = _conventions(table)
    main_prefixes = {"unet.", "transformer."}
    out: dict[str, tuple[_NormTarget, str]] = {}
    conflicts: set[str] = set()

    def add(name: str, target: _NormTarget, scheme: str) -> None:
        prev = out.get(name)
        if prev is not None and prev[0] != target:
            conflicts.add(name)
        out.setdefault(name, (target, scheme))

    diffusers_prefixes = {c[2] for c in convs.values() if c[0] == "diffusers"} | main_prefixes
    for key, shape in table.tensors.items():
        stem = _strip_param(key)
        if stem is None or len(shape) != 1 or key in module_keys or key in module_biases:
            continue
        near = _nearest(key, modules)  # the module sharing the longest path: its component and block
        if near is None:
            continue
        bias = stem + ".bias" if stem + ".bias" in table.tensors else None
        target = _NormTarget(key, bias, near.block)
        entries = dmap.get(key)
        dname = None
        if entries and len(entries) == 1 and entries[0][1] is None:
            dname = _strip_param(entries[0][0])
        conv = convs.get(near.component)
        if conv is not None:
            kind, kohya_prefix, match = conv
            if kind == "ref" and key.startswith(match):
                add(f"{kohya_prefix}_{stem[len(match):].replace('.', '_')}", target, "kohya")
            elif kind == "diffusers" and dname and dname.startswith(match):
                add(f"{kohya_prefix}_{dname[len(match):].replace('.', '_')}", target, "kohya")
        if dname and any(dname.startswith(p) for p in diffusers_prefixes):
            add(dname, target, "peft")
            comp, path = dname.split(".", 1)
            if comp + "." in main_prefixes:
                add("base_model.model." + path, target, "peft-raw")
                add(f"{comp}.base_model.model.{path}", target, "peft-raw")
                add("lora_unet_" + path.replace(".", "_"), target, "kohya-dp")
                add("lora_transformer_" + path.replace(".", "_"), target, "onetrainer")
                add("lycoris_" + path.replace(".", "_"), target, "lycoris")
            else:
                enc = COMFY_TEXT_ENCODERS.get(table.arch, {}).get(comp)
                if enc:
                    add(f"text_encoders.{enc}.transformer.{path}", target, "comfy")
        if near.component in ("unet", "transformer"):
            path = stem[len("model.diffusion_model."):] if stem.startswith("model.diffusion_model.") else stem
            add("diffusion_model." + path, target, "comfy")
            add(path, target, "bfl")
    for n in conflicts:
        out.pop(n, None)
    return out


def _common_segments(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def _nearest(key: str, modules: Sequence[ModuleSpec]) -> ModuleSpec | None:
    """The module whose key shares the most leading path segments with ``key`` (None: none shares any)."""
    best, score = None, 0
    for m in modules:
        s = _common_segments(key, m.key)
        if s > score:
            best, score = m, s
    return best


# ------------------------------------------------------------------------------------------------ helpers


def _short(lines: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = "\n  ".join(lines[:limit])
    more = f"\n  … and {len(lines) - limit} more" if len(lines) > limit else ""
    return f"\n  {shown}{more}"


def _title(arch: str | None) -> str:
    if arch is None:
        return "unknown"
    try:
        return get_arch(arch).title
    except PlanError:
        return arch


def _is_fp8(dtype: torch.dtype) -> bool:
    return dtype in _FP8


def _out_dtype(info_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None or not info_dtype.is_floating_point:
        return info_dtype
    return dtype


def _check_output_path(out: Path, inputs: Sequence[Path], overwrite: bool, folder: bool) -> None:
    """The output checks of the writer, done at plan time (and for folder outputs, which it does not write)."""
    if not folder:
        StreamingWriter(out, [], None, overwrite=overwrite, inputs=list(inputs))
        return
    for inp in inputs:
        ri, ro = inp.resolve(), out.resolve()
        if ro == ri or ro.is_relative_to(ri) or (inp.is_dir() and ri.is_relative_to(ro)):
            raise OutputError(f"{out}: the output folder would overwrite or contain the input {inp}; lorasurgery "
                              "never writes over its inputs. Choose another output folder.", out)
    if out.suffix == ".safetensors":
        raise OutputError(f"{out}: the base is a diffusers folder, so the baked model is a folder of the same "
                          "structure; give a folder path (without .safetensors) as the output.", out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is a file; the baked diffusers model is a folder. Choose another "
                          "output path.", out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: the output folder already exists. Pass --overwrite to replace it, or choose "
                          "another output path.", out)
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the output folder's parent {out.parent} does not exist; create it first.", out)


# -------------------------------------------------------------------------------------------------- plan


def plan_bake(base: str | Path, loras: Sequence[WeightedInput], out: str | Path, *, blocks: str | None = None,
              dtype: str = "keep", device: str = "auto", allow_unmatched: bool = False,
              allow_nonfinite: bool = False, overwrite: bool = False) -> BakePlan:
    """Map every LoRA module onto the base's tensors and check everything that can fail before writing.

    Reads the base's header, the LoRAs' headers and the LoRAs' tensors (one module at a time: finiteness and
    shape checks). Raises :class:`PlanError` for unmatched keys, LoRAs of another architecture and shape
    mismatches (listing the first 20 and the count; ``allow_unmatched`` skips and counts them instead,
    except a LoRA of another architecture or one of which nothing applies), for non-finite LoRA modules
    (``allow_nonfinite`` skips and counts them), bad block specs and options; :class:`OutputError` for an
    output that exists (without ``overwrite``) or would overwrite an input. The returned plan keeps the
    files open: use it in a ``with`` block or call :meth:`BakePlan.close`.
    """
    base = Path(base)
    out = Path(out)
    if not loras:
        raise PlanError("nothing to bake: give at least one LoRA (PATH[:WEIGHT[:BLOCKS]]) to merge into the base.")
    dtype_key = str(dtype).strip().lower()
    if dtype_key == "keep":
        out_dtype = None
    else:
        out_dtype = parse_dtype(dtype)
        if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise PlanError(f"--dtype {dtype}: a baked checkpoint can be written as keep (each tensor keeps the "
                            "base's dtype), fp16, bf16 or fp32.")
    dev = resolve_device(device)
    for w in loras:
        if not math.isfinite(float(w.weight)):
            raise PlanError(f"{w.path}: the weight {w.weight!r} is not a finite number.")
    model = open_model(base, role="base checkpoint")
    indexes: list[LoraIndex] = []
    try:
        folder_output = model.source.kind in ("diffusers", "component")
        _check_output_path(out, [base] + [Path(w.path) for w in loras], overwrite, folder_output)
        table = model.table
        arch = model.arch
        inputs = []
        seen: dict[Path, int] = {}
        for i, w in enumerate(loras):
            p = Path(w.path)
            key = p.resolve()
            if key in seen:
                raise PlanError(f"{p}: given twice (inputs {seen[key] + 1} and {i + 1}); give one weight per LoRA "
                                "(weights add up: use their sum).")
            seen[key] = i
            inputs.append(_plan_input(i, w, blocks, model, table, arch, allow_unmatched, allow_nonfinite, indexes))
        _check_unmatched(inputs, model, allow_unmatched)
        jobs = _plan_jobs(model, inputs, out_dtype)
        sources, files, copy_files, skipped = _plan_files(model, folder_output)
        plan = BakePlan(base, out, model, arch, model.layout, inputs, jobs, sources, files, folder_output, out_dtype,
                        dev, allow_unmatched, allow_nonfinite, overwrite, blocks, {}, copy_files, skipped)
        plan.options = _options(plan, dtype_key)
        if skipped:
            plan.warnings.append(f"{len(skipped)} weight file(s) of the base folder are not read by lorasurgery and "
                                 f"are left out of the output (not baked): {', '.join(skipped[:5])}"
                                 f"{' …' if len(skipped) > 5 else ''}")
        return plan
    except BaseException:
        for idx in indexes:
            idx.close()
        model.close()
        raise


def _plan_input(i: int, w: WeightedInput, global_blocks: str | None, model: Model, table: ModelTable, arch: str,
                allow_unmatched: bool, allow_nonfinite: bool, indexes: list[LoraIndex]) -> InputPlan:
    path = Path(w.path)
    idx = index_lora(path, table=table)
    indexes.append(idx)
    keys = idx.source.keys()
    if not looks_like_lora(keys):
        raise InputError(f"is not a LoRA: its keys are not LoRA tensors (e.g. {keys[0] if keys else 'none'}); "
                         "give LoRA files as inputs and the checkpoint with --base.", path)
    _resolve_norms(idx, table)
    own: list[str | None] = []

    def own_arch() -> str | None:  # the LoRA's own architecture, detected only when something does not fit
        if not own:
            own.append(_own_arch(idx))
        return own[0]

    mods = {m.key: m for m in table.modules}
    problems: list[str] = _problem_lines(idx, arch, model)
    mismatched: list[str] = []
    resolved: list[tuple[LoraModule, ModuleSpec | _NormTarget]] = []
    for m in idx.modules:
        if isinstance(m.target, _NormModuleTarget):
            spec: ModuleSpec | _NormTarget = m.target.norm
            needed = [spec.weight] if "w_norm" in m.keys or "diff" in m.keys else []
            if "b_norm" in m.keys or "diff_b" in m.keys:
                if spec.bias is None:
                    mismatched.extend(f"{k}: the base's {spec.weight} has no bias for it" for k in m.keys.values())
                    continue
                needed.append(spec.bias)
        else:
            spec = mods[m.target.module]
            needed = [spec.key]
        absent = [k for k in needed if not model.has_ref(k)]
        if absent:
            comp = spec.component if isinstance(spec, ModuleSpec) else None
            where = f" (the base has no {comp} component)" if comp and not _has_component(model, table, comp) else ""
            problems.extend(f"{k}: targets {absent[0]}, which the base does not contain{where}" for k in m.keys.values())
            continue
        resolved.append((m, spec))
    if (problems or mismatched or not resolved) and own_arch() not in (None, arch):
        _arch_error(path, own_arch() or "", arch, model)
    # per-input block weights
    spec_text = w.blocks if w.blocks is not None else global_blocks
    present = {s.block for _, s in resolved}
    depth = table.config.get("depth") if arch == "sd3" else None
    bw = parse_block_spec(spec_text, arch=arch, depth=depth if isinstance(depth, int) else None,
                          present_blocks=present, seed=i,
                          source=f"block weights of {path.name}" if w.blocks is not None else "--blocks")
    baked: list[LoraModule] = []
    contributions: list[Contribution] = []
    notes: list[str] = []
    nonfinite: list[str] = []
    zero = 0
    algos: Counter[str] = Counter()
    block_modules: Counter[str] = Counter()
    for m, spec in resolved:
        bad = _nonfinite_keys(idx, m)
        if bad:
            if not allow_nonfinite:
                raise PlanError(f"module {m.name!r} holds NaN or Inf values (in {', '.join(bad)}); baking it would "
                                "put non-finite numbers into the model. Fix or re-export the LoRA, or pass "
                                "--allow-nonfinite to skip such modules.", path)
            nonfinite.append(m.name)
            continue
        try:
            delta = idx.load(m)
            cs = _contributions(i, m, spec, delta, model, arch, float(w.weight), bw)
        except (PlanError, InputError) as exc:
            mismatched.extend(f"{k}: {_why(exc, path)}" for k in m.keys.values())
            continue
        if getattr(delta, "alpha", None) == 0 and getattr(delta, "scale_tensor", None) is None:
            notes.append(f"module {m.name!r} has alpha 0, which every loader reads as no effect")
        block = spec.block
        if all(c.multiplier == 0 for c in cs):
            zero += 1
        else:
            contributions.extend(c for c in cs if c.multiplier != 0)
            baked.append(m)
            algos[m.algo] += 1
            block_modules[block or "OTHER"] += 1
    if mismatched and own_arch() not in (None, arch):
        _arch_error(path, own_arch() or "", arch, model)
    unmatched = problems + mismatched
    plan = InputPlan(path, float(w.weight), bw, spec_text, idx, own[0] if own else arch, baked,
                     dict(sorted(algos.items())), zero, unmatched, nonfinite, dict(block_modules), contributions, notes,
                     idx.source.sha256(), sum(f.stat().st_size for f in idx.source.files))
    if not baked and not zero and not nonfinite:
        if unmatched and allow_unmatched:
            raise PlanError(f"no module of this LoRA applies to the base {model.path.name} "
                            f"({_title(arch)}, {model.layout} layout): all {len(unmatched)} keys are unmatched, so "
                            f"baking it would change nothing:{_short(unmatched)}", path)
        if not unmatched:
            raise PlanError("holds no LoRA modules to bake.", path)
    return plan


def _problem_lines(idx: LoraIndex, arch: str, model: Model) -> list[str]:
    """``key: reason`` for every key the index could not interpret, with the component a module belongs to
    when it is a module of the architecture that the base lacks (a text-encoder module on a UNet-only file)."""
    from ..formats.names import names_for_arch

    lines = [f"{k}: {why}" for k, why in idx.foreign.items()]
    known = names_for_arch(arch) if idx.unmatched else {}
    comps = {m.key: m.component for m in real_table(arch).modules} if idx.unmatched else {}
    for name, keys in idx.unmatched.items():
        hit = known.get(name)
        comp = comps.get(hit.target.module) if hit is not None else None
        if comp is not None and not _has_component(model, model.table, comp):
            why = f"module of the {comp} component, which the base does not contain"
        elif hit is not None:
            why = f"module {hit.target.module} is not in this {_title(arch)} model (another variant?)"
        else:
            why = f"module {name!r} is not a module of {_title(arch)}"
        lines.extend(f"{k}: {why}" for k in keys)
    lines.extend(f"{k}: not a LoRA tensor of any known convention" for k in idx.unknown)
    return lines


def _why(exc: Exception, path: Path) -> str:
    msg = str(exc)
    for prefix in (f"{path}: ", f"{path.name}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg


def _has_component(model: Model, table: ModelTable, comp: str) -> bool:
    return any(model.has_ref(m.key) for m in table.modules if m.component == comp)


def _arch_error(path: Path, own: str, base_arch: str, model: Model) -> None:
    raise PlanError(f"is a {_title(own)} LoRA (its module names and shapes are {_title(own)} ones), but the base "
                    f"{model.path.name} is a {_title(base_arch)} checkpoint ({model.layout} layout). A LoRA can only be "
                    f"baked into a model of the architecture it was trained for; pick a {_title(own)} base.", path)


def _own_arch(idx: LoraIndex) -> str | None:
    """The LoRA's architecture from its own module names and shapes (independent of the base)."""
    names = [m.name for m in idx.modules] + list(idx.unmatched)
    shapes: dict[str, tuple[int, ...]] = {}
    for m in idx.modules:
        for sfx in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "diff"):
            if sfx in m.shapes:
                shapes[m.name] = m.shapes[sfx]
    for name, keys in idx.unmatched.items():
        for k in keys:
            s = split_key(k)
            if s is not None and s.suffix in ("lora_down.weight", "hada_w1_b", "lokr_w1_b", "diff"):
                shapes[name] = tuple(idx.source.info(k).shape)
    arch, _ = detect_lora_arch(names, shapes)
    return arch


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf. One min/max reduction (NaN propagates into both, ±Inf shows as
    an extreme): many times faster than ``isfinite(t).all()`` on CPU, for every float dtype."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if _is_fp8(t.dtype):
        t = t.float()
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _nonfinite_keys(idx: LoraIndex, m: LoraModule) -> list[str]:
    return [sfx for sfx, key in m.keys.items() if not _all_finite(idx.source.get(key))]


@dataclass(frozen=True)
class _NormModuleTarget(Target):
    """A LoRA target that is a norm layer (no Linear/Conv module of the table)."""

    norm: _NormTarget | None = None


def _resolve_norms(idx: LoraIndex, table: ModelTable) -> None:
    """Move modules named like a norm layer of the base from ``unmatched`` into the index's modules."""
    if not idx.unmatched:
        return
    names = norm_names(table)
    from ..delta import classify_shapes

    for name in list(idx.unmatched):
        hit = names.get(name)
        if hit is None:
            continue
        target, scheme = hit
        keys = idx.unmatched[name]
        keymap: dict[str, str] = {}
        for k in keys:
            s = split_key(k)
            if s is None or s.foreign or s.suffix in keymap:
                keymap = {}
                break
            keymap[s.suffix] = k
        if not keymap:
            continue
        shapes = {sfx: tuple(idx.source.info(k).shape) for sfx, k in keymap.items()}
        try:
            algo, rank = classify_shapes(shapes)
        except InputError:
            continue
        if algo not in ("norm", "full"):
            continue
        idx.modules.append(LoraModule(name, _NormModuleTarget(target.weight, (), target), scheme, keymap, shapes,
                                      algo, rank))
        del idx.unmatched[name]


def _target_rows(mod: ModuleSpec, target: Target, ref_rows: int) -> tuple[int, int]:
    if not target.parts:
        return 0, ref_rows
    rows = part_rows(mod, ref_rows)
    return rows[target.parts[0]][0], rows[target.parts[-1]][1]


def _contributions(i: int, m: LoraModule, spec: ModuleSpec | _NormTarget, delta: Delta, model: Model,
                   arch: str, weight: float, bw: BlockWeights) -> list[Contribution]:
    """The contributions of one loaded module, with shape checks against the base (PlanError on mismatch)."""
    block = spec.block
    mult = weight * bw.weight(block)
    tid = m.target.id
    out: list[Contribution] = []
    if isinstance(spec, _NormTarget):
        shape = model.ref_shape(spec.weight)
        delta_shape = delta.out_features
        if delta_shape != shape[0]:
            raise PlanError(f"holds {delta.algo} tensors for {delta_shape} channels but the base's "
                            f"{spec.weight} has shape {tuple(shape)}")
        has_w = delta.algo == "norm" or getattr(delta, "diff", None) is not None
        if has_w:
            if delta.algo == "full":
                delta.dense(shape)  # shape check
            out.append(Contribution(i, m.name, tid, spec.weight, (0, shape[0]), "weight", mult, block, delta.algo,
                                    False))
        if delta.dense_bias() is not None:
            out.append(Contribution(i, m.name, tid, spec.bias or "", (0, shape[0]), "bias", mult, block,
                                    delta.algo, False))
        return out
    ref_shape = tuple(model.ref_shape(spec.key))
    if spec.transposed:
        lin = (ref_shape[1], ref_shape[0])
        _fit(delta, lin, None, arch)
        out.append(Contribution(i, m.name, tid, spec.key, (0, ref_shape[0]), "weight", mult, block, delta.algo,
                                delta.needs_base, transposed=True))
        if delta.dense_bias() is not None:
            raise PlanError(f"changes a bias, but {spec.key} (stored transposed) has none")
        return out
    ta, tb = _target_rows(spec, m.target, ref_shape[0])
    tshape = (tb - ta,) + ref_shape[1:]
    pad = _fit(delta, tshape, spec, arch)
    has_weight = not (delta.algo == "full" and getattr(delta, "diff", None) is None)
    if has_weight:
        if pad is not None and delta.needs_base:
            raise PlanError(f"is a {delta.algo} module with fewer input channels ({pad}) than the base's "
                            f"{spec.key} {tuple(ref_shape)}; only additive deltas can be zero-padded")
        out.append(Contribution(i, m.name, tid, spec.key, (ta, tb), "weight", mult, block, delta.algo,
                                delta.needs_base, pad_in=pad))
    if delta.dense_bias() is not None:
        if spec.bias is None or not model.has_ref(spec.bias):
            raise PlanError(f"changes a bias (diff_b), but the base's {spec.key} has no bias")
        n = delta.dense_bias().shape[0]
        if n != tb - ta:
            raise PlanError(f"diff_b has {n} values but the target has {tb - ta} rows")
        out.append(Contribution(i, m.name, tid, spec.bias, (ta, tb), "bias", mult, block, delta.algo, False))
    return out


def _fit(delta: Delta, shape: tuple[int, ...], spec: ModuleSpec | None, arch: str) -> int | None:
    """Check ``delta`` fits a target of ``shape``; return the narrower input width when ΔW is zero-padded.

    A delta with fewer input channels than the base fits only when the base is a widened variant of the
    released model (inpainting ``conv_in``, FLUX Fill ``img_in``) and the delta has the released width.
    """
    if delta.needs_base:
        try:
            delta.apply(torch.zeros(shape, device="meta"))
        except PlanError:
            raise
        except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError):
            pass  # the algorithm needs real values to check; it is checked again when applied
        return None
    try:
        if getattr(delta, "diff", None) is None and delta.algo == "full":
            return None
        delta._check_shape(shape)
        return None
    except PlanError as exc:
        narrow = _padding(delta, shape, spec, arch)
        if narrow is None:
            raise PlanError(str(exc)) from None
        return narrow


def _padding(delta: Delta, shape: tuple[int, ...], spec: ModuleSpec | None, arch: str) -> int | None:
    if spec is None or len(shape) < 2 or delta.out_features != shape[0] or delta.in_features is None:
        return None
    kernel = tuple(shape[2:])
    k = 1
    for x in kernel:
        k *= x
    if delta.in_features % k:
        return None
    narrow = delta.in_features // k
    if narrow >= shape[1]:
        return None
    dk = delta.kernel
    if dk is not None and len(kernel) and tuple(dk) != kernel and not (all(x == 1 for x in dk) and k == 1):
        return None
    released = {m.key: m for m in real_table(arch).modules}.get(spec.key)
    if released is None or len(released.shape) < 2 or released.shape[1] != narrow:
        return None
    return narrow


def _check_unmatched(inputs: list[InputPlan], model: Model, allow: bool) -> None:
    lines = [f"{i.name}: {line}" for i in inputs for line in i.unmatched]
    if lines and not allow:
        reasons = Counter(line.split(": ", 2)[-1] for line in lines)
        summary = "; ".join(f"{n} × {why}" for why, n in reasons.most_common(3))
        raise PlanError(
            f"{len(lines)} LoRA keys do not apply to the base {model.path.name} ({_title(model.arch)}, "
            f"{model.layout} layout), so baking would silently drop them ({summary}):{_short(lines)}\n"
            "Check that the LoRAs were made for this model; pass --allow-unmatched to bake the rest and skip "
            "these keys.")


# ---------------------------------------------------------------------------------------------------- jobs


def _plan_jobs(model: Model, inputs: list[InputPlan], out_dtype: torch.dtype | None) -> dict[str, FileJob]:
    table = model.table
    inv = layout_inverses(table)[model.layout]
    lay = table.layouts[model.layout.split(":")[0]]
    by_ref: dict[str, list[Contribution]] = defaultdict(list)
    for inp in inputs:
        for c in inp.contributions:
            by_ref[c.ref_key].append(c)
    src = model.source
    scaled = [k for k in src.keys() if k.endswith(".scale_weight")]
    if scaled and out_dtype is not None:
        raise PlanError(f"{model.path}: is a scaled-fp8 checkpoint (e.g. {scaled[0]}): its fp8 weights only mean "
                        "something with their scales, so --dtype cannot convert them. Bake with --dtype keep.",
                        model.path)
    jobs: dict[str, FileJob] = {}
    for key in src.keys():
        info = src.info(key)
        odt = _out_dtype(info.torch_dtype, out_dtype)
        job = FileJob(key, info, odt, mode="copy" if odt == info.torch_dtype else "cast")
        hit = inv.get(key)
        if hit is not None and hit[0] in by_ref:
            ref, rows = hit
            ref_rows = model.ref_shape(ref)[0]
            fa, fb = rows if rows is not None else (0, ref_rows)
            cs = tuple(c for c in by_ref[ref] if c.rows[0] < fb and c.rows[1] > fa)
            if cs:
                job.ref_key, job.rows = ref, (fa, fb)
                job.swapped = ref in lay.swapped
                job.transposed_file = ref in lay.transposed
                job.contributions = cs
                if job.swapped and rows is not None:
                    raise PlanError(f"{model.path}: {key} holds rows {rows} of {ref}, whose halves are swapped in "
                                    "this layout; such a split is not supported.", model.path)
                spans = any(c.needs_base and not (fa <= c.rows[0] and c.rows[1] <= fb) for c in cs)
                if spans:
                    job.mode = "assembled"
                elif all(c.kind == "weight" and not c.needs_base and not c.transposed and c.algo == "lora"
                         for c in cs) and not job.transposed_file and len(info.shape) >= 1:
                    job.mode = "chunk"
                else:
                    job.mode = "full"
                if _is_fp8(info.torch_dtype) and key.endswith(".weight"):
                    sk = key[: -len("weight")] + "scale_weight"
                    if sk in src:
                        job.scale_key = sk
        jobs[key] = job
    return jobs


def _plan_files(model: Model, folder_output: bool
                ) -> tuple[list[SourceFile], list[OutFile], list[str], list[str]]:
    """Source files in reading order and the output files: one per source file for a folder output, else one."""
    src = model.source
    by_file: dict[Path, list[str]] = defaultdict(list)
    for k in src.keys():
        by_file[src.file_of(k)].append(k)
    rel = dict(zip(src.files, src.relative_files()))
    sources = [SourceFile(f, rel[f], read_header(f), by_file[f]) for f in src.files]
    if not folder_output:
        keys = list(src.keys())
        return sources, [OutFile("", keys, keys, dict(src.metadata or {}))], [], []
    files = [OutFile(sf.relative, sf.keys, list(sf.header.tensors), dict(sf.header.metadata)) for sf in sources]
    root = Path(src.path)
    written = {sf.relative for sf in sources}
    copy, skipped = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        r = p.relative_to(root).as_posix()
        if r in written or any(part.startswith(".") for part in Path(r).parts):
            continue
        if p.name.lower().endswith(_WEIGHT_SUFFIXES) or p.suffix.lower() in PICKLE_SUFFIXES:
            skipped.append(r)
        else:
            copy.append(r)
    return sources, files, copy, skipped


def _options(plan: BakePlan, dtype_key: str) -> dict[str, object]:
    return {
        "operation": "bake",
        "base": plan.base.name,
        "arch": plan.arch,
        "layout": plan.layout,
        "loras": [{"path": i.path.name, "weight": i.weight, "blocks": i.blocks.spec,
                   "blocks_given": i.given_blocks} for i in plan.inputs],
        "blocks": plan.global_blocks,
        "dtype": dtype_key,
        "allow_unmatched": plan.allow_unmatched,
        "allow_nonfinite": plan.allow_nonfinite,
        "unmatched_keys": plan.unmatched_count,
        "nonfinite_modules": sum(len(i.nonfinite) for i in plan.inputs),
    }


# ---------------------------------------------------------------------------------------------- execution


class _Stats:
    """Running totals of the precision checks."""

    def __init__(self) -> None:
        self.delta_el = 0.0
        self.lost_el = 0.0
        self.by_dtype: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.exp_sq = 0.0
        self.err_sq = 0.0
        self.fp8_exp_sq = 0.0
        self.fp8_err_sq = 0.0
        self.saturated = 0
        self.modules: dict[str, list[float]] = {}  # ref key -> [exp_sq, app_sq, delta_el, lost_el]
        self.module_dtype: dict[str, str] = {}

    def add(self, ref: str, dtype: torch.dtype, exp_sq: float, app_sq: float, err_sq: float, delta_el: float,
            lost_el: float) -> None:
        name = dtype_name(dtype)
        self.delta_el += delta_el
        self.lost_el += lost_el
        d = self.by_dtype[name]
        d[0] += delta_el
        d[1] += lost_el
        self.exp_sq += exp_sq
        self.err_sq += err_sq
        if _is_fp8(dtype):
            self.fp8_exp_sq += exp_sq
            self.fp8_err_sq += err_sq
        m = self.modules.setdefault(ref, [0.0, 0.0, 0, 0])
        m[0] += exp_sq
        m[1] += app_sq
        m[2] += delta_el
        m[3] += lost_el
        self.module_dtype[ref] = name


_DONE = object()


class _Reader:
    """Reads the base's files in order in a helper thread, hashing every byte (header and data) as it goes.

    Items, in order: ``("tensor", source file, key, info, raw uint8 tensor)`` and, after each file,
    ``("hash", relative path, hex digest)``. At most ``READ_AHEAD_BYTES`` of tensors (or one tensor) wait,
    so memory stays bounded; reads and SHA-256 release the GIL and overlap with the computation in the
    main thread.
    """

    def __init__(self, plan: BakePlan, limit: int = READ_AHEAD_BYTES) -> None:
        self.plan = plan
        self.q = ByteQueue(limit)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lorasurgery-read", daemon=True)
        self.thread.start()

    def _put(self, item, nbytes: int = 0) -> bool:
        return self.q.put(item, nbytes, stop=self.stop)

    def _run(self) -> None:
        try:
            for sf in self.plan.sources:
                h = hashlib.sha256()
                with open(sf.path, "rb", buffering=0) as fh:
                    h.update(_read_exact(fh, sf.header.data_offset, sf.path).numpy())
                    pos = 0
                    for key in sf.keys:
                        info = sf.header.tensors[_file_name(self.plan, key)]
                        if info.start != pos:
                            raise InputError(f"tensor {key!r} is not where its header says; the file changed while "
                                             "it was read.", sf.path)
                        raw = _read_exact(fh, info.nbytes, sf.path)
                        pos = info.end
                        h.update(raw.numpy())
                        if not self._put(("tensor", sf, key, info, raw), info.nbytes):
                            return
                    if fh.read(1):
                        raise InputError("has bytes after its last tensor; the file changed while it was read.",
                                         sf.path)
                if not self._put(("hash", sf.relative, h.hexdigest())):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the main thread
            self._put(("error", exc))

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is _DONE:
                return
            if item[0] == "error":
                raise item[1]
            yield item

    def close(self) -> None:
        self.stop.set()
        self.q.clear()
        self.thread.join()


class _WriteBehind:
    """Writes finished tensors in a helper thread (file writes release the GIL); at most
    ``WRITE_BEHIND_BYTES`` (or one tensor) wait."""

    def __init__(self, limit: int = WRITE_BEHIND_BYTES) -> None:
        self.q = ByteQueue(limit)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="lorasurgery-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is _DONE:
                return
            if self.error is not None:
                continue  # drain after a failure
            w, name, tensor = item
            try:
                w.write(name, tensor)
            except BaseException as exc:
                self.error = exc

    def put(self, w: StreamingWriter, name: str, tensor: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((w, name, tensor), tensor.numel() * tensor.element_size())

    def stop(self) -> None:
        """Let the thread write what is queued (or drain it after an error) and end."""
        if self.thread.is_alive():
            self.q.put(_DONE)
            self.thread.join()

    def finish(self) -> None:
        """Wait for every queued tensor to be written; raise the first write error."""
        self.stop()
        if self.error is not None:
            raise self.error


class _DeltaCache:
    """Recently loaded deltas (the parts of a fused module are baked from one load)."""

    def __init__(self, plan: BakePlan, size: int = 8) -> None:
        self.plan = plan
        self.size = size
        self.items: OrderedDict[tuple[int, str], Delta] = OrderedDict()
        self.modules = [{m.name: m for m in i.modules} for i in plan.inputs]

    def get(self, c: Contribution) -> Delta:
        key = (c.input, c.module)
        d = self.items.get(key)
        if d is None:
            idx = self.plan.inputs[c.input].index
            d = idx.load(self.modules[c.input][c.module], self.plan.device)
            self.items[key] = d
            if len(self.items) > self.size:
                self.items.popitem(last=False)
        else:
            self.items.move_to_end(key)
        return d


def bake(base: str | Path, loras: Sequence[WeightedInput], out: str | Path, *, blocks: str | None = None,
         dtype: str = "keep", device: str = "auto", allow_unmatched: bool = False, allow_nonfinite: bool = False,
         overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> BakeReport:
    """Bake ``loras`` into ``base`` and write ``out`` (see the module docstring).

    ``loras`` are :class:`~lorasurgery.ops.inputs.WeightedInput` (path, weight — negative allowed — and an
    optional block spec that replaces ``blocks`` for that LoRA). ``blocks`` is a block-weight spec for every
    LoRA without its own (preset, list, ``ID=VALUE`` pairs or YAML file; :func:`lorasurgery.blocks.parse_block_spec`).
    ``dtype``: ``keep`` or ``fp16``/``bf16``/``fp32`` for every float tensor. ``device``: where the float32
    arithmetic runs (``auto`` = CUDA when available). ``progress(done_bytes, total_bytes)`` is called after
    every tensor. Errors leave no output; inputs are never modified.
    """
    t0 = time.perf_counter()
    with plan_bake(base, loras, out, blocks=blocks, dtype=dtype, device=device, allow_unmatched=allow_unmatched,
                   allow_nonfinite=allow_nonfinite, overwrite=overwrite) as plan:
        planned = time.perf_counter() - t0
        report = execute(plan, progress=progress)
    report.plan_seconds = planned
    report.seconds += planned
    return report


def execute(plan: BakePlan, progress: Callable[[int, int], None] | None = None) -> BakeReport:
    """Stream the base through the plan and write the output (used by :func:`bake`).

    Stages overlap: a reader thread (sequential reads + the base's SHA-256), the computation in the
    calling thread, a writer thread (writes) and a hash thread (the output's SHA-256); each hand-off holds
    at most 64-128 MiB (or one tensor). On the CPU the computation leaves those three threads a core each:
    torch's intra-op pool is limited to the remaining cores (one on a 2-core machine), or its idle threads
    spin on the cores the pipeline needs.
    """
    t0 = time.perf_counter()
    stats = _Stats()
    nonfinite_base: list[str] = []
    cache = _DeltaCache(plan)
    total = plan.total_bytes
    done = 0
    width = len(_json(canonical_json(_input_rows(plan)))) - 2
    tmp_dir: Path | None = None
    if plan.folder_output:
        tmp_dir = plan.out.parent / f".{plan.out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp_dir.mkdir()
    counts: Counter[str] = Counter()
    written: list[tuple[str, str, int]] = []
    base_hashes: list[tuple[str, str]] = []
    inputs = [plan.base] + [i.path for i in plan.inputs]
    reader: _Reader | None = None
    try:
        with ExitStack() as stack:
            stack.enter_context(ops_threads(cores_besides(3) if plan.device.type == "cpu" else None))
            writers: list[tuple[Path, StreamingWriter]] = []
            writer_of: dict[str, tuple[StreamingWriter, str]] = {}
            for f in plan.files:
                target = plan.out if tmp_dir is None else tmp_dir / f.relative
                target.parent.mkdir(parents=True, exist_ok=True)
                specs = [TensorSpec(n, plan.jobs[k].out_dtype, plan.jobs[k].info.shape) for k, n in zip(f.keys, f.names)]
                w = StreamingWriter(target, specs, _file_metadata(plan, f),
                                    overwrite=plan.overwrite if tmp_dir is None else False, inputs=inputs,
                                    reserved_metadata={"lorasurgery.inputs": width},
                                    fill_sshs_hashes=any(k.startswith("sshs_") for k in f.metadata),
                                    hash_in_thread=True)
                stack.enter_context(w)
                writers.append((target, w))
                writer_of.update((k, (w, n)) for k, n in zip(f.keys, f.names))
            assembled: dict[str, tuple[torch.Tensor, int]] = {}
            behind = _WriteBehind()
            stack.callback(behind.stop)  # runs before the writers are closed or aborted
            reader = _Reader(plan)
            for item in reader:
                if item[0] == "hash":
                    base_hashes.append((item[1], item[2]))
                    continue
                _, sf, key, info, raw = item
                job = plan.jobs[key]
                tensor = (raw.view(info.torch_dtype).reshape(info.shape) if info.nbytes
                          else torch.empty(info.shape, dtype=info.torch_dtype))
                result, how = _produce(plan, job, tensor, cache, stats, nonfinite_base, assembled)
                counts[how] += 1
                w, name = writer_of[key]
                behind.put(w, name, result)
                done += info.nbytes
                if progress is not None:
                    progress(done, total)
            behind.finish()
            base_sha = _combine(base_hashes, plan)
            rows = canonical_json(_input_rows(plan, base_sha))
            for _, w in writers:
                w.fill_encoded("lorasurgery.inputs", rows)
        for f, (target, w) in zip(plan.files, writers):
            written.append((f.relative or plan.out.name, w.model_hash or "", target.stat().st_size))
        if tmp_dir is not None:
            root = Path(plan.model.source.path)
            for r in plan.copy_files:
                dst = tmp_dir / r
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / r, dst)
            _replace_folder(tmp_dir, plan.out)
            tmp_dir = None
    finally:
        if reader is not None:
            reader.close()
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return _report(plan, stats, nonfinite_base, counts, written, base_sha, time.perf_counter() - t0)


def _file_name(plan: BakePlan, key: str) -> str:
    comp = plan.model.source.component_of(key)
    return key[len(comp) + 1:] if comp else key


def _combine(hashes: list[tuple[str, str]], plan: BakePlan) -> str:
    """The base's SHA-256 as :meth:`TensorSource.sha256` defines it (whole file, or hash of the sorted hashes)."""
    if plan.model.source.kind == "file":
        return hashes[0][1]
    joined = "".join(h for _, h in sorted(hashes))
    return hashlib.sha256(joined.encode("ascii")).hexdigest()


def _read_exact(fh, n: int, path: Path) -> torch.Tensor:
    buf = torch.empty(n, dtype=torch.uint8)
    if n == 0:
        return buf
    view = memoryview(buf.numpy())
    got = 0
    while got < n:
        k = fh.readinto(view[got:])
        if not k:
            raise InputError(f"ended after {got} of {n} bytes of a tensor; the file is truncated or changed while it "
                             "was read.", path)
        got += k
    return buf


def _replace_folder(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _input_rows(plan: BakePlan, base_sha: str | None = None) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [{"path": plan.base.name, "name": title_of(plan.base, plan.model.source.metadata),
                                      "sha256": base_sha or "0" * 64, "size": plan.model.file_bytes,
                                      "role": "base", "weight": None}]
    for i in plan.inputs:
        rows.append({"path": i.path.name, "name": title_of(i.path, i.index.metadata), "sha256": i.sha256,
                     "size": i.size, "role": "lora", "weight": i.weight})
    return rows


def _file_metadata(plan: BakePlan, f: OutFile) -> dict[str, str]:
    """The base file's metadata plus the provenance keys (``lorasurgery.inputs`` is a reserved value, filled with
    the base's SHA-256 once it has streamed through)."""
    meta = {k: v for k, v in f.metadata.items() if not k.startswith("lorasurgery.")}
    prov = provenance(_input_rows(plan), plan.options, None, device=str(plan.device))
    prov.pop("lorasurgery.inputs", None)
    meta.update(prov)
    return meta


# -------------------------------------------------------------------------------------- per-tensor kernels


def _produce(plan: BakePlan, job: FileJob, tensor: torch.Tensor, cache: _DeltaCache, stats: _Stats,
             nonfinite: list[str], assembled: dict[str, tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, str]:
    """The output tensor for one base tensor and how it was made (copy, cast, chunk, full, assembled, kept)."""
    if job.mode == "copy":
        return tensor, "copy"
    if job.mode == "cast":
        return tensor.to(job.out_dtype), "cast"
    try:
        if job.mode == "chunk":
            return _bake_chunked(plan, job, tensor, cache, stats), "changed"
        if job.mode == "full":
            return _bake_full(plan, job, tensor, cache, stats), "changed"
        return _bake_assembled(plan, job, tensor, cache, stats, assembled), "changed"
    except _NonFinite as exc:
        if not plan.allow_nonfinite:
            raise PlanError(f"{plan.base}: {exc.what} in {job.ref_key} (file tensor {job.key}); the bake was "
                            "stopped and no output was written. Pass --allow-nonfinite to leave such tensors "
                            "unchanged.", plan.base) from None
        nonfinite.append(f"{job.key}: {exc.what}")
        if job.ref_key in assembled:
            del assembled[job.ref_key]
        return (tensor if job.out_dtype == tensor.dtype else tensor.to(job.out_dtype)), "kept"


class _NonFinite(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def _check_finite(base: torch.Tensor, result: torch.Tensor, plan: BakePlan, job: FileJob) -> None:
    """Raise :class:`_NonFinite` when the result is not finite (the LoRAs were checked at plan time), and
    :class:`PlanError` when it does not fit an fp16 output. One reduction pass: NaN propagates into the
    min/max, ±Inf shows as an extreme. ``base`` (any dtype) is only read to word the error."""
    if result.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(result))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if not _all_finite(base):
            raise _NonFinite("the base holds NaN or Inf values")
        raise _NonFinite("the baked result holds NaN or Inf values (overflow)")
    if job.out_dtype == torch.float16 and job.scale_key is None and (hi >= 65520.0 or lo <= -65520.0):
        raise PlanError(f"{plan.base}: baking overflows fp16 in {job.ref_key}: the result exceeds ±65504. Write "
                        "the output with --dtype bf16 or fp32.", plan.base)


def _base_fp32(job: FileJob, t: torch.Tensor, plan: BakePlan) -> torch.Tensor:
    """The base rows in float32 on the compute device (a new tensor), dequantised for scaled fp8."""
    w = t.to(plan.device).to(torch.float32, copy=True)
    if job.scale_key is not None:
        w *= plan.model.source.get(job.scale_key).to(plan.device).float()
    return w


def _finish(plan: BakePlan, job: FileJob, result: torch.Tensor, stats: _Stats) -> torch.Tensor:
    """Cast a float32 result (file orientation) to the output dtype (saturating fp8, requantising scaled fp8)."""
    out_dtype = job.out_dtype
    if job.scale_key is not None:
        result = result / plan.model.source.get(job.scale_key).to(result.device).float()
    if _is_fp8(out_dtype):
        lim = float(torch.finfo(out_dtype).max)
        over = int((result.abs() > lim).sum())
        if over:
            stats.saturated += over
            result = result.clamp(-lim, lim)
    return result.to(out_dtype)


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) ** 2 if t.numel() else 0.0


def _measure(stats: _Stats, job: FileJob, base32: torch.Tensor, delta: torch.Tensor, cast: torch.Tensor,
             base_raw: torch.Tensor, plan: BakePlan, weight: float = 1.0) -> None:
    """Precision checks of some rows: ΔW intended vs applied, elements whose change was lost to the cast.

    ``base32``/``delta`` are float32 on the device, ``cast`` the output rows, ``base_raw`` the same rows as
    stored in the base; ``weight`` scales the sums when the rows are a sample.
    """
    applied = cast.to(base32.device).float()
    if job.scale_key is not None:
        applied = applied * plan.model.source.get(job.scale_key).to(applied.device).float()
    applied = applied - base32  # a new tensor: cast.float() may be ``cast`` itself
    nz = delta != 0
    base_out = base_raw if base_raw.dtype == cast.dtype else base_raw.to(cast.dtype)
    # equal values (not bits: a change from +0 to -0 is no change)
    same = cast.to(base32.device).float() == base_out.to(base32.device).float()
    app_sq = _sq(applied)
    applied -= delta
    stats.add(job.ref_key or job.key, job.out_dtype, weight * _sq(delta), weight * app_sq, weight * _sq(applied),
              weight * int(nz.count_nonzero()), weight * int((nz & same).count_nonzero()))


def _file_to_ref_segments(job: FileJob, r0: int, r1: int, n: int) -> list[tuple[int, int, int]]:
    """(file row start, file row stop, reference row of the first) for file rows [r0, r1)."""
    fa = job.rows[0] if job.rows else 0
    if not job.swapped:
        return [(r0, r1, fa + r0)]
    h = n // 2
    split = n - h  # file rows [0, split) hold reference rows [h, n)
    segs = []
    if r0 < split:
        segs.append((r0, min(r1, split), h + r0))
    if r1 > split:
        a = max(r0, split)
        segs.append((a, r1, a - split))
    return segs


def _measure_sampled(stats: _Stats, job: FileJob, base32: torch.Tensor, result: torch.Tensor, cast: torch.Tensor,
                     raw: torch.Tensor, plan: BakePlan) -> None:
    """:func:`_measure` of a whole tensor (ΔW = result − base): every row of small tensors, every k-th row of
    large ones (about ``SAMPLE_ELEMENTS`` elements, sums scaled up)."""
    n = base32.shape[0] if base32.ndim else 1
    if base32.ndim == 0 or base32.numel() <= SAMPLE_ELEMENTS:
        _measure(stats, job, base32, result - base32, cast, raw, plan)
        return
    stride = max(1, math.ceil(base32.numel() / SAMPLE_ELEMENTS))
    idx = torch.arange(0, n, stride, device=base32.device)
    b = base32.index_select(0, idx)
    idx_cpu = idx.cpu()
    _measure(stats, job, b, result.index_select(0, idx) - b, cast.index_select(0, idx.to(cast.device)),
             raw.index_select(0, idx_cpu), plan, weight=n / idx.numel())


def _ref_rows(job: FileJob, file_rows: torch.Tensor, n: int) -> torch.Tensor:
    """Reference row of each file row (halves swapped in some layouts; split tensors hold a row range)."""
    if job.swapped:
        split = n - n // 2  # file rows [0, split) hold reference rows [n // 2, n)
        return torch.where(file_rows < split, file_rows + n // 2, file_rows - split)
    return file_rows + (job.rows[0] if job.rows else 0)


def _bake_chunked(plan: BakePlan, job: FileJob, tensor: torch.Tensor, cache: _DeltaCache,
                  stats: _Stats) -> torch.Tensor:
    """Additive low-rank deltas, ``CHUNK_ELEMENTS`` at a time: W[rows] += B[rows] @ A in place (one GEMM per
    contribution and chunk), cast straight into the output. The precision checks use every row of small
    tensors and a fixed stride of rows of large ones (about ``SAMPLE_ELEMENTS`` elements)."""
    shape = tuple(tensor.shape)
    n = shape[0]
    if n == 0:
        return torch.empty(shape, dtype=job.out_dtype)
    row_numel = max(1, tensor[0].numel())
    step = max(1, CHUNK_ELEMENTS // row_numel)
    stride = max(1, math.ceil(n * row_numel / SAMPLE_ELEMENTS))
    dev = plan.device
    factors = []
    for c in job.contributions:
        b, a = cache.get(c).scaled(c.multiplier).factors()
        row_shape = (c.pad_in,) + shape[2:] if c.pad_in is not None else shape[1:]
        factors.append((c, b.to(dev), a.to(dev), row_shape))
    out = torch.empty(shape, dtype=job.out_dtype)
    direct = dev.type == "cpu" and job.scale_key is None and not _is_fp8(job.out_dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        raw = tensor[r0:r1]
        w = _base_fp32(job, raw, plan)
        if stride == 1:  # small tensor: ΔW of every row, measured exactly
            delta = torch.zeros_like(w)
            _add_rows(job, factors, delta, r0, r1, n)
            result = w + delta
            _check_finite(raw, result, plan, job)
            cast = result if direct and job.out_dtype == torch.float32 else _finish(plan, job, result, stats)
            out[r0:r1].copy_(cast)
            _measure(stats, job, w, delta, cast, raw, plan)
            continue
        first = min(-(-r0 // stride) * stride, r1)  # the first sampled row in the chunk (none: r1)
        loc = torch.arange(first - r0, r1 - r0, stride, device=dev)
        base_s = w.index_select(0, loc)
        ref_s = _ref_rows(job, loc + r0, n)
        _add_rows(job, factors, w, r0, r1, n)
        delta_s = torch.zeros_like(base_s)
        for c, b, a, row_shape in factors:
            sel = ((ref_s >= c.rows[0]) & (ref_s < c.rows[1])).nonzero().squeeze(1)
            if sel.numel():
                part = (b.index_select(0, ref_s[sel] - c.rows[0]) @ a).reshape((sel.numel(),) + row_shape)
                if c.pad_in is not None:
                    delta_s[sel, : c.pad_in] += part
                else:
                    delta_s[sel] += part
        _check_finite(raw, w, plan, job)
        if direct:
            out[r0:r1].copy_(w)
        else:
            out[r0:r1].copy_(_finish(plan, job, w, stats))
        if loc.numel():
            loc_cpu = loc.cpu()
            _measure(stats, job, base_s, delta_s, out[r0:r1].index_select(0, loc_cpu), raw.index_select(0, loc_cpu),
                     plan, weight=(r1 - r0) / loc.numel())
    return out


def _add_rows(job: FileJob, factors, dst_all: torch.Tensor, r0: int, r1: int, n: int) -> None:
    """``dst_all`` (file rows [r0, r1)) += B[rows] @ A of every contribution, in place (one GEMM each)."""
    for f0, f1, ref0 in _file_to_ref_segments(job, r0, r1, n):
        ref1 = ref0 + (f1 - f0)
        for c, b, a, row_shape in factors:
            lo, hi = max(ref0, c.rows[0]), min(ref1, c.rows[1])
            if lo >= hi:
                continue
            dst = dst_all[lo - ref0 + f0 - r0: hi - ref0 + f0 - r0]
            rows_b = b[lo - c.rows[0]: hi - c.rows[0]]
            if c.pad_in is not None:
                dst[:, : c.pad_in] += (rows_b @ a).reshape((hi - lo,) + row_shape)
            else:
                dst.view(hi - lo, -1).addmm_(rows_b, a)


def _to_ref(job: FileJob, w: torch.Tensor) -> torch.Tensor:
    if job.transposed_file:
        w = w.T
    if job.swapped:
        w = swap_halves(w)  # swapping the halves is its own inverse
    return w.contiguous()


def _from_ref(job: FileJob, w: torch.Tensor) -> torch.Tensor:
    if job.swapped:
        w = swap_halves(w)
    if job.transposed_file:
        w = w.T
    return w.contiguous()


def _apply_all(plan: BakePlan, contributions: Iterable[Contribution], w_ref: torch.Tensor, fa: int,
               cache: _DeltaCache) -> torch.Tensor:
    """Apply contributions to the reference-orientation rows [fa, fa + len) in place, in input order."""
    by_input: dict[int, list[Contribution]] = defaultdict(list)
    for c in contributions:
        by_input[c.input].append(c)
    fb = fa + w_ref.shape[0]
    for i in sorted(by_input):
        ordered = sorted(by_input[i], key=lambda c: c.needs_base)  # additive first, then W-dependent
        for c in ordered:
            d = cache.get(c).scaled(c.multiplier)
            lo, hi = max(fa, c.rows[0]), min(fb, c.rows[1])
            if lo >= hi:
                continue
            dst = w_ref[lo - fa: hi - fa]
            if c.kind == "bias":
                dst += d.dense_bias().to(w_ref.device)[lo - c.rows[0]: hi - c.rows[0]]
                continue
            if c.transposed:
                lin_shape = (w_ref.shape[1], w_ref.shape[0])
                if c.needs_base:
                    w_ref.copy_(d.apply(w_ref.T.contiguous()).T)
                else:
                    w_ref += d.dense(lin_shape).to(w_ref.device).T
                continue
            tshape = (c.rows[1] - c.rows[0],) + tuple(w_ref.shape[1:])
            if c.needs_base:
                w_ref[c.rows[0] - fa: c.rows[1] - fa] = d.apply(w_ref[c.rows[0] - fa: c.rows[1] - fa].reshape(tshape))
                continue
            if c.pad_in is not None:
                dshape = (tshape[0], c.pad_in) + tshape[2:]
                dense = d.dense(dshape).to(w_ref.device)
                dst[:, : c.pad_in] += dense[lo - c.rows[0]: hi - c.rows[0]]
            elif len(tshape) == 1:
                dst += d.dense(tshape).to(w_ref.device)[lo - c.rows[0]: hi - c.rows[0]]
            else:
                dense = d.dense(tshape).to(w_ref.device)
                dst += dense[lo - c.rows[0]: hi - c.rows[0]]
    return w_ref


def _bake_full(plan: BakePlan, job: FileJob, tensor: torch.Tensor, cache: _DeltaCache, stats: _Stats) -> torch.Tensor:
    base32 = _base_fp32(job, tensor, plan)
    assert job.rows is not None
    ref = _to_ref(job, base32.clone())
    result_ref = _apply_all(plan, job.contributions, ref, job.rows[0], cache)
    result = _from_ref(job, result_ref)
    _check_finite(base32, result, plan, job)
    cast = _finish(plan, job, result, stats)
    _measure_sampled(stats, job, base32, result, cast, tensor, plan)
    return cast.cpu()


def _bake_assembled(plan: BakePlan, job: FileJob, tensor: torch.Tensor, cache: _DeltaCache, stats: _Stats,
                    assembled: dict[str, tuple[torch.Tensor, int]]) -> torch.Tensor:
    """A W-dependent delta on a weight the file stores in several tensors: bake the whole weight once."""
    assert job.ref_key is not None and job.rows is not None
    ref = job.ref_key
    entries = plan.model.file_entries(ref)
    if ref not in assembled:
        parts = []
        for fk, _ in entries:
            t = tensor if fk == job.key else plan.model.source.get(fk)
            parts.append(_base_fp32(plan.jobs[fk], t, plan))
        whole = torch.cat(parts, 0)
        contributions = {c for fk, _ in entries for c in plan.jobs[fk].contributions}
        ordered = sorted(contributions, key=lambda c: (c.input, c.needs_base, c.rows, c.kind, c.module))
        result = _apply_all(plan, ordered, whole.clone(), 0, cache)
        _check_finite(whole, result, plan, job)
        assembled[ref] = (result, len(entries))
    result, left = assembled[ref]
    fa, fb = job.rows
    part = result[fa:fb]
    base32 = _base_fp32(job, tensor, plan)
    cast = _finish(plan, job, part, stats)
    _measure_sampled(stats, job, base32, part, cast, tensor, plan)
    if left <= 1:
        del assembled[ref]
    else:
        assembled[ref] = (result, left - 1)
    return cast.cpu()


# ------------------------------------------------------------------------------------------------- report


def _report(plan: BakePlan, stats: _Stats, nonfinite_base: list[str], counts: Counter, written, base_sha: str,
            seconds: float) -> BakeReport:
    inputs = []
    for i in plan.inputs:
        table = [(b, w, i.block_modules.get(b, 0)) for b, w in i.blocks.table()]
        inputs.append(InputReport(i.name, i.path, i.weight, i.blocks.spec, i.given_blocks, i.arch,
                                  i.index.key_format, len(i.modules), i.zero_weight, len(i.unmatched),
                                  len(i.nonfinite), i.algos, table, i.sha256, i.size))
    checks = []
    for ref, (exp_sq, app_sq, nz, lost) in stats.modules.items():
        checks.append(ModuleCheck(ref, stats.module_dtype[ref], math.sqrt(exp_sq), math.sqrt(app_sq),
                                  lost / nz if nz else 0.0))
    weak = sorted((c for c in checks if c.expected_norm > 0 and c.ratio < WEAK_RATIO), key=lambda c: c.ratio)
    warnings = list(plan.warnings)
    for i in plan.inputs:
        warnings.extend(f"{i.name}: {n}" for n in i.notes)
    fp8_err = math.sqrt(stats.fp8_err_sq / stats.fp8_exp_sq) if stats.fp8_exp_sq > 0 else None
    fp8_tensors = sum(1 for r in stats.module_dtype.values() if r.startswith(("fp8", "F8")))
    if fp8_err is not None:
        warnings.append(f"fp8 base: the change actually applied differs from the intended ΔW by "
                        f"{100 * fp8_err:.1f}% (relative Frobenius error, {fp8_tensors} fp8 tensors): the fp8 cast "
                        f"loses that much of the LoRA; {_pct(stats.by_dtype, [k for k in stats.by_dtype if k.startswith(('fp8', 'F8'))])} of the "
                        "elements it should change kept their base value.")
    if stats.saturated:
        warnings.append(f"{stats.saturated} element(s) exceeded the fp8 range and were saturated.")
    if weak:
        warnings.append(f"{len(weak)} module(s) kept less than {int(WEAK_RATIO * 100)}% of their intended change "
                        f"after the cast (e.g. {weak[0].ref_key}: ‖W'−W‖ = {weak[0].applied_norm:.3g} for "
                        f"‖ΔW‖ = {weak[0].expected_norm:.3g}); a wider --dtype keeps them.")
    if nonfinite_base:
        warnings.append(f"{len(nonfinite_base)} base tensor(s) hold NaN/Inf and were left unchanged.")
    rel = math.sqrt(stats.err_sq / stats.exp_sq) if stats.exp_sq > 0 else 0.0
    out_bytes = sum(b for _, _, b in written)
    unmatched = [f"{i.name}: {line}" for i in plan.inputs for line in i.unmatched]
    nonfinite = [f"{i.name}: {m}" for i in plan.inputs for m in i.nonfinite] + nonfinite_base
    changed = counts.get("changed", 0)
    meta_keys = sorted({"lorasurgery.version", "lorasurgery.recipe", "lorasurgery.inputs", "lorasurgery.env"})
    return BakeReport(
        base=plan.base, out=plan.out, arch=plan.arch, layout=plan.layout, device=str(plan.device),
        dtype=plan.options["dtype"], base_sha256=base_sha, base_bytes=plan.model.file_bytes,  # type: ignore[arg-type]
        out_files=list(written), out_bytes=out_bytes, inputs=inputs, tensors=len(plan.jobs),
        tensors_changed=changed, tensors_copied=counts.get("copy", 0), tensors_cast=counts.get("cast", 0),
        unmatched=unmatched[:LIST_LIMIT], unmatched_count=len(unmatched), nonfinite_skipped=nonfinite,
        delta_elements=round(stats.delta_el), lost_elements=round(stats.lost_el),
        lost_by_dtype={k: (round(v[0]), round(v[1])) for k, v in stats.by_dtype.items()}, fp8_tensors=fp8_tensors,
        fp8_relative_error=fp8_err, saturated=stats.saturated, relative_error=rel, weak_modules=weak,
        checks=len(checks), warnings=warnings, copied_files=list(plan.copy_files),
        skipped_files=list(plan.skipped_files), seconds=seconds, metadata_keys=meta_keys)


def _pct(by_dtype: Mapping[str, list[float]], names: Sequence[str]) -> str:
    tot = sum(by_dtype[n][0] for n in names if n in by_dtype)
    lost = sum(by_dtype[n][1] for n in names if n in by_dtype)
    return f"{100 * lost / tot:.1f}%" if tot else "0%"
