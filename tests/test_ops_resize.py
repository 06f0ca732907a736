"""resize: optimal truncation per module from the factors, rank rules, metadata, CLI."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lorasurgery.delta import LoHa, LowRank
from lorasurgery.errors import PlanError
from lorasurgery.formats.names import Target
from lorasurgery.formats.write import lora_tensors
from lorasurgery.io.reader import read_header
from lorasurgery.ops.algebra import resize
from lorasurgery.testing import save, tiny_lora_deltas, tiny_table
from test_ops_merge import assert_dense_equal, dense_by_module, one_thread, optimal_ratio, read_items, run, write

__all__ = ["one_thread"]  # autouse fixture, imported to apply here too


def lora_file(tmp_path, arch="sdxl", fmt="kohya", rank=6, alpha=2.5, name="l.safetensors", **kw):
    table = tiny_table(arch)
    items = tiny_lora_deltas(table, rank=rank, alpha=alpha, seed=4, groups=("attn", "locon"), **kw)
    p = write(items, table, fmt, tmp_path / name)
    return table, p, dense_by_module(table, read_items(p, table))


@pytest.mark.parametrize("arch,fmt", [("sdxl", "kohya"), ("flux", "peft"), ("sd3", "peft")])
def test_resize_to_full_rank_is_lossless_and_keeps_format(tmp_path, arch, fmt):
    table, p, ref = lora_file(tmp_path, arch, fmt, split_parts=(arch == "flux"))
    rep = resize(p, tmp_path / "r.safetensors", rank=6)
    assert rep.format == fmt and rep.source_format == fmt
    assert_dense_equal(dense_by_module(table, read_items(rep.output, table)), ref, rtol=1e-5)
    assert all(r.rank_in == 6 and r.rank_out <= 6 and abs(r.retained - 1) < 1e-6 for r in rep.rows)


@pytest.mark.parametrize("rank", [1, 3])
def test_resize_is_eckart_young_optimal(tmp_path, rank):
    table, p, ref = lora_file(tmp_path)
    rep = resize(p, tmp_path / "r.safetensors", rank=rank, device="cpu")
    items = read_items(rep.output, table)
    assert {d.rank for d in items.values()} == {rank}
    assert optimal_ratio(table, items, ref) <= 1.0001
    for r in rep.rows:
        assert r.method == "factored svd" and r.rank_in == 6 and r.rank_out == rank and 0 < r.retained < 1


def known_spectrum_lora(tmp_path, sigmas):
    """A one-module LoRA whose ΔW has exactly the singular values ``sigmas`` (alpha ≠ rank)."""
    table = tiny_table("sdxl")
    mod = next(m for m in table.modules if m.kind == "linear" and m.group == "attn" and m.component == "unet")
    out, inp = mod.shape
    g = torch.Generator().manual_seed(7)
    r = len(sigmas)
    u = torch.linalg.qr(torch.randn(out, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(inp, r, generator=g, dtype=torch.float64)).Q
    s = torch.tensor(sigmas, dtype=torch.float64)
    alpha = 3.0  # scale alpha / r: divide it out of the factors
    up = (u * s.sqrt()) / (alpha / r)
    down = s.sqrt()[:, None] * v.T
    d = LowRank(up=up.float(), down=down.float(), alpha=alpha)
    return save(lora_tensors({Target(mod.key): d}, table, "kohya"), tmp_path / "k.safetensors")


@pytest.mark.parametrize("method,param,cap,expected", [
    ("sv_ratio", 3.0, None, 2),  # σ_i > 8/3: {8, 4}
    ("sv_ratio", 20.0, None, 5),  # σ_i > 0.4
    ("sv_fro", 0.95, None, 2),  # Σσ² ≥ 0.9025·85.3125 = 77.0: 64, 80
    ("sv_fro", 0.99, None, 3),  # ≥ 83.6: 64, 80, 84
    ("sv_cumulative", 0.9, None, 4),  # Σσ ≥ 14.175: 8, 12, 14, 15
    ("sv_cumulative", 0.9, 3, 3),  # capped by --rank
    ("fixed", None, 1, 1),
])
def test_dynamic_ranks_have_no_off_by_one(tmp_path, method, param, cap, expected):
    p = known_spectrum_lora(tmp_path, [8, 4, 2, 1, 0.5, 0.25])
    rep = resize(p, tmp_path / "r.safetensors", rank=cap, rank_method=method, rank_param=param)
    (row,) = rep.rows
    assert (row.rank_in, row.rank_out) == (6, expected)
    kept = [8, 4, 2, 1, 0.5, 0.25][:expected]
    assert row.retained == pytest.approx((sum(x * x for x in kept) / 85.3125) ** 0.5, rel=1e-5)


def test_metadata_kept_and_updated(tmp_path):
    table = tiny_table("sdxl")
    items = tiny_lora_deltas(table, rank=6, alpha=2.0, seed=2)
    meta = {"ss_output_name": "style", "ss_tag_frequency": "{}", "my.note": "kept", "sshs_model_hash": "stale",
            "ss_network_dim": "6"}
    p = save(lora_tensors(items, table, "kohya"), tmp_path / "style.safetensors", meta)
    rep = resize(p, tmp_path / "fixed.safetensors", rank=2)
    m = read_header(rep.output).metadata
    assert m["ss_output_name"] == "style" and m["my.note"] == "kept" and m["ss_tag_frequency"] == "{}"
    assert m["ss_network_dim"] == "2" and "resized" in m["ss_training_comment"]
    data = rep.output.read_bytes()
    hlen = int.from_bytes(data[:8], "little")
    assert m["sshs_model_hash"] == hashlib.sha256(data[8 + hlen:]).hexdigest() == rep.model_hash
    rep = resize(p, tmp_path / "dyn.safetensors", rank_method="sv_fro", rank_param=0.7)
    m = read_header(rep.output).metadata
    ranks = {r.rank_out for r in rep.rows}
    assert len(ranks) > 1 and m["ss_network_dim"] == "Dynamic"
    assert json.loads(m["lorasurgery.recipe"])["rank"] == {"method": "sv_fro", "param": 0.7, "rank": None,
                                                          "conv_rank": None}


def test_conv_rank_and_caps(tmp_path):
    table, p, ref = lora_file(tmp_path, rank=6)
    mods = {m.key: m for m in table.modules}
    rep = resize(p, tmp_path / "r.safetensors", rank=4, conv_rank=2)
    for r in rep.rows:
        conv = mods[r.target.split(":")[0]].kind == "conv"
        assert r.rank_out == (2 if conv else 4)
    rep = resize(p, tmp_path / "big.safetensors", rank=100000)
    assert any("capped" in n for n in rep.notes)
    assert_dense_equal(dense_by_module(table, read_items(rep.output, table)), ref, rtol=1e-5)


def test_loha_becomes_optimal_lora(tmp_path):
    table = tiny_table("sdxl")
    mod = next(m for m in table.modules if m.kind == "linear" and m.group == "attn" and m.component == "unet")
    o, i = mod.shape
    g = torch.Generator().manual_seed(9)
    loha = LoHa(w1a=torch.randn(o, 3, generator=g), w1b=torch.randn(3, i, generator=g),
                w2a=torch.randn(o, 2, generator=g), w2b=torch.randn(2, i, generator=g), alpha=1.5)
    p = save(lora_tensors({Target(mod.key): loha}, table, "kohya"), tmp_path / "h.safetensors")
    ref = dense_by_module(table, read_items(p, table))
    rep = resize(p, tmp_path / "r.safetensors", rank=3, svd="exact")
    items = read_items(rep.output, table)
    assert [d.algo for d in items.values()] == ["lora"] and rep.rows[0].method.startswith("dense svd")
    assert optimal_ratio(table, items, ref) <= 1.0001


def test_resize_errors(tmp_path):
    table, p, _ = lora_file(tmp_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(PlanError, match="--rank"):
        resize(p, out)
    with pytest.raises(PlanError, match="--rank"):
        resize(p, out, rank=0)
    with pytest.raises(PlanError, match="rank-param"):
        resize(p, out, rank=4, rank_param=0.5)
    with pytest.raises(PlanError, match="in \\(0, 1\\]"):
        resize(p, out, rank_method="sv_fro", rank_param=1.5)
    mod = next(m for m in table.modules if m.kind == "linear" and m.group == "attn" and m.component == "unet")
    dora = LowRank(up=torch.ones(mod.shape[0], 1), down=torch.ones(1, mod.shape[1]), alpha=1.0,
                   dora_scale=torch.ones(mod.shape[0], 1))
    pd = save(lora_tensors({Target(mod.key): dora}, table, "kohya"), tmp_path / "dora.safetensors")
    with pytest.raises(PlanError, match="base"):
        resize(pd, out, rank=1)
    assert not out.exists()


def test_cli_resize_table_and_json(tmp_path, monkeypatch):
    table, p, _ = lora_file(tmp_path)
    r = run("resize", p, "--rank", "2", "-o", tmp_path / "a.safetensors")
    assert r.exit_code == 0, r.output
    assert "old rank" in r.output and "new rank" in r.output and "retained" in r.output
    r = run("resize", p, "--rank-method", "sv_fro", "--rank-param", "0.8", "-o", tmp_path / "b.safetensors",
            "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["op"] == "resize" and rep["rows"]
    assert all(row["rank_in"] == 6 and 1 <= row["rank_out"] <= 6 and row["retained_fro"] >= 0.8 - 1e-6
               for row in rep["rows"])
    monkeypatch.chdir(tmp_path)
    assert run("resize", p, "--rank", "3").exit_code == 0 and (tmp_path / "l-r3.safetensors").exists()
    for bad in (["--rank", "0"], [], ["--rank-method", "sv_ratio", "--rank-param", "0.5"]):
        r = run("resize", p, *bad, "-o", tmp_path / "bad.safetensors")
        assert r.exit_code == 1 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resize_on_cuda_matches_cpu(tmp_path):
    table, p, ref = lora_file(tmp_path)
    a = resize(p, tmp_path / "cpu.safetensors", rank=3, device="cpu")
    b = resize(p, tmp_path / "gpu.safetensors", rank=3, device="cuda")
    da = dense_by_module(table, read_items(a.output, table))
    db = dense_by_module(table, read_items(b.output, table))
    assert_dense_equal(db, da, rtol=1e-4)
    assert optimal_ratio(table, read_items(b.output, table), ref) <= 1.0001
