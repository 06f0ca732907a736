"""lorasurgery.ops.extract: a LoRA from two checkpoints, checked against the exact differences.

The pairs are built from the tiny tables (real key names): tuned = base + a known change per module, so
the extracted LoRA, read back with ``index_lora`` + ``module_dense`` (and by diffusers for SD1), must
reproduce the change; rank rules are checked against hand-computed singular values.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgery import linalg
from lorasurgery.arch import get_arch
from lorasurgery.errors import InputError, OutputError, PlanError
from lorasurgery.formats.dense import module_dense
from lorasurgery.formats.read import index_lora
from lorasurgery.io.reader import read_header
from lorasurgery.ops.extract import _exact, _randomized, default_output, extract, plan_extract
from lorasurgery.testing import (
    save,
    save_diffusers_folder,
    tiny_checkpoint,
    tiny_lora,
    tiny_lora_deltas,
    tiny_table,
    to_layout,
)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def write_ckpt(ref: dict, table, layout: str | None, path: Path) -> Path:
    """Save reference tensors in ``layout`` (None = reference layout); "diffusers" gives a folder."""
    if layout is None:
        return save(ref, path.with_suffix(".safetensors"))
    tensors = to_layout(ref, table, layout)
    if layout == "diffusers":
        return save_diffusers_folder(tensors, path)
    return save(tensors, path.with_suffix(".safetensors"))


def build_pair(tmp: Path, arch: str, *, base_layout=None, tuned_layout=None, groups=("attn",), rank=4,
               config=None, changes=None, seed=7, drop_te=False):
    """(table, base path, tuned path, {module key: true ΔW}) with tuned = base + rank-``rank`` changes.

    ``changes`` ({module key: ΔW}) replaces the random low-rank changes. ``drop_te`` leaves the text
    encoders out of both files.
    """
    table = tiny_table(arch, config)
    base = tiny_checkpoint(arch, seed=0, config=config)
    if drop_te:
        base = {k: v for k, v in base.items() if not k.startswith("text_encoders.")}
    mods = {m.key: m for m in table.modules}
    if changes is None:
        changes = {}
        for target, delta in tiny_lora_deltas(table, rank=rank, alpha=float(rank), seed=seed, groups=groups).items():
            if target.module in base:
                changes[target.module] = module_dense(mods[target.module], {target: delta}, base[target.module].shape)
    tuned = dict(base)
    true = {}
    for key, dw in changes.items():
        tuned[key] = base[key] + dw
        true[key] = tuned[key] - base[key]  # what the stored float32 files really differ by
    tmp.mkdir(parents=True, exist_ok=True)
    b = write_ckpt(base, table, base_layout, tmp / f"{arch}-base")
    t = write_ckpt(tuned, table, tuned_layout, tmp / f"{arch}-tuned")
    return table, b, t, true


def readback(path: Path, table) -> dict[str, torch.Tensor]:
    """Module key -> dense ΔW of a LoRA file, read with our reader."""
    mods = {m.key: m for m in table.modules}
    got: dict[str, dict] = defaultdict(dict)
    with index_lora(path, table=table) as idx:
        assert idx.all_consumed, idx.problems()
        for lm, d in idx.deltas():
            got[lm.target.module][lm.target] = d
        return {k: module_dense(mods[k], v) for k, v in got.items()}


def worst_error(path: Path, table, true: dict[str, torch.Tensor]) -> float:
    got = readback(path, table)
    assert set(got) == set(true), sorted(set(got) ^ set(true))[:5]
    return max(float((got[k].reshape(w.shape) - w).norm() / w.norm()) for k, w in true.items())


def spectrum_matrix(m: int, n: int, sigma, seed: int) -> torch.Tensor:
    """float32 U diag(sigma) V^T with random orthonormal U, V (built in float64)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    p = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q
    return ((U * sigma) @ V.T).float()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is faster and keeps timings stable on small CI machines."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ----------------------------------------------------------------------------------------------------
# exact reconstruction, every architecture and layout pair
# ----------------------------------------------------------------------------------------------------

