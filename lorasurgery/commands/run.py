"""``lorasurgery run RECIPE``: run a YAML recipe (thin shell over :func:`lorasurgery.recipe.run_recipe`), its
dry-run rendering, and the demo step :func:`demo_recipe`.

``--dry-run`` plans from headers alone and prints each step, its inputs, the per-block weight tables, the
outputs with formats, dtypes, ranks and estimated sizes. A run checks sha256 pins before any work, runs the
steps (a progress bar per step on a terminal, one plain line per step otherwise, on stderr), writes the
outputs with the resolved recipe in their metadata and prints each output's sha256, so that CI can pin them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..recipe.execute import OutputResult, Reporter, RunReport, StepResult
from ..recipe.plan import RecipePlan, StepPlan
from . import human_size

EPILOG = """\b
Examples:
  lorasurgery run recipes/sdxl-style-character-merge.yaml --set models=./demo --dry-run
  lorasurgery run my-recipe.yaml                        # writes the outputs, prints their sha256
  lorasurgery run my-recipe.yaml --json --overwrite     # machine-readable report; replace old outputs
  lorasurgery run my-recipe.yaml --locked               # every input must carry a sha256 pin
"""


def _est(n: int | None, kind: str) -> str:
    if n is None or kind == "unknown":
        return "known after the run"
    return {"exact": "", "estimate": "≈ ", "upper bound": "≤ "}.get(kind, "") + human_size(n)


def _ranks(step: StepPlan) -> str:
    mods = step.result.modules
    if mods is None or step.result.kind != "lora":
        return ""
    from collections import Counter

    c = Counter(m.rank for m in mods.values() if m.rank is not None)
    if not c:
        return ""
    bound = "≤ " if step.result.size_kind == "upper bound" else ""
    parts = [f"{bound}{r} ×{n}" for r, n in sorted(c.items(), key=lambda kv: -kv[0])]
    return ", ".join(parts[:5]) + (" …" if len(parts) > 5 else "")


def render_plan(plan: RecipePlan, console: Console) -> None:
    """The dry-run plan: inputs, each step with its LoRAs and block tables, outputs, warnings."""
    r = plan.recipe
    console.rule(f"[bold]recipe {r.file}[/] (seed {r.seed})")
    if r.data["vars"]:
        console.print("vars: " + ", ".join(f"{k}={v!r}" for k, v in r.data["vars"].items()), highlight=False)
    it = Table(title="inputs", title_justify="left")
    for col in ("name", "file", "what", "size", "pin"):
        it.add_column(col, overflow="fold")
    for name, ip in plan.inputs.items():
        pin = "sha256" if ip.sha256_pin else ("size" if ip.size_pin is not None else "-")
        what = ip.artifact.describe() if ip.artifact is not None else "(not opened)"
        it.add_row(name, ip.given, what, human_size(ip.size), pin)
    console.print(it)
    for k, s in enumerate(plan.steps):
        console.print(f"[bold]step {k + 1}/{len(plan.steps)}[/] [cyan]{s.id}[/]: {s.op} {_uses(s)}", highlight=False)
        for use, counts in zip(s.loras, s.block_counts or [{}] * len(s.loras)):
            if use.blocks is None:
                continue
            console.print(f"  block weights of [cyan]{use.name}[/] (weight {use.weight:g}; given: "
                          f"{_given(use.given)})", highlight=False)
            bt = Table(padding=(0, 1))
            bt.add_column("block")
            bt.add_column("weight", justify="right")
            bt.add_column("modules", justify="right")
            bt.add_column("effective", justify="right")
            hidden = 0
            for block, w in use.blocks.table():
                n = counts.get(None if block == "OTHER" else block, 0)
                if w == 1.0 and n == 0:
                    hidden += 1
                    continue
                style = "dim" if n == 0 else ("yellow" if w == 0 else "")
                bt.add_row(block, f"{w:g}", str(n), f"{w * use.weight:g}", style=style)
            if hidden:
                bt.caption = f"{hidden} other blocks: weight 1, no modules"
            console.print(bt)
        res = s.result
        line = f"  → {res.describe()}"
        if res.kind == "lora":
            line += f", {res.dtype}"
            rk = _ranks(s)
            if rk:
                line += f", ranks {rk}"
        else:
            line += f", dtype {s.options.get('dtype')}"
        line += f", {_est(res.bytes, res.size_kind)}"
        console.print(line, highlight=False)
        for note in s.notes:
            console.print(f"    [yellow]note:[/] {note}", highlight=False)
    ot = Table(title="outputs", title_justify="left")
    for col in ("file", "from", "format", "dtype", "size", ""):
        ot.add_column(col, overflow="fold")
    for o in plan.outputs:
        res = plan.step(o.step).result
        ot.add_row(o.given, o.step, o.format or "-", o.dtype or "-", _est(res.bytes, res.size_kind),
                   "[yellow]exists[/]" if o.exists else "")
    console.print(ot)
    for w in plan.warnings:
        console.print(f"[yellow]{w}[/]", highlight=False, soft_wrap=True)


def _given(v: Any) -> str:
    if v is None:
        return "-"
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "…"


def _uses(s: StepPlan) -> str:
    if s.loras:
        parts = [f"{u.name} ×{u.weight:g}" for u in s.loras]
        if s.op == "bake":
            return f"{s.options['base']} + " + ", ".join(parts)
        return ", ".join(parts)
    return ", ".join(s.uses)


def render_run(report: RunReport, console: Console) -> None:
    """The closing lines: every output's sha256 in ``sha256sum`` format (to pin in CI), then the inputs'."""
    console.print(f"[bold]outputs written[/] ({len(report.outputs)}, {report.seconds:.1f} s); sha256:", highlight=False)
    for o in report.outputs:
        console.print(f"{o.sha256}  {o.path}", highlight=False, soft_wrap=True)
    console.print("inputs (sha256, bytes):", highlight=False, style="dim")
    for name, (sha, size) in report.inputs.items():
        console.print(f"{sha}  {name} ({size} bytes)", highlight=False, style="dim", soft_wrap=True)
    for w in report.warnings:
        console.print(f"[yellow]{w}[/]", highlight=False, soft_wrap=True)


class PlainReporter(Reporter):
    """One line per step on stderr (logs, CI)."""

    def __init__(self, console: Console):
        self.c = console
        self.count = 0

    def hashing(self, name: str, index: int, count: int) -> None:
        if index == 0:
            self.c.print(f"hashing {count} input(s) to check pins …", highlight=False)

    def step_start(self, step: StepPlan, index: int, count: int) -> None:
        self.count = count
        self.c.print(f"[{index + 1}/{count}] {step.op} {step.id} …", highlight=False)

    def step_done(self, step: StepPlan, result: StepResult) -> None:
        self.c.print(f"[{step.index + 1}/{self.count}] {step.op} {step.id}: done in {result.seconds:.1f} s"
                     + _brief(result), highlight=False)

    def output_written(self, output: OutputResult) -> None:
        self.c.print(f"wrote {output.path} ({human_size(output.bytes)})", highlight=False)


def _brief(result: StepResult) -> str:
    s = result.summary
    parts = []
    if s.get("modules") is not None:
        parts.append(f"{s['modules']} modules")
    if s.get("bytes") is not None:
        parts.append(human_size(s["bytes"]))
    return f" ({', '.join(parts)})" if parts else ""


class BarReporter(PlainReporter):
    """A progress bar per step on a terminal (stderr)."""

    def __init__(self, console: Console):
        super().__init__(console)
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task: TaskID | None = None

    def __enter__(self) -> "BarReporter":
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def hashing(self, name: str, index: int, count: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task("hashing inputs", total=count)
        self.bar.update(self.task, completed=index)

    def step_start(self, step: StepPlan, index: int, count: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[self.task].total)
        self.count = count
        self.task = self.bar.add_task(f"[{index + 1}/{count}] {step.op} {step.id}", total=1)

    def step_progress(self, done: float, total: float, label: str = "") -> None:
        if self.task is not None and total:
            self.bar.update(self.task, completed=done, total=total)

    def step_done(self, step: StepPlan, result: StepResult) -> None:
        if self.task is not None:
            t = self.bar.tasks[self.task]
            self.bar.update(self.task, completed=t.total, description=f"{t.description}{_brief(result)}")

    def output_written(self, output: OutputResult) -> None:
        self.bar.console.print(f"wrote {output.path} ({human_size(output.bytes)})", highlight=False)


@click.command("run", epilog=EPILOG)
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Override a variable declared under 'vars:' (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the plan from file headers; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the run report as JSON (stdout).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--device", default="auto", show_default=True, help="Where SVDs and bakes compute: auto, cpu, cuda[:N].")
@click.option("--verify", is_flag=True, help="With --dry-run: also hash the inputs and check their sha256 pins.")
@click.option("--locked", is_flag=True, help="Require a sha256 pin on every input.")
@click.option("--temp-dir", type=click.Path(path_type=Path), default=None,
              help="Folder for intermediate results [default: beside the first output].")
def command(recipe: Path, sets: tuple[str, ...], dry_run: bool, as_json: bool, overwrite: bool, device: str,
            verify: bool, locked: bool, temp_dir: Path | None) -> None:
    """Run the steps of RECIPE and write its outputs (or, with --dry-run, show the plan).

    Inputs are hashed and their sha256 pins checked before any work. Outputs hold the resolved recipe,
    the input hashes and the tool versions in their metadata; their sha256 is printed at the end.
    """
    from ..cli import console, err_console
    from ..recipe.execute import run_plan
    from ..recipe.loader import parse_sets
    from ..recipe.plan import plan_recipe, verify_pins
    from ..recipe.schema import load_recipe

    values = parse_sets(sets)
    rec = load_recipe(recipe, values)
    plan = plan_recipe(rec, for_run=not dry_run, overwrite=overwrite)
    plan.raise_errors()
    if dry_run:
        if verify:
            verify_pins(plan, locked=locked)
        elif locked:
            _check_locked(plan)
        if as_json:
            click.echo(json.dumps(plan.to_dict(), indent=2, sort_keys=True, default=str))
        else:
            render_plan(plan, console)
            console.print("[bold]dry run[/]: nothing was written" + ("; sha256 pins verified" if verify else ""),
                          highlight=False)
        return
    if err_console.is_terminal and not as_json:
        with BarReporter(err_console) as rep:
            report = run_plan(plan, overwrite=overwrite, device=device, temp_dir=temp_dir, locked=locked,
                              reporter=rep)
    else:
        report = run_plan(plan, overwrite=overwrite, device=device, temp_dir=temp_dir, locked=locked,
                          reporter=PlainReporter(err_console))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
    else:
        render_run(report, console)


def _check_locked(plan: RecipePlan) -> None:
    from ..recipe.loader import Issue, RecipeError

    missing = [Issue(plan.recipe.key_where("inputs", n), f"input {n!r} has no sha256 pin (--locked requires one on "
                                                         "every input).")
               for n, ip in plan.inputs.items() if ip.sha256_pin is None]
    if missing:
        raise RecipeError(missing)


# --------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------

#: The recipe the demo runs on its tiny models (written next to them as ``demo-recipe.yaml``).
DEMO_RECIPE = """\
# lorasurgery demo recipe: an SDXL style LoRA and a character LoRA merged with block weights,
# then recompressed. Run it yourself: lorasurgery run demo-recipe.yaml --dry-run
version: 1
seed: 0
vars:
  models: .          # the folder with the demo's tiny models (relative to this file)
