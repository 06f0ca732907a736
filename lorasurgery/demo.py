"""``lorasurgery demo``: build tiny models of every architecture and run the tool on them.

Everything is generated locally from the architecture tables (:mod:`lorasurgery.testing`); nothing is
downloaded. The demo grows with each operation the tool supports.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .arch import ARCH_NAMES, get_arch
from .errors import OutputError
from .inspect import inspect_file
from .testing import save, tiny_checkpoint, tiny_lora


def build_demo_models(folder: Path, *, overwrite: bool = False) -> list[Path]:
    """Write a tiny base checkpoint and a kohya + a PEFT LoRA per architecture; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch in ARCH_NAMES:
        spec = get_arch(arch)
        items = [
            (folder / f"{arch}-base.safetensors", lambda: tiny_checkpoint(arch, _single_layout(spec), seed=0)),
            (folder / f"{arch}-lora-kohya.safetensors", lambda: tiny_lora(arch, "kohya", rank=4, alpha=2.0, seed=1)),
            (folder / f"{arch}-lora-peft.safetensors", lambda: tiny_lora(arch, "peft", rank=4, alpha=2.0, seed=2)),
        ]
        for path, make in items:
            if path.exists() and not overwrite:
                raise OutputError(f"{path} exists; pass --overwrite to replace the demo files", path)
            save(make(), path)
            paths.append(path)
    return paths


def _single_layout(spec) -> str:
    table = spec.build(spec.tiny_config())
    return next(iter(table.layouts))


def run_demo(folder: Path, *, overwrite: bool = False, console: Console | None = None) -> None:
    """Every operation on tiny models: inspect, bake, extract, LoRA algebra, and a recipe at the end."""
    from .cli import render_inspect
    from .commands.bake_view import demo_bake
    from .commands.extract import demo_extract
    from .commands.merge import demo_algebra
    from .commands.run import demo_recipe

    console = console or Console()
    folder = Path(folder)
    console.rule("[bold]lorasurgery demo: tiny models of every architecture")
    paths = build_demo_models(folder, overwrite=overwrite)
    console.print(f"wrote {len(paths)} files to {folder}")
    for path in paths:
        render_inspect(inspect_file(path), console=console)
    render_inspect(inspect_file(folder / "sdxl-lora-kohya.safetensors", blocks=True), console=console)
    console.rule("[bold]bake: a LoRA merged into a base checkpoint")
    demo_bake(folder, console, overwrite=overwrite)
    console.rule("[bold]extract: a LoRA from base and fine-tune")
    worst = demo_extract(folder, console, overwrite=overwrite)
    console.print(f"extraction reproduces the fine-tune's change within {worst:.2e} (relative, worst module)")
    demo_algebra(folder, console, overwrite=overwrite)
    demo_recipe(folder, console)
    console.rule(f"[bold green]demo done: every file is in {folder}")
