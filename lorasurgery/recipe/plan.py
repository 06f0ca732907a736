"""Planning a recipe from file headers alone: what every step reads, resolves and produces.

:func:`plan_recipe` opens every input's header (no tensor data is read: a LoRA's module names and shapes, a
checkpoint's tensor names and shapes), detects architectures and layouts, and walks the steps in order with a
description of every intermediate result (:class:`Artifact`: a LoRA's modules, blocks and rank bounds, or a
checkpoint's tensors). Along the way it checks what can be checked before any work:

* inputs exist, their ``size`` pins hold, their architecture matches an ``arch`` pin, and each is used as
  what it is (a LoRA where a LoRA is needed, a checkpoint where a checkpoint is needed);
* the LoRAs of a step share one architecture, which is the base's for a bake;
* every block spec resolves for the detected architecture (:func:`lorasurgery.blocks.parse_block_spec`:
  layouts and list lengths, presets, block ids, short lists that leave out blocks holding modules);
* rank options are consistent (``method: svd`` needs a rank, ``concat`` takes none; rule parameters);
* LoRA modules a bake would apply exist in the base; modules that depend on the base weight (DoRA, (IA)³,
  OFT, ...) are not merged without a base;
* an extraction from two input files is planned by :func:`lorasurgery.ops.extract.plan_extract` itself;
* outputs do not overwrite inputs (and, for a run, do not exist unless ``overwrite``).

Every problem becomes an :class:`~.loader.Issue` at the line of the value that causes it. The plan also
carries the numbers a dry run prints: per-block weight tables with module counts, output formats, dtypes, rank
bounds and estimated sizes (exact for inputs, estimates for results), and the *resolved recipe*.

SHA-256 pins are not checked here (that needs a full read): :func:`verify_pins` does it, and ``run`` calls
it before any work.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Mapping, Sequence

from ..errors import LoraSurgeryError, PlanError
from .loader import Issue, RecipeError, Where
from .schema import FORMAT_VERSION, BlockSpec, Recipe

__all__ = ["Artifact", "ModInfo", "LoraUse", "StepPlan", "OutputPlan", "InputPlan", "RecipePlan", "plan_recipe",
           "verify_pins", "portable_path", "block_seed", "DEFAULT_FORMAT", "ITEMSIZE"]

#: Default LoRA key format per architecture (as :data:`lorasurgery.ops.output.DEFAULT_FORMAT`).
DEFAULT_FORMAT = {"sd1": "kohya", "sd2": "kohya", "sdxl": "kohya", "sd3": "peft", "flux": "kohya"}
#: Default extraction dtype per architecture (as :data:`lorasurgery.ops.output.DEFAULT_EXTRACT_DTYPE`).
DEFAULT_EXTRACT_DTYPE = {"sd1": "fp16", "sd2": "fp16", "sdxl": "fp16", "sd3": "bf16", "flux": "bf16"}
ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}
_ST_NAMES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


# --------------------------------------------------------------------------------------------------
# plan data
# --------------------------------------------------------------------------------------------------


@dataclass
class ModInfo:
    """One module (target) of a LoRA as far as headers tell: block, algorithm, rank (bound), matrix size."""

    target: str
    module: str
    block: str | None
    algo: str
    rank: int | None
    rows: int | None
    cols: int | None
    needs_base: bool = False


@dataclass
class Artifact:
    """What an input or a step result is (a LoRA or a checkpoint), known from headers."""

    name: str
    kind: str  # "lora" or "checkpoint"
    arch: str
    table: Any = None  # ModelTable
    path: Path | None = None  # input files only
    producer: str | None = None  # step id
    key_format: str | None = None  # LoRA key convention (kohya, peft, ...)
    layout: str | None = None  # checkpoint layout
    dtype: str | None = None  # LoRA factor dtype name, or the checkpoint's float dtype ("mixed" if several)
    bytes: int | None = None
    size_kind: str = "exact"  # "exact", "estimate", "upper bound", "unknown"
    modules: dict[str, ModInfo] | None = None  # LoRAs; None = known only after the run
    ref_keys: frozenset[str] | None = None  # checkpoints: reference keys present
    float_numel: int = 0  # checkpoints: elements of float tensors
    other_bytes: int = 0  # checkpoints: bytes of non-float tensors
    float_bytes: int = 0
    folder: bool = False  # a diffusers pipeline or component folder

    @property
    def depth(self) -> int | None:
        if self.arch != "sd3" or self.table is None:
            return None
        d = self.table.config.get("depth")
        return d if isinstance(d, int) else None

    def present_blocks(self) -> set[str | None] | None:
        if self.modules is None:
            return None
        return {m.block for m in self.modules.values()}

    def describe(self) -> str:
        if self.kind == "lora":
            n = "?" if self.modules is None else str(len(self.modules))
            return f"{self.arch} LoRA, {n} modules" + (f", {self.key_format}" if self.key_format else "")
        return f"{self.arch} checkpoint" + (f", {self.layout} layout" if self.layout else "")


@dataclass
class InputPlan:
    name: str
    given: str  # the path as written (after substitution)
    path: Path
    artifact: Artifact | None
    size: int | None
    sha256_pin: str | None
    size_pin: int | None
    arch_pin: str | None
    role: str | None = None  # first use
    weight: float | None = None


@dataclass
class LoraUse:
    """A LoRA read by a step, with its weight and resolved block weights."""

    name: str
    weight: float
    blocks: Any  # BlockWeights | None
    given: Any  # the spec as written (plain Python), or None
    source: str  # "item", "step" or "" (no blocks)
    role: str = "lora"

    @property
    def spec(self) -> str | None:
        """The resolved spec text handed to the operation (None = every block at 1)."""
        if self.blocks is None or self.blocks.is_identity:
            return None
        return self.blocks.spec


@dataclass
class StepPlan:
    index: int
    id: str
    op: str
    where: Where
    uses: list[str]
    options: dict[str, Any]  # the step as in the resolved recipe
    loras: list[LoraUse]
    result: Artifact
    notes: list[str] = field(default_factory=list)
    block_counts: list[dict[str | None, int]] = field(default_factory=list)  # per LoRA use
    extract_plan: Any = None  # ExtractPlan when both checkpoints are input files


@dataclass
class OutputPlan:
    index: int
    step: str
    given: str
    path: Path
    title: str
    format: str | None
    dtype: str | None
    metadata: dict[str, str]
    where: Where
    exists: bool = False


@dataclass
class RecipePlan:
    """Everything :func:`plan_recipe` found; ``issues`` holds errors and warnings (valid = no errors)."""

    recipe: Recipe
    inputs: dict[str, InputPlan]
    steps: list[StepPlan]
    outputs: list[OutputPlan]
    issues: list[Issue]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def valid(self) -> bool:
        return not self.errors

    def raise_errors(self) -> None:
        if self.errors:
            raise RecipeError(sorted(self.errors, key=lambda i: (i.where.line, i.where.column)))

    def step(self, step_id: str) -> StepPlan:
        return next(s for s in self.steps if s.id == step_id)

    def dependencies(self, step_id: str) -> tuple[list[str], list[str]]:
        """(steps, inputs) the result of ``step_id`` depends on, in recipe order."""
        need_steps: set[str] = set()
        need_inputs: set[str] = set()
        todo = [step_id]
        while todo:
            s = todo.pop()
            if s in need_steps:
                continue
            need_steps.add(s)
            for u in self.step(s).uses:
                if u in self.inputs:
                    need_inputs.add(u)
                else:
                    todo.append(u)
        return ([s.id for s in self.steps if s.id in need_steps],
                [n for n in self.inputs if n in need_inputs])

    def resolved(self, hashes: Mapping[str, tuple[str, int]] | None = None) -> dict[str, Any]:
        """The resolved recipe: defaults filled, block specs expanded, inputs with their sha256 and size.

        ``hashes`` maps input names to (sha256, size) measured by a run; without it the pins (or null) are
        shown. Paths are relative to the recipe's folder as written; absolute paths (e.g. from ``--set``)
        are reduced to their file names, so no local folder leaks into outputs.
        """
        r = self.recipe
        folder = r.folder
        inputs = {}
        for name, ip in self.inputs.items():
            sha, size = (hashes or {}).get(name, (ip.sha256_pin, ip.size_pin if ip.size_pin is not None
                                                   else ip.size))
            art = ip.artifact
            inputs[name] = {"path": portable_path(ip.given, folder), "sha256": sha.lower() if sha else sha,
                            "size": size, "arch": art.arch if art is not None else ip.arch_pin}
        return {
            "version": FORMAT_VERSION,
            "description": r.data.get("description"),
            "seed": r.seed,
            "vars": {k: (portable_path(v, folder) if isinstance(v, str) else v) for k, v in r.data["vars"].items()},
            "inputs": inputs,
            "steps": [s.options for s in self.steps],
            "outputs": [{"from": o.step, "path": portable_path(o.given, folder), "title": o.title,
                         "format": o.format, "dtype": o.dtype, "metadata": dict(o.metadata)} for o in self.outputs],
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (``run --dry-run --json``, ``validate --json``)."""
        return {
            "recipe": self.recipe.file,
            "valid": self.valid,
            "issues": [i.as_dict() for i in self.issues],
            "inputs": [{
                "name": n, "path": str(ip.path), "bytes": ip.size, "sha256_pin": ip.sha256_pin,
                "size_pin": ip.size_pin, "role": ip.role,
                **({"kind": ip.artifact.kind, "arch": ip.artifact.arch, "layout": ip.artifact.layout,
                    "key_format": ip.artifact.key_format, "dtype": ip.artifact.dtype,
                    "modules": None if ip.artifact.modules is None else len(ip.artifact.modules)}
                   if ip.artifact is not None else {}),
            } for n, ip in self.inputs.items()],
            "steps": [_step_dict(s) for s in self.steps],
            "outputs": [{"from": o.step, "path": str(o.path), "title": o.title, "format": o.format, "dtype": o.dtype,
                         "estimated_bytes": self.step(o.step).result.bytes,
                         "size_kind": self.step(o.step).result.size_kind, "exists": o.exists}
                        for o in self.outputs],
            "resolved_recipe": self.resolved() if self.valid else None,
        }


