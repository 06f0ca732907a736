"""Hypothesis properties of the LoRA algebra against float64 dense references.

Random LoRAs on a few modules of the tiny SDXL and FLUX models (a linear layer, a 3x3 LoCon conv with or
without a Tucker mid, the OpenCLIP fused q/k/v, the FLUX fused qkv and linear1), random ranks, alphas
(≠ rank, or absent), weights (negative too) and key conventions (kohya fused vs PEFT split names):

* concat merge bakes to Σ w_i ΔW_i; subtract(B, A) to ΔB − ΔA (float32 rounding only);
* svd merge and resize: every written module's error equals the Eckart–Young optimum of its target
  (ratio ≤ 1.0001); resize to the full rank is lossless;
* convert round trips are exact.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgery.delta import LowRank
from lorasurgery.formats.names import Target
from lorasurgery.formats.write import lora_tensors
from lorasurgery.ops.algebra import convert, merge_loras, resize, subtract
from lorasurgery.testing import save, tiny_table
from test_ops_merge import assert_dense_equal, combine, dense_by_module, one_thread, optimal_ratio, read_items

__all__ = ["one_thread"]  # autouse fixture, imported to apply here too

SETTINGS = settings(max_examples=12, deadline=None)


def _sdxl_only(mod):
    """No tiny SD1/SD2 module has this diffusers name with this shape (a one-module LoRA is unambiguous)."""
    name = mod.names.get("diffusers")
    for other in ("sd1", "sd2"):
        for m in tiny_table(other).modules:
            if m.names.get("diffusers") == name and tuple(m.shape) == tuple(mod.shape):
                return False
    return True


def _candidates(arch):
    table = tiny_table(arch)
    mods = table.modules
    if arch == "sdxl":
        # attn2.to_k: its 2048-wide context input tells SDXL from SD1/SD2 even in a one-module LoRA
        picks = [next(m for m in mods if "attn2.to_k" in m.key and m.component == "unet"),
                 next(m for m in mods if m.kind == "conv" and tuple(m.shape[2:]) == (3, 3) and _sdxl_only(m)),
                 next(m for m in mods if m.parts)]
    else:
        picks = [next(m for m in mods if m.key.endswith("img_attn.qkv.weight")),
                 next(m for m in mods if m.key.endswith("linear1.weight")),
                 next(m for m in mods if m.key.endswith("img_attn.proj.weight"))]
    return table, picks


TABLES = {a: _candidates(a) for a in ("sdxl", "flux")}


@st.composite
def lora_spec(draw, arch):
    """(fmt, [(module index, rank, alpha, tucker, split)], weight, seed) of one random LoRA."""
    _, picks = TABLES[arch]
    idx = draw(st.lists(st.integers(0, len(picks) - 1), min_size=1, max_size=len(picks), unique=True))
    mods = []
    for i in sorted(idx):
        rank = draw(st.integers(1, 4))
        alpha = draw(st.one_of(st.none(), st.floats(0.25, 8.0)))
        tucker = picks[i].kind == "conv" and draw(st.booleans())
        split = bool(picks[i].parts) and draw(st.booleans())
        mods.append((i, rank, alpha, tucker, split))
    fmt = draw(st.sampled_from(["kohya", "peft"]))
    weight = draw(st.one_of(st.floats(-2.0, -0.1), st.floats(0.1, 2.0)))
    return fmt, mods, weight, draw(st.integers(0, 2**31 - 1))


def build(arch, spec, path):
    """Write the LoRA of ``spec`` (Tucker convs as raw kohya tensors) and return its float64 dense ΔW."""
    table, picks = TABLES[arch]
    fmt, mods, _, seed = spec
    g = torch.Generator().manual_seed(seed)
    items, raw = {}, {}
    for i, rank, alpha, tucker, split in mods:
        mod = picks[i]
        out, inp = mod.shape[0], mod.shape[1]
        if tucker:
            d = LowRank(up=torch.randn(out, rank, 1, 1, generator=g) * 0.3,
                        down=torch.randn(rank, inp, 1, 1, generator=g) * 0.3,
                        mid=torch.randn(rank, rank, *mod.shape[2:], generator=g) * 0.3, alpha=alpha)
            raw.update({f"{mod.names['kohya']}.{k}": v for k, v in d.tensors().items()})
            continue
        targets = ([(Target(mod.key, (p.name,)), p.stop - p.start) for p in mod.parts] if split
                   else [(Target(mod.key), out)])
        for t, rows in targets:
            items[t] = LowRank(up=torch.randn(rows, rank, *([1, 1] if len(mod.shape) == 4 else []), generator=g) * 0.3,
                               down=torch.randn(rank, *mod.shape[1:], generator=g) * 0.3, alpha=alpha)
    tensors = dict(lora_tensors(items, table, fmt)) if items else {}
    tensors.update(raw)
    save(tensors, path)
    return dense_by_module(table, read_items(path, table))


@given(arch=st.sampled_from(["sdxl", "flux"]), data=st.data(), out_fmt=st.sampled_from(["kohya", "peft"]))
@SETTINGS
def test_concat_merge_is_the_weighted_sum(arch, data, out_fmt):
    specs = data.draw(st.lists(lora_spec(arch), min_size=1, max_size=3))
    table, _ = TABLES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"in{i}.safetensors" for i in range(len(specs))]
        dense = [build(arch, s, p) for s, p in zip(specs, paths)]
        rep = merge_loras([(p, s[2]) for p, s in zip(paths, specs)], Path(tmp) / "m.safetensors", fmt=out_fmt)
        got = dense_by_module(table, read_items(rep.output, table))
    size = {}
    for s, d in zip(specs, dense):
        for k, v in d.items():
            size[k] = size.get(k, 0.0) + abs(s[2]) * float(v.norm())
    assert_dense_equal(got, combine(*[(s[2], d) for s, d in zip(specs, dense)]), rtol=5e-6, scale=size)


@given(arch=st.sampled_from(["sdxl", "flux"]), a=st.data(), out_fmt=st.sampled_from(["kohya", "peft"]))
@SETTINGS
def test_subtract_is_the_difference(arch, a, out_fmt):
    sb, sa = a.draw(lora_spec(arch)), a.draw(lora_spec(arch))
    table, _ = TABLES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        pb, pa = Path(tmp) / "b.safetensors", Path(tmp) / "a.safetensors"
        db, da = build(arch, sb, pb), build(arch, sa, pa)
        rep = subtract(pb, pa, Path(tmp) / "d.safetensors", fmt=out_fmt)
        got = dense_by_module(table, read_items(rep.output, table))
    size = {k: float(combine((1.0, db), (1.0, da))[k].norm()) + 1e-12 for k in set(db) | set(da)}
    size = {k: max(size[k], float(db[k].norm()) if k in db else 0, float(da[k].norm()) if k in da else 0)
            for k in size}
    assert_dense_equal(got, combine((1.0, db), (-1.0, da)), rtol=5e-6, scale=size)


@given(arch=st.sampled_from(["sdxl", "flux"]), data=st.data(), rank=st.integers(1, 6),
       out_fmt=st.sampled_from(["kohya", "peft"]))
@SETTINGS
def test_svd_merge_is_optimal(arch, data, rank, out_fmt):
    specs = data.draw(st.lists(lora_spec(arch), min_size=1, max_size=3))
    table, _ = TABLES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"in{i}.safetensors" for i in range(len(specs))]
        dense = [build(arch, s, p) for s, p in zip(specs, paths)]
        rep = merge_loras([(p, s[2]) for p, s in zip(paths, specs)], Path(tmp) / "m.safetensors", rank=rank,
                          fmt=out_fmt, device="cpu")
        items = read_items(rep.output, table)
    assert max(d.rank for d in items.values()) <= rank
    assert optimal_ratio(table, items, combine(*[(s[2], d) for s, d in zip(specs, dense)])) <= 1.0001


@given(arch=st.sampled_from(["sdxl", "flux"]), data=st.data(), rank=st.integers(1, 5))
@SETTINGS
def test_resize_is_optimal_and_full_rank_lossless(arch, data, rank):
    spec = data.draw(lora_spec(arch))
    table, _ = TABLES[arch]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "in.safetensors"
        ref = build(arch, spec, p)
        rep = resize(p, Path(tmp) / "r.safetensors", rank=rank, device="cpu")
        items = read_items(rep.output, table)
        full = resize(p, Path(tmp) / "full.safetensors", rank=64, device="cpu")
        back = dense_by_module(table, read_items(full.output, table))
    assert optimal_ratio(table, items, ref) <= 1.0001
    assert_dense_equal(back, ref, rtol=1e-5)


@given(arch=st.sampled_from(["sdxl", "flux"]), data=st.data())
@SETTINGS
def test_convert_round_trip_is_exact(arch, data):
    spec = data.draw(lora_spec(arch))
    table, _ = TABLES[arch]
    fmt = spec[0]
    other = "peft" if fmt == "kohya" else "kohya"
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "in.safetensors"
        ref = build(arch, spec, p)
        a = convert(p, Path(tmp) / "a.safetensors", to=other)
        b = convert(a.output, Path(tmp) / "b.safetensors", to=fmt)
        mid = dense_by_module(table, read_items(a.output, table))
        back = dense_by_module(table, read_items(b.output, table))
    assert_dense_equal(mid, ref, rtol=1e-6)
    assert_dense_equal(back, ref, rtol=1e-6)


@st.composite
def hard_factors(draw):
    """float32 ``(B, A)`` stacks that stress the factored truncation: tall or wide ΔW, columns of B or rows
    of A scaled over up to seven decades, duplicated (rank-deficient) columns, nearly cancelling pairs."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    m, n = draw(st.sampled_from([(96, 40), (40, 96), (64, 64), (120, 20)]))
    r = draw(st.integers(2, 24))
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    decades = draw(st.floats(0.0, 7.0))
    scale = torch.logspace(0, -decades, r, dtype=torch.float64)
    if draw(st.booleans()):
        B = B * scale
    else:
        A = A * scale[:, None]
    tweak = draw(st.sampled_from(["none", "duplicate", "cancel"]))
    if tweak != "none" and r >= 4:
        h = r // 2
        if tweak == "duplicate":
            B[:, h:2 * h] = B[:, :h]
        else:  # the second half nearly undoes the first: a difference LoRA of two close LoRAs
            B[:, h:2 * h] = -B[:, :h] * (1 + 1e-3 * torch.randn(m, h, generator=g, dtype=torch.float64))
            A[h:2 * h] = A[:h] + 1e-3 * torch.randn(h, n, generator=g, dtype=torch.float64)
    B, A = B.float(), A.float().contiguous()
    if m < n or draw(st.booleans()):  # column-major, as _stack makes B unless it is the longer side
        B = B.mT.contiguous().mT
    return B, A


