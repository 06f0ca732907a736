"""Recipe planning from headers and `lorasurgery validate`: header checks at their line, nothing read or
written, exit codes and --json. Uses a few tiny model files (the demo's names)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorasurgery.cli import main
from lorasurgery.commands import run as run_cmd
from lorasurgery.commands import validate as validate_cmd
from lorasurgery.io.hashes import sha256_file
from lorasurgery.recipe import RecipeError, load_recipe, plan_recipe, verify_pins
from lorasurgery.testing import save, tiny_checkpoint, tiny_lora

for _c in (run_cmd.command, validate_cmd.command):
    if _c.name not in main.commands:
        main.add_command(_c)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    save(tiny_checkpoint("flux", "bfl", seed=0), d / "flux-base.safetensors")
    save(tiny_lora("flux", "kohya", rank=4, alpha=2.0, seed=1), d / "flux-lora-kohya.safetensors")
    save(tiny_lora("flux", "peft", rank=4, alpha=2.0, seed=2), d / "flux-lora-peft.safetensors")
    save(tiny_lora("sd1", "kohya", rank=4, alpha=2.0, seed=1), d / "sd1-lora-kohya.safetensors")
    save(tiny_lora("sd3", "kohya", rank=4, alpha=2.0, seed=1), d / "sd3-lora-kohya.safetensors")
    save(tiny_lora("sdxl", "kohya", rank=4, alpha=2.0, seed=1), d / "sdxl-lora-kohya.safetensors")
    save(_tuned("flux"), d / "flux-tuned.safetensors")
    return d


def _tuned(arch: str) -> dict:
    """The tiny base (reference layout) plus a rank-4 change on every attention module: a fine-tune."""
    from lorasurgery.formats.dense import module_dense
    from lorasurgery.testing import tiny_lora_deltas, tiny_table

    table = tiny_table(arch)
    mods = {m.key: m for m in table.modules}
    ckpt = tiny_checkpoint(arch, seed=0)
    for target, delta in tiny_lora_deltas(table, rank=4, alpha=4.0, seed=7).items():
        key = target.module
        ckpt[key] = ckpt[key] + module_dense(mods[key], {target: delta}, ckpt[key].shape)
    return ckpt


BASE = """\
version: 1
vars:
  models: .
inputs:
  base: {path: "${models}/flux-base.safetensors"}
  a: {path: "${models}/flux-lora-kohya.safetensors", arch: flux}
  b: {path: "${models}/flux-lora-peft.safetensors"}
steps:
  - id: mix
    op: merge
    loras:
      - {input: a, weight: 0.5, blocks: FLUXDOUBLE}
      - b
    output: out/mix.safetensors
  - id: baked
    op: bake
    base: base
    loras: [mix]
    output: out/baked.safetensors