PAIRS = [
    ("sd1", None, "diffusers", None),  # LDM file vs diffusers folder
    ("sd2", "diffusers", None, None),
    ("sdxl", None, "diffusers", None),  # sgm file vs diffusers folder
    ("sdxl", "diffusers", None, "peft"),
    ("sd3", None, "diffusers", None),
    ("flux", "bfl", "comfy", None),  # FLUX BFL vs ComfyUI layouts
    ("flux", "comfy", "bfl", "peft"),  # fused qkv/linear1 split by the PEFT writer
]


@pytest.mark.parametrize("arch,base_layout,tuned_layout,fmt", PAIRS)
def test_rank_r_change_is_reproduced(tmp_path, arch, base_layout, tuned_layout, fmt):
    table, b, t, true = build_pair(tmp_path, arch, base_layout=base_layout, tuned_layout=tuned_layout)
    opts = {"format": fmt} if fmt else {}
    rep = extract(b, t, tmp_path / "out.safetensors", rank=4, dtype="fp32", **opts)
    assert {m.key for m in rep.modules} == set(true)
    assert rep.ranks == {4: len(true)}
    assert rep.mean_retained == pytest.approx(1.0, abs=1e-6)
    assert worst_error(rep.path, table, true) < 1e-4
    # every other module is identical and reported as such; nothing else differs
    assert all(s.reason.startswith(("no difference", "not a default", "LoCon", "3x3", "the peft"))
               for s in rep.skipped), {s.reason for s in rep.skipped}
    assert rep.other_diffs == []
    with index_lora(rep.path) as idx:
        expected = fmt or {"sd3": "peft"}.get(arch, "kohya")
        assert idx.key_format == expected


def test_fused_modules_are_extracted_whole(tmp_path):
    """FLUX qkv / linear1 are one module each in the plan; the kohya file has fused names."""
    table, b, t, true = build_pair(tmp_path, "flux")
    plan = plan_extract(b, t, tmp_path / "o.safetensors", rank=4)
    fused = [j for j in plan.jobs if j.key.endswith(("qkv.weight", "linear1.weight"))]
    assert fused and all(j.m == table.tensors[j.key][0] for j in fused)
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, dtype="fp32")
    names = set(read_header(rep.path).tensors)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in names
    assert "lora_unet_single_blocks_0_linear1.lora_down.weight" in names


