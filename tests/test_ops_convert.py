"""convert: exact between key conventions, every input key consumed, round trips for every architecture."""
from __future__ import annotations

import json

import pytest
import torch

from lorasurgery.arch import ARCH_NAMES
from lorasurgery.errors import InputError, PlanError
from lorasurgery.formats.write import has_name, lora_tensors
from lorasurgery.io.reader import read_header
from lorasurgery.ops.algebra import convert
from lorasurgery.testing import save, tiny_lora_deltas, tiny_table
from test_ops_merge import assert_dense_equal, dense_by_module, one_thread, read_items, run, write

__all__ = ["one_thread"]  # autouse fixture, imported to apply here too


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("first,split", [("kohya", False), ("peft", True)])
def test_round_trip_every_format_pair(tmp_path, arch, first, split):
    """kohya → PEFT → kohya → PEFT (and PEFT with split q/k/v → kohya fused → ...): the same ΔW each time."""
    table = tiny_table(arch)
    items = tiny_lora_deltas(table, rank=3, alpha=5.0, seed=3, groups=("attn", "locon"), split_parts=split)
    src = write(items, table, first, tmp_path / "src.safetensors")
    ref = dense_by_module(table, read_items(src, table))
    other = "peft" if first == "kohya" else "kohya"
    a = convert(src, tmp_path / "a.safetensors", to=other, drop_unsupported=True)
    b = convert(a.output, tmp_path / "b.safetensors", to=first)
    c = convert(b.output, tmp_path / "c.safetensors", to=other)
    named = {m.key for m in table.modules if has_name(m, other)}
    ref_named = {k: v for k, v in ref.items() if k in named}
    assert sorted(a.dropped) == sorted(t.id for t in read_items(src, table) if t.module not in named)
    for rep in (a, b, c):
        assert rep.format in ("kohya", "peft")
        assert_dense_equal(dense_by_module(table, read_items(rep.output, table)), ref_named, rtol=1e-6)


def _flux_kohya(tmp_path):
    table = tiny_table("flux")
    items = tiny_lora_deltas(table, rank=2, alpha=None, seed=8)
    path = write(items, table, "kohya", tmp_path / "k.safetensors")
    return table, path


def test_xlabs_and_comfy_inputs_convert_exactly(tmp_path):
    table, kpath = _flux_kohya(tmp_path)
    ref = dense_by_module(table, read_items(kpath, table))
    tensors = dict(lora_tensors(read_items(kpath, table), table, "kohya"))
    xlabs, comfy = {}, {}
    ren = {"img_attn_qkv": "processor.qkv_lora1", "txt_attn_qkv": "processor.qkv_lora2",
           "img_attn_proj": "processor.proj_lora1", "txt_attn_proj": "processor.proj_lora2"}
    for k, v in tensors.items():
        name, _, sfx = k.partition(".")
        if sfx == "alpha":
            continue
        if name.startswith("lora_unet_double_blocks_"):
            rest = name[len("lora_unet_double_blocks_"):]
            i, _, sub = rest.partition("_")
            if sub in ren:
                xsfx = {"lora_down.weight": "down.weight", "lora_up.weight": "up.weight"}[sfx]
                xlabs[f"double_blocks.{i}.{ren[sub]}.{xsfx}"] = v
                comfy[f"diffusion_model.double_blocks.{i}.{sub.replace('_attn_', '_attn.')}.{sfx}"] = v
    assert xlabs and comfy
    px = save(xlabs, tmp_path / "xlabs.safetensors")
    pc = save(comfy, tmp_path / "comfy.safetensors")
    for p in (px, pc):
        got = read_items(p, table)
        want = {t.module for t in got}
        for fmt in ("kohya", "peft"):
            rep = convert(p, tmp_path / f"{p.stem}-{fmt}.safetensors", to=fmt)
            assert rep.source_format in ("xlabs", "comfy")
            out = dense_by_module(table, read_items(rep.output, table))
            assert_dense_equal(out, {k: v for k, v in ref.items() if k in want}, rtol=1e-6)


def test_unconsumed_keys_fail_and_drop_unsupported(tmp_path):
    table = tiny_table("sd2")
    items = tiny_lora_deltas(table, rank=2, alpha=1.0, groups=("attn", "extra"))
    tensors = dict(lora_tensors(items, table, "kohya"))
    tensors["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(2, 4)
    bad = save(tensors, tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="lora_unet_not_a_module"):
        convert(bad, tmp_path / "o.safetensors", to="peft")
    good = write(items, table, "kohya", tmp_path / "good.safetensors")
    with pytest.raises(PlanError, match="--drop-unsupported"):
        convert(good, tmp_path / "o.safetensors", to="peft")
    assert not (tmp_path / "o.safetensors").exists()
    rep = convert(good, tmp_path / "o.safetensors", to="peft", drop_unsupported=True)
    unnamed = {m.key for m in table.modules if not has_name(m, "peft")}
    assert rep.dropped and all(d.split(":")[0] in unnamed for d in rep.dropped)
    assert any("dropped" in n for n in rep.notes)


def test_metadata_and_dtype_kept(tmp_path):
    table = tiny_table("sdxl")
    items = tiny_lora_deltas(table, rank=2, alpha=1.0)
    p = save(lora_tensors(items, table, "kohya", dtype=torch.float16), tmp_path / "h.safetensors",
             {"ss_output_name": "h", "modelspec.author": "me"})
    rep = convert(p, tmp_path / "p.safetensors", to="peft")
    h = read_header(rep.output)
    assert h.metadata["ss_output_name"] == "h" and h.metadata["modelspec.author"] == "me"
    assert {t.dtype for t in h.tensors.values()} == {"F16"} and rep.dtype == "fp16"
    rep = convert(p, tmp_path / "f.safetensors", to="kohya", dtype="fp32")
    assert {t.dtype for k, t in read_header(rep.output).tensors.items()} == {"F32"}


def test_cli_convert(tmp_path, monkeypatch):
    table, kpath = _flux_kohya(tmp_path)
    r = run("convert", kpath, "--to", "peft", "-o", tmp_path / "p.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["format"] == "peft" and rep["source_format"] == "kohya"
    monkeypatch.chdir(tmp_path)
    r = run("convert", tmp_path / "p.safetensors", "--to", "kohya")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p-kohya.safetensors").exists()
    assert run("convert", kpath).exit_code == 2  # --to is required (usage error)
    r = run("convert", tmp_path / "missing.safetensors", "--to", "kohya")
    assert r.exit_code == 1 and r.output.startswith("error:")