def _step_dict(s: StepPlan) -> dict[str, Any]:
    res = s.result
    ranks = _rank_summary(res)
    out: dict[str, Any] = {
        "id": s.id, "op": s.op, "uses": s.uses,
        "result": {"kind": res.kind, "arch": res.arch, "format": res.key_format, "layout": res.layout,
                   "dtype": res.dtype, "modules": None if res.modules is None else len(res.modules),
                   "ranks": ranks, "estimated_bytes": res.bytes, "size_kind": res.size_kind},
        "loras": [],
        "notes": s.notes,
        "options": s.options,
    }
    for use, counts in zip(s.loras, s.block_counts or [{}] * len(s.loras)):
        entry: dict[str, Any] = {"name": use.name, "weight": use.weight, "role": use.role,
                                 "blocks": use.spec, "blocks_given": use.given}
        if use.blocks is not None:
            entry["block_table"] = [{"block": b, "weight": w, "modules": counts.get(None if b == "OTHER" else b, 0)}
                                    for b, w in use.blocks.table()]
        out["loras"].append(entry)
    return out


def _rank_summary(a: Artifact) -> dict[str, int] | None:
    if a.modules is None or a.kind != "lora":
        return None
    c = Counter(m.rank for m in a.modules.values() if m.rank is not None)
    return {str(k): v for k, v in sorted(c.items(), key=lambda kv: -kv[0])}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def portable_path(text: Any, folder: Path) -> Any:
    """A path as stored in metadata: relative paths as written (``/`` separators); an absolute path becomes
    relative to the recipe's ``folder`` when it lies inside it, else just its file name."""
    if not isinstance(text, str) or not text:
        return text
    p = PurePath(text)
    if not p.is_absolute():
        return p.as_posix() if ("/" in text or "\\" in text) else text
    try:
        return Path(text).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return p.name