@pytest.mark.interop
def test_diffusers_loads_the_extracted_sd1_lora(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers_oracle import load_lora, lora_deltas, models_for

    table, b, t, true = build_pair(tmp_path, "sd1", tuned_layout="diffusers")
    rep = extract(b, t, tmp_path / "sd1.safetensors", rank=4, dtype="fp32")
    models = models_for("sd1")
    records = load_lora("sd1", rep.path, models)
    assert records == [], records
    got = lora_deltas(models)
    mods = {m.key: m for m in table.modules}
    want = {mods[k].names["diffusers"]: w for k, w in true.items()}
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for name, w in want.items():
        g = got[name].reshape(w.shape)
        assert float((g - w).norm() / w.norm()) < 1e-4, name


# ----------------------------------------------------------------------------------------------------
# SVD back-ends
# ----------------------------------------------------------------------------------------------------

SPECTRA = {
    "i^-1/2": lambda p: torch.arange(1, p + 1, dtype=torch.float64) ** -0.5,
    "1/i": lambda p: 1.0 / torch.arange(1, p + 1, dtype=torch.float64),
    "64+tail": lambda p: torch.cat([torch.linspace(1.0, 0.2, 64, dtype=torch.float64),
                                    torch.full((p - 64,), 1e-3, dtype=torch.float64)]),
}


def test_randomized_error_within_half_a_percent_of_exact(tmp_path):
    """Per module, ||ΔW - LoRA|| of --svd randomized is within 0.5 % of the optimal rank-32 truncation."""
    cfg = dict(get_arch("flux").tiny_config(), hidden=256, heads=2, depth_double=1, depth_single=1)
    table = tiny_table("flux", cfg)
    base = {k: v for k, v in tiny_checkpoint("flux", config=cfg).items() if not k.startswith("text_encoders.")}
    changes, tails = {}, {}
    names = list(SPECTRA)
    for i, mod in enumerate(m for m in table.modules if m.group == "attn" and m.key in base):
        m, n = mod.shape
        p = min(m, n)
        sigma = SPECTRA[names[i % 3]](p) * 0.05
        changes[mod.key] = spectrum_matrix(m, n, sigma, seed=i)
        tails[mod.key] = float(sigma[32:].pow(2).sum().sqrt())
    _, b, t, true = build_pair(tmp_path, "flux", config=cfg, changes=changes, drop_te=True)
    plan = plan_extract(b, t, tmp_path / "r.safetensors", rank=32)
    assert {j.svd for j in plan.jobs} == {"randomized"}  # auto picks randomized for these shapes
    res = {}
    for svd in ("randomized", "exact"):
        rep = extract(b, t, tmp_path / f"{svd}.safetensors", rank=32, svd=svd, dtype="fp32")
        assert {m.svd for m in rep.modules} == {svd}
        got = readback(rep.path, table)
        res[svd] = {k: float((got[k] - w).norm()) for k, w in true.items()}
    for k in true:
        assert res["exact"][k] == pytest.approx(tails[k], rel=1e-3), k
        assert res["randomized"][k] / res["exact"][k] <= 1.005, (k, res["randomized"][k] / res["exact"][k])


def test_backends_equal_linalg_up_to_rounding():
    """The batched back-ends of extract agree with lorasurgery.linalg's per-matrix functions."""
    mats = [spectrum_matrix(48, 160, SPECTRA["1/i"](48), seed=s) for s in range(3)]
    keys = ["a.weight", "b.weight", "c.weight"]
    energies = [float(x.double().pow(2).sum()) for x in mats]
    batch = _randomized(mats, 6, keys, energies, seed=5, power_iters=4)
    for x, key, got in zip(mats, keys, batch):
        ref = linalg.svd_randomized(x, 6, seed=5, key=key)
        torch.testing.assert_close(got.S, ref.S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.U * got.S @ got.Vh, ref.U * ref.S @ ref.Vh, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.U, ref.U, atol=1e-4, rtol=0)  # same sign convention
        assert got.total_energy == pytest.approx(ref.total_energy, rel=1e-6)
    for x, got in zip(mats, _exact(mats, energies)):  # wide matrices: decomposed as their transpose
        ref = linalg.svd_exact(x)
        torch.testing.assert_close(got.S, ref.S, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.U, ref.U, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.Vh, ref.Vh, atol=1e-4, rtol=0)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(8, 40), n=st.integers(8, 40), r=st.integers(1, 5), seed=st.integers(0, 1000))
def test_randomized_recovers_exact_low_rank(m, n, r, seed):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    r = min(r, m, n)
    x = torch.randn(m, r, generator=gen) @ torch.randn(r, n, generator=gen)
    energy = float(x.double().pow(2).sum())
    (res,) = _randomized([x], r, ["k"], [energy], seed=seed, power_iters=2)
    approx = res.U * res.S @ res.Vh
    assert float((approx - x).norm() / x.norm()) < 1e-4
    assert res.retained_fraction(r) == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# rank rules against hand-computed singular values
# ----------------------------------------------------------------------------------------------------

HAND = {  # module index -> singular values of its ΔW
    0: [4.0, 3.0, 2.0, 1.0, 0.5],
    1: [10.0, 1.0, 0.9, 0.1],
    2: [1.0, 0.95, 0.9, 0.85, 0.8, 0.75],
}
# (method, param, rank cap) -> expected rank per module, computed by hand from HAND:
#   sv_ratio 3.5: thresholds 4/3.5 = 1.14, 10/3.5 = 2.86, 1/3.5 = 0.29          -> 3, 1, 6
#   sv_ratio 12:  thresholds 0.33, 0.83, 0.083                                    -> 5, 3, 6
#   sv_fro 0.9:   E = 30.25, 101.82, 4.6375; targets 0.81 E = 24.50, 82.47, 3.76;
#                 partial sums 16, 25 | 100 | 1, 1.9025, 2.7125, 3.435, 4.075      -> 2, 1, 5
#   sv_cumulative 0.8: N = 10.5, 12.0, 5.25; targets 8.4, 9.6, 4.2;
#                 partial sums 4, 7, 9 | 10 | 1, 1.95, 2.85, 3.7, 4.5              -> 3, 1, 5
#   sv_fro 0.9 with --rank 1 caps everything at 1.
RULES = [
    ("sv_ratio", 3.5, 8, [3, 1, 6]),
    ("sv_ratio", 12.0, 8, [5, 3, 6]),
    ("sv_fro", 0.9, 8, [2, 1, 5]),
    ("sv_cumulative", 0.8, 8, [3, 1, 5]),
    ("sv_fro", 0.9, 1, [1, 1, 1]),
]