"""


def recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def plan_errors(tmp_path: Path, models: Path, text: str) -> list[str]:
    r = load_recipe(recipe(tmp_path, text), {"models": str(models)}, display="r.yaml")
    p = plan_recipe(r)
    return [str(i) for i in p.errors]


def test_valid_plan_reads_headers_only(tmp_path, models, monkeypatch):
    from lorasurgery.io import reader

    def no_data(*a, **k):
        raise AssertionError("validate/dry-run must not read tensor data")

    monkeypatch.setattr(reader.TensorSource, "get", no_data)
    r = load_recipe(recipe(tmp_path, BASE), {"models": str(models)})
    p = plan_recipe(r)
    assert p.valid, p.errors
    mix = p.step("mix")
    assert mix.result.arch == "flux" and mix.result.key_format == "kohya" and mix.result.dtype == "fp32"
    # FLUXDOUBLE turns the single blocks and OUT of `a` off: those modules drop out of the merge
    a_use = mix.loras[0]
    assert a_use.blocks.weight("S00") == 0 and a_use.blocks.weight("D00") == 1 and a_use.weight == 0.5
    assert any("weight × block weight 0" in n for n in mix.notes)
    assert p.step("baked").result.kind == "checkpoint" and p.step("baked").result.layout == "bfl"
    resolved = p.resolved()
    assert resolved["steps"][0]["loras"][0]["blocks"] == a_use.blocks.spec
    assert resolved["inputs"]["a"]["path"] == "flux-lora-kohya.safetensors"  # absolute --set path: name only
    assert resolved["outputs"][0] == {"from": "mix", "path": "out/mix.safetensors", "title": "mix", "format": "kohya",
                                      "dtype": "fp32", "metadata": {}}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old,new,want_line,want", [
    # a 20-value (SDXL) block list on a FLUX LoRA
    ("blocks: FLUXDOUBLE}", "blocks: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]}", 12,
     "20 values given, but FLUX block lists have 61 values"),
    # an SD1 preset on FLUX
    ("blocks: FLUXDOUBLE}", "blocks: OUTD}", 12, "OUTD is a preset for SD1/SD2"),
    # a block id FLUX does not have
    ("blocks: FLUXDOUBLE}", "blocks: {M00: 0}}", 12, "FLUX has no middle block"),
    # arch pin mismatch
    ("arch: flux}", "arch: sdxl}", 6, "not sdxl as the recipe says"),
    # a checkpoint where a LoRA is needed
    ("      - b\n", "      - base\n", 13, "'base' is a flux checkpoint, bfl layout, but a lora is needed"),
    # LoRAs of two architectures
    ("flux-lora-peft", "sd1-lora-kohya", 13, "'b' is a sd1 LoRA but 'a' is flux"),
    # rank options that do not fit the method
    ("    output: out/mix.safetensors\n", "    rank: 4\n    output: out/mix.safetensors\n", 14,
     "rank truncates the result and needs 'method: svd'"),
    ("    output: out/mix.safetensors\n", "    method: svd\n    output: out/mix.safetensors\n", 9,
     "a svd needs 'rank: N'"),
    ("    output: out/mix.safetensors\n", "    method: svd\n    rank_method: sv_fro\n    rank_param: 2\n"
                                        "    output: out/mix.safetensors\n", 16, "sv_fro takes a fraction in (0, 1]"),
    # a missing input file
    ("flux-lora-peft", "flux-lora-nope", 7, "does not exist"),
    # a size pin that does not match
    ("flux-lora-peft.safetensors\"}", "flux-lora-peft.safetensors\", size: 12}", 7, "size pin 12 does not match"),
    # an output that would overwrite an input
    ("out/baked.safetensors", "${models}/flux-base.safetensors", 19, "is the input 'base'"),
])
def test_header_errors_at_their_line(tmp_path, models, old, new, want_line, want):
    text = BASE.replace(old, new, 1)
    assert text != BASE
    errs = plan_errors(tmp_path, models, text)
    assert any(e.startswith(f"r.yaml:{want_line}:") and want in e for e in errs), errs
    assert not (tmp_path / "out").exists()


def test_bake_lora_of_another_architecture(tmp_path, models):
    text = BASE.replace("    loras: [mix]\n", "    loras: [sdxl]\n").replace(
        "  b: {path", "  sdxl: {path: \"${models}/sdxl-lora-kohya.safetensors\"}\n  b: {path")
    errs = plan_errors(tmp_path, models, text)
    assert any("'sdxl' is a sdxl LoRA but the base 'base' is a flux checkpoint" in e for e in errs), errs


def test_sd3_depth_comes_from_the_lora(tmp_path, models):
    text = """\
    version: 1
    vars: {models: .}
    inputs:
      l: {path: "${models}/sd3-lora-kohya.safetensors"}
    steps:
      - id: j
        op: merge
        loras: [{input: l, blocks: "BASE=0,J00=1,J01-OUT=0"}]
        output: out/j.safetensors
      - id: bad
        op: merge
        loras: [{input: l, blocks: "J05=0"}]
        output: out/bad.safetensors
    """
    errs = plan_errors(tmp_path, models, text)
    assert len(errs) == 1 and "r.yaml:12:" in errs[0] and "unknown block id 'J05' for SD3 (depth 2)" in errs[0], errs


def test_verify_pins(tmp_path, models):
    good = sha256_file(models / "flux-lora-peft.safetensors")
    text = BASE.replace("flux-lora-peft.safetensors\"}", f"flux-lora-peft.safetensors\", sha256: {good}}}")
    r = load_recipe(recipe(tmp_path, text), {"models": str(models)})
    hashes = verify_pins(plan_recipe(r))
    assert hashes["b"] == (good, (models / "flux-lora-peft.safetensors").stat().st_size)
    with pytest.raises(RecipeError, match="input 'base' has no sha256 pin; --locked"):
        verify_pins(plan_recipe(r), locked=True)
    bad = "0" * 64
    text = BASE.replace("flux-lora-peft.safetensors\"}", f"flux-lora-peft.safetensors\", sha256: \"{bad}\"}}")
    r = load_recipe(recipe(tmp_path, text, "bad.yaml"), {"models": str(models)}, display="bad.yaml")
    with pytest.raises(RecipeError) as ei:
        verify_pins(plan_recipe(r))
    msg = str(ei.value)
    assert "bad.yaml:7:" in msg and f"sha256 pin {bad} does not match" in msg and good in msg


# ---- the command ------------------------------------------------------------------------------------------


def test_validate_cli_exit_codes_and_json(tmp_path, models):
    ok = recipe(tmp_path, BASE, "ok.yaml")
    bad = recipe(tmp_path, BASE.replace("op: bake", "op: baek"), "bad.yaml")
    runner = CliRunner()
    res = runner.invoke(main, ["validate", str(ok), "--set", f"models={models}"])
    assert res.exit_code == 0, res.output
    assert "valid (3 inputs, 2 steps, 2 outputs" in res.output
    res = runner.invoke(main, ["validate", str(ok), str(bad), "--set", f"models={models}", "--json"])
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    assert report["valid"] is False
    good_r, bad_r = report["recipes"]
    assert good_r["valid"] and good_r["plan"]["steps"][0]["id"] == "mix"
    assert not bad_r["valid"]
    issue = bad_r["issues"][0]
    assert issue["line"] == 16 and issue["column"] == 9 and "Did you mean 'bake'?" in issue["message"]
    res = runner.invoke(main, ["validate", str(bad)])
    assert res.exit_code == 1 and f"{bad}:16:9: steps[1].op: unknown operation 'baek'" in res.output
    # schema only: the files are not opened, so a missing models folder is fine
    res = runner.invoke(main, ["validate", str(ok), "--schema-only", "--set", "models=/nonexistent"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["validate", str(ok), "--set", "models=/nonexistent"])
    assert res.exit_code == 1 and "does not exist" in res.output
    # --set of a variable no recipe declares
    res = runner.invoke(main, ["validate", str(ok), "--set", "modles=x"])
    assert res.exit_code == 1 and "Did you mean 'models'?" in res.output
    # --locked: every input needs a pin
    res = runner.invoke(main, ["validate", str(ok), "--set", f"models={models}", "--locked"])
    assert res.exit_code == 1 and "no sha256 pin" in res.output
    res = runner.invoke(main, ["validate", "--print-schema"])
    assert res.exit_code == 0 and json.loads(res.stdout)["title"] == "lorasurgery recipe"
    assert runner.invoke(main, ["validate"]).exit_code == 2


def test_run_dry_run_cli(tmp_path, models):
    ok = recipe(tmp_path, BASE, "ok.yaml")
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(ok), "--set", f"models={models}", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [s["id"] for s in plan["steps"]] == ["mix", "baked"]
    mix = plan["steps"][0]
    table = {row["block"]: row for row in mix["loras"][0]["block_table"]}
    assert table["S00"]["weight"] == 0 and table["D00"]["weight"] == 1 and table["D00"]["modules"] > 0
    assert plan["outputs"][0]["estimated_bytes"] > 0 and plan["resolved_recipe"]["version"] == 1
    res = runner.invoke(main, ["run", str(ok), "--set", f"models={models}", "--dry-run"])
    assert res.exit_code == 0 and "block weights of a" in res.output and "nothing was written" in res.output
    assert not (tmp_path / "out").exists()
    # errors: exit 1 with file:line:col
    bad = recipe(tmp_path, BASE.replace("blocks: FLUXDOUBLE}", "blocks: OUTD}"), "bad.yaml")
    res = runner.invoke(main, ["run", str(bad), "--set", f"models={models}", "--dry-run"])
    assert res.exit_code == 1 and f"{bad}:12:" in res.output and "OUTD" in res.output


def test_bake_of_a_diffusers_folder_is_refused_at_plan_time(tmp_path, models):
    from lorasurgery.testing import save_diffusers_folder, tiny_table, to_layout

    save_diffusers_folder(to_layout(tiny_checkpoint("flux", seed=0), tiny_table("flux"), "diffusers"),
                          tmp_path / "flux-diffusers")
    text = BASE.replace('"${models}/flux-base.safetensors"', f'"{tmp_path / "flux-diffusers"}"')
    errs = plan_errors(tmp_path, models, text)
    assert len(errs) == 1 and errs[0].startswith("r.yaml:17:") and "is a diffusers folder" in errs[0], errs


EXTRACT = """\
version: 1
vars: {models: .}
inputs:
  base: {path: "${models}/flux-base.safetensors"}
  tuned: {path: "${models}/flux-tuned.safetensors"}