def block_seed(seed: int, step: str, position: int) -> int:
    """Seed of the ``R``/``U`` values of one block spec use: from the recipe seed, the step and the position."""
    from ..linalg import derive_seed

    return derive_seed(seed, position, f"blocks:{step}")


def _widest(dtypes: Sequence[str | None]) -> str:
    seen = {d for d in dtypes if d}
    if "fp64" in seen:
        return "fp64"
    if not seen or "fp32" in seen or {"fp16", "bf16"} <= seen or "mixed" in seen:
        return "fp32"
    return next(iter(seen))


_LOC = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<msg>.*)$", re.DOTALL)


def _issue_from(exc: Exception, where: Where, prefix: str = "") -> Issue:
    """An issue from a library error; a message that starts with ``file:line:col:`` keeps that position."""
    text = str(exc)
    m = _LOC.match(text)
    if m and m.group("file") == where.file:
        return Issue(Where(where.file, int(m.group("line")), int(m.group("col"))), prefix + m.group("msg"))
    return Issue(where, prefix + text)


def _dims(m: Any) -> tuple[int | None, int | None, int | None]:
    """(rank, rows, in·kh·kw) of a LoRA module from its shapes (meta tensors, no data)."""
    import torch

    from ..delta import parse_module

    try:
        d = parse_module(m.name, {sfx: torch.empty(tuple(s), device="meta") for sfx, s in m.shapes.items()})
    except (LoraSurgeryError, ValueError, RuntimeError, TypeError):
        return m.rank, None, None
    rows = int(d.out_features) if d.out_features is not None else None
    cols = int(d.in_features) if d.in_features is not None else None
    return (int(d.rank) if getattr(d, "rank", None) is not None else m.rank), rows, cols


def _lora_artifact(name: str, path: Path) -> Artifact:
    from ..ops.algebra import W_DEPENDENT, open_lora

    with open_lora(path, what="LoRA", base_hint=False) as idx:
        table = idx.table
        mods = {m.key: m for m in table.modules}
        modules: dict[str, ModInfo] = {}
        dts = []
        shapes = idx.source.shapes()
        for k, st in idx.source.dtypes().items():
            if st in _ST_NAMES and len(shapes[k]) > 0:
                dts.append(_ST_NAMES[st])
        for m in idx.modules:
            rank, rows, cols = _dims(m)
            spec = mods.get(m.target.module)
            modules[m.target.id] = ModInfo(m.target.id, m.target.module, spec.block if spec is not None else None,
                                           m.algo, rank, rows, cols,
                                           m.algo in W_DEPENDENT or "dora_scale" in m.keys)
        size = sum(f.stat().st_size for f in idx.source.files)
        return Artifact(name, "lora", idx.arch, table, path, None, idx.key_format, None,
                        _widest(dts) if len(set(dts)) != 1 else dts[0], size, "exact", modules)


def _checkpoint_artifact(name: str, path: Path) -> Artifact:
    from ..io.dtypes import ST_TO_TORCH
    from ..model import open_model

    with open_model(path, role="checkpoint") as model:
        src = model.source
        shapes = src.shapes()
        fl_numel = other = fl_bytes = 0
        fdt: set[str] = set()
        for k, st in src.dtypes().items():
            info = src.info(k)
            dt = ST_TO_TORCH.get(st)
            if dt is not None and dt.is_floating_point:
                fl_numel += math.prod(shapes[k])
                fl_bytes += info.nbytes
                fdt.add(_ST_NAMES.get(st, st.lower()))
            else:
                other += info.nbytes
        size = sum(f.stat().st_size for f in src.files)
        return Artifact(name, "checkpoint", model.arch, model.table, path, None, None, model.layout,
                        next(iter(fdt)) if len(fdt) == 1 else "mixed", size, "exact", None,
                        frozenset(model.ref_keys()), fl_numel, other, fl_bytes,
                        src.kind in ("diffusers", "component"))


