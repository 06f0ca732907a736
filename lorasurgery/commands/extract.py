"""``lorasurgery extract BASE TUNED``: a LoRA from the difference of two checkpoints (thin shell over
:func:`lorasurgery.ops.extract.extract`), its closing table, and the demo step :func:`demo_extract`.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..ops.extract import ExtractReport, extract

EPILOG = """\b
Examples:
  lorasurgery extract sd15.safetensors my_finetune.safetensors
  lorasurgery extract sdxl_base.safetensors ./my_sdxl_diffusers -o style.safetensors --rank 64
  lorasurgery extract base.safetensors tuned.safetensors --conv-rank 16          # LoCon: resnet convs too
  lorasurgery extract base.safetensors tuned.safetensors --rank-method sv_fro --rank-param 0.9 --rank 128
  lorasurgery extract flux1-dev.safetensors flux_ft.safetensors --format peft --device cuda
"""


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator:
    """A rich progress bar over modules (and compared tensors) on ``console``; a no-op when disabled."""
    if not enabled:
        yield None
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=True)
    tasks: dict[str, int] = {}
    labels = {"modules": "extracting modules", "tensors": "comparing other tensors"}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(labels.get(stage, stage), total=total or 1)
        bar.update(tasks[stage], completed=done if total else 1)

    with bar:
        yield update


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" … (+{len(names) - n})" if len(names) > n else "")


def render_report(report: ExtractReport, console: Console) -> None:
    """The closing table: modules, ranks, retained energy, skipped modules, other differences, time."""
    p = report.plan
    t = Table(title=f"extracted {report.path.name}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("architecture", f"{p.arch}: base {p.base_layout} layout, tuned {p.tuned_layout} layout")
    t.add_row("output", f"{report.path} ({p.format}, {report.output.tensors} tensors, "
                        f"{report.output.bytes / 2**20:.1f} MiB, {str(p.dtype).replace('torch.', '')})")
    by_comp = Counter(m.component for m in report.modules)
    t.add_row("modules extracted", f"{len(report.modules)} (" + ", ".join(f"{c} {n}" for c, n in by_comp.items()) + ")")
    ranks = report.ranks
    if len(ranks) <= 6:
        t.add_row("ranks", ", ".join(f"{r} ×{n}" for r, n in ranks.items()))
    else:
        rs = sorted(m.rank for m in report.modules)
        t.add_row("ranks", f"{rs[0]}–{rs[-1]} (median {rs[len(rs) // 2]}, {len(ranks)} distinct)")
    opts = p.options
    rule = "fixed" if opts.rank_method == "fixed" else f"{opts.rank_method} {opts.rank_param:g}"
    t.add_row("rank rule", f"{rule}, rank {opts.rank}" + (f", conv rank {opts.conv_rank}" if opts.conv_rank else "")
              + (f", clamp {opts.clamp_quantile:g}" if opts.clamp_quantile else ""))
    svd = Counter(m.svd for m in report.modules)
    t.add_row("SVD", f"{opts.svd}: " + ", ".join(f"{k} {v}" for k, v in svd.items()) + f" on {p.device}")
    if report.modules:
        worst = min(report.modules, key=lambda m: m.retained)
        t.add_row("retained energy", f"mean {report.mean_retained:.4f} ‖ΔW_r‖²/‖ΔW‖² "
                                     f"(lowest {worst.retained:.4f} in {worst.name}, rank {worst.rank})")
    t.add_row("time", f"{report.seconds:.1f} s")
    console.print(t)

    if report.skipped:
        st = Table(title=f"skipped modules ({len(report.skipped)})", title_justify="left")
        st.add_column("reason", overflow="fold")
        st.add_column("modules", justify="right")
        st.add_column("differ", justify="right")
        st.add_column("largest max |ΔW|", justify="right")
        st.add_column("examples", overflow="fold")
        groups: dict[str, list] = defaultdict(list)
        for s in report.skipped:
            groups[s.reason].append(s)
        for reason, items in groups.items():
            differ = [s for s in items if s.max_abs]
            top = max((s.max_abs or 0.0 for s in items), default=0.0)
            st.add_row(reason, str(len(items)), str(len(differ)) if any(s.max_abs is not None for s in items) else "-",
                       f"{top:.3g}" if top else "-", _short([s.name for s in (differ or items)]))
        console.print(st)

    if report.other_diffs:
        ot = Table(title=f"differences no LoRA carries ({len(report.other_diffs)} tensors; "
                         f"{report.identical_tensors} other tensors identical)", title_justify="left")
        ot.add_column("kind")
        ot.add_column("tensors", justify="right")
        ot.add_column("largest max |Δ|", justify="right")
        ot.add_column("‖Δ‖F (all)", justify="right")
        ot.add_column("largest", overflow="fold")
        cats: dict[str, list] = defaultdict(list)
        for o in report.other_diffs:
            cats[o.category].append(o)
        for cat, items in sorted(cats.items()):
            top = max(items, key=lambda o: o.norm)
            total = sum(o.norm ** 2 for o in items) ** 0.5
            ot.add_row(cat, str(len(items)), f"{max(o.max_abs for o in items):.3g}", f"{total:.4g}",
                       f"{top.key} (‖Δ‖F {top.norm:.3g})")
        console.print(ot)
    for note in p.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


@click.command("extract", epilog=EPILOG)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("tuned", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None,
              help="Output file [default: <tuned stem>-lora-r<rank>.safetensors in the current folder].")
@click.option("--rank", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rank of linear/1x1 modules (the cap for dynamic rank methods).")
@click.option("--conv-rank", type=click.IntRange(min=1), default=None,
              help="Also extract LoCon targets (resnet convs, samplers); rank (cap) of 3x3 convs.")
@click.option("--rank-method", type=click.Choice(["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]), default="fixed",
              show_default=True, help="How each module's rank is chosen (see README).")
@click.option("--rank-param", type=float, default=None,
              help="Parameter of the dynamic rank method: sv_ratio > 1; sv_fro, sv_cumulative in (0, 1].")
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="SVD back-end; auto picks randomized where it is faster, exact elsewhere.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="Output dtype [default: fp16 for SD1/SD2/SDXL, bf16 for SD3/FLUX].")
@click.option("--text-encoder/--no-text-encoder", default=True, show_default=True,
              help="Extract text-encoder modules too (each module is kept or skipped on its own).")
@click.option("--min-diff", type=float, default=0.0, show_default=True,
              help="Skip a module whose max |ΔW| is at most this (kohya uses 0.01 for the text encoder).")
@click.option("--clamp-quantile", type=float, default=None,
              help="Clamp the factors at this quantile of their values (kohya: 0.99). Off by default.")
@click.option("--format", "fmt", type=click.Choice(["kohya", "peft"]), default=None,
              help="Output key format [default: kohya; peft for SD3].")
@click.option("--blocks", default=None, help="Block weights (preset, list or ID=VALUE pairs); 0 skips a block.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized SVD.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stdout).")
def command(base: Path, tuned: Path, out: Path | None, rank: int, conv_rank: int | None, rank_method: str,
            rank_param: float | None, svd: str, device: str, dtype: str | None, text_encoder: bool, min_diff: float,
            clamp_quantile: float | None, fmt: str | None, blocks: str | None, seed: int, overwrite: bool,
            as_json: bool) -> None:
    """Extract a LoRA from the difference TUNED − BASE of two checkpoints.

    BASE and TUNED are checkpoints of one architecture (SD1/SD2, SDXL, SD3, FLUX) in any layout
    (single file, sharded, diffusers folder; the two may differ). Every module a LoRA network would
    train is extracted (attention and MLP layers; resnet convs too with --conv-rank); everything else
    that differs is listed with the size of its difference.
    """
    from ..cli import console, err_console

    with _progress(err_console, err_console.is_terminal and not as_json) as update:
        report = extract(base, tuned, out, progress=update, rank=rank, conv_rank=conv_rank, rank_method=rank_method,
                         rank_param=rank_param, svd=svd, device=device, dtype=dtype, text_encoder=text_encoder,
                         min_diff=min_diff, clamp_quantile=clamp_quantile, format=fmt, blocks=blocks, seed=seed,
                         overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        render_report(report, console)


def demo_extract(folder: str | Path, console: Console | None = None, *, overwrite: bool = False) -> float:
    """Extract from a tiny SD1 pair (LDM base, diffusers-folder fine-tune = base + a rank-4 change),
    print the closing table and the reconstruction error; return the worst relative error per module.
    """
    from ..formats.dense import module_dense
    from ..formats.read import index_lora
    from ..testing import save, save_diffusers_folder, tiny_checkpoint, tiny_lora_deltas, tiny_table, to_layout

    console = console or Console()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = "sd1"
    table = tiny_table(arch)
    base = tiny_checkpoint(arch, seed=0)
    mods = {m.key: m for m in table.modules}
    tuned = dict(base)
    true: dict[str, torch.Tensor] = {}
    for target, delta in tiny_lora_deltas(table, rank=4, alpha=4.0, seed=7, groups=("attn", "locon")).items():
        mod = mods[target.module]
        dw = module_dense(mod, {target: delta}, base[target.module].shape)
        tuned[target.module] = base[target.module] + dw
        true[target.module] = tuned[target.module] - base[target.module]
    base_path = save(base, folder / "sd1-extract-base.safetensors")
    tuned_path = save_diffusers_folder(to_layout(tuned, table, "diffusers"), folder / "sd1-extract-tuned")
    out = folder / "sd1-extract-lora.safetensors"
    report = extract(base_path, tuned_path, out, rank=4, conv_rank=4, dtype="fp32", overwrite=overwrite)
    console.rule("[bold]extract: tiny SD1 base (LDM file) vs fine-tune (diffusers folder)")
    render_report(report, console)
    worst = 0.0
    with index_lora(out, table=table) as idx:
        got: dict[str, dict] = defaultdict(dict)
        for lm, d in idx.deltas():
            got[lm.target.module][lm.target] = d
        for key, want in true.items():
            have = module_dense(mods[key], got[key], want.shape)
            worst = max(worst, float((have - want).norm() / want.norm()))
    status = "[green]OK[/]" if worst < 1e-4 else "[red]FAILED[/]"
    console.print(f"reconstruction: {len(true)} modules changed by rank 4, read back from {out.name}: worst "
                  f"relative error ‖ΔW_lora − ΔW‖/‖ΔW‖ = {worst:.2e} {status}", highlight=False)
    return worst
