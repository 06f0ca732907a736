"""``lorasurgery merge``: LoRA+LoRA merge into one LoRA, or (with ``--base``) baking LoRAs into a checkpoint.

Also holds what the algebra commands share (``subtract``, ``resize``, ``convert``): the rendering of an
:class:`~lorasurgery.ops.algebra.AlgebraReport`, the progress bar, and :func:`demo_algebra`.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import PlanError
from ..linalg import RANK_METHODS
from ..ops.algebra import AlgebraReport, merge_loras
from ..ops.inputs import parse_weighted
from . import human_size

SVD_CHOICES = ("auto", "exact", "randomized")


# --------------------------------------------------------------------------------------------------
# shared rendering
# --------------------------------------------------------------------------------------------------


def _short(target: str) -> str:
    t = target.removeprefix("model.diffusion_model.")
    return t.replace(".weight:", ":").removesuffix(".weight")


def render_algebra_report(report: AlgebraReport, console: Console, *, rows: bool = True,
                          max_rows: int | None = None) -> None:
    """The closing table of merge/subtract/resize/convert: one row per output module, then a summary.

    ``max_rows`` shows only the first rows (the demo); the summary always covers every module.
    """
    if rows and report.rows:
        title = {"resize": "resize: rank per module", "convert": "convert: modules",
                 "subtract": "subtract: modules of the difference", "merge": "merge: modules"}[report.op]
        t = Table(title=title, title_justify="left")
        t.add_column("module", overflow="fold")
        t.add_column("block")
        t.add_column("algo")
        if report.op in ("merge", "subtract"):
            t.add_column("inputs", justify="right")
        old = "old rank" if report.op in ("resize", "convert") else "rank in"
        t.add_column(old, justify="right")
        if report.op != "convert":
            t.add_column("new rank" if report.op == "resize" else "rank out", justify="right")
            t.add_column("retained ‖ΔW‖F", justify="right")
            t.add_column("energy", justify="right")
            t.add_column("method")
        shown = report.rows if max_rows is None else report.rows[:max_rows]
        for r in shown:
            cells = [_short(r.target), r.block or "OTHER", r.algo]
            if report.op in ("merge", "subtract"):
                cells.append(str(r.inputs))
            cells.append("-" if r.rank_in is None else str(r.rank_in))
            if report.op != "convert":
                cells.append("-" if r.rank_out is None else str(r.rank_out))
                cells.append("-" if r.retained is None else f"{100 * r.retained:.2f}%")
                cells.append("-" if r.energy is None else f"{100 * r.energy:.2f}%")
                cells.append(r.method + (f" [yellow]({r.note})[/]" if r.note and r.rank_out is None else ""))
            t.add_row(*cells)
        if len(shown) < len(report.rows):
            t.add_row(f"… {len(report.rows) - len(shown)} more modules", *[""] * (len(t.columns) - 1))
        console.print(t)
    data = report.as_dict()
    s = Table(show_header=False, title=f"{report.op}: {report.output.name}", title_justify="left")
    s.add_column("field", style="bold")
    s.add_column("value", overflow="fold")
    s.add_row("output", str(report.output))
    s.add_row("architecture", report.arch)
    if report.source_format:
        s.add_row("input format", report.source_format)
    s.add_row("format / dtype", f"{report.format} / {report.dtype}")
    if report.op in ("merge", "subtract"):
        s.add_row("method", report.method)
        for inp in report.inputs:
            extra = f", blocks {inp['blocks']}" if inp.get("blocks") else ""
            s.add_row(f"input ({inp['role']})", f"{Path(inp['path']).name} × {inp['weight']:g}{extra}")
    ranks = sorted({r.rank_out for r in report.rows if r.rank_out is not None})
    if ranks:
        s.add_row("ranks", str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} … {ranks[-1]} (dynamic)")
    if report.method == "svd" and data["mean_retained_fro"] is not None:
        s.add_row("retained ‖ΔW‖F", f"mean {100 * data['mean_retained_fro']:.2f}%, "
                                        f"min {100 * data['min_retained_fro']:.2f}%")
    s.add_row("written", f"{report.modules} modules, {report.tensors} tensors, {human_size(report.bytes)}")
    s.add_row("sshs_model_hash", report.model_hash)
    s.add_row("time", f"{report.seconds:.2f} s")
    for note in report.notes:
        s.add_row("[yellow]note[/]", note)
    console.print(s)


def emit(report: AlgebraReport, as_json: bool) -> None:
    """Print a report as JSON (``--json``) or as rich tables."""
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        render_algebra_report(report, Console())


@contextmanager
def progress_bar(label: str) -> Iterator:
    """A per-module progress callback drawing on stderr when it is a terminal (else None)."""
    err = Console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int, key: str) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def rank_options(f):
    """--rank/--conv-rank/--rank-method/--rank-param/--svd/--seed/--workers, shared by merge, subtract and resize."""
    f = click.option("--workers", type=int, default=None,
                     help="Modules decomposed in parallel (default: one per CPU core; 1 with CUDA).")(f)
    f = click.option("--seed", type=int, default=None,
                     help="Seed of the randomized SVD (LoHa/LoKr/full inputs only). Default 0.")(f)
    f = click.option("--svd", type=click.Choice(SVD_CHOICES), default=None,
                     help="SVD back-end for LoHa/LoKr/full inputs, which are densified first (low-rank inputs "
                          "always use the exact factored SVD). Default auto.")(f)
    f = click.option("--rank-param", type=float, default=None,
                     help="Parameter of the dynamic rule: sv_ratio ρ > 1, sv_fro φ in (0, 1], sv_cumulative τ in "
                          "(0, 1].")(f)
    f = click.option("--rank-method", type=click.Choice(RANK_METHODS), default=None,
                     help="fixed (default: --rank), or a dynamic rule choosing the minimal rank per module; "
                          "--rank then caps it.")(f)
    f = click.option("--conv-rank", type=int, default=None,
                     help="Rank (or cap) for 3x3 convolutions (LoCon); default: --rank.")(f)
    f = click.option("--rank", type=int, default=None, help="Target rank (or cap with a dynamic --rank-method).")(f)
    return f


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------

HELP = """Merge LoRAs into one LoRA, or bake them into a checkpoint with --base.

