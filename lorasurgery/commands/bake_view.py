"""Rendering of a bake (``lorasurgery merge LORA... --base CKPT``) and the demo step :func:`demo_bake`.

:func:`render_bake_report` prints the closing tables of :func:`lorasurgery.ops.bake.bake` with rich: the
output, the inputs (modules baked per LoRA, unmatched and non-finite counts, block weights), the precision
checks (elements whose change was lost to the cast, fp8 loss, modules that kept little of their delta) and
any warnings. :func:`bake_report_dict` gives the same as plain data for ``--json``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..ops.bake import BakeReport
from . import human_size

WEAK_SHOWN = 10


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _weight(w: float) -> str:
    return f"{w:g}"


@contextmanager
def bake_progress(console: Console, enabled: bool) -> Iterator:
    """A rich progress bar over the base's bytes (``progress(done, total)`` callback); None when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("[bold]baking"), BarColumn(), DownloadColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=True)
    task = bar.add_task("bake", total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or 1)

    with bar:
        yield update


def render_bake_report(report: BakeReport, console: Console) -> None:
    """Print the summary, the inputs, the precision checks and the warnings of a bake."""
    t = Table(title=f"baked {report.out.name}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("base", f"{report.base.name}: {report.arch}, {report.layout} layout, {human_size(report.base_bytes)}, "
                      f"sha256 {report.base_sha256[:16]}…")
    files = len(report.out_files)
    what = f"{files} files" if files > 1 else "1 file"
    t.add_row("output", f"{report.out} ({what}, {human_size(report.out_bytes)}, dtype {report.dtype})")
    if files == 1:
        t.add_row("output data sha256", report.out_sha256)
    t.add_row("tensors", f"{report.tensors}: {report.tensors_changed} changed, {report.tensors_copied} copied "
                         f"byte for byte" + (f", {report.tensors_cast} cast" if report.tensors_cast else ""))
    t.add_row("precision", _precision(report))
    if report.fp8_relative_error is not None:
        t.add_row("fp8 loss", f"{100 * report.fp8_relative_error:.1f}% of the applied delta over "
                              f"{report.fp8_tensors} fp8 tensors"
                  + (f", {report.saturated} elements saturated" if report.saturated else ""))
    t.add_row("module check", f"{report.checks} modules, {len(report.weak_modules)} kept < 50% of their ΔW")
    if report.unmatched_count:
        t.add_row("[yellow]unmatched keys[/]", f"{report.unmatched_count} skipped (--allow-unmatched)")
    if report.nonfinite_skipped:
        t.add_row("[yellow]non-finite[/]", f"{len(report.nonfinite_skipped)} skipped (--allow-nonfinite)")
    if report.copied_files:
        t.add_row("files copied", f"{len(report.copied_files)} (configs, tokenizers, …)")
    secs = report.seconds
    rate = report.base_bytes / secs / 2**20 if secs > 0 else math.inf
    t.add_row("time", f"{secs:.2f} s ({rate:.0f} MiB/s) on {report.device}")
    console.print(t)

    it = Table(title="inputs", title_justify="left")
    for col, kw in (("LoRA", {}), ("weight", {"justify": "right"}), ("blocks", {"overflow": "fold"}),
                    ("modules baked", {"justify": "right"}), ("algorithms", {}), ("weight 0", {"justify": "right"}),
                    ("unmatched", {"justify": "right"}), ("non-finite", {"justify": "right"}), ("sha256", {})):
        it.add_column(col, **kw)
    for i in report.inputs:
        it.add_row(i.name, _weight(i.weight), i.blocks or "all 1", str(i.modules),
                   ", ".join(f"{a} ×{n}" for a, n in i.algos.items()) or "-", str(i.zero_weight),
                   str(i.unmatched), str(i.nonfinite), i.sha256[:12])
    console.print(it)
    for i in report.inputs:
        if not i.blocks:
            continue
        bt = Table(title=f"block weights of {i.name}: {i.given_blocks} (blocks holding its modules)",
                   title_justify="left")
        bt.add_column("block")
        bt.add_column("weight", justify="right")
        bt.add_column("modules", justify="right")
        for block, w, n in i.block_table:
            if n:
                bt.add_row(block, _weight(w), str(n))
        if i.zero_weight:
            bt.add_row("[dim]at weight 0[/]", "0", str(i.zero_weight))
        console.print(bt)

    if report.weak_modules:
        wt = Table(title=f"modules that kept little of their change ({len(report.weak_modules)}; worst first)",
                   title_justify="left")
        wt.add_column("tensor", overflow="fold")
        wt.add_column("dtype")
        wt.add_column("‖ΔW‖ intended", justify="right")
        wt.add_column("‖W'−W‖ applied", justify="right")
        wt.add_column("elements unchanged", justify="right")
        for c in report.weak_modules[:WEAK_SHOWN]:
            wt.add_row(c.ref_key, c.dtype, f"{c.expected_norm:.3g}", f"{c.applied_norm:.3g}",
                       f"{100 * c.lost_fraction:.1f}%")
        console.print(wt)
    if report.unmatched:
        console.print(f"[yellow]{report.unmatched_count} unmatched LoRA keys were skipped[/] (first {len(report.unmatched)}):")
        for line in report.unmatched:
            console.print(f"  {line}", highlight=False)
    for line in report.nonfinite_skipped[:20]:
        console.print(f"[yellow]skipped (NaN/Inf):[/] {line}", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def _precision(report: BakeReport) -> str:
    parts = []
    for dt, (n, lost) in sorted(report.lost_by_dtype.items()):
        parts.append(f"{dt}: {_pct(lost, n)} of {n} changed elements lost to the cast")
    head = f"relative error of the applied delta {report.relative_error:.2e}"
    return head + ("; " + "; ".join(parts) if parts else "")


def bake_report_dict(report: BakeReport) -> dict[str, Any]:
    """The report as JSON-ready data (``--json``)."""
    return {
        "base": str(report.base), "out": str(report.out), "arch": report.arch, "layout": report.layout,
        "device": report.device, "dtype": report.dtype, "base_sha256": report.base_sha256,
        "base_bytes": report.base_bytes,
        "out_files": [{"file": f, "data_sha256": h, "bytes": b} for f, h, b in report.out_files],
        "out_bytes": report.out_bytes,
        "inputs": [{"name": i.name, "path": str(i.path), "weight": i.weight, "blocks": i.blocks,
                    "blocks_given": i.given_blocks, "arch": i.arch, "key_format": i.key_format,
                    "modules": i.modules, "zero_weight": i.zero_weight, "unmatched": i.unmatched,
                    "nonfinite": i.nonfinite, "algorithms": i.algos, "sha256": i.sha256, "size": i.size,
                    "block_table": [{"block": b, "weight": w, "modules": n} for b, w, n in i.block_table]}
                   for i in report.inputs],
        "tensors": report.tensors, "tensors_changed": report.tensors_changed,
        "tensors_copied": report.tensors_copied, "tensors_cast": report.tensors_cast,
        "unmatched": report.unmatched, "unmatched_count": report.unmatched_count,
        "nonfinite_skipped": report.nonfinite_skipped,
        "delta_elements": report.delta_elements, "lost_elements": report.lost_elements,
        "lost_fraction": report.lost_fraction,
        "lost_by_dtype": {k: {"delta_elements": n, "lost": lost} for k, (n, lost) in report.lost_by_dtype.items()},
        "relative_error": report.relative_error, "fp8_tensors": report.fp8_tensors,
        "fp8_relative_error": report.fp8_relative_error, "saturated": report.saturated,
        "weak_modules": [{"tensor": c.ref_key, "dtype": c.dtype, "expected_norm": c.expected_norm,
                          "applied_norm": c.applied_norm, "lost_fraction": c.lost_fraction}
                         for c in report.weak_modules],
        "modules_checked": report.checks, "warnings": report.warnings,
        "copied_files": report.copied_files, "skipped_files": report.skipped_files, "seconds": report.seconds,
    }


def demo_bake(folder: str | Path, console: Console | None = None, *, overwrite: bool = False) -> BakeReport:
    """Bake a tiny kohya LoRA (attention + LoCon modules, rank 4) at weight 0.8 into a tiny SD1 base; show the
    inspect table of the base and of the result, the bake report, and the largest deviation from
    ``W + 0.8·ΔW`` computed independently."""
    import torch

    from .. import cli
    from ..formats.dense import module_dense
    from ..formats.write import lora_tensors
    from ..inspect import inspect_file
    from ..io.reader import open_source
    from ..ops.bake import bake
    from ..ops.inputs import WeightedInput
    from ..testing import save, tiny_checkpoint, tiny_lora_deltas, tiny_table

    console = console or Console()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = tiny_table("sd1")
    base_t = tiny_checkpoint("sd1", seed=0, dtype=torch.float16)
    items = tiny_lora_deltas(table, rank=4, alpha=2.0, seed=5, groups=("attn", "locon"))
    base = folder / "sd1-bake-base.safetensors"
    lora = folder / "sd1-bake-lora.safetensors"
    out = folder / "sd1-bake-merged.safetensors"
    for p in (base, lora, out):
        if p.exists() and not overwrite:
            from ..errors import OutputError

            raise OutputError(f"{p} exists; pass --overwrite to replace the demo files", p)
    save(base_t, base)
    save(lora_tensors(items, table, "kohya"), lora)
    console.rule("[bold]bake: a tiny kohya LoRA into a tiny SD1 checkpoint (merge LORA:0.8 --base CKPT)")
    console.print("[bold]before[/]")
    cli.render_inspect(inspect_file(base), console)
    report = bake(base, [WeightedInput(lora, 0.8)], out, overwrite=overwrite, device="cpu")
    console.print("[bold]after[/]")
    cli.render_inspect(inspect_file(out), console)
    render_bake_report(report, console)
    mods = {m.key: m for m in table.modules}
    worst = 0.0
    with open_source(out) as src:
        for t, d in items.items():
            want = (base_t[t.module].float() + 0.8 * module_dense(mods[t.module], {t: d}, base_t[t.module].shape))
            got = src.get(t.module).float()
            ulp = want.abs().clamp_min(2 ** -14) * 2 ** -10  # one fp16 ULP
            worst = max(worst, float(((got - want).abs() / ulp).max()))
    status = "[green]OK[/]" if worst <= 1.0 else "[red]FAILED[/]"
    console.print(f"check: {len(items)} modules against W + 0.8·ΔW computed independently: largest deviation "
                  f"{worst:.2f} fp16 ULP {status}", highlight=False)
    return report
