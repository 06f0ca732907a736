"""LoRA+LoRA merge (concat and svd) and subtract: library and CLI, against float64 dense references."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lorasurgery.arch import ARCH_NAMES
from lorasurgery.delta import LoHa, LoKr, LowRank
from lorasurgery.errors import InputError, OutputError, PlanError
from lorasurgery.formats.dense import module_dense, target_rows
from lorasurgery.formats.names import Target
from lorasurgery.formats.read import index_lora
from lorasurgery.formats.write import has_name, lora_tensors
from lorasurgery.io.reader import read_header
from lorasurgery.ops.algebra import merge_loras, subtract
from lorasurgery.testing import save, tiny_checkpoint, tiny_lora_deltas, tiny_table

# ----------------------------------------------------------------------------------------------------
# helpers (also used by the other algebra test files)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread avoids spin-wait overhead on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write(items, table, fmt, path, dtype=torch.float32):
    """Write canonical items as a LoRA file (modules the format cannot name are left out)."""
    return save(lora_tensors(items, table, fmt, dtype=dtype, dropped=[]), path)


def read_items(path, table):
    with index_lora(path, table=table) as idx:
        assert idx.all_consumed, idx.problems()[:5]
        return {m.target: d for m, d in idx.deltas()}


def dense_by_module(table, items):
    """Float64 ΔW per module in the reference layout."""
    mods = {m.key: m for m in table.modules}
    groups = defaultdict(dict)
    for t, d in items.items():
        groups[t.module][t] = d
    return {k: module_dense(mods[k], g).double() for k, g in groups.items()}


def combine(*terms):
    """Σ w · dense over (weight, {module: dense}) terms; modules missing from a term count as 0."""
    keys = set().union(*(d.keys() for _, d in terms))
    out = {}
    for k in keys:
        out[k] = sum(w * d[k] for w, d in terms if k in d)
    return out


def assert_dense_equal(got, ref, rtol=2e-6, scale=None):
    """Relative Frobenius error per module ≤ rtol; ``scale`` (module → norm) replaces ‖ref‖ where larger
    (a difference of near-equal terms is compared with the size of its terms)."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:5]
    for k in ref:
        size = max(float(ref[k].norm()), float(scale.get(k, 0.0)) if scale else 0.0, 1e-30)
        err = float((got[k] - ref[k]).norm()) / size
        assert err <= rtol, (k, err)


def unit_matrix(table, target, dense_module):
    """The (rows, in·kh·kw) float64 matrix of one output target, in its LoRA (Linear) orientation."""
    mod = {m.key: m for m in table.modules}[target.module]
    if mod.transposed:
        return dense_module.T.contiguous()
    a, b = target_rows(mod, target, dense_module.shape[0])
    m = dense_module[a:b]
    return m.reshape(m.shape[0], -1)


def optimal_ratio(table, items, ref_dense):
    """max over targets of ‖ΔW_ref − ΔW_out‖ / (Eckart–Young optimum at the written rank)."""
    worst = 0.0
    for t, d in items.items():
        ref = unit_matrix(table, t, ref_dense[t.module])
        got = d.dense(tuple(ref.shape)).double()
        s = torch.linalg.svdvals(ref)
        opt = float(s[d.rank:].pow(2).sum().sqrt())
        err = float((got - ref).norm())
        if opt > 1e-5 * float(ref.norm()):
            worst = max(worst, err / opt)
        else:  # the written rank holds the whole (float32) delta: must be exact up to rounding
            assert err <= 2e-5 * float(ref.norm()), (t.id, err)
    return worst


def pair(tmp_path, arch, *, fmt_b="peft"):
    """Two LoRAs of ``arch``: A kohya (rank 4, alpha 2, attention + LoCon + extra), B split names (rank 3, alpha 5)."""
    table = tiny_table(arch)
    a = tiny_lora_deltas(table, rank=4, alpha=2.0, seed=1, groups=("attn", "locon", "extra"))
    b = tiny_lora_deltas(table, rank=3, alpha=5.0, seed=2, groups=("attn",), split_parts=True)
    pa = write(a, table, "kohya", tmp_path / f"{arch}-a.safetensors")
    pb = write(b, table, fmt_b, tmp_path / f"{arch}-b.safetensors")
    return table, pa, pb, dense_by_module(table, read_items(pa, table)), dense_by_module(table, read_items(pb, table))