def _probe(name: str, path: Path) -> Artifact:
    from ..formats.keys import looks_like_lora
    from ..io.reader import open_source

    with open_source(path) as src:
        is_lora = looks_like_lora(src.keys())
    return _lora_artifact(name, path) if is_lora else _checkpoint_artifact(name, path)


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------


class _Planner:
    def __init__(self, recipe: Recipe, *, check_files: bool, for_run: bool, overwrite: bool):
        self.r = recipe
        self.check_files = check_files
        self.for_run = for_run
        self.overwrite = overwrite
        self.issues: list[Issue] = list(recipe.warnings)
        self.artifacts: dict[str, Artifact | None] = {}
        self.inputs: dict[str, InputPlan] = {}
        self.steps: list[StepPlan] = []

    def error(self, where: Where, msg: str) -> None:
        self.issues.append(Issue(where, msg))

    # ---- inputs -------------------------------------------------------------------------------
    def plan_inputs(self) -> None:
        r = self.r
        for name, spec in r.inputs.items():
            path = _resolve(spec["path"], r.folder)
            ip = InputPlan(name, spec["path"], path, None, None, spec["sha256"], spec["size"], spec["arch"])
            self.inputs[name] = ip
            self.artifacts[name] = None
            if not self.check_files:
                continue
            at = r.where("inputs", name, "path")
            if not path.exists():
                where_to = "" if Path(spec["path"]).is_absolute() else \
                    f" (resolved against the recipe's folder: {path.absolute()})"
                self.error(at, f"input {name!r}: {spec['path']!r} does not exist{where_to}.")
                continue
            try:
                art = _probe(name, path)
            except LoraSurgeryError as exc:
                self.error(at, f"input {name!r}: {exc}")
                continue
            ip.artifact = art
            ip.size = art.bytes
            self.artifacts[name] = art
            if spec["size"] is not None and spec["size"] != art.bytes:
                self.error(r.where("inputs", name, "size"),
                           f"input {name!r}: size pin {spec['size']} does not match the file ({art.bytes} bytes); "
                           "the file is not the one the recipe was written for.")
            if spec["arch"] is not None and spec["arch"] != art.arch:
                self.error(r.where("inputs", name, "arch"),
                           f"input {name!r} is a {art.describe()}, not {spec['arch']} as the recipe says.")

    # ---- steps --------------------------------------------------------------------------------
    def plan_steps(self) -> None:
        for i, step in enumerate(self.r.steps):
            sp = self.plan_step(i, step)
            if sp is not None:
                self.steps.append(sp)
                self.artifacts[step["id"]] = sp.result
            else:
                self.artifacts[step["id"]] = None

    def _use(self, i: int, suffix: tuple, name: str, want: str) -> Artifact | None:
        art = self.artifacts.get(name)
        ip = self.inputs.get(name)
        if ip is not None and ip.role is None:
            ip.role = {"loras": "lora", "lora": "lora", "minus": "minus", "base": "base", "tuned": "tuned"}[suffix[0]]
        if art is None:
            return None
        if art.kind != want:
            self.error(self.r.where("steps", i, *suffix), f"{name!r} is a {art.describe()}, but a {want} is needed "
                                                          "here.")
            return None
        return art

    def _blocks(self, i: int, step: dict, spec: BlockSpec | None, arch: str, art: Artifact, position: int,
                suffix: tuple, present: bool = True) -> Any:
        """Resolve one block spec use for ``art``; None for no spec; an issue and None when invalid."""
        from ..blocks import parse_block_spec

        if spec is None:
            return None
        node = spec.node
        shared = self.r.data["blocks"]
        if spec.name is not None and spec.name in shared:
            node = shared[spec.name].node
        where = self.r.where("steps", i, *suffix)
        try:
            return parse_block_spec(node, arch=arch, depth=art.depth if arch == "sd3" else None,
                                    present_blocks=art.present_blocks() if present else None,
                                    seed=block_seed(self.r.seed, step["id"], position), source=str(where))
        except PlanError as exc:
            self.issues.append(_issue_from(exc, where))
            return None

    def _lora_uses(self, i: int, step: dict, field_: str) -> tuple[list[tuple[dict, Artifact | None, tuple]], bool]:
        v = step[field_]
        items = v if isinstance(v, list) else [v]
        out = []
        ok = True
        for k, item in enumerate(items):
            suffix = (field_, k) if isinstance(v, list) else (field_,)
            art = self._use(i, suffix + ("input",), item["input"], "lora")
            if art is None:
                ok = False
            out.append((item, art, suffix))
        return out, ok

    def plan_step(self, i: int, step: dict) -> StepPlan | None:
        op = step["op"]
        try:
            return getattr(self, f"plan_{op}")(i, step)
        except LoraSurgeryError as exc:
            self.error(self.r.where("steps", i), f"step {step['id']!r} ({op}): {exc}")
            return None

    def _check_rank_options(self, i: int, step: dict, *, method: str | None) -> bool:
        r = self.r
        ranked = [k for k in ("rank", "conv_rank", "rank_param") if step.get(k) is not None] + \
            (["rank_method"] if step.get("rank_method") not in (None, "fixed") else [])
        if method == "concat" and ranked:
            self.error(r.where("steps", i, ranked[0]), f"{ranked[0]} truncates the result and needs 'method: svd'; "
                                                       "the concat method is exact and keeps every rank.")
            return False
        if method == "concat":
            return True
        rm = step.get("rank_method") or "fixed"
        if rm == "fixed":
            if step.get("rank") is None:
                self.error(r.where("steps", i), f"step {step['id']!r}: a {'resize' if method is None else 'svd'} "
                                                "needs 'rank: N' (or a dynamic 'rank_method' with 'rank_param').")
                return False
            if step.get("rank_param") is not None:
                self.error(r.where("steps", i, "rank_param"), "rank_param applies to the dynamic rank methods "
                                                              "(sv_ratio, sv_fro, sv_cumulative), not to 'fixed'.")
                return False
            return True
        p = step.get("rank_param")
        if p is None:
            ex = {"sv_ratio": "10", "sv_fro": "0.9", "sv_cumulative": "0.9"}[rm]
            self.error(r.where("steps", i, "rank_method"), f"rank_method {rm} needs rank_param (e.g. {ex}).")
            return False
        if rm == "sv_ratio" and not p > 1:
            self.error(r.where("steps", i, "rank_param"), f"sv_ratio keeps singular values above σ₁ / ratio, so "
                                                          f"rank_param must be > 1 (e.g. 2-20), got {p:g}.")
            return False
        if rm in ("sv_fro", "sv_cumulative") and not 0 < p <= 1:
            self.error(r.where("steps", i, "rank_param"), f"{rm} takes a fraction in (0, 1] (e.g. 0.9), got {p:g}.")
            return False
        if rm == "sv_cumulative" and step.get("svd") == "randomized":
            self.error(r.where("steps", i, "svd"), "rank_method sv_cumulative needs the whole spectrum: use svd "
                                                   "exact or auto, not randomized.")
            return False
        return True

    def _combined_lora(self, i: int, step: dict, uses: list[tuple[dict, Artifact | None, tuple]], signs: list[float],
                       roles: list[str]) -> StepPlan | None:
        """merge / subtract: LoRAs of one architecture, blocks resolved, result estimated."""
        r = self.r
        ok = self._check_rank_options(i, step, method=step["method"])
        arts = [a for _, a, _ in uses]
        if any(a is None for a in arts):
            return None
        first = arts[0]
        assert first is not None
        for (item, a, suffix) in uses[1:]:
            assert a is not None
            if a.arch != first.arch:
                self.error(r.where("steps", i, *suffix), f"{item['input']!r} is a {a.arch} LoRA but "
                                                         f"{uses[0][0]['input']!r} is {first.arch}; LoRAs can only "
                                                         "be combined with LoRAs of the same model family.")
                ok = False
        for (item, a, suffix) in uses:
            assert a is not None
            bad = [m.target for m in (a.modules or {}).values() if m.needs_base]
            if bad:
                self.error(r.where("steps", i, *suffix), f"{item['input']!r} has {len(bad)} modules whose change "
                                                         "depends on the base weight (DoRA, (IA)³, GLoRA, OFT), e.g. "
                                                         f"{bad[0]}; they cannot be {step['op']}d without a base "
                                                         "checkpoint: bake them instead.")
                ok = False
        lora_uses: list[LoraUse] = []
        counts: list[dict[str | None, int]] = []
        for k, ((item, a, suffix), sign, role) in enumerate(zip(uses, signs, roles)):
            assert a is not None
            spec, src = (item["blocks"], "item") if item["blocks"] is not None else \
                ((step["blocks"], "step") if step["blocks"] is not None else (None, ""))
            where_suffix = suffix + ("blocks",) if src == "item" else ("blocks",)
            bw = self._blocks(i, step, spec, first.arch, a, k, where_suffix)
            if spec is not None and bw is None:
                ok = False
            lora_uses.append(LoraUse(item["input"], sign * item["weight"], bw,
                                     spec.value if spec is not None else None, src, role))
            counts.append(_block_counts(a))
        if not ok:
            return None
        fmt = step["format"] or DEFAULT_FORMAT[first.arch]
        dtype = step["dtype"] or _widest([a.dtype for a in arts])  # type: ignore[union-attr]
        modules, zero = _combine_modules(lora_uses, arts)  # type: ignore[arg-type]
        notes = []
        if zero:
            notes.append(f"{zero} input modules have weight × block weight 0 and are left out.")
        size_kind = "estimate"
        if step["method"] == "svd":
            modules, size_kind = _truncated(modules, step)
        if not modules:
            self.error(r.where("steps", i), f"step {step['id']!r}: every module has weight × block weight 0; the "
                                            "result would be empty.")
            return None
        res = Artifact(step["id"], "lora", first.arch, first.table, None, step["id"], fmt, None, dtype,
                       _lora_bytes(modules, dtype), size_kind, modules)
        options = dict(step)
        options["format"], options["dtype"] = fmt, dtype
        if step["method"] == "svd":
            options["rank_method"] = step["rank_method"] or "fixed"
        if step["op"] == "merge":
            options["loras"] = [_item_out(u, 1.0) for u in lora_uses]
        else:
            options["lora"] = _item_out(lora_uses[0], 1.0)
            options["minus"] = _item_out(lora_uses[1], -1.0)
        options["blocks"] = None
        return StepPlan(i, step["id"], step["op"], r.where("steps", i), [u.name for u in lora_uses], options,
                        lora_uses, res, notes, counts)

    def plan_merge(self, i: int, step: dict) -> StepPlan | None:
        uses, ok = self._lora_uses(i, step, "loras")
        if not ok:
            return None
        return self._combined_lora(i, step, uses, [1.0] * len(uses), ["lora"] * len(uses))

    def plan_subtract(self, i: int, step: dict) -> StepPlan | None:
        b, ok1 = self._lora_uses(i, step, "lora")
        a, ok2 = self._lora_uses(i, step, "minus")
        if not (ok1 and ok2):
            return None
        return self._combined_lora(i, step, b + a, [1.0, -1.0], ["lora", "minus"])

    def plan_resize(self, i: int, step: dict) -> StepPlan | None:
        r = self.r
        art = self._use(i, ("lora",), step["lora"], "lora")
        ok = self._check_rank_options(i, step, method=None)
        if art is None or not ok:
            return None
        bad = [m.target for m in (art.modules or {}).values() if m.needs_base]
        if bad:
            self.error(r.where("steps", i, "lora"), f"{step['lora']!r} has modules that depend on the base weight "
                                                    f"(e.g. {bad[0]}); they cannot be resized without a base.")
            return None
        fmt = step["format"] or _convention(art)
        dtype = step["dtype"] or art.dtype or "fp32"
        notes = []
        modules, size_kind = (_truncated(dict(art.modules), step) if art.modules is not None else (None, "unknown"))
        if art.modules is not None and step.get("rank") is not None and (step.get("rank_method") or "fixed") == "fixed":
            have = {m.rank for m in art.modules.values() if m.rank is not None}
            if have and max(have) <= step["rank"]:
                ranks = ", ".join(map(str, sorted(have)))
                notes.append(f"every module already has rank ≤ {step['rank']} (ranks {ranks}); "
                             "resize keeps them (re-factored, lossless).")
        res = Artifact(step["id"], "lora", art.arch, art.table, None, step["id"], fmt, None, dtype,
                       _lora_bytes(modules, dtype) if modules is not None else None, size_kind, modules)
        options = dict(step)
        options["format"], options["dtype"] = fmt, dtype
        return StepPlan(i, step["id"], "resize", r.where("steps", i), [step["lora"]], options, [], res, notes)

    def plan_convert(self, i: int, step: dict) -> StepPlan | None:
        r = self.r
        art = self._use(i, ("lora",), step["lora"], "lora")
        if art is None:
            return None
        dtype = step["dtype"] or art.dtype or "fp32"
        modules = dict(art.modules) if art.modules is not None else None
        res = Artifact(step["id"], "lora", art.arch, art.table, None, step["id"], step["format"], None, dtype,
                       _lora_bytes(modules, dtype) if modules is not None else None,
                       "estimate" if modules is not None else "unknown", modules)
        options = dict(step)
        options["dtype"] = dtype
        return StepPlan(i, step["id"], "convert", r.where("steps", i), [step["lora"]], options, [], res)

    def plan_bake(self, i: int, step: dict) -> StepPlan | None:
        r = self.r
        base = self._use(i, ("base",), step["base"], "checkpoint")
        uses, ok = self._lora_uses(i, step, "loras")
        if base is None or not ok:
            return None
        if base.folder:
            self.error(r.where("steps", i, "base"), f"{step['base']!r} is a diffusers folder; baking it gives a "
                                                    "folder, and recipe outputs are single .safetensors files. Bake "
                                                    "it with `lorasurgery merge --base`, or use a single-file "
                                                    "checkpoint.")
            return None
        lora_uses: list[LoraUse] = []
        counts = []
        fine = True
        for k, (item, a, suffix) in enumerate(uses):
            assert a is not None
            if a.arch != base.arch:
                self.error(r.where("steps", i, *suffix), f"{item['input']!r} is a {a.arch} LoRA but the base "
                                                         f"{step['base']!r} is a {base.arch} checkpoint.")
                fine = False
                continue
            if a.modules is not None and base.ref_keys is not None:
                missing = sorted({m.module for m in a.modules.values() if m.module not in base.ref_keys})
                if missing and not step["allow_unmatched"]:
                    shown = ", ".join(missing[:5]) + (f" … (+{len(missing) - 5})" if len(missing) > 5 else "")
                    self.error(r.where("steps", i, *suffix), f"{len(missing)} modules of {item['input']!r} target "
                                                             f"weights the base {step['base']!r} does not have "
                                                             f"({shown}); set 'allow_unmatched: true' to skip them.")
                    fine = False
                    continue
            spec, src = (item["blocks"], "item") if item["blocks"] is not None else \
                ((step["blocks"], "step") if step["blocks"] is not None else (None, ""))
            bw = self._blocks(i, step, spec, base.arch, a, k, suffix + ("blocks",) if src == "item" else ("blocks",))
            if spec is not None and bw is None:
                fine = False
            lora_uses.append(LoraUse(item["input"], item["weight"], bw, spec.value if spec is not None else None, src))
            counts.append(_block_counts(a))
        seen: dict[str, int] = {}
        for k, u in enumerate(lora_uses):
            if u.name in seen:
                self.error(r.where("steps", i, "loras", k), f"{u.name!r} is baked twice (items {seen[u.name] + 1} and "
                                                            f"{k + 1}); give it once with the sum of the weights.")
                fine = False
            seen[u.name] = k
        if not fine:
            return None
        dtype = step["dtype"]
        if dtype == "keep":
            size = base.bytes
        else:
            size = base.other_bytes + base.float_numel * ITEMSIZE[dtype] + max(0, (base.bytes or 0)
                                                                              - base.other_bytes - base.float_bytes)
        res = Artifact(step["id"], "checkpoint", base.arch, base.table, None, step["id"], None, base.layout,
                       base.dtype if dtype == "keep" else dtype, size, "estimate", None, base.ref_keys,
                       base.float_numel, base.other_bytes, base.float_numel * ITEMSIZE.get(dtype, 0)
                       if dtype != "keep" else base.float_bytes)
        options = dict(step)
        options["loras"] = [_item_out(u, 1.0) for u in lora_uses]
        options["blocks"] = None
        return StepPlan(i, step["id"], "bake", r.where("steps", i), [step["base"]] + [u.name for u in lora_uses],
                        options, lora_uses, res, [], counts)

    def plan_extract(self, i: int, step: dict) -> StepPlan | None:
        r = self.r
        base = self._use(i, ("base",), step["base"], "checkpoint")
        tuned = self._use(i, ("tuned",), step["tuned"], "checkpoint")
        rm = step["rank_method"]
        ok = self._check_rank_options(i, step, method="extract")
        if base is None or tuned is None or not ok:
            return None
        if base.arch != tuned.arch:
            self.error(r.where("steps", i, "tuned"), f"{step['tuned']!r} is a {tuned.describe()} but the base "
                                                     f"{step['base']!r} is a {base.describe()}; both must be the same "
                                                     "architecture.")
            return None
        bw = None
        if step["blocks"] is not None:
            bw = self._blocks(i, step, step["blocks"], base.arch, Artifact("", "lora", base.arch, base.table), 0,
                              ("blocks",), present=False)
            if bw is None:
                return None
        fmt = step["format"] or DEFAULT_FORMAT[base.arch]
        dtype = step["dtype"] or DEFAULT_EXTRACT_DTYPE[base.arch]
        options = dict(step)
        options["format"], options["dtype"] = fmt, dtype
        options["blocks"] = bw.spec if bw is not None and not bw.is_identity else None
        modules: dict[str, ModInfo] | None = None
        size_kind = "unknown"
        eplan = None
        notes: list[str] = []
        if base.path is not None and tuned.path is not None:
            from ..ops.extract import plan_extract

            try:
                # the output path only matters for the output checks, which the recipe does itself
                eplan = plan_extract(base.path, tuned.path, r.folder / f".lorasurgery-plan-{step['id']}.safetensors",
                                     overwrite=True, **_extract_kwargs(options, seed=r.seed, device="cpu"))
            except LoraSurgeryError as exc:
                self.error(r.where("steps", i), f"step {step['id']!r} (extract): {exc}")
                return None
            fixed = rm == "fixed"
            modules = {j.key: ModInfo(j.key, j.key, j.block, "lora", j.k, j.m, j.n) for j in eplan.jobs}
            size_kind = "estimate" if fixed else "upper bound"
            notes.extend(eplan.notes)
            if eplan.skipped:
                reasons = Counter(s.reason for s in eplan.skipped)
                notes.append("not extracted: " + "; ".join(f"{n} × {why}" for why, n in reasons.most_common(4)))
        res = Artifact(step["id"], "lora", base.arch, base.table, None, step["id"], fmt, None, dtype,
                       _lora_bytes(modules, dtype) if modules is not None else None, size_kind, modules)
        sp = StepPlan(i, step["id"], "extract", r.where("steps", i), [step["base"], step["tuned"]], options, [], res,
                      notes)
        sp.extract_plan = eplan
        return sp

    # ---- outputs ----------------------------------------------------------------------------------
    def plan_outputs(self) -> list[OutputPlan]:
        r = self.r
        outs = []
        input_paths = {n: ip.path for n, ip in self.inputs.items()}
        for k, (o, at) in enumerate(zip(r.outputs, r.output_at)):
            path = _resolve(o["path"], r.folder)
            sp = next((s for s in self.steps if s.id == o["from"]), None)
            title = o["title"] or _stem(path)
            fmt = sp.result.key_format if sp is not None and sp.result.kind == "lora" else None
            dtype = sp.result.dtype if sp is not None else o.get("dtype")
            op = OutputPlan(k, o["from"], o["path"], path, title, fmt, dtype, dict(o["metadata"]), r.where(*at))
            pw = r.where(*at, "path") if at[0] == "outputs" else r.where(*at)
            for name, ip in input_paths.items():
                if _same(path, ip):
                    self.error(pw, f"output {o['path']!r} is the input {name!r}; lorasurgery never writes over its "
                                   "inputs.")
            op.exists = path.exists()
            if op.exists and path.is_dir():
                self.error(pw, f"output {o['path']!r} is a folder; give a .safetensors file path.")
            elif op.exists and self.for_run and not self.overwrite:
                self.error(pw, f"output {o['path']!r} already exists; pass --overwrite to replace it.")
            outs.append(op)
        return outs