@pytest.fixture(scope="module")
def hand_pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hand")
    table = tiny_table("sd1")
    linear = [m for m in table.modules if m.group == "attn" and m.kind == "linear" and m.component == "unet"
              and min(m.shape) >= 16][:3]
    changes = {m.key: spectrum_matrix(*m.shape, HAND[i], seed=i) for i, m in enumerate(linear)}
    _, b, t, _ = build_pair(tmp, "sd1", changes=changes)
    return b, t, [m.key for m in linear], tmp


@pytest.mark.parametrize("method,param,cap,expected", RULES)
def test_dynamic_rank_rules(hand_pair, method, param, cap, expected):
    b, t, keys, tmp = hand_pair
    svds = ("exact",) if method == "sv_cumulative" else ("exact", "randomized")
    for svd in svds:
        out = tmp / f"{method}-{param}-{cap}-{svd}.safetensors"
        rep = extract(b, t, out, rank=cap, rank_method=method, rank_param=param, svd=svd, dtype="fp32")
        ranks = {m.key: m.rank for m in rep.modules}
        assert [ranks[k] for k in keys] == expected, (svd, ranks)
        # the file agrees, and ss_network_dim says Dynamic when the ranks differ
        meta = read_header(out).metadata
        assert meta["ss_network_dim"] == ("Dynamic" if len(set(expected)) > 1 else str(expected[0]))
        for m in rep.modules:  # retained energy from the hand spectrum
            sig = HAND[keys.index(m.key)]
            want = sum(s * s for s in sig[: m.rank]) / sum(s * s for s in sig)
            assert m.retained == pytest.approx(want, rel=1e-4)