\b
LoRA+LoRA (no --base): the result is one LoRA holding Σ weight·block-weight·ΔW.
  --method concat (default): exact. Each input's weight × block weight × alpha/rank
    is folded into its factors and the ranks are concatenated (ranks add up), so
    every loader applies exactly the weighted sum. Any ranks, LoCon 3x3 and Tucker
    inputs; modules present in only some inputs are kept. LoHa/LoKr/full modules are passed through (scaled) or, where
    they meet another input's change, written as an exact full diff.
  --method svd --rank N (implied by any rank option): the optimal rank-N (or
    --rank-method) approximation of the sum per module, computed from the factors
    without forming ΔW; LoHa/LoKr/full inputs are densified and truncated.
  DoRA, (IA)³, GLoRA and OFT modules depend on the base weight: use --base.

\b
Bake (--base CKPT): W' = W + Σ weight·block-weight·ΔW for every module of the
  checkpoint, written in the base's own layout and dtypes (see `--dtype keep`).
  --method, the rank options, --format and --drop-unsupported do not apply;
  --allow-unmatched and --allow-nonfinite apply only here.

\b
Inputs are PATH[:WEIGHT[:BLOCKS]] (weights may be negative; BLOCKS is a block spec
for that input, replacing --blocks for it). Without -o the output is
<first LoRA stem>-merged.safetensors (bake: <base stem>-baked.safetensors) in the
current folder.
"""

EPILOG = """\b
Examples:
  lorasurgery merge style.safetensors:0.7 detail.safetensors:0.4 -o mix.safetensors
  lorasurgery merge a.safetensors b.safetensors:-0.5 --rank 64 -o ab-r64.safetensors
  lorasurgery merge a.safetensors:1:OUTD b.safetensors:0.8 --rank-method sv_fro --rank-param 0.95 --rank 128
  lorasurgery merge style.safetensors:0.8 --base sdxl_base.safetensors -o baked.safetensors