def _extract_kwargs(options: Mapping[str, Any], *, seed: int, device: str) -> dict[str, Any]:
    keys = ("rank", "conv_rank", "rank_method", "rank_param", "svd", "split", "text_encoder", "min_diff",
            "clamp_quantile", "include_extra", "power_iters", "blocks", "format", "dtype")
    return {k: options[k] for k in keys} | {"seed": seed, "device": device}


def _item_out(u: LoraUse, sign: float) -> dict[str, Any]:
    return {"input": u.name, "weight": sign * u.weight, "blocks": u.spec}


def _block_counts(a: Artifact) -> dict[str | None, int]:
    return dict(Counter(m.block for m in (a.modules or {}).values()))


def _convention(a: Artifact) -> str:
    kf = a.key_format or ""
    if kf in ("peft", "peft-raw", "kohya", "kohya-dp"):
        return "peft" if kf.startswith("peft") else "kohya"
    return DEFAULT_FORMAT[a.arch]


def _combine_modules(uses: Sequence[LoraUse], arts: Sequence[Artifact]) -> tuple[dict[str, ModInfo], int]:
    """Modules of a concat result: ranks add up per target; zero-weight contributions drop out."""
    out: dict[str, ModInfo] = {}
    zero = 0
    for u, a in zip(uses, arts):
        for t, m in (a.modules or {}).items():
            factor = u.weight * (u.blocks.weight(m.block) if u.blocks is not None else 1.0)
            if factor == 0:
                zero += 1
                continue
            have = out.get(t)
            if have is None:
                out[t] = ModInfo(t, m.module, m.block, m.algo, m.rank, m.rows, m.cols)
            else:
                have.rank = None if have.rank is None or m.rank is None else have.rank + m.rank
    return out, zero