@given(factors=hard_factors(), data=st.data())
@settings(max_examples=60, deadline=None)
def test_factored_truncation_is_optimal_on_hard_factors(factors, data):
    """Eckart–Young optimal (ratio ≤ 1.0001) wherever the optimum lies above float32 rounding, within that
    rounding otherwise, and lossless at full rank, on the Gram/Householder path and its two-sided fallback
    alike. float32 rounding is relative to ‖B‖·‖A‖, not ‖ΔW‖: cancelling terms (a difference of two close
    LoRAs) lose their common part to the rounding of the factors themselves."""
    from lorasurgery.ops.algebra import factored_truncation

    B, A = factors
    W = B.double() @ A.double()
    s = torch.linalg.svdvals(W)
    cap = min(B.shape[0], A.shape[1], B.shape[1])
    k = data.draw(st.integers(1, cap))
    res = factored_truncation(B, A, "fixed", float(k), k)
    assert res is not None
    up, down, got_k, retained = res
    assert got_k == k and up.shape == (B.shape[0], k) and down.shape == (k, A.shape[1])
    assert up.dtype == down.dtype == torch.float32
    err = float((W - up.double() @ down.double()).norm())
    opt = float(s[k:].square().sum().sqrt())
    floor = 1e-6 * float(B.double().norm() * A.double().norm())  # about ten float32 ε
    assert err <= max(1.0001 * opt, opt + floor), (err, opt, floor)
    full = factored_truncation(B, A, "fixed", float(cap), cap)
    assert float((W - full[0].double() @ full[1].double()).norm()) <= floor


def test_rank_beyond_the_numerical_rank_takes_the_two_sided_path(monkeypatch):
    """A kept σ near zero (here: duplicated columns, rank asked = columns) would be divided by; the module is
    then computed with both singular bases from reflectors, and the result is still ΔW itself."""
    import lorasurgery.ops.algebra as alg

    g = torch.Generator().manual_seed(3)
    up = torch.randn(50, 4, generator=g)
    B = torch.cat([up, up], 1).mT.contiguous().mT
    A = torch.randn(8, 30, generator=g)
    calls = []
    real = alg._two_sided_truncation
    monkeypatch.setattr(alg, "_two_sided_truncation", lambda *a, **k: calls.append(1) or real(*a, **k))
    up_k, down_k, k, _ = alg.factored_truncation(B, A, "fixed", 8.0, 8)
    W = B.double() @ A.double()
    assert calls and k == 8
    assert float((W - up_k.double() @ down_k.double()).norm()) <= 1e-6 * float(W.norm())
    calls.clear()
    alg.factored_truncation(B, A, "fixed", 4.0, 4)  # within the numerical rank: the one-sided path
    assert not calls
