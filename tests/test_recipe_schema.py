"""Recipe loader and schema (lorasurgery.recipe.loader / .schema): positions, defaults, every kind of bad
input with its line and a suggestion, variables, JSON Schema export. No model files are needed here."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from lorasurgery.recipe import schema as S
from lorasurgery.recipe.loader import RecipeError, load_yaml, parse_sets, substitute, to_python
from lorasurgery.recipe.schema import (
    OPS,
    STEP_TYPES,
    json_schema,
    load_recipe,
    reference_markdown,
)
from lorasurgery.errors import PlanError

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
version: 1
seed: 5
vars:
  models: m
  w: 0.5
inputs:
  a: {path: "${models}/a.safetensors"}
  b:
    path: ${models}/b.safetensors
    arch: sdxl
blocks:
  outer: {layout: sdxl-12, values: [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]}
steps:
  - id: mix
    op: merge
    loras:
      - {input: a, weight: "${w}", blocks: outer}
      - b
  - id: small
    op: resize
    lora: mix
    rank: 4
    output: out/small.safetensors
outputs:
  - {from: mix, path: out/mix.safetensors, dtype: fp16, metadata: {note: "hi"}}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def errors_of(tmp_path: Path, text: str, sets: dict | None = None) -> list[str]:
    p = write(tmp_path, text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p, sets, display="r.yaml")
    return [str(i) for i in ei.value.issues]


def one_error(tmp_path: Path, text: str, sets: dict | None = None) -> str:
    errs = errors_of(tmp_path, text, sets)
    assert len(errs) == 1, errs
    return errs[0]


# ---- a valid recipe -------------------------------------------------------------------------------------


def test_valid_recipe_defaults_and_positions(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), display="r.yaml")
    d = r.data
    assert d["version"] == 1 and d["seed"] == 5 and d["description"] is None
    assert d["vars"] == {"models": "m", "w": 0.5}
    assert d["inputs"]["a"] == {"path": "m/a.safetensors", "sha256": None, "size": None, "arch": None}
    assert d["inputs"]["b"]["arch"] == "sdxl"
    mix, small = r.steps
    # a quoted "${w}" in a flow mapping is typed by the schema: a number where a number is expected
    assert mix["loras"][0]["weight"] == 0.5 and mix["loras"][0]["blocks"].name == "outer"
    assert mix["loras"][1] == {"input": "b", "weight": 1.0, "blocks": None}
    # every option of the operation is present with its documented default
    assert set(mix) == set(STEP_TYPES["merge"].names) - {"output"}
    assert mix["method"] == "concat" and mix["svd"] == "auto" and mix["rank"] is None
    # the output's dtype was moved onto the step that produces it
    assert mix["dtype"] == "fp16"
    assert small["rank"] == 4 and small["rank_method"] == "fixed"
    # inline outputs join the list, in step order first
    assert [(o["from"], o["path"]) for o in r.outputs] == [("small", "out/small.safetensors"),
                                                           ("mix", "out/mix.safetensors")]
    assert r.outputs[1]["metadata"] == {"note": "hi"} and r.outputs[0]["title"] is None
    # positions: 1-based line and column of each value
    assert str(r.where("steps", 1, "rank")) == "r.yaml:22:11"
    assert str(r.where("inputs", "b", "arch")) == "r.yaml:10:11"
    assert r.where("steps", 0, "loras", 0, "weight").line == 17
    assert not r.warnings


def test_set_overrides_and_types(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), {"w": "-1.25", "models": "/abs/models"})
    assert r.steps[0]["loras"][0]["weight"] == -1.25
    assert r.inputs["a"]["path"] == "/abs/models/a.safetensors"
    assert r.data["vars"] == {"models": "/abs/models", "w": -1.25}
    # a text field given a number through a variable gets the text
    text = GOOD.replace("path: out/mix.safetensors", "path: out/mix.safetensors, title: \"${w}\"")
    r2 = load_recipe(write(tmp_path, text), {"w": "2024"})
    assert r2.outputs[1]["title"] == "2024"
    assert parse_sets(["a=1", "b=x=y"]) == {"a": "1", "b": "x=y"}
    for bad in (["novalue"], ["=1"], ["1x=2"], ["a=1", "a=2"]):
        with pytest.raises(PlanError):
            parse_sets(bad)


# ---- bad input: each a clear error at its line ------------------------------------------------------------


def test_yaml_syntax_error_has_line(tmp_path):
    e = one_error(tmp_path, "version: 1\ninputs:\n  a: {path: x\nsteps: []\n")
    assert e.startswith("r.yaml:4:") and "not valid YAML" in e
    e = one_error(tmp_path, "version: 1\ninputs:\n\ta: 1\n")
    assert "r.yaml:3:1" in e and "tabs" in e
    assert "more than one YAML document" in one_error(tmp_path, "version: 1\n---\nversion: 1\n")
    assert "empty" in one_error(tmp_path, "# nothing\n")
    assert "mapping" in one_error(tmp_path, "- 1\n- 2\n")


def test_unknown_keys_suggest_nearest(tmp_path):
    errs = errors_of(tmp_path, GOOD.replace("seed: 5", "sed: 5").replace("weight: \"${w}\"", "wieght: 1")
                     .replace("    rank: 4\n", "    rnak: 4\n"))
    assert any(e.startswith("r.yaml:2:1:") and "unknown key 'sed'" in e and "Did you mean 'seed'?" in e
               for e in errs), errs
    assert any("r.yaml:17:" in e and "'wieght'" in e and "Did you mean 'weight'?" in e for e in errs), errs
    assert any("r.yaml:22:" in e and "'rnak'" in e and "Did you mean 'rank'?" in e for e in errs), errs
    # an option of another operation says which operations have it
    e = one_error(tmp_path, GOOD.replace("    lora: mix\n    rank: 4\n", "    lora: mix\n    rank: 4\n    base: a\n"))
    assert "unknown key 'base'" in e and "an option of extract, bake, not of resize" in e
    # the version key of recipes.md's sketch
    e = errors_of(tmp_path, GOOD.replace("version: 1", "lorasurgery: 1"))
    assert any("format version key is 'version: 1'" in x for x in e) and \
        any("missing required key 'version'" in x for x in e)


def test_wrong_types_and_ranges(tmp_path):
    cases = [
        ("seed: 5", "seed: five", "r.yaml:2:7: seed: expected integer ≥ 0, got text 'five'"),
        ("seed: 5", "seed: -1", "seed: -1 is out of range"),
        ("seed: 5", "seed: 1.5", "(a whole number is needed)"),
        ("    rank: 4\n", "    rank: '4'\n", "(it is quoted; remove the quotes)"),
        ("    rank: 4\n", "    rank: 0\n", "rank: 0 is out of range; expected integer ≥ 1"),
        ("    rank: 4\n", "    rank: 4\n    svd: fast\n", "unknown SVD back-end 'fast'"),
        ("    rank: 4\n", "    rank: 4\n    drop_unsupported: yes please\n", "expected true or false"),
        ("arch: sdxl", "arch: SDXL2", "unknown architecture 'SDXL2'"),
        ("version: 1", "version: 2", "recipe format version 2 is not supported"),
        ("metadata: {note: \"hi\"}", "metadata: {note: 3}", "expected text, got integer '3' (quote it"),
        ("steps:\n", "steps: {}\nx:\n", "steps: expected a list"),
        ("      - b\n", "      - [b]\n", "expected a LoRA"),
        ("weight: \"${w}\"", "weight: .nan", "expected a finite number"),
    ]
    for old, new, want in cases:
        text = GOOD.replace(old, new, 1)
        assert text != GOOD, old
        errs = errors_of(tmp_path, text)
        assert any(want in e for e in errs), (new, errs)
    e = errors_of(tmp_path, GOOD.replace("    op: resize\n", "    op: resise\n"))
    assert any("unknown operation 'resise'" in x and "Did you mean 'resize'?" in x for x in e)
    e = errors_of(tmp_path, GOOD.replace("    op: resize\n", ""))
    assert any("the step has no 'op'" in x for x in e)
    e = one_error(tmp_path, GOOD.replace("  b:\n    path: ${models}/b.safetensors\n", "  b:\n    size: 3\n"))
    assert "missing required key 'path'" in e and e.startswith("r.yaml:9:")


def test_duplicate_keys_and_merge_keys(tmp_path):
    e = one_error(tmp_path, GOOD.replace("seed: 5\n", "seed: 5\nseed: 6\n"))
    assert e.startswith("r.yaml:3:1:") and "appears twice" in e
    e = one_error(tmp_path, "version: 1\nx: &a {p: 1}\ny:\n  <<: *a\n")
    assert "merge keys" in e and "r.yaml:4:3" in e


def test_names_references_cycles(tmp_path):
    # unknown reference, with the nearest known name
    e = one_error(tmp_path, GOOD.replace("    lora: mix\n", "    lora: mixx\n"))
    assert "'mixx' is neither an input nor an earlier step" in e and "Did you mean 'mix'?" in e
    assert e.startswith("r.yaml:21:")
    # forward reference
    text = GOOD.replace("      - b\n", "      - small\n")
    e = one_error(tmp_path, text)
    assert "step 'small' is defined later" in e and "cycle: mix → small → mix" in e
    # self reference
    e = one_error(tmp_path, GOOD.replace("    lora: mix\n", "    lora: small\n"))
    assert "refers to its own result" in e
    # a step id that is also an input name; duplicate step ids
    e = errors_of(tmp_path, GOOD.replace("  - id: small\n", "  - id: a\n"))
    assert any(x.startswith("r.yaml:19:9:") and "step id 'a' is also the name of an input (line 7)" in x for x in e)
    e = errors_of(tmp_path, GOOD.replace("  - id: small\n", "  - id: mix\n"))
    assert any("step id 'mix' is used twice (first at line 14)" in x for x in e)
    # a LoRA step reading a checkpoint-producing step
    text = GOOD.replace("  - id: small\n    op: resize\n    lora: mix\n    rank: 4\n",
                        "  - id: ck\n    op: bake\n    base: a\n    loras: [b]\n  - id: small\n    op: resize\n"
                        "    lora: ck\n    rank: 4\n")
    e = one_error(tmp_path, text)
    assert "'ck' is the result of a bake step, i.e. a checkpoint" in e and "needs a lora" in e


def test_outputs_checks(tmp_path):
    e = one_error(tmp_path, GOOD.replace("{from: mix, path: out/mix", "{from: mx, path: out/mix"))
    assert "no step has this id" in e and "Did you mean 'mix'?" in e
    assert "names an input" in one_error(tmp_path, GOOD.replace("{from: mix,", "{from: a,"))
    assert "must end in .safetensors" in one_error(tmp_path, GOOD.replace("out/mix.safetensors", "out/mix.ckpt"))
    assert "is written twice" in one_error(tmp_path, GOOD.replace("out/mix.safetensors", "out/small.safetensors"))
    e = one_error(tmp_path, GOOD.replace("metadata: {note: \"hi\"}", "metadata: {sshs_model_hash: x}"))
    assert "reserved" in e
    # conflicting dtype between an output and its step
    e = one_error(tmp_path, GOOD.replace("    rank: 4\n", "    rank: 4\n    dtype: bf16\n")
                  .replace("output: out/small.safetensors", "output: {path: out/small.safetensors, dtype: fp32}"))
    assert "dtype 'fp32' conflicts with dtype 'bf16' of step 'small'" in e
    text = GOOD.replace("    output: out/small.safetensors\n", "").replace(
        "outputs:\n  - {from: mix, path: out/mix.safetensors, dtype: fp16, metadata: {note: \"hi\"}}\n", "")
    assert "writes nothing" in one_error(tmp_path, text)


def test_variables(tmp_path):
    e = one_error(tmp_path, GOOD.replace("${models}/b", "${model}/b"))
    assert "unknown variable '${model}'" in e and "Did you mean '${models}'?" in e and e.startswith("r.yaml:9:")
    e = one_error(tmp_path, GOOD, {"modle": "x"})
    assert "--set modle=...: the recipe declares no variable 'modle'" in e and "Did you mean 'models'?" in e
    e = one_error(tmp_path, GOOD.replace("  w: 0.5", "  w: ${models}"))
    assert "cannot use other variables" in e
    # $${ is a literal ${
    r = load_recipe(write(tmp_path, GOOD.replace("metadata: {note: \"hi\"}", "metadata: {note: \"$${x}\"}")))
    assert r.outputs[1]["metadata"]["note"] == "${x}"
    # an unused variable is a warning, not an error
    r = load_recipe(write(tmp_path, GOOD.replace("  w: 0.5\n", "  w: 0.5\n  unused: 1\n")))
    assert any("'unused' is declared but never used" in str(w) for w in r.warnings)
    # several problems are all reported, sorted by position
    errs = errors_of(tmp_path, GOOD.replace("${models}/a", "${x}/a").replace("${models}/b", "${y}/b"))
    assert [e.split(":")[1] for e in errs] == ["7", "9"]


def test_block_spec_names(tmp_path):
    e = one_error(tmp_path, GOOD.replace("blocks: outer}", "blocks: outre}"))
    assert "block spec 'outre' is neither a 'blocks:' entry" in e and "Did you mean 'outer'?" in e
    # a preset name is fine here (checked for the architecture when the files are read)
    load_recipe(write(tmp_path, GOOD.replace("blocks: outer}", "blocks: OUTD}")))
    e = one_error(tmp_path, GOOD.replace("  outer: {", "  ALL: {").replace("blocks: outer}", "blocks: ALL}"))
    assert "name of a built-in preset" in e
    assert "a block-weight spec is the name" in one_error(tmp_path, GOOD.replace("blocks: outer}", "blocks: 3}"))


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yaml")


# ---- schema as data: JSON Schema, reference, constants ---------------------------------------------------


def test_schema_json_file_is_generated_from_the_data():
    on_disk = json.loads((ROOT / "lorasurgery" / "recipe" / "schema.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(json_schema())), \
        "schema.json is stale: python -c 'from lorasurgery.recipe.schema import write_schema_file; write_schema_file()'"


def test_json_schema_accepts_every_shipped_recipe_and_rejects_bad_ones():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        loaded = load_yaml(path)
        defaults = {k: str(x) for k, x in (to_python(loaded.root).get("vars") or {}).items()}
        doc = to_python(substitute(loaded.root, defaults, str(path), []))
        assert not list(v.iter_errors(doc)), path
    bad = {"version": 1, "inputs": {"a": {"path": "x"}},
           "steps": [{"id": "s", "op": "convert", "lora": "a", "format": "peft", "rank": 3}]}
    assert list(v.iter_errors(bad))
    assert list(v.iter_errors({**bad, "version": 2, "steps": [{"id": "s", "op": "convert", "lora": "a",
                                                                "format": "peft"}]}))


def test_reference_lists_every_key():
    ref = reference_markdown()
    for s in (S.RECIPE, S.INPUT, S.OUTPUT, S.LORA_ITEM, *STEP_TYPES.values()):
        for f in s.fields:
            if f.name in ("id", "op", "output") and s in STEP_TYPES.values():
                continue
            assert f"| `{f.name}` |" in ref, (s.name, f.name)
    for op in OPS:
        assert f"*`op: {op}`*" in ref


def test_constants_match_the_library():
    from lorasurgery.arch import ARCH_NAMES
    from lorasurgery.formats.write import FORMATS
    from lorasurgery.linalg import RANK_METHODS
    from lorasurgery.ops import extract as ex
    from lorasurgery.ops.bake import OUTPUT_DTYPES
    from lorasurgery.ops.output import DEFAULT_EXTRACT_DTYPE, DEFAULT_FORMAT
    from lorasurgery.io.dtypes import dtype_name
    from lorasurgery.recipe import plan as P

    assert S.ARCHS == ARCH_NAMES and S.FORMATS == FORMATS and S.RANK_METHODS == RANK_METHODS
    assert S.SVD_MODES == ex.SVD_MODES and S.LORA_DTYPES == ex.OUTPUT_DTYPES and S.BAKE_DTYPES == OUTPUT_DTYPES
    assert P.DEFAULT_FORMAT == DEFAULT_FORMAT
    assert P.DEFAULT_EXTRACT_DTYPE == {a: dtype_name(d) for a, d in DEFAULT_EXTRACT_DTYPE.items()}
    # the extract step offers every option of ExtractOptions the recipe controls, with the same defaults
    from dataclasses import fields

    recipe_side = {"device", "seed", "overwrite"}  # chosen by `run` (--device), the recipe's seed, --overwrite
    opts = {f.name: f.default for f in fields(ex.ExtractOptions)}
    step = {f.name: f.default for f in S.EXTRACT.fields if f.name not in ("id", "op", "output", "base", "tuned")}
    assert set(step) == set(opts) - recipe_side
    for k, v in step.items():
        assert v == opts[k], k