inputs:
  style: {path: "${models}/sdxl-lora-kohya.safetensors", arch: sdxl}
  character: {path: "${models}/sdxl-lora-peft.safetensors", arch: sdxl}
blocks:
  # SDXL 12-value layout: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05.
  # The style LoRA keeps its text encoder, middle and output blocks; its input blocks are off.
  style_only_out: {layout: sdxl-12, values: [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]}
steps:
  - id: mix
    op: merge
    loras:
      - {input: style, weight: 0.8, blocks: style_only_out}
      - {input: character, weight: 1.0, blocks: "OUT00=0.5,OUT01=0.5"}
    output:
      path: out/style-character.safetensors
      metadata: {ss_training_comment: "lorasurgery demo: style + character"}
  - id: small
    op: merge
    loras: [mix]
    method: svd
    rank_method: sv_fro
    rank_param: 0.9
    rank: 4
    output: out/style-character-small.safetensors
"""


def demo_recipe(folder: str | Path, console: Console | None = None) -> RunReport:
    """Write :data:`DEMO_RECIPE` into the demo folder, show its dry run, run it and print the outputs.

    The demo folder must hold the demo's tiny models (:func:`lorasurgery.demo.build_demo_models`). Earlier
    demo outputs are replaced.
    """
    from ..recipe.execute import run_plan
    from ..recipe.plan import plan_recipe
    from ..recipe.schema import load_recipe

    console = console or Console()
    folder = Path(folder)
    path = folder / "demo-recipe.yaml"
    path.write_text(DEMO_RECIPE, encoding="utf-8")
    console.rule("[bold]recipe: a YAML recipe run end to end (lorasurgery run demo-recipe.yaml)")
    plan = plan_recipe(load_recipe(path), for_run=True, overwrite=True)
    plan.raise_errors()
    render_plan(plan, console)
    report = run_plan(plan, overwrite=True, device="cpu", reporter=PlainReporter(console))
    render_run(report, console)
    return report

