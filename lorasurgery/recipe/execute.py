"""Running a recipe: pins first, then each step through the library operations, then the outputs.

:func:`run_recipe` does, in this order, and writes nothing before step 4:

1. load and schema-check the recipe (:mod:`.schema`), with ``--set`` values;
2. plan it from headers (:func:`.plan.plan_recipe`): every error a dry run would report stops the run here,
   including outputs that exist without ``overwrite``;
3. hash every input (full read) and check the ``size``/``sha256`` pins (:func:`.plan.verify_pins`); a
   mismatch stops the run;
4. run the steps in file order, each by calling its library operation
   (:func:`lorasurgery.ops.extract.extract`, :func:`lorasurgery.ops.algebra.merge_loras`, ``subtract``,
   ``resize``, ``convert``, :func:`lorasurgery.ops.bake.bake`). Every step writes its result to
   ``<step id>.safetensors`` in a temporary folder (``.lorasurgery-<random>`` beside the first output, or
   ``temp_dir``); later steps read it from there. Intermediates therefore stream like any file and never need
   to fit in memory;
5. write the outputs: each is a copy of its step's file, tensor by tensor, with the metadata completed:
   ``modelspec.title``, the recipe's provenance keys (``lorasurgery.version``, ``lorasurgery.recipe`` = the
   resolved recipe as canonical JSON, ``lorasurgery.inputs`` = the inputs the output depends on with their
   sha256 and size, ``lorasurgery.steps`` = each contributing step's operation and resolved options,
   ``lorasurgery.env`` = Python/torch/safetensors/numpy versions and device, ``lorasurgery.seed``,
   ``lorasurgery.output``) and the output's extra ``metadata``; ``sshs_*`` hashes are recomputed. The tensor
   data is the step's, byte for byte. Outputs are written together at the end (temporary file + rename each),
   so a failing step leaves no output; the temporary folder is always removed.

Everything is deterministic: the temporary names are the step ids, paths in metadata are relative to the
recipe (absolute ones reduced to file names), and no date is written, so the same recipe and inputs give
byte-identical outputs on the same device type and library versions.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import InputError, LoraSurgeryError, OutputError, PlanError
from .plan import OutputPlan, RecipePlan, StepPlan, _extract_kwargs, plan_recipe, portable_path, verify_pins
from .schema import Recipe, load_recipe

__all__ = ["Reporter", "StepResult", "OutputResult", "RunReport", "run_recipe", "run_plan", "publish"]


class Reporter:
    """Progress callbacks of a run; the default does nothing. The CLI renders them (TTY bars or plain lines)."""

    def hashing(self, name: str, index: int, count: int) -> None:
        """Before input ``name`` is hashed."""

    def step_start(self, step: StepPlan, index: int, count: int) -> None:
        """Before a step runs."""

    def step_progress(self, done: float, total: float, label: str = "") -> None:
        """Progress inside the running step (units depend on the operation)."""

    def step_done(self, step: StepPlan, result: "StepResult") -> None:
        """After a step wrote its result."""

    def output_written(self, output: "OutputResult") -> None:
        """After an output file was written."""


@dataclass
class StepResult:
    id: str
    op: str
    seconds: float
    summary: dict[str, Any]
    provenance: Any = None  # the operation's own resolved options (its lorasurgery.recipe)


@dataclass
class OutputResult:
    step: str
    path: Path
    given: str
    sha256: str
    bytes: int
    sshs_model_hash: str


@dataclass
class RunReport:
    recipe: str
    inputs: dict[str, tuple[str, int]]
    steps: list[StepResult]
    outputs: list[OutputResult]
    seconds: float
    resolved: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "inputs": [{"name": n, "sha256": s, "size": z} for n, (s, z) in self.inputs.items()],
            "steps": [{"id": s.id, "op": s.op, "seconds": round(s.seconds, 3), **s.summary} for s in self.steps],
            "outputs": [{"from": o.step, "path": str(o.path), "sha256": o.sha256, "bytes": o.bytes,
                         "sshs_model_hash": o.sshs_model_hash} for o in self.outputs],
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "resolved_recipe": self.resolved,
        }


def run_recipe(path: str | Path, sets: Mapping[str, str] | None = None, *, overwrite: bool = False,
               device: str = "auto", temp_dir: str | Path | None = None, locked: bool = False,
               display: str | None = None, reporter: Reporter | None = None) -> RunReport:
    """Run the recipe at ``path`` (see the module docstring); returns what was written.

    Raises :class:`~.loader.RecipeError` (invalid recipe, failed header checks, pin mismatch: nothing written)
    or the operation's :class:`~lorasurgery.errors.LoraSurgeryError` (no output written).
    """
    recipe = load_recipe(path, sets, display=display)
    plan = plan_recipe(recipe, for_run=True, overwrite=overwrite)
    plan.raise_errors()
    return run_plan(plan, overwrite=overwrite, device=device, temp_dir=temp_dir, locked=locked, reporter=reporter)


def run_plan(plan: RecipePlan, *, overwrite: bool = False, device: str = "auto", temp_dir: str | Path | None = None,
             locked: bool = False, reporter: Reporter | None = None) -> RunReport:
    """Steps 3-5 of :func:`run_recipe` for an already valid plan."""
    from ..linalg import resolve_device

    t0 = time.perf_counter()
    rep = reporter or Reporter()
    plan.raise_errors()
    hashes = verify_pins(plan, locked=locked, progress=rep.hashing)
    dev = str(resolve_device(device))
    resolved = plan.resolved(hashes)
    created: list[Path] = []
    written: list[Path] = []
    root = Path(temp_dir) if temp_dir is not None else plan.outputs[0].path.parent
    try:
        for o in plan.outputs:
            _make_parents(o.path.parent, created)
        if temp_dir is not None and not root.is_dir():
            raise OutputError(f"the temporary folder {root} does not exist; create it or leave --temp-dir out.", root)
        tmp = Path(tempfile.mkdtemp(prefix=".lorasurgery-", dir=root))
    except BaseException:
        _remove_created(created)
        raise
    results: dict[str, StepResult] = {}
    outputs: list[OutputResult] = []
    try:
        paths: dict[str, Path] = {n: ip.path for n, ip in plan.inputs.items()}
        for k, sp in enumerate(plan.steps):
            rep.step_start(sp, k, len(plan.steps))
            out = tmp / f"{sp.id}.safetensors"
            s0 = time.perf_counter()
            try:
                summary = _run_step(sp, paths, out, plan.recipe.seed, dev, rep)
            except LoraSurgeryError as exc:
                cls = type(exc) if type(exc) in (InputError, OutputError, PlanError) else PlanError
                tail = "" if "written" in str(exc) else " No output was written."
                raise cls(f"{sp.where}: step {sp.id!r} ({sp.op}) failed: {exc}{tail}") from exc
            paths[sp.id] = out
            res = StepResult(sp.id, sp.op, time.perf_counter() - s0, summary, _op_provenance(out))
            results[sp.id] = res
            rep.step_done(sp, res)
        for o in plan.outputs:
            meta = output_metadata(plan, o, hashes, resolved, results, dev)
            inputs = [ip.path for ip in plan.inputs.values()]
            model_hash = publish(paths[o.step], o.path, meta, overwrite=overwrite, inputs=inputs)
            written.append(o.path)
            from ..io.hashes import sha256_file

            res_o = OutputResult(o.step, o.path, o.given, sha256_file(o.path), o.path.stat().st_size, model_hash)
            outputs.append(res_o)
            rep.output_written(res_o)
    except BaseException:
        for p in written:
            try:
                p.unlink()
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warnings = [str(i) for i in plan.warnings]
    return RunReport(plan.recipe.file, hashes, list(results.values()), outputs, time.perf_counter() - t0, resolved,
                     warnings)


def _make_parents(folder: Path, created: list[Path]) -> None:
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for m in reversed(missing):
        m.mkdir()
        created.append(m)


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass


def _op_provenance(path: Path) -> Any:
    from ..io.reader import read_header

    meta = read_header(path).metadata
    text = meta.get("lorasurgery.recipe")
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# --------------------------------------------------------------------------------------------------
# steps
# --------------------------------------------------------------------------------------------------


def _run_step(sp: StepPlan, paths: Mapping[str, Path], out: Path, seed: int, device: str,
              rep: Reporter) -> dict[str, Any]:
    from ..ops.inputs import WeightedInput

    o = sp.options
    op = sp.op

    def algebra_progress(done: int, total: int, label: str = "") -> None:
        rep.step_progress(done, total, label)

    rank_kw = {}
    if op in ("merge", "subtract", "resize") and (op == "resize" or o["method"] == "svd"):
        rank_kw = {"rank": o["rank"], "rank_method": o["rank_method"], "rank_param": o["rank_param"],
                   "conv_rank": o["conv_rank"]}
    if op == "extract":
        from ..ops.extract import extract

        def extract_progress(stage: str, done: int, total: int) -> None:
            rep.step_progress(done, total, stage)

        report = extract(paths[o["base"]], paths[o["tuned"]], out, progress=extract_progress,
                         **_extract_kwargs(o, seed=seed, device=device))
        return {"modules": len(report.modules), "bytes": report.output.bytes, "notes": list(report.plan.notes),
                "mean_retained": report.mean_retained if report.modules else None,
                "skipped": len(report.skipped)}
    if op == "merge":
        from ..ops.algebra import merge_loras

        inputs = [WeightedInput(paths[u.name], u.weight, u.spec) for u in sp.loras]
        report = merge_loras(inputs, out, method=o["method"], fmt=o["format"], dtype=o["dtype"], device=device,
                             svd=o["svd"], seed=seed, drop_unsupported=o["drop_unsupported"],
                             progress=algebra_progress, **rank_kw)
        return _algebra_summary(report)
    if op == "subtract":
        from ..ops.algebra import subtract

        b, a = sp.loras
        report = subtract(WeightedInput(paths[b.name], b.weight, b.spec),
                          WeightedInput(paths[a.name], -a.weight, a.spec), out, fmt=o["format"], dtype=o["dtype"],
                          device=device, svd=o["svd"], seed=seed, drop_unsupported=o["drop_unsupported"],
                          progress=algebra_progress, **rank_kw)
        return _algebra_summary(report)
    if op == "resize":
        from ..ops.algebra import resize

        report = resize(paths[o["lora"]], out, fmt=o["format"], dtype=o["dtype"], device=device, svd=o["svd"],
                        seed=seed, drop_unsupported=o["drop_unsupported"], progress=algebra_progress, **rank_kw)
        return _algebra_summary(report)
    if op == "convert":
        from ..ops.algebra import convert

        report = convert(paths[o["lora"]], out, to=o["format"], dtype=o["dtype"],
                         drop_unsupported=o["drop_unsupported"])
        return _algebra_summary(report)
    if op == "bake":
        from ..ops.bake import bake

        def bake_progress(done: int, total: int) -> None:
            rep.step_progress(done, total, "bytes")

        loras = [WeightedInput(paths[u.name], u.weight, u.spec) for u in sp.loras]
        report = bake(paths[o["base"]], loras, out, blocks=None, dtype=o["dtype"], device=device,
                      allow_unmatched=o["allow_unmatched"], allow_nonfinite=o["allow_nonfinite"],
                      progress=bake_progress)
        return {"bytes": report.out_bytes, "tensors_changed": report.tensors_changed,
                "unmatched": report.unmatched_count, "lost_fraction": report.lost_fraction,
                "notes": list(report.warnings)}
    raise ValueError(f"unknown operation {op!r}")  # the schema admits only the operations above


def _algebra_summary(report: Any) -> dict[str, Any]:
    d = report.as_dict()
    return {"modules": d["modules"], "bytes": d["bytes"], "notes": d["notes"], "dropped": d["dropped"],
            "mean_retained_fro": d["mean_retained_fro"], "min_retained_fro": d["min_retained_fro"]}


# --------------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------------


def output_metadata(plan: RecipePlan, o: OutputPlan, hashes: Mapping[str, tuple[str, int]],
                    resolved: Mapping[str, Any], results: Mapping[str, StepResult], device: str) -> dict[str, str]:
    """The provenance keys and extra metadata of one output (all strings, deterministic)."""
    from .. import __version__
    from ..io.metadata import canonical_json, environment

    r: Recipe = plan.recipe
    steps, inputs = plan.dependencies(o.step)
    rows = []
    for name in inputs:
        ip = plan.inputs[name]
        sha, size = hashes[name]
        rows.append({"name": name, "path": portable_path(ip.given, r.folder), "sha256": sha, "size": size,
                     "role": ip.role, "weight": None})
    meta = {
        "modelspec.title": o.title,
        "lorasurgery.version": __version__,
        "lorasurgery.recipe": canonical_json(resolved),
        "lorasurgery.inputs": canonical_json(rows),
        "lorasurgery.steps": canonical_json([{"id": s, "op": plan.step(s).op, "options": results[s].provenance}
                                             for s in steps]),
        "lorasurgery.env": canonical_json(environment(device, None)),
        "lorasurgery.seed": str(r.seed),
        "lorasurgery.output": canonical_json({"from": o.step, "path": portable_path(o.given, r.folder)}),
    }
    meta.update(o.metadata)
    return meta


def publish(src_path: Path, out: Path, metadata: Mapping[str, str], *, overwrite: bool,
            inputs: list[Path]) -> str:
    """Copy the safetensors file ``src_path`` to ``out`` tensor by tensor with its metadata completed.

    The source's ``lorasurgery.*`` keys are replaced by ``metadata`` (which is applied last); ``sshs_*`` hashes
    are recomputed when the source has them. Tensor order and bytes are kept, so the data section (and
    ``sshs_model_hash``) is identical. Returns the data section's SHA-256.
    """
    from ..io.reader import open_source
    from ..io.writer import StreamingWriter, TensorSpec

    with open_source(src_path) as src:
        infos = sorted((src.info(k) for k in src.keys()), key=lambda i: i.start)
        meta = {k: v for k, v in src.metadata.items() if not k.startswith("lorasurgery.")}
        fill = any(k.startswith("sshs_") for k in meta)
        meta.update(metadata)
        specs = [TensorSpec(i.name, i.torch_dtype, tuple(i.shape)) for i in infos]
        with StreamingWriter(out, specs, meta, overwrite=overwrite, inputs=inputs, fill_sshs_hashes=fill) as w:
            for i in infos:
                w.write(i.name, src.get(i.name))
    return w.model_hash or ""