steps:
  - id: x
    op: extract
    base: base
    tuned: tuned
    rank: 6
    text_encoder: false
    output: out/x.safetensors
  - id: y
    op: resize
    lora: x
    rank: 2
    output: out/y.safetensors
"""


def test_extract_from_two_files_is_planned_in_full(tmp_path, models):
    from lorasurgery.ops.extract import plan_extract
    from lorasurgery.recipe import run_recipe
    from lorasurgery.formats.read import index_lora

    r = load_recipe(recipe(tmp_path, EXTRACT), {"models": str(models)})
    p = plan_recipe(r)
    assert p.valid, p.errors
    x = p.step("x")
    direct = plan_extract(models / "flux-base.safetensors", models / "flux-tuned.safetensors",
                          tmp_path / "o.safetensors", rank=6, text_encoder=False, device="cpu")
    assert set(x.result.modules) == {j.key for j in direct.jobs} and x.result.size_kind == "estimate"
    assert x.options["dtype"] == "bf16" and x.options["format"] == "kohya"  # FLUX defaults, resolved
    assert {m.rank for m in p.step("y").result.modules.values()} == {2}
    report = run_recipe(recipe(tmp_path, EXTRACT, "run.yaml"), {"models": str(models)})
    with index_lora(report.outputs[0].path) as idx:
        assert {m.target.module for m in idx.modules} == set(x.result.modules)
        assert max(m.rank for m in idx.modules) <= 6
    est, actual = x.result.bytes, report.outputs[0].bytes
    assert 0.5 < est / actual < 2, (est, actual)
    # a wrong rank rule is reported at its line before anything runs
    errs = plan_errors(tmp_path, models, EXTRACT.replace("    rank: 6\n", "    rank: 6\n    rank_param: 0.5\n"))
    assert any(e.startswith("r.yaml:12:") and "rank_param applies to the dynamic rank methods" in e for e in errs)


def test_verify_and_locked_flags(tmp_path, models):
    good = sha256_file(models / "sd3-lora-kohya.safetensors")
    text = textwrap.dedent("""\
        version: 1
        vars: {models: .}
        inputs:
          l: {path: "${models}/sd3-lora-kohya.safetensors", sha256: SHA}
        steps:
          - {id: p, op: convert, lora: l, format: peft, output: out/p.safetensors}
        """)
    ok = recipe(tmp_path, text.replace("SHA", good), "ok.yaml")
    bad = recipe(tmp_path, text.replace("SHA", "f" * 64), "bad.yaml")
    runner = CliRunner()
    res = runner.invoke(main, ["validate", str(ok), "--set", f"models={models}", "--verify", "--locked"])
    assert res.exit_code == 0 and "sha256 pins verified" in res.output, res.output
    res = runner.invoke(main, ["validate", str(bad), "--set", f"models={models}"])
    assert res.exit_code == 0  # pins are checked only with --verify (or by run)
    res = runner.invoke(main, ["validate", str(bad), "--set", f"models={models}", "--verify"])
    assert res.exit_code == 1 and f"{bad}:4:" in res.output and "does not match" in res.output
    res = runner.invoke(main, ["run", str(bad), "--set", f"models={models}", "--dry-run", "--verify"])
    assert res.exit_code == 1 and "does not match" in res.output
    res = runner.invoke(main, ["run", str(ok), "--set", f"models={models}", "--dry-run", "--verify", "--locked"])
    assert res.exit_code == 0 and "sha256 pins verified" in res.output
    res = runner.invoke(main, ["run", str(bad), "--set", f"models={models}"])
    assert res.exit_code == 1 and "does not match" in res.output and not (tmp_path / "out").exists()