def test_rank_cap_above_module_size_is_reported(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1", rank=4)
    rep = extract(b, t, tmp_path / "o.safetensors", rank=1000, dtype="fp32")
    assert any("rank 1000 is more than" in n and "capped" in n for n in rep.plan.notes)
    for m in rep.modules:
        assert m.rank == min(m.shape[0], math.prod(m.shape[1:])) == m.cap
    assert worst_error(rep.path, table, true) < 1e-4


# ----------------------------------------------------------------------------------------------------
# which modules: min-diff, text encoder, LoCon, blocks, clamp, other differences
# ----------------------------------------------------------------------------------------------------


def test_min_diff_is_per_module_never_per_text_encoder(tmp_path):
    table = tiny_table("sd1")
    te = [m for m in table.modules if m.component == "te1" and m.group == "attn"]
    unet = [m for m in table.modules if m.component == "unet" and m.group == "attn" and m.kind == "linear"][:2]
    changes = {m.key: spectrum_matrix(*m.shape, [0.5, 0.2], seed=i) for i, m in enumerate(te[:3] + unet)}
    small = te[3]
    changes[small.key] = torch.zeros(small.shape)
    changes[small.key][0, 0] = 2e-4
    _, b, t, true = build_pair(tmp_path, "sd1", changes=changes)
    rep = extract(b, t, tmp_path / "o.safetensors", rank=2, min_diff=1e-3, dtype="fp32")
    got = {m.key for m in rep.modules}
    assert got == {m.key for m in te[:3] + unet}  # three of the text encoder's modules, not none
    skip = {s.key: s for s in rep.skipped}
    assert "--min-diff" in skip[small.key].reason and skip[small.key].max_abs == pytest.approx(2e-4, rel=1e-3)
    assert skip[te[4].key].reason == "no difference (ΔW = 0)"
    rep0 = extract(b, t, tmp_path / "o0.safetensors", rank=2, dtype="fp32")  # default min-diff 0: kept
    assert small.key in {m.key for m in rep0.modules}


def test_text_encoder_can_be_left_out(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sdxl")
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, text_encoder=False, dtype="fp32")
    assert {m.component for m in rep.modules} == {"unet"}
    te_skips = [s for s in rep.skipped if s.component.startswith("te")]
    assert te_skips and all(s.reason.startswith("text encoder left out") for s in te_skips)
    changed = [s for s in te_skips if s.key in true]
    assert len(changed) == sum(1 for k in true if k.startswith("conditioner"))
    assert all(s.max_abs and s.max_abs > 0 for s in changed)  # their difference is still measured
    assert worst_error(rep.path, table, {k: w for k, w in true.items() if not k.startswith("conditioner")}) < 1e-4


def test_locon_targets_need_conv_rank(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1", groups=("attn", "locon"))
    locon = {m.key for m in table.modules if m.group == "locon"}
    rep = extract(b, t, tmp_path / "plain.safetensors", rank=4, dtype="fp32")
    skip = {s.key: s for s in rep.skipped}
    assert locon <= set(skip)
    assert all("--conv-rank" in skip[k].reason and skip[k].max_abs > 0 for k in locon)
    rep = extract(b, t, tmp_path / "locon.safetensors", rank=4, conv_rank=4, dtype="fp32")
    assert {m.key for m in rep.modules} == set(true)
    assert worst_error(rep.path, table, true) < 1e-4
    meta = read_header(rep.path).metadata
    assert json.loads(meta["ss_network_args"]) == {"conv_alpha": "4.0", "conv_dim": "4"}


def test_block_weights_scale_and_skip(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1")
    mods = {m.key: m for m in table.modules}
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, dtype="fp32", blocks="IN01=0,OUT11=0.5")
    got = readback(rep.path, table)
    for key, w in true.items():
        block = mods[key].block
        if block == "IN01":
            assert key not in got
            assert any(s.key == key and "weight 0" in s.reason for s in rep.skipped)
        else:
            scale = 0.5 if block == "OUT11" else 1.0
            assert float((got[key] - scale * w).norm() / w.norm()) < 1e-4, key


def test_clamp_quantile_matches_linalg(tmp_path):
    table = tiny_table("sd1")
    mod = next(m for m in table.modules if m.group == "attn" and m.kind == "linear" and min(m.shape) >= 32)
    dw = spectrum_matrix(*mod.shape, [3.0, 2.0, 1.0, 0.5], seed=3)
    _, b, t, true = build_pair(tmp_path, "sd1", changes={mod.key: dw})
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, clamp_quantile=0.9, svd="exact", dtype="fp32")
    got = readback(rep.path, table)[mod.key]
    up, down = linalg.svd_exact(true[mod.key]).truncate(4, split="up")
    cu, cd = linalg.clamp_quantile(up, down, 0.9, split="up")
    torch.testing.assert_close(got, cu @ cd, rtol=1e-4, atol=1e-6)
    (m,) = rep.modules
    err = float((got - true[mod.key]).norm() ** 2 / true[mod.key].norm() ** 2)
    assert m.retained == pytest.approx(1 - err, abs=1e-5) and m.retained < 1


def test_differences_no_lora_carries_are_reported(tmp_path):
    table = tiny_table("sd1")
    base = tiny_checkpoint("sd1", seed=0)
    norm = "model.diffusion_model.input_blocks.1.1.norm.weight"
    bias = next(m.bias for m in table.modules if m.group == "attn" and m.bias)
    emb = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    mod = next(m for m in table.modules if m.group == "attn" and m.kind == "linear")
    changes = {norm: torch.full(base[norm].shape, 0.01), bias: torch.full(base[bias].shape, -0.02),
               emb: torch.zeros(base[emb].shape), mod.key: spectrum_matrix(*mod.shape, [1.0], seed=1)}
    changes[emb][3, 5] = 0.25
    _, b, t, true = build_pair(tmp_path, "sd1", changes=changes)
    rep = extract(b, t, tmp_path / "o.safetensors", rank=1, dtype="fp32")
    other = {o.key: o for o in rep.other_diffs}
    assert set(other) == {norm, bias, emb}
    assert (other[norm].category, other[bias].category, other[emb].category) == ("norm", "bias", "embedding")
    for key in (norm, bias, emb):
        assert other[key].max_abs == pytest.approx(float(true[key].abs().max()), rel=1e-5)
        assert other[key].norm == pytest.approx(float(true[key].norm()), rel=1e-5)
    assert rep.identical_tensors > 100
    assert [m.key for m in rep.modules] == [mod.key]


# ----------------------------------------------------------------------------------------------------
# output: names, dtype, metadata, determinism
# ----------------------------------------------------------------------------------------------------


def test_metadata_provenance_and_default_dtype(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1")
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, device="cpu")
    header = read_header(rep.path)
    dtypes = {i.dtype for n, i in header.tensors.items() if not n.endswith(".alpha")}
    assert dtypes == {"F16"}  # SD1 default
    assert {i.dtype for n, i in header.tensors.items() if n.endswith(".alpha")} == {"F32"}
    meta = header.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    inputs = json.loads(meta["lorasurgery.inputs"])
    assert [(i["role"], i["path"]) for i in inputs] == [("base", b.name), ("tuned", t.name)]
    assert inputs[0]["sha256"] == hashlib.sha256(b.read_bytes()).hexdigest()
    recipe = json.loads(meta["lorasurgery.recipe"])
    assert recipe["operation"] == "extract" and recipe["rank"] == 4 and recipe["dtype"] == "fp16"
    assert json.loads(meta["lorasurgery.env"])["device"] == "cpu"
    assert meta["lorasurgery.seed"] == "0"
    assert rep.output.model_hash == meta["sshs_model_hash"]
    assert worst_error(rep.path, table, true) < 2e-3  # fp16 factors


def test_same_inputs_and_seed_give_identical_bytes(tmp_path):
    _, b, t, _ = build_pair(tmp_path, "flux", tuned_layout="comfy")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    p1 = extract(b, t, tmp_path / "a" / "o.safetensors", rank=3, svd="randomized", seed=11).path
    p2 = extract(b, t, tmp_path / "b" / "o.safetensors", rank=3, svd="randomized", seed=11).path
    assert p1.read_bytes() == p2.read_bytes()  # the title is the file stem, so same name, other folder
    p3 = extract(b, t, tmp_path / "c.safetensors", rank=3, svd="randomized", seed=12).path
    assert read_header(p3).metadata["lorasurgery.seed"] == "12"


def test_plan_reads_headers_only(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sdxl", tuned_layout="diffusers")
    plan = plan_extract(b, t, tmp_path / "o.safetensors", rank=8, conv_rank=2, device="cpu")
    assert plan.arch == "sdxl" and (plan.base_layout, plan.tuned_layout) == ("sgm", "diffusers")
    assert all(len(batch) == 1 for batch in plan.batches)  # CPU: one module at a time
    convs = [j for j in plan.jobs if j.kind == "conv"]
    assert convs and all(j.cap == 2 for j in convs) and all(j.cap == 8 for j in plan.jobs if j.kind != "conv")
    d = plan.to_dict()
    assert d["arch"] == "sdxl" and len(d["modules"]) == len(plan.jobs)
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------


def test_nan_in_a_module_names_file_and_module(tmp_path):
    table = tiny_table("sd1")
    mod = next(m for m in table.modules if m.group == "attn")
    bad = torch.zeros(mod.shape)
    bad[0, 0] = float("nan")
    _, b, t, _ = build_pair(tmp_path, "sd1", changes={mod.key: bad})
    out = tmp_path / "o.safetensors"
    with pytest.raises(InputError) as exc:
        extract(b, t, out, rank=2)
    msg = str(exc.value)
    assert str(t) in msg and mod.key in msg and "NaN or Inf" in msg
    assert not out.exists() and not list(tmp_path.glob(".o.safetensors.tmp*"))


def test_inf_in_a_base_norm_is_reported(tmp_path):
    base = tiny_checkpoint("sd1", seed=0)
    key = "model.diffusion_model.input_blocks.1.1.norm.weight"
    tuned = dict(base)
    base = dict(base)
    base[key] = base[key].clone()
    base[key][0] = float("inf")
    b = save(base, tmp_path / "b.safetensors")
    t = save(tuned, tmp_path / "t.safetensors")
    with pytest.raises(InputError, match="NaN or Inf") as exc:
        extract(b, t, tmp_path / "o.safetensors")
    assert str(b) in str(exc.value) and key in str(exc.value)


def test_different_architectures_and_shapes(tmp_path):
    b = save(tiny_checkpoint("sd1"), tmp_path / "sd1.safetensors")
    x = save(tiny_checkpoint("sdxl"), tmp_path / "sdxl.safetensors")
    with pytest.raises(PlanError) as exc:
        extract(b, x, tmp_path / "o.safetensors")
    assert "sd1" in str(exc.value) and "sdxl" in str(exc.value) and str(x) in str(exc.value)
    cfg = get_arch("sd1").tiny_config()
    cfg = {**cfg, "unet": {**cfg["unet"], "channels": [64, 64, 64, 64]}}
    y = save(tiny_checkpoint("sd1", config=cfg), tmp_path / "sd1-wide.safetensors")
    with pytest.raises(PlanError, match="different shapes"):
        plan_extract(b, y, tmp_path / "o.safetensors")


def test_identical_inputs_and_same_file(tmp_path):
    b = save(tiny_checkpoint("sd1"), tmp_path / "b.safetensors")
    c = tmp_path / "copy.safetensors"
    shutil.copy(b, c)
    with pytest.raises(InputError, match="identical weights"):
        extract(b, c, tmp_path / "o.safetensors")
    with pytest.raises(InputError, match="same file"):
        extract(b, b, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_lora_and_missing_files_are_refused(tmp_path):
    b = save(tiny_checkpoint("sd1"), tmp_path / "b.safetensors")
    lora = save(tiny_lora("sd1"), tmp_path / "lora.safetensors")
    with pytest.raises(InputError, match="is a LoRA, not a tuned checkpoint"):
        extract(b, lora, tmp_path / "o.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        extract(tmp_path / "nope.safetensors", b, tmp_path / "o.safetensors")


def test_output_rules(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1")
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--overwrite"):
        extract(b, t, out, rank=2)
    assert out.read_bytes() == b"keep"
    extract(b, t, out, rank=2, overwrite=True)
    assert read_header(out).tensors
    with pytest.raises(OutputError, match="one of the inputs"):
        extract(b, t, t, rank=2, overwrite=True)


def test_bad_options(tmp_path):
    _, b, t, _ = build_pair(tmp_path, "sd1")
    o = tmp_path / "o.safetensors"
    with pytest.raises(PlanError, match="needs --rank-param"):
        plan_extract(b, t, o, rank_method="sv_fro")
    with pytest.raises(PlanError, match="whole spectrum"):
        plan_extract(b, t, o, rank_method="sv_cumulative", rank_param=0.9, svd="randomized")
    with pytest.raises(PlanError, match="must be > 1"):
        plan_extract(b, t, o, rank_method="sv_ratio", rank_param=0.5)
    with pytest.raises(PlanError, match="unknown extract option"):
        plan_extract(b, t, o, ranks=4)
    with pytest.raises(PlanError, match="clamp-quantile"):
        plan_extract(b, t, o, clamp_quantile=0.3)
    with pytest.raises(PlanError, match="nothing to extract"):
        extract(b, t, o, min_diff=10.0)


# ----------------------------------------------------------------------------------------------------
# CLI and demo
# ----------------------------------------------------------------------------------------------------


@pytest.fixture()
def cli():
    from lorasurgery.cli import main
    from lorasurgery.commands.extract import command

    if command.name not in main.commands:
        main.add_command(command)
    return main


def test_cli_json_and_default_output_name(tmp_path, cli):
    table, b, t, true = build_pair(tmp_path, "sd1", tuned_layout="diffusers")
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        res = runner.invoke(cli, ["extract", str(b), str(t), "--rank", "4", "--dtype", "fp32", "--json"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.output)
        out = Path(cwd) / "sd1-tuned-lora-r4.safetensors"
        assert out.exists() and report["output"] == str(out)
        assert default_output(t, 4) == out
        assert len(report["modules"]) == len(true) and report["ranks"] == {"4": len(true)}
        assert worst_error(out, table, true) < 1e-4
        res = runner.invoke(cli, ["extract", str(b), str(t), "--rank", "4"])
        assert res.exit_code == 1 and "--overwrite" in res.output and "Traceback" not in res.output
        res = runner.invoke(cli, ["extract", str(b), str(t), "-o", "x.safetensors", "--rank", "4",
                                  "--conv-rank", "2"])
        assert res.exit_code == 0, res.output
        assert "modules extracted" in res.output and "retained energy" in res.output


def test_cli_error_exit_code(tmp_path, cli):
    b = save(tiny_checkpoint("sd1"), tmp_path / "b.safetensors")
    res = CliRunner().invoke(cli, ["extract", str(b), str(tmp_path / "missing.safetensors")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_demo_extract(tmp_path):
    from io import StringIO

    from rich.console import Console

    from lorasurgery.commands.extract import demo_extract

    buf = StringIO()
    worst = demo_extract(tmp_path, Console(file=buf, width=150))
    assert worst < 1e-4
    assert "OK" in buf.getvalue() and "modules extracted" in buf.getvalue()


def test_float64_base_and_float32_tuned(tmp_path):
    """Inputs of any float dtype are compared in float32; the layouts' dtypes may differ."""
    table = tiny_table("flux")
    base = {k: v.double() for k, v in tiny_checkpoint("flux", seed=0).items()}
    mod = next(m for m in table.modules if m.group == "attn" and m.component == "transformer")
    dw = spectrum_matrix(*mod.shape, [0.5, 0.25], seed=4).double()
    tuned = {k: v.float() for k, v in base.items()}
    tuned[mod.key] = (base[mod.key] + dw).float()
    b = save(base, tmp_path / "b64.safetensors")
    t = save(tuned, tmp_path / "t32.safetensors")
    rep = extract(b, t, tmp_path / "o.safetensors", rank=2, dtype="fp32", device="cpu")
    assert [m.key for m in rep.modules] == [mod.key]
    got = readback(rep.path, table)[mod.key]
    want = tuned[mod.key] - base[mod.key].float()
    assert float((got - want).norm() / want.norm()) < 1e-3
    # every other tensor holds the same values in both dtypes (float32 values stored as float64)
    assert rep.other_diffs == [] and rep.identical_tensors > 0


def test_batched_pipeline_on_the_cpu(tmp_path, monkeypatch):
    """The CUDA batching (same-shaped modules decomposed together) run on the CPU gives the same LoRA."""
    import lorasurgery.ops.extract as ex

    table, b, t, true = build_pair(tmp_path, "sdxl", groups=("attn", "locon"))
    plain = extract(b, t, tmp_path / "plain.safetensors", rank=4, conv_rank=4, dtype="fp32", device="cpu")
    orig = ex._batches
    monkeypatch.setattr(ex, "_batches", lambda jobs, device: orig(jobs, torch.device("cuda")))
    batched = extract(b, t, tmp_path / "batched.safetensors", rank=4, conv_rank=4, dtype="fp32", device="cpu")
    assert max(len(x) for x in batched.plan.batches) > 1
    assert sorted(i for x in batched.plan.batches for i in x) == list(range(len(batched.plan.jobs)))
    assert [(m.key, m.rank) for m in batched.modules] == [(m.key, m.rank) for m in plain.modules]
    p, q = readback(plain.path, table), readback(batched.path, table)
    for key in p:
        assert float((p[key] - q[key]).norm() / p[key].norm()) < 1e-5, key
    assert worst_error(batched.path, table, true) < 1e-4


def test_gpu_batches_are_deterministic_and_bounded():
    from lorasurgery.ops.extract import ModuleJob, _batches

    def job(i, m, n):
        return ModuleJob(f"k{i}", f"k{i}", "unet", None, "linear", (m, n), m, n, False, 4, 4, "randomized", 1.0)

    jobs = [job(i, 64, 64) for i in range(20)] + [job(20 + i, 4096, 4096) for i in range(10)] + [job(30, 8, 8)]
    jobs.insert(5, job(31, 32, 48))
    out = _batches(jobs, torch.device("cuda"))
    assert out == _batches(jobs, torch.device("cuda"))
    assert sorted(i for b in out for i in b) == list(range(len(jobs)))
    for b in out:
        assert len({(jobs[i].m, jobs[i].n) for i in b}) == 1 and len(b) <= 16
        assert len(b) * jobs[b[0]].m * jobs[b[0]].n <= 1 << 27 or len(b) == 1
    assert [len(b) for b in _batches(jobs, torch.device("cpu"))] == [1] * len(jobs)