def run(*args):
    from lorasurgery.cli import main
    from lorasurgery.commands import convert, merge, resize
    from lorasurgery.commands import subtract as subtract_cmd

    for mod in (merge, subtract_cmd, resize, convert):
        if mod.command.name not in main.commands:
            main.add_command(mod.command)
    return CliRunner().invoke(main, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------
# concat
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_concat_is_exact_for_every_architecture(tmp_path, arch, fmt):
    table, pa, pb, da, db = pair(tmp_path, arch)
    rep = merge_loras([f"{pa}:0.7", f"{pb}:-0.3"], tmp_path / "m.safetensors", fmt=fmt, drop_unsupported=True)
    assert rep.method == "concat" and rep.format == fmt
    got = dense_by_module(table, read_items(rep.output, table))
    ref = combine((0.7, da), (-0.3, db))
    named = {m.key for m in table.modules if has_name(m, fmt)}
    ref = {k: v for k, v in ref.items() if k in named}
    assert_dense_equal(got, ref)
    # ranks of modules both inputs address the same way add up
    ranks = {r.rank_out for r in rep.rows if r.inputs == 2 and "addressed" not in r.note}
    assert ranks <= {7}


def test_concat_tucker_conv_and_different_ranks(tmp_path):
    table = tiny_table("sdxl")
    conv = next(m for m in table.modules if m.kind == "conv" and m.shape[2:] == (3, 3))
    lin = next(m for m in table.modules if m.kind == "linear" and m.component == "unet")
    out, inc = conv.shape[0], conv.shape[1]
    g = torch.Generator().manual_seed(0)
    tucker = LowRank(up=torch.randn(out, 3, 1, 1, generator=g), down=torch.randn(3, inc, 1, 1, generator=g),
                     mid=torch.randn(3, 3, 3, 3, generator=g), alpha=1.5)
    plain = LowRank(up=torch.randn(out, 5, 1, 1, generator=g), down=torch.randn(5, inc, 3, 3, generator=g), alpha=7.0)
    o, i = lin.shape
    l1 = LowRank(up=torch.randn(o, 2, generator=g), down=torch.randn(2, i, generator=g), alpha=None)
    l2 = LowRank(up=torch.randn(o, 6, generator=g), down=torch.randn(6, i, generator=g), alpha=0.5)
    # Tucker mids are written raw (lora_tensors would fold them)
    raw = {f"{conv.names['kohya']}.{k}": v for k, v in tucker.tensors().items()}
    pa = save({**dict(lora_tensors({Target(lin.key): l1}, table, "kohya")), **raw}, tmp_path / "a.safetensors")
    pb = save(lora_tensors({Target(conv.key): plain, Target(lin.key): l2}, table, "kohya"), tmp_path / "b.safetensors")
    with index_lora(pa, table=table) as idx:
        assert any("lora_mid.weight" in m.keys for m in idx.modules)
    rep = merge_loras([f"{pa}:1.3", f"{pb}:-0.6"], tmp_path / "m.safetensors")
    items = read_items(rep.output, table)
    da, db = dense_by_module(table, read_items(pa, table)), dense_by_module(table, read_items(pb, table))
    ref = combine((1.3, da), (-0.6, db))
    assert_dense_equal(dense_by_module(table, items), ref)
    assert items[Target(conv.key)].rank == 8 and items[Target(lin.key)].rank == 8
    assert items[Target(conv.key)].down.shape[1:] == (inc, 3, 3)


def test_loha_lokr_pass_through_and_dense_diff(tmp_path):
    table = tiny_table("sdxl")
    lins = [m for m in table.modules if m.kind == "linear" and m.component == "unet" and m.group == "attn"][:3]
    g = torch.Generator().manual_seed(3)
    o, i = lins[0].shape
    loha = LoHa(w1a=torch.randn(o, 2, generator=g), w1b=torch.randn(2, i, generator=g),
                w2a=torch.randn(o, 3, generator=g), w2b=torch.randn(3, i, generator=g), alpha=1.0)
    o2, i2 = lins[1].shape
    lokr = LoKr(w1=torch.randn(2, 2, generator=g), w2a=torch.randn(o2 // 2, 2, generator=g),
                w2b=torch.randn(2, i2 // 2, generator=g), alpha=3.0)
    low = tiny_lora_deltas(table, rank=2, alpha=1.0, seed=5)
    items_a = {Target(lins[0].key): loha, Target(lins[1].key): lokr}
    items_b = {t: d for t, d in low.items() if t.module in (lins[0].key, lins[2].key)}
    pa = save(lora_tensors(items_a, table, "kohya"), tmp_path / "a.safetensors")
    pb = save(lora_tensors(items_b, table, "kohya"), tmp_path / "b.safetensors")
    da, db = dense_by_module(table, read_items(pa, table)), dense_by_module(table, read_items(pb, table))
    rep = merge_loras([f"{pa}:0.5", f"{pb}:2"], tmp_path / "m.safetensors")
    got = read_items(rep.output, table)
    assert_dense_equal(dense_by_module(table, got), combine((0.5, da), (2.0, db)))
    assert got[Target(lins[1].key)].algo == "lokr"  # alone in its module: passed through, scaled
    assert got[Target(lins[0].key)].algo == "full"  # LoHa meets a LoRA: exact dense diff
    # svd: densified and optimally truncated
    rep = merge_loras([f"{pa}:0.5", f"{pb}:2"], tmp_path / "s.safetensors", rank=2, svd="exact")
    got = read_items(rep.output, table)
    assert {d.algo for d in got.values()} == {"lora"} and {d.rank for d in got.values()} == {2}
    assert optimal_ratio(table, got, combine((0.5, da), (2.0, db))) <= 1.0001
    # PEFT cannot hold LoHa/LoKr: clear error, nothing written
    with pytest.raises(PlanError, match="low-rank"):
        merge_loras([pa, pb], tmp_path / "p.safetensors", fmt="peft")
    assert not (tmp_path / "p.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# svd
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,fmt", [("sdxl", "kohya"), ("flux", "kohya"), ("flux", "peft"), ("sd2", "peft")])
def test_svd_merge_is_eckart_young_optimal(tmp_path, arch, fmt):
    table, pa, pb, da, db = pair(tmp_path, arch)
    rep = merge_loras([f"{pa}:0.8", f"{pb}:-1.1"], tmp_path / "s.safetensors", rank=3, fmt=fmt,
                      drop_unsupported=True, device="cpu")
    assert rep.method == "svd"
    items = read_items(rep.output, table)
    assert {d.rank for d in items.values()} <= {1, 2, 3}
    assert optimal_ratio(table, items, combine((0.8, da), (-1.1, db))) <= 1.0001
    for r in rep.rows:
        assert 0 < r.retained <= 1 and r.method == "factored svd"


def test_svd_dynamic_rule_and_caps(tmp_path):
    table, pa, pb, da, db = pair(tmp_path, "sdxl")
    rep = merge_loras([pa, pb], tmp_path / "d.safetensors", rank_method="sv_fro", rank_param=0.8, rank=5)
    for r in rep.rows:
        assert r.rank_out <= 5 and (r.retained >= 0.8 - 1e-6 or r.rank_out == 5)
    rep = merge_loras([pa, pb], tmp_path / "c.safetensors", rank=100000)
    assert any("capped" in n for n in rep.notes)
    items = read_items(rep.output, table)
    ref = combine((1.0, da), (1.0, db))
    for t, d in items.items():  # capped at min(out, in, total rank): the result is exact
        m = unit_matrix(table, t, ref[t.module])
        assert d.rank <= min(m.shape)
    assert_dense_equal(dense_by_module(table, items), ref, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# block weights, metadata, determinism
# ----------------------------------------------------------------------------------------------------


def test_block_weights_scale_linearly(tmp_path):
    table, pa, pb, da, db = pair(tmp_path, "sdxl")
    mods = {m.key: m for m in table.modules}
    rep = merge_loras([f"{pa}:0.5", f"{pb}:1:OUT00=0,IN04=2"], tmp_path / "b.safetensors", blocks="IN04=0,MID=0.25")
    got = dense_by_module(table, read_items(rep.output, table))
    wa = {"IN04": 0.0, "M00": 0.25}
    wb = {"OUT00": 0.0, "IN04": 2.0}
    ref = {}
    for k in set(da) | set(db):
        blk = mods[k].block
        v = 0.5 * wa.get(blk, 1.0) * da[k] if k in da else 0
        v = v + (wb.get(blk, 1.0) * db[k] if k in db else 0)
        if not isinstance(v, int) and (k in db and wb.get(blk, 1.0) != 0 or k in da and wa.get(blk, 1.0) != 0):
            ref[k] = v
    assert_dense_equal(got, ref)
    assert rep.inputs[0]["blocks"] and rep.inputs[1]["blocks"]


def test_metadata_provenance_and_determinism(tmp_path):
    table, pa, pb, _, _ = pair(tmp_path, "flux")
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    r1 = merge_loras([f"{pa}:0.7", f"{pb}:0.3"], tmp_path / "x" / "out.safetensors", rank=2, workers=1)
    r2 = merge_loras([f"{pa}:0.7", f"{pb}:0.3"], tmp_path / "y" / "out.safetensors", rank=2, workers=3)
    assert r1.output.read_bytes() == r2.output.read_bytes()  # whatever the number of parallel workers
    meta = read_header(r1.output).metadata
    inputs = json.loads(meta["lorasurgery.inputs"])
    import hashlib

    assert [i["sha256"] for i in inputs] == [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in (pa, pb)]
    assert [i["weight"] for i in inputs] == [0.7, 0.3]
    recipe = json.loads(meta["lorasurgery.recipe"])
    assert recipe["method"] == "svd" and recipe["rank"]["rank"] == 2
    assert meta["modelspec.merged_from"] == "flux-a, flux-b"
    assert meta["ss_network_dim"] in ("2", "Dynamic") and meta["ss_network_module"] == "networks.lora_flux"
    assert len(meta["sshs_model_hash"]) == 64


def test_output_checks_before_work(tmp_path):
    table, pa, pb, _, _ = pair(tmp_path, "sd1")
    before = Path(pa).read_bytes()
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--overwrite"):
        merge_loras([pa, pb], out)
    assert out.read_bytes() == b"keep"
    with pytest.raises(OutputError, match="input"):
        merge_loras([pa, pb], pa, overwrite=True)
    assert Path(pa).read_bytes() == before
    merge_loras([pa, pb], out, overwrite=True)
    assert out.read_bytes() != b"keep"


# ----------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------


def test_plan_errors(tmp_path):
    table, pa, pb, _, _ = pair(tmp_path, "sdxl")
    t1 = tiny_table("sd1")
    p1 = write(tiny_lora_deltas(t1, rank=2), t1, "kohya", tmp_path / "sd1.safetensors")
    ck = save(tiny_checkpoint("sdxl"), tmp_path / "base.safetensors")
    out = tmp_path / "o.safetensors"
    with pytest.raises(PlanError, match=r"sdxl.*sd1|sd1.*sdxl") as e:
        merge_loras([pa, p1], out)
    assert "sd1.safetensors" in str(e.value) and "sdxl-a.safetensors" in str(e.value)
    with pytest.raises(InputError, match="checkpoint, not a LoRA") as e:
        merge_loras([pa, ck], out)
    assert "--base" in str(e.value)
    with pytest.raises(PlanError, match="no input"):
        merge_loras([], out)
    for bad in (0, -3):
        with pytest.raises(PlanError, match="--rank"):
            merge_loras([pa, pb], out, rank=bad)
    with pytest.raises(PlanError, match="svd"):
        merge_loras([pa, pb], out, method="concat", rank=4)
    with pytest.raises(PlanError, match="rank"):
        merge_loras([pa, pb], out, method="svd")
    with pytest.raises(PlanError, match="rank-param"):
        merge_loras([pa, pb], out, rank_method="sv_fro")
    with pytest.raises(PlanError, match="sv_ratio"):
        merge_loras([pa, pb], out, rank_method="sv_ratio", rank_param=0.5)
    assert not out.exists()


def test_base_dependent_modules_are_refused(tmp_path):
    table = tiny_table("sdxl")
    lin = next(m for m in table.modules if m.kind == "linear" and m.component == "unet")
    g = torch.Generator().manual_seed(0)
    dora = LowRank(up=torch.randn(lin.shape[0], 2, generator=g), down=torch.randn(2, lin.shape[1], generator=g),
                   alpha=2.0, dora_scale=torch.rand(lin.shape[0], 1, generator=g) + 0.5)
    p = save(lora_tensors({Target(lin.key): dora}, table, "kohya"), tmp_path / "dora.safetensors")
    _, pa, _, _, _ = pair(tmp_path, "sdxl")
    with pytest.raises(PlanError, match="--base") as e:
        merge_loras([pa, p], tmp_path / "o.safetensors")
    assert "DoRA" in str(e.value)
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# subtract
# ----------------------------------------------------------------------------------------------------


def test_subtract_exact_and_truncated(tmp_path):
    table, pa, pb, da, db = pair(tmp_path, "flux")
    rep = subtract(pb, pa, tmp_path / "d.safetensors")
    assert rep.op == "subtract" and [i["weight"] for i in rep.inputs] == [1.0, -1.0]
    got = dense_by_module(table, read_items(rep.output, table))
    ref = combine((1.0, db), (-1.0, da))
    assert_dense_equal(got, ref)
    only_a = [k for k in da if k not in db]
    assert only_a and all(torch.allclose(got[k], -da[k], rtol=1e-5, atol=1e-9) for k in only_a)
    rep = subtract(pb, pa, tmp_path / "r.safetensors", rank=2)
    assert optimal_ratio(table, read_items(rep.output, table), ref) <= 1.0001


def test_subtract_of_a_lora_from_itself_is_empty(tmp_path):
    table, pa, _, _, _ = pair(tmp_path, "sd1")
    rep = subtract(pa, pa, tmp_path / "zero.safetensors")  # exact: the factors cancel in the product
    got = dense_by_module(table, read_items(rep.output, table))
    assert max(float(v.abs().max()) for v in got.values()) < 1e-6


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def test_cli_merge_subtract(tmp_path):
    table, pa, pb, da, db = pair(tmp_path, "sdxl")
    out = tmp_path / "m.safetensors"
    r = run("merge", f"{pa}:0.7", f"{pb}:0.3", "-o", out)
    assert r.exit_code == 0, r.output
    assert "concat" in r.output and out.exists()
    r = run("merge", pa, pb, "--rank", "2", "-o", tmp_path / "s.safetensors", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["method"] == "svd" and all(row["rank_out"] <= 2 for row in rep["rows"])
    r = run("subtract", pb, pa, "-o", tmp_path / "d.safetensors")
    assert r.exit_code == 0, r.output
    assert_dense_equal(dense_by_module(table, read_items(tmp_path / "d.safetensors", table)),
                       combine((1.0, db), (-1.0, da)))
    r = run("merge", "--help")
    assert r.exit_code == 0 and "--base" in r.output and "concat" in r.output and "Bake" in r.output


def test_cli_default_output_name(tmp_path, monkeypatch):
    _, pa, pb, _, _ = pair(tmp_path, "sd1")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run("merge", pa, pb).exit_code == 0
    assert (work / "sd1-a-merged.safetensors").exists()
    assert run("subtract", pb, pa).exit_code == 0
    assert (work / "sd1-b-minus-sd1-a.safetensors").exists()


@pytest.mark.parametrize("case", ["mixed-arch", "checkpoint", "rank-0", "lora-option-with-base",
                                  "bake-option-without-base", "bad-weight", "missing"])
def test_cli_errors_exit_1_one_line_no_output(tmp_path, case):
    _, pa, pb, _, _ = pair(tmp_path, "sdxl")
    t1 = tiny_table("sd1")
    p1 = write(tiny_lora_deltas(t1, rank=2), t1, "kohya", tmp_path / "sd1.safetensors")
    ck = save(tiny_checkpoint("sdxl"), tmp_path / "base.safetensors")
    out = tmp_path / "o.safetensors"
    args = {
        "mixed-arch": ["merge", pa, p1],
        "checkpoint": ["merge", pa, ck],
        "rank-0": ["merge", pa, pb, "--rank", "0"],
        "lora-option-with-base": ["merge", pa, "--base", ck, "--rank", "4"],
        "bake-option-without-base": ["merge", pa, pb, "--allow-unmatched"],
        "bad-weight": ["merge", f"{pa}:abc"],
        "missing": ["subtract", tmp_path / "nope.safetensors", pa],
    }[case]
    r = run(*args, "-o", out)
    assert r.exit_code == 1, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    assert not out.exists()


def test_cli_merge_with_base_bakes(tmp_path):
    table = tiny_table("sdxl")
    ck = save(tiny_checkpoint("sdxl"), tmp_path / "base.safetensors")
    p = write(tiny_lora_deltas(table, rank=2, alpha=1.0), table, "kohya", tmp_path / "l.safetensors")
    out = tmp_path / "baked.safetensors"
    r = run("merge", f"{p}:0.5", "--base", ck, "-o", out)
    assert r.exit_code == 0, r.output
    assert out.exists() and set(read_header(out).tensors) == set(read_header(ck).tensors)
