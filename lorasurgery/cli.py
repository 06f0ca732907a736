"""The ``lorasurgery`` command line: a thin Click shell over the library.

Every command parses options, calls one library function and renders its plain result with rich.
User errors (:class:`~lorasurgery.errors.LoraSurgeryError`) print one paragraph and exit with status 1;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import LoraSurgeryError
from .commands import human_size

err_console = Console(stderr=True)
console = Console()


class Group(click.Group):
    """Turns LoraSurgeryError into a one-paragraph message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraSurgeryError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: no output was written")
            sys.exit(130)


EPILOG = """\b
Examples:
  lorasurgery demo ./demo                                  tiny models of every architecture, every operation
  lorasurgery inspect --blocks style.safetensors           what a file is; ΔW norm per block
  lorasurgery merge style.safetensors:0.8 char.safetensors:0.6 -o mix.safetensors
  lorasurgery merge style.safetensors:0.8 --base model.safetensors -o baked.safetensors
  lorasurgery extract base.safetensors tuned.safetensors --rank 32
  lorasurgery subtract after.safetensors before.safetensors -o diff.safetensors
  lorasurgery resize style.safetensors --rank 16 -o style-r16.safetensors
  lorasurgery convert style.safetensors --to peft -o style-peft.safetensors
  lorasurgery validate recipes/*.yaml
  lorasurgery run recipe.yaml --dry-run
"""


@click.group(cls=Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorasurgery")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Offline LoRA model surgery for SD1.x/2.x, SDXL, SD3 and FLUX.1."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _dist(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in d.items()) or "-"


def render_inspect(report: dict, console: Console = console) -> None:
    t = Table(title=f"{Path(report['path']).name}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    t.add_row("kind", report["kind"])
    t.add_row("architecture", str(report.get("architecture")))
    if report["kind"] == "lora":
        t.add_row("key format", str(report.get("key_format")))
        t.add_row("modules", f"{report['modules']} ({_dist(report.get('components', {}))})")
        t.add_row("algorithms", _dist(report["algorithms"]))
        t.add_row("ranks", _dist(report["ranks"]))
        t.add_row("alphas", _dist(report["alphas"]))
    else:
        t.add_row("layout", str(report.get("layout")))
        t.add_row("confidence", f"{report.get('confidence', 0):.3f}")
        for e in report.get("evidence", []):
            t.add_row("evidence", e)
        if report.get("ambiguous_with"):
            t.add_row("[yellow]ambiguous with[/]", ", ".join(report["ambiguous_with"]))
        if report.get("lora_targets"):
            t.add_row("LoRA targets", _dist(report["lora_targets"]))
        t.add_row("keys outside the layout", str(report.get("unmapped_keys", 0)))
    t.add_row("tensors", f"{report['tensors']} in {report['files']} file(s)")
    t.add_row("size", human_size(report["bytes"]))
    t.add_row("dtypes", _dist(report["dtypes"]))
    console.print(t)
    if report.get("uninterpreted"):
        console.print(f"[yellow]{report['uninterpreted_keys']} keys not interpreted[/] (first 20):")
        for line in report["uninterpreted"]:
            console.print(f"  {line}", highlight=False)
    meta = report.get("metadata") or {}
    if meta:
        mt = Table(title="metadata", title_justify="left")
        mt.add_column("key")
        mt.add_column("value", overflow="fold")
        for k, v in meta.items():
            mt.add_row(k, v if len(v) <= 300 else v[:300] + f"… ({len(v)} chars)")
        console.print(mt)
    blocks = report.get("blocks")
    if blocks:
        render_blocks(blocks, console)


def render_blocks(rows: list[dict], console: Console = console) -> None:
    top = max((r["norm"] for r in rows), default=0.0) or 1.0
    bt = Table(title="ΔW Frobenius norm per block", title_justify="left")
    bt.add_column("block")
    bt.add_column("modules", justify="right")
    bt.add_column("‖ΔW‖F", justify="right")
    bt.add_column("")
    for r in rows:
        bar = "█" * int(round(30 * r["norm"] / top)) if r["norm"] == r["norm"] else "n/a (needs base)"
        bt.add_row(r["block"], str(r["modules"]), f"{r['norm']:.4g}", f"[cyan]{bar}[/]")
    console.print(bt)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--blocks", is_flag=True, help="For a LoRA: ‖ΔW‖F per block of its architecture (reads the LoRA).")
def inspect(file: Path, as_json: bool, blocks: bool) -> None:
    """Show what FILE is: LoRA or checkpoint, architecture, layout or key format, ranks, metadata.

    Reads the header only (plus a LoRA's alpha scalars), so multi-GB checkpoints take milliseconds.

    \b
    Example:
      lorasurgery inspect sdxl_style.safetensors --blocks
    """
    from .inspect import inspect_file

    report = inspect_file(file, blocks=blocks)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        render_inspect(report)


@main.command()
@click.argument("folder", type=click.Path(path_type=Path), default=Path("lorasurgery-demo"))
@click.option("--overwrite", is_flag=True, help="Replace files of an earlier demo in FOLDER.")
def demo(folder: Path, overwrite: bool) -> None:
    """Build tiny models of every architecture in FOLDER and run the tool on them.

    \b
    Example:
      lorasurgery demo ./demo
    """
    from .demo import run_demo

    run_demo(folder, overwrite=overwrite, console=console)


# Commands that live in lorasurgery/commands/<name>.py, each defining a click command named `command`.
# A command is listed here only once its operation is complete (nothing half-done appears in --help).
COMMANDS: tuple[str, ...] = ("merge", "extract", "subtract", "resize", "convert", "validate", "run")


def _register() -> None:
    import importlib

    for name in COMMANDS:
        main.add_command(importlib.import_module(f"lorasurgery.commands.{name}").command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