"""


@click.command("merge", help=HELP, epilog=EPILOG)
@click.argument("loras", nargs=-1, metavar="LORA[:WEIGHT[:BLOCKS]]...")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output .safetensors file.")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Bake the LoRAs into this checkpoint instead of merging them into a LoRA.")
@click.option("--method", type=click.Choice(("auto", "concat", "svd")), default=None,
              help="LoRA+LoRA only: concat (exact) or svd (truncated); auto = svd when a rank option is given.")
@rank_options
@click.option("--blocks", default=None, help="Block weights for every input without its own spec (preset, list, "
                                             "ID=VALUE pairs or a .yaml file).")
@click.option("--format", "fmt", type=click.Choice(("kohya", "peft")), default=None,
              help="LoRA+LoRA only: output key format (default per architecture: kohya, SD3 peft).")
@click.option("--dtype", default=None, help="Output dtype: keep (default: the inputs' widest dtype; for a bake the "
                                            "base's dtypes), fp16, bf16 or fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (SVDs and bakes).")
@click.option("--drop-unsupported", is_flag=True,
              help="LoRA+LoRA only: leave out modules the output format cannot name (listed) instead of failing.")
@click.option("--allow-unmatched", is_flag=True, help="Bake only: proceed when LoRA keys match no base tensor.")
@click.option("--allow-nonfinite", is_flag=True, help="Bake only: skip (and count) modules with NaN/Inf values.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(loras, output, base, method, rank, conv_rank, rank_method, rank_param, svd, seed, workers, blocks, fmt,
            dtype, device, drop_unsupported, allow_unmatched, allow_nonfinite, as_json, overwrite) -> None:
    if not loras:
        raise PlanError("no input LoRAs were given: lorasurgery merge LORA[:WEIGHT[:BLOCKS]]... [--base CKPT]")
    inputs = [parse_weighted(x) for x in loras]
    if base is not None:
        lora_only = {"--method": method, "--rank": rank, "--conv-rank": conv_rank, "--rank-method": rank_method,
                     "--rank-param": rank_param, "--svd": svd, "--seed": seed, "--workers": workers, "--format": fmt,
                     "--drop-unsupported": drop_unsupported or None}
        given = [k for k, v in lora_only.items() if v is not None]
        if given:
            raise PlanError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} to LoRA+LoRA merges "
                            "(without --base); a bake adds the full ΔW to the base's own tensors.")
        from ..io.metadata import title_of
        from ..ops.bake import bake
        from .bake_view import bake_progress, bake_report_dict, render_bake_report

        out = output if output is not None else Path.cwd() / f"{title_of(base)}-baked.safetensors"
        err = Console(stderr=True)
        with bake_progress(err, err.is_terminal) as progress:
            report = bake(base, inputs, out, blocks=blocks, dtype=dtype or "keep", device=device,
                          allow_unmatched=allow_unmatched, allow_nonfinite=allow_nonfinite, overwrite=overwrite,
                          progress=progress)
        if as_json:
            click.echo(json.dumps(bake_report_dict(report), indent=2, sort_keys=True))
        else:
            render_bake_report(report, Console())
        return
    bake_only = [k for k, v in (("--allow-unmatched", allow_unmatched), ("--allow-nonfinite", allow_nonfinite)) if v]
    if bake_only:
        raise PlanError(f"{' and '.join(bake_only)} only appl{'y' if len(bake_only) > 1 else 'ies'} when baking into "
                        "a checkpoint (--base CKPT); a LoRA+LoRA merge refuses unmatched keys and NaN/Inf values.")
    with progress_bar("merge") as progress:
        report = merge_loras(inputs, output, method=method or "auto", rank=rank, rank_method=rank_method,
                             rank_param=rank_param, conv_rank=conv_rank, blocks=blocks, fmt=fmt, dtype=dtype,
                             device=device, svd=svd or "auto", seed=seed or 0, overwrite=overwrite,
                             drop_unsupported=drop_unsupported, workers=workers, progress=progress)
    emit(report, as_json)


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------


def demo_algebra(folder: Path, console: Console, *, overwrite: bool = False) -> list[AlgebraReport]:
    """Merge two tiny SDXL LoRAs (concat and svd), subtract them, resize and convert one; print the tables.

    Writes ``algebra-*.safetensors`` into ``folder`` (created if needed) and returns the reports.
    """
    from ..errors import OutputError
    from ..ops.algebra import convert, resize, subtract
    from ..testing import save, tiny_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / "algebra-a.safetensors"
    b = folder / "algebra-b.safetensors"
    outs = {k: folder / f"algebra-{k}.safetensors" for k in ("concat", "svd", "diff", "resized", "peft")}
    for p in [a, b, *outs.values()]:
        if p.exists() and not overwrite:
            raise OutputError(f"{p} exists; pass --overwrite to replace the demo files", p)
    save(tiny_lora("sdxl", "kohya", rank=4, alpha=2.0, seed=11, groups=("attn", "locon")), a)
    save(tiny_lora("sdxl", "kohya", rank=8, alpha=8.0, seed=12), b)
    console.rule("[bold]LoRA algebra on two tiny SDXL LoRAs (A: rank 4 LoCon, B: rank 8)")
    reports = []
    console.print("[bold]merge A:0.7 B:0.5 (exact concat: ranks add up)")
    reports.append(merge_loras([f"{a}:0.7", f"{b}:0.5"], outs["concat"], overwrite=overwrite))
    render_algebra_report(reports[-1], console, rows=False)
    console.print("[bold]merge A:0.7 B:0.5 --rank 6 (optimal truncation from the factors)")
    reports.append(merge_loras([f"{a}:0.7", f"{b}:0.5"], outs["svd"], rank=6, overwrite=overwrite))
    render_algebra_report(reports[-1], console, rows=False)
    console.print("[bold]subtract B A (difference LoRA B − A)")
    reports.append(subtract(b, a, outs["diff"], overwrite=overwrite))
    render_algebra_report(reports[-1], console, rows=False)
    console.print("[bold]resize B --rank-method sv_fro --rank-param 0.9")
    reports.append(resize(b, outs["resized"], rank_method="sv_fro", rank_param=0.9, overwrite=overwrite))
    render_algebra_report(reports[-1], console, max_rows=12)
    console.print("[bold]convert A --to peft (the same ΔW with diffusers/PEFT names, scales folded)")
    reports.append(convert(a, outs["peft"], to="peft", drop_unsupported=True, overwrite=overwrite))
    render_algebra_report(reports[-1], console, rows=False)
    return reports