def _truncated(modules: dict[str, ModInfo], step: Mapping[str, Any]) -> tuple[dict[str, ModInfo], str]:
    """Rank bounds after an SVD truncation: min(rank or cap, rows, cols, input rank)."""
    rm = step.get("rank_method") or "fixed"
    cap = step.get("rank")
    out = {}
    for t, m in modules.items():
        bounds = [x for x in (cap, m.rows, m.cols, m.rank) if x is not None]
        r = min(bounds) if bounds else None
        out[t] = ModInfo(t, m.module, m.block, "lora", r, m.rows, m.cols)
    return out, ("estimate" if rm == "fixed" else "upper bound")


def _lora_bytes(modules: Mapping[str, ModInfo] | None, dtype: str) -> int | None:
    if modules is None:
        return None
    size = ITEMSIZE.get(dtype, 4)
    total = 0
    for m in modules.values():
        if m.rank is None or m.rows is None or m.cols is None:
            if m.rows is not None and m.cols is not None:
                total += m.rows * m.cols * size  # full / dense module
            continue
        total += (m.rows + m.cols) * m.rank * size + 4
    return total


def _resolve(given: str, folder: Path) -> Path:
    p = Path(os.path.expanduser(given))
    return p if p.is_absolute() else folder / p


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else path.stem


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def plan_recipe(recipe: Recipe, *, check_files: bool = True, for_run: bool = False,
                overwrite: bool = False) -> RecipePlan:
    """Plan ``recipe`` from headers (see the module docstring). Problems are collected, not raised:
    check :attr:`RecipePlan.valid` or call :meth:`RecipePlan.raise_errors`.

    ``check_files=False`` skips everything that needs the input files (``validate --schema-only``);
    ``for_run`` turns existing outputs into errors unless ``overwrite``.
    """
    p = _Planner(recipe, check_files=check_files, for_run=for_run, overwrite=overwrite)
    p.plan_inputs()
    if check_files:
        p.plan_steps()
    outputs = p.plan_outputs()
    issues = sorted(p.issues, key=lambda i: (i.where.file, i.where.line, i.where.column))
    return RecipePlan(recipe, p.inputs, p.steps, outputs, issues)


