"""Every LoRA convention round-trips through the canonical form with the same ΔW per module."""
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

from lorasurgery.arch import ARCH_NAMES
from lorasurgery.formats.dense import module_dense
from lorasurgery.formats.read import index_lora
from lorasurgery.errors import PlanError
from lorasurgery.formats.write import has_name, lora_tensors
from lorasurgery.testing import save, tiny_lora_deltas, tiny_table


def dense_by_module(table, items):
    mods = {m.key: m for m in table.modules}
    groups = defaultdict(dict)
    for t, d in items.items():
        groups[t.module][t] = d
    return {k: module_dense(mods[k], g) for k, g in groups.items()}


def read_items(path, table=None):
    with index_lora(path, table=table) as idx:
        assert idx.all_consumed, idx.problems()[:5]
        return idx.arch, idx.key_format, {m.target: d for m, d in idx.deltas()}


def assert_same(a, b, rtol=1e-5):
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-7, msg=k)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("split", [False, True])
def test_roundtrip(tmp_path, arch, fmt, split):
    table = tiny_table(arch)
    items = tiny_lora_deltas(table, rank=3, alpha=5.0, split_parts=split, groups=("attn",))
    path = save(lora_tensors(items, table, fmt), tmp_path / "a.safetensors")
    got_arch, key_format, back = read_items(path, table)
    assert got_arch == arch
    with index_lora(path) as idx:  # recognised without being told the model
        assert idx.arch == arch
    assert key_format == {"kohya": "kohya", "peft": "peft"}[fmt]
    assert_same(dense_by_module(table, items), dense_by_module(table, back))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_convert_chain(tmp_path, arch):
    """kohya -> peft -> kohya keeps ΔW for every module."""
    table = tiny_table(arch)
    items = tiny_lora_deltas(table, rank=2, alpha=3.0, groups=("attn", "locon", "extra"))
    ref = dense_by_module(table, items)
    p1 = save(lora_tensors(items, table, "kohya"), tmp_path / "k.safetensors")
    _, _, a = read_items(p1, table)
    with pytest.raises(PlanError) if any(not has_name(m, "peft") for m in table.modules) else nullcontext():
        lora_tensors(a, table, "peft")
    dropped = []
    p2 = save(lora_tensors(a, table, "peft", dropped=dropped), tmp_path / "p.safetensors")
    _, _, b = read_items(p2, table)
    p3 = save(lora_tensors(b, table, "kohya"), tmp_path / "k2.safetensors")
    _, _, c = read_items(p3, table)
    names_ok = {m.key for m in table.modules if has_name(m, "peft")}
    assert sorted(dropped) == sorted(t.id for t in a if t.module not in names_ok)
    ref_peft = {k: v for k, v in ref.items() if k in names_ok}
    assert_same(ref, dense_by_module(table, a))
    assert_same(ref_peft, dense_by_module(table, b))
    assert_same(ref_peft, dense_by_module(table, c))


def test_kohya_alpha_uniform_and_float32(tmp_path):
    """One alpha value for every module (diffusers applies the most common alpha to the rest)."""
    table = tiny_table("sdxl")
    items = tiny_lora_deltas(table, rank=4, alpha=2.0)
    # make ranks differ between modules
    first = next(iter(items))
    items[first] = tiny_lora_deltas(table, rank=2, alpha=7.0)[first]
    tensors = dict(lora_tensors(items, table, "kohya"))
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert {v.dtype for v in alphas.values()} == {torch.float32}
    assert len({float(v) for v in alphas.values()}) == 1
    path = save(tensors, tmp_path / "x.safetensors")
    _, _, back = read_items(path, table)
    assert_same(dense_by_module(table, items), dense_by_module(table, back))


def test_deterministic_bytes(tmp_path):
    table = tiny_table("flux")
    items = tiny_lora_deltas(table, rank=3, alpha=1.5, split_parts=True)
    a = save(lora_tensors(items, table, "kohya"), tmp_path / "a.safetensors").read_bytes()
    b = save(lora_tensors(items, table, "kohya"), tmp_path / "b.safetensors").read_bytes()
    assert a == b
