"""``lorasurgery validate RECIPE...``: check recipes without running them (thin shell over
:mod:`lorasurgery.recipe`).

For each recipe: the schema (unknown keys with the nearest valid key, types, ranges), variables, names and
references between steps (unknown names, forward references, cycles), outputs; then, unless
``--schema-only``, the input files: they exist, their headers fit (architecture, layouts, block-list
lengths and block ids for the detected architecture, rank options, bake targets). No tensor data is read;
``--verify`` also hashes the inputs to check their ``sha256`` pins. Every problem is printed as
``file:line:column: message``. Exit status 0 when every recipe is valid, 1 otherwise.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import LoraSurgeryError, PlanError

EPILOG = """\b
Examples:
  lorasurgery validate recipes/*.yaml --set models=./demo
  lorasurgery validate my-recipe.yaml --json
  lorasurgery validate my-recipe.yaml --schema-only      # no input files needed
  lorasurgery validate my-recipe.yaml --verify --locked  # every input pinned and matching
  lorasurgery validate --print-schema > recipe.schema.json
"""


def validate_one(path: Path, sets: dict[str, str], *, schema_only: bool, verify: bool, locked: bool,
                 ignore_unknown_sets: bool) -> dict:
    """Validate one recipe; a dict with ``valid``, ``issues`` and (when planned) ``plan``."""
    from ..recipe.loader import Issue, RecipeError, Where
    from ..recipe.plan import plan_recipe, verify_pins
    from ..recipe.schema import load_recipe

    out: dict = {"recipe": str(path), "valid": False, "issues": [], "declared_vars": [], "loaded": False}
    try:
        recipe = load_recipe(path, sets, ignore_unknown_sets=ignore_unknown_sets)
    except RecipeError as exc:
        out["issues"] = [i.as_dict() for i in exc.issues]
        return out
    out["declared_vars"] = list(recipe.data["vars"])
    out["loaded"] = True
    plan = plan_recipe(recipe, check_files=not schema_only)
    issues = list(plan.issues)
    if locked:
        issues += [Issue(recipe.key_where("inputs", n), f"input {n!r} has no sha256 pin (--locked requires one "
                                                        "on every input).")
                   for n, ip in plan.inputs.items() if ip.sha256_pin is None]
    if verify and plan.valid and not any(i.severity == "error" for i in issues):
        try:
            verify_pins(plan)
        except RecipeError as exc:
            issues += exc.issues
        except LoraSurgeryError as exc:
            issues.append(Issue(Where(recipe.file), str(exc)))
    issues.sort(key=lambda i: (i.where.file, i.where.line, i.where.column))
    out["issues"] = [i.as_dict() for i in issues]
    out["valid"] = not any(i.severity == "error" for i in issues)
    out["summary"] = {"inputs": len(plan.inputs), "steps": len(recipe.steps), "outputs": len(plan.outputs),
                      "files_checked": not schema_only, "pins_verified": bool(verify and out["valid"])}
    out["plan"] = plan.to_dict() if out["valid"] and not schema_only else None
    return out


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _line(issue: dict) -> str:
    loc = issue["file"] + (f":{issue['line']}:{issue['column']}" if issue.get("line") else "")
    sev = "" if issue["severity"] == "error" else "warning: "
    return f"{loc}: {sev}{issue['message']}"


@click.command("validate", epilog=EPILOG)
@click.argument("recipes", nargs=-1, type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE",
              help="Override a variable declared under 'vars:' (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report (stdout).")
@click.option("--schema-only", is_flag=True, help="Check the recipe text only; do not open the input files.")
@click.option("--verify", is_flag=True, help="Also hash the inputs and check their sha256 pins (reads them fully).")
@click.option("--locked", is_flag=True, help="Require a sha256 pin on every input.")
@click.option("--print-schema", is_flag=True, help="Print the recipe JSON Schema and exit.")
def command(recipes: tuple[Path, ...], sets: tuple[str, ...], as_json: bool, schema_only: bool, verify: bool,
            locked: bool, print_schema: bool) -> None:
    """Check RECIPE files: schema, references, input headers, block lists, ranks (no tensor data read).

    Every problem is printed as FILE:LINE:COLUMN: message. Exit status 0 when every recipe is valid, 1 when
    any is not (2 for a usage error).
    """
    from ..recipe.loader import parse_sets
    from ..recipe.schema import json_schema

    if print_schema:
        click.echo(json.dumps(json_schema(), indent=2, ensure_ascii=False))
        return
    if not recipes:
        raise click.UsageError("give at least one RECIPE file (or --print-schema).")
    values = parse_sets(sets)
    many = len(recipes) > 1
    results = [validate_one(p, values, schema_only=schema_only, verify=verify, locked=locked,
                            ignore_unknown_sets=many) for p in recipes]
    if many:
        declared = {v for r in results for v in r["declared_vars"]}
        unknown = [n for n in values if n not in declared]
        if unknown and any(r["loaded"] for r in results):
            raise PlanError(f"--set {unknown[0]}=...: no recipe declares a variable {unknown[0]!r} (declared: "
                            f"{', '.join(sorted(declared)) or 'none'}).")
    ok = all(r["valid"] for r in results)
    if as_json:
        click.echo(json.dumps({"valid": ok, "recipes": results}, indent=2, sort_keys=True, default=str))
    else:
        from ..cli import console

        for r in results:
            for issue in r["issues"]:
                style = "red" if issue["severity"] == "error" else "yellow"
                console.print(f"[{style}]{_line(issue)}[/]", highlight=False, soft_wrap=True)
            if r["valid"]:
                s = r["summary"]
                what = "schema and references" if not s["files_checked"] else "schema, references and input headers"
                pins = "; sha256 pins verified" if s["pins_verified"] else ""
                console.print(f"[green]{r['recipe']}: valid[/] ({_n(s['inputs'], 'input')}, {_n(s['steps'], 'step')}, "
                              f"{_n(s['outputs'], 'output')}; {what} checked{pins})", highlight=False, soft_wrap=True)
            else:
                n = sum(1 for i in r["issues"] if i["severity"] == "error")
                console.print(f"[bold red]{r['recipe']}: invalid[/] ({_n(n, 'problem')})", highlight=False,
                              soft_wrap=True)
    if not ok:
        sys.exit(1)