def verify_pins(plan: RecipePlan, *, locked: bool = False,
                progress: Any = None) -> dict[str, tuple[str, int]]:
    """Hash every input (full read) and check the ``sha256``/``size`` pins; returns name -> (sha256, size).

    Raises :class:`RecipeError` listing every mismatch (at the pin's line) before any work is done.
    ``locked`` also requires a ``sha256`` pin on every input. ``progress(name, index, count)`` is called before
    each input is hashed.
    """
    from ..io.reader import open_source

    r = plan.recipe
    issues: list[Issue] = []
    out: dict[str, tuple[str, int]] = {}
    if locked:
        for name, ip in plan.inputs.items():
            if ip.sha256_pin is None:
                issues.append(Issue(r.key_where("inputs", name), f"input {name!r} has no sha256 pin; --locked requires "
                                                                 "a pin on every input (the run prints each input's "
                                                                 "sha256 to copy into the recipe)."))
    if issues:
        raise RecipeError(issues)
    names = list(plan.inputs)
    for k, name in enumerate(names):
        ip = plan.inputs[name]
        if progress is not None:
            progress(name, k, len(names))
        with open_source(ip.path) as src:
            size = sum(f.stat().st_size for f in src.files)
            if ip.size_pin is not None and ip.size_pin != size:
                issues.append(Issue(r.where("inputs", name, "size"), f"input {name!r}: size pin {ip.size_pin} does not "
                                                                     f"match the file ({size} bytes)."))
                continue
            digest = src.sha256()
        out[name] = (digest, size)
        if ip.sha256_pin is not None and ip.sha256_pin.lower() != digest:
            issues.append(Issue(r.where("inputs", name, "sha256"),
                                f"input {name!r}: sha256 pin {ip.sha256_pin.lower()} does not match the file "
                                f"{ip.given} (sha256 {digest}); the file is not the one the recipe was written "
                                "for. Nothing was written."))
    if issues:
        raise RecipeError(issues)
    return out
