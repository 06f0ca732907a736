"""YAML recipes: versioned, validated descriptions of lorasurgery operations, run reproducibly.

* :mod:`.loader`: YAML with a position for every node, ``${name}`` variables and ``--set``;
* :mod:`.schema`: the schema as data, its validation (nearest-key suggestions) and JSON Schema export;
* :mod:`.plan`: planning from file headers alone (validate, dry run), pin verification;
* :mod:`.execute`: running the steps through the library operations and writing the outputs.
"""
from __future__ import annotations

from .execute import Reporter, RunReport, run_plan, run_recipe
from .loader import Issue, RecipeError, Where
from .plan import RecipePlan, plan_recipe, verify_pins
from .schema import FORMAT_VERSION, Recipe, json_schema, load_recipe, reference_markdown

__all__ = ["FORMAT_VERSION", "Issue", "Recipe", "RecipeError", "RecipePlan", "Reporter", "RunReport", "Where",
           "json_schema", "load_recipe", "plan_recipe", "reference_markdown", "run_plan", "run_recipe",
           "verify_pins"]
