"""Baking LoRAs into a base checkpoint (``lorasurgery.ops.bake``) against float64 references.

Tiny models with the real key structure (``lorasurgery.testing``); alphas always differ from ranks. The
references compute ``W + Σ w·w_b·s·up@down`` in float64 directly from the LoRA factors, placed in the
reference layout, and are then stored in the base's own layout with :func:`lorasurgery.testing.to_layout`
(fused rows split, adaLN halves swapped, text_projection transposed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorasurgery.delta import LowRank, parse_module
from lorasurgery.errors import InputError, OutputError, PlanError
from lorasurgery.formats.dense import part_rows
from lorasurgery.formats.write import lora_tensors
from lorasurgery.io.hashes import sha256_file
from lorasurgery.io.reader import open_source, read_header
from lorasurgery.ops.bake import bake, norm_names, plan_bake
from lorasurgery.ops.inputs import WeightedInput
from lorasurgery.testing import save, save_diffusers_folder, tiny_checkpoint, tiny_lora_deltas, tiny_table, to_layout

GROUPS = ("attn", "locon", "extra")


# ------------------------------------------------------------------------------------------------ references


def dense64(d: LowRank, shape) -> torch.Tensor:
    """float64 ΔW of a plain LoRA/LoCon delta, straight from its stored factors."""
    b = d.up.double().reshape(d.up.shape[0], -1)
    a = d.down.double().reshape(d.down.shape[0], -1)
    return (float(d.alpha) / d.down.shape[0] * float(d.multiplier) * (b @ a)).reshape(shape)


def reference(table, base_ref: dict, loras: list[tuple[dict, float]], blocks=None) -> dict[str, torch.Tensor]:
    """float64 ``W + Σ w·w_b·ΔW`` for every reference tensor (fused parts placed in their rows)."""
    mods = {m.key: m for m in table.modules}
    out = {k: v.double().clone() for k, v in base_ref.items()}
    for items, w in loras:
        for t, d in items.items():
            mod = mods[t.module]
            wb = blocks(mod.block) if blocks else 1.0
            shape = tuple(base_ref[mod.key].shape)
            if mod.transposed:
                out[mod.key] += w * wb * dense64(d, (shape[1], shape[0])).T
                continue
            a, b = (0, shape[0])
            if t.parts:
                rows = part_rows(mod, shape[0])
                a, b = rows[t.parts[0]][0], rows[t.parts[-1]][1]
            out[mod.key][a:b] += w * wb * dense64(d, (b - a,) + shape[1:])
    return out


def assert_matches(out_path: Path, expected: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    with open_source(out_path) as src:
        assert set(src.keys()) == set(expected)
        for k in src.keys():
            got = src.get(k).double()
            want = expected[k].double()
            tol = rtol * max(1.0, float(want.abs().max())) if want.numel() else 0.0
            err = float((got - want).abs().max()) if want.numel() else 0.0
            assert err <= tol, f"{k}: max abs error {err:.3g} > {tol:.3g}"


def raw_data(path: Path) -> dict[str, bytes]:
    """Raw bytes of every tensor of a single safetensors file, by key."""
    h = read_header(path)
    with open(path, "rb") as f:
        data = f.read()[h.data_offset:]
    return {k: data[i.start:i.end] for k, i in h.tensors.items()}


def lora_file(tmp: Path, arch: str, fmt: str = "kohya", *, seed: int = 1, groups=GROUPS, split_parts=False,
              rank: int = 4, alpha: float = 2.0, name: str | None = None, std: float = 0.1, table=None):
    table = table or tiny_table(arch)
    items = tiny_lora_deltas(table, rank=rank, alpha=alpha, seed=seed, groups=groups, split_parts=split_parts,
                             std=std)
    path = save(lora_tensors(items, table, fmt), tmp / (name or f"{arch}-{fmt}-{seed}.safetensors"))
    return path, items


# ------------------------------------------------------------------------------------------------- layouts

LAYOUTS = [("sd1", "ldm", "kohya", False), ("sd2", "ldm", "kohya", False), ("sdxl", "sgm", "kohya", False),
           ("sdxl", "diffusers", "kohya", False), ("sd3", "sd3", "peft", True), ("sd3", "diffusers", "kohya", False),
           ("flux", "bfl", "peft", True), ("flux", "comfy", "kohya", False), ("flux", "diffusers", "kohya", False)]


@pytest.mark.parametrize("arch, layout, fmt, split", LAYOUTS, ids=[f"{a}-{l}-{f}" for a, l, f, _ in LAYOUTS])
def test_bake_every_layout_matches_float64_reference(tmp_path, arch, layout, fmt, split):
    """Fused targets get each part in its rows (kohya fused into split diffusers tensors, PEFT split into fused
    BFL/SD3 tensors), adaLN halves swapped in diffusers, text_projection transposed; untouched tensors stay
    byte-identical; keys, order, dtypes and metadata are the base's."""
    table = tiny_table(arch)
    ref = tiny_checkpoint(arch, seed=3)
    base = save(to_layout(ref, table, layout), tmp_path / "base.safetensors", {"modelspec.title": "tiny", "x": "1"})
    # diffusers files lack some "extra" tensors; PEFT has no name for text_projection
    groups = GROUPS if layout != "diffusers" and fmt != "peft" else ("attn", "locon")
    lora, items = lora_file(tmp_path, arch, fmt, groups=groups, split_parts=split)
    out = tmp_path / "out.safetensors"
    report = bake(base, [WeightedInput(lora, -0.7)], out, device="cpu")
    expected = to_layout(reference(table, ref, [(items, -0.7)]), table, layout)
    assert_matches(out, expected)
    hb, ho = read_header(base), read_header(out)
    assert list(hb.tensors) == list(ho.tensors)
    assert [i.dtype for i in hb.tensors.values()] == [i.dtype for i in ho.tensors.values()]
    assert ho.metadata["x"] == "1" and ho.metadata["modelspec.title"] == "tiny"
    rb, ro = raw_data(base), raw_data(out)
    changed = {k for k in rb if rb[k] != ro[k]}
    assert len(changed) == report.tensors_changed
    assert report.tensors_copied == len(rb) - len(changed)
    from lorasurgery.formats.read import index_lora

    with index_lora(lora) as idx:
        assert report.inputs[0].modules == len(idx.modules) > 0 and idx.all_consumed
    assert report.unmatched_count == 0 and report.weak_modules == []


def test_provenance_hashes_and_determinism(tmp_path):
    base = save(tiny_checkpoint("flux", seed=0, dtype=torch.float16), tmp_path / "base.safetensors",
                {"ss_note": "kept"})
    lora, _ = lora_file(tmp_path, "flux")
    lora2, _ = lora_file(tmp_path, "flux", seed=9, groups=("attn",))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ins = [WeightedInput(lora, 0.5), WeightedInput(lora2, -1.25, "FLUXDOUBLE")]
    report = bake(base, ins, a, device="cpu", blocks="ALL0.5")
    bake(base, ins, b, device="cpu", blocks="ALL0.5")
    assert a.read_bytes() == b.read_bytes()
    meta = read_header(a).metadata
    assert meta["ss_note"] == "kept"
    rows = json.loads(meta["lorasurgery.inputs"])
    assert [r["role"] for r in rows] == ["base", "lora", "lora"]
    assert rows[0]["sha256"] == sha256_file(base) == report.base_sha256
    assert rows[1]["sha256"] == sha256_file(lora) and rows[2]["sha256"] == sha256_file(lora2)
    assert [r["weight"] for r in rows[1:]] == [0.5, -1.25]
    assert all(not os.path.isabs(r["path"]) for r in rows)
    recipe = json.loads(meta["lorasurgery.recipe"])
    assert recipe["operation"] == "bake" and recipe["blocks"] == "ALL0.5"
    assert recipe["loras"][0]["blocks"] == report.inputs[0].blocks != ""
    assert recipe["loras"][1]["blocks_given"] == "FLUXDOUBLE"
    from lorasurgery.io.hashes import sshs_model_hash

    assert report.out_sha256 == sshs_model_hash(a)
    assert report.out_bytes == a.stat().st_size
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary files left


def test_progress_reports_bytes(tmp_path):
    base = save(tiny_checkpoint("flux", seed=0), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "flux")
    calls = []
    bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu",
         progress=lambda d, t: calls.append((d, t)))
    total = open_source(base).total_bytes
    assert calls[-1] == (total, total)
    assert all(x[0] <= y[0] for x, y in zip(calls, calls[1:]))


# -------------------------------------------------------------------------------------------- block weights


def test_block_weights_global_and_per_input(tmp_path):
    from lorasurgery.blocks import parse_block_spec

    table = tiny_table("sd1")
    ref = tiny_checkpoint("sd1", seed=2)
    base = save(ref, tmp_path / "base.safetensors")
    l1, i1 = lora_file(tmp_path, "sd1", seed=1)
    l2, i2 = lora_file(tmp_path, "sd1", seed=2, groups=("attn",))
    spec_global = "IN01=0.5,M00=-1,OUT05=2,OTHER=0.25,BASE=0"
    out = tmp_path / "o.safetensors"
    bake(base, [WeightedInput(l1, 0.8), WeightedInput(l2, 0.6, "OUTD")], out, blocks=spec_global, device="cpu")
    bw1 = parse_block_spec(spec_global, arch="sd1")
    bw2 = parse_block_spec("OUTD", arch="sd1")
    exp = reference(table, ref, [(i1, 0.8)], blocks=bw1.weight)
    exp = reference(table, {k: v.float() for k, v in exp.items()}, [(i2, 0.6)], blocks=bw2.weight)
    assert_matches(out, exp)


def test_block_weight_zero_leaves_modules_byte_identical(tmp_path):
    base = save(tiny_checkpoint("sdxl", seed=0, dtype=torch.bfloat16), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "sdxl", groups=("attn",))
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, 1.0, "NONE")], out, device="cpu")
    assert raw_data(out) == raw_data(base)
    assert report.tensors_changed == 0 and report.inputs[0].zero_weight > 0


def test_block_list_of_wrong_length_is_refused(tmp_path):
    base = save(tiny_checkpoint("sdxl", seed=0), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "sdxl", groups=("attn",))
    with pytest.raises(PlanError, match="17|SDXL|sdxl"):
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", blocks=",".join(["1"] * 17), device="cpu")
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------------------- delta algorithms


def _sd1_targets():
    table = tiny_table("sd1")
    mods = {m.key: m for m in table.modules}
    pick = {
        "lin": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lin_b": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight",
        "ff": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
        "conv": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "conv2": "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
        "c1x1": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "k": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight",
        "v": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight",
        "q2": "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight",
        "te": "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
    }
    return table, {k: mods[v] for k, v in pick.items()}


def _rn(g, *shape, std=0.1):
    return torch.randn(*shape, generator=g) * std


def lycoris_modules(g) -> dict[str, dict[str, torch.Tensor]]:
    """kohya name -> tensors, one module per algorithm, on the tiny SD1 model."""
    table, m = _sd1_targets()
    k = lambda key: m[key].names["kohya"]  # noqa: E731
    out = {
        k("lin"): {"hada_w1_a": _rn(g, 32, 3), "hada_w1_b": _rn(g, 3, 32), "hada_w2_a": _rn(g, 32, 3),
                   "hada_w2_b": _rn(g, 3, 32), "alpha": torch.tensor(1.5)},
        k("ff"): {"lokr_w1": _rn(g, 4, 2), "lokr_w2_a": _rn(g, 64, 2), "lokr_w2_b": _rn(g, 2, 16),
                  "alpha": torch.tensor(3.0)},
        k("conv"): {"lora_down.weight": _rn(g, 3, 32, 1, 1), "lora_mid.weight": _rn(g, 3, 3, 3, 3),
                    "lora_up.weight": _rn(g, 32, 3, 1, 1), "alpha": torch.tensor(2.0)},
        k("lin_b"): {"diff": _rn(g, 32, 32, std=0.01), "diff_b": _rn(g, 32, std=0.01)},
        k("c1x1"): {"lora_down.weight": _rn(g, 4, 32), "lora_up.weight": _rn(g, 32, 4), "alpha": torch.tensor(1.0)},
        k("te"): {"lora_down.weight": _rn(g, 2, 32), "lora_up.weight": _rn(g, 37, 2), "alpha": torch.tensor(4.0)},
        "lora_unet_down_blocks_0_resnets_0_norm1": {"w_norm": _rn(g, 32), "b_norm": _rn(g, 32)},
        "lora_unet_down_blocks_0_attentions_0_norm": {"diff": _rn(g, 32), "diff_b": _rn(g, 32)},
    }
    return out


def wdep_modules(g) -> dict[str, dict[str, torch.Tensor]]:
    """Modules whose change depends on the base weight: DoRA, (IA)^3, OFT, GLoRA."""
    _, m = _sd1_targets()
    k = lambda key: m[key].names["kohya"]  # noqa: E731
    return {
        k("k"): {"lora_down.weight": _rn(g, 4, 32), "lora_up.weight": _rn(g, 32, 4), "alpha": torch.tensor(2.0),
                 "dora_scale": 1.0 + _rn(g, 32, 1)},
        k("v"): {"weight": _rn(g, 32), "on_input": torch.tensor(0)},
        k("q2"): {"oft_blocks": _rn(g, 4, 8, 8), "alpha": torch.tensor(1e-3)},
        k("conv2"): {"lora_down.weight": _rn(g, 4, 32, 3, 3), "lora_up.weight": _rn(g, 32, 4, 1, 1),
                     "alpha": torch.tensor(3.0), "dora_scale": 1.0 + _rn(g, 32, 1, 1, 1)},
        k("lin"): {"a1.weight": _rn(g, 32, 2), "a2.weight": _rn(g, 2, 32), "b1.weight": _rn(g, 32, 2),
                   "b2.weight": _rn(g, 2, 32), "alpha": torch.tensor(1.0)},
    }


def _save_modules(mods: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    return save({f"{n}.{s}": t for n, ts in mods.items() for s, t in ts.items()}, path)


def _by_key(table):
    mods = {m.key: m for m in table.modules}
    by_kohya = {m.names["kohya"]: m for m in table.modules if m.names.get("kohya")}
    return mods, by_kohya


def test_lycoris_algorithms_and_norms(tmp_path):
    """LoHa, LoKr, Tucker LoCon, full diff with diff_b (-> the bias), norm w_norm/b_norm (-> the norm's weight
    and bias), a 2-D LoRA on a 1x1 conv, and a text-encoder module, all at weight -0.6."""
    g = torch.Generator().manual_seed(11)
    table = tiny_table("sd1")
    ref = tiny_checkpoint("sd1", seed=4)
    base = save(ref, tmp_path / "base.safetensors")
    mods_t = lycoris_modules(g)
    lora = _save_modules(mods_t, tmp_path / "lyco.safetensors")
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, -0.6)], out, device="cpu")
    assert report.inputs[0].algos == {"full": 2, "lokr": 1, "loha": 1, "lora": 3, "norm": 1}
    _, by_kohya = _by_key(table)
    exp = {k: v.clone() for k, v in ref.items()}
    names = norm_names(table)
    for name, ts in mods_t.items():
        d = parse_module(name, ts).scaled(-0.6)
        if name in by_kohya:
            mod = by_kohya[name]
            exp[mod.key] = exp[mod.key] + d.dense(tuple(ref[mod.key].shape))
            if d.dense_bias() is not None:
                exp[mod.bias] = exp[mod.bias] + d.dense_bias()
        else:
            target = names[name][0]
            exp[target.weight] = exp[target.weight] + d.dense(tuple(ref[target.weight].shape))
            exp[target.bias] = exp[target.bias] + d.dense_bias()
    assert_matches(out, exp)


@pytest.mark.parametrize("arch, name, weight_key", [
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_0", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight"),
    ("sdxl", "lora_te2_text_model_encoder_layers_0_layer_norm1",
     "conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"),
    ("flux", "lycoris_transformer_blocks_0_attn_norm_q", "double_blocks.0.img_attn.norm.query_norm.scale"),
    ("flux", "diffusion_model.single_blocks.1.norm.key_norm", "single_blocks.1.norm.key_norm.scale"),
])
def test_norm_modules_in_every_naming(tmp_path, arch, name, weight_key):
    """LyCORIS norm modules are named like the other modules of their convention (kohya LDM paths for SDXL,
    HF names for OpenCLIP, lycoris_ diffusers paths, ComfyUI paths) and change the norm's weight (and bias)."""
    g = torch.Generator().manual_seed(3)
    ref = tiny_checkpoint(arch, seed=1)
    base = save(ref, tmp_path / "base.safetensors")
    c = ref[weight_key].shape[0]
    bias_key = weight_key[: -len("weight")] + "bias" if weight_key.endswith(".weight") else None
    ts = {"w_norm": _rn(g, c)}
    if bias_key in ref:
        ts["b_norm"] = _rn(g, c)
    lora = _save_modules({name: ts}, tmp_path / "norm.safetensors")
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, 2.0)], out, device="cpu")
    assert report.inputs[0].algos == {"norm": 1}
    exp = dict(ref)
    exp[weight_key] = ref[weight_key] + 2.0 * ts["w_norm"]
    if "b_norm" in ts:
        exp[bias_key] = ref[bias_key] + 2.0 * ts["b_norm"]
    assert_matches(out, exp)


@pytest.mark.parametrize("order", ["additive-first", "wdep-first"])
def test_weight_dependent_deltas_in_input_order(tmp_path, order):
    """DoRA (output-axis, linear and conv), (IA)^3, OFT and GLoRA are applied with Delta.apply to the running
    float32 weight, after the additive contributions of earlier inputs (math.md §2)."""
    g = torch.Generator().manual_seed(5)
    table = tiny_table("sd1")
    ref = tiny_checkpoint("sd1", seed=6)
    base = save(ref, tmp_path / "base.safetensors")
    add_path, add_items = lora_file(tmp_path, "sd1", groups=("attn", "locon"), seed=3)
    wd = wdep_modules(g)
    wd_path = _save_modules(wd, tmp_path / "wdep.safetensors")
    ins = [WeightedInput(add_path, 0.9), WeightedInput(wd_path, 0.7)]
    if order == "wdep-first":
        ins.reverse()
    out = tmp_path / "o.safetensors"
    bake(base, ins, out, device="cpu")
    _, by_kohya = _by_key(table)
    mods = {m.key: m for m in table.modules}
    additive = {t.module: d for t, d in add_items.items()}
    exp = {k: v.float().clone() for k, v in ref.items()}

    def add(key):
        exp[key] = exp[key] + additive[key].scaled(0.9).dense(tuple(exp[key].shape))

    def wdep(key, name):
        exp[key] = parse_module(name, wd[name]).scaled(0.7).apply(exp[key])

    wd_keys = {by_kohya[n].key: n for n in wd}
    for key in mods:
        if key not in additive and key not in wd_keys:
            continue
        if order == "additive-first":
            if key in additive:
                add(key)
            if key in wd_keys:
                wdep(key, wd_keys[key])
        else:
            if key in wd_keys:
                wdep(key, wd_keys[key])
            if key in additive:
                add(key)
    assert_matches(out, exp, rtol=2e-6)


def test_wdep_delta_on_split_fused_weight_is_assembled(tmp_path):
    """A DoRA module on a kohya-fused FLUX qkv baked into a diffusers-layout base (q, k, v stored apart): the
    whole weight is rebuilt, the DoRA applied once, and each file tensor gets its rows."""
    g = torch.Generator().manual_seed(8)
    table = tiny_table("flux")
    ref = tiny_checkpoint("flux", seed=1)
    base = save(to_layout(ref, table, "diffusers"), tmp_path / "base.safetensors")
    mod = next(m for m in table.modules if m.key == "double_blocks.0.img_attn.qkv.weight")
    rows, cols = mod.shape
    ts = {"lora_down.weight": _rn(g, 4, cols), "lora_up.weight": _rn(g, rows, 4), "alpha": torch.tensor(2.0),
          "dora_scale": 1.0 + _rn(g, rows, 1)}
    lora = _save_modules({mod.names["kohya"]: ts}, tmp_path / "dora.safetensors")
    out = tmp_path / "o.safetensors"
    bake(base, [WeightedInput(lora, 0.5)], out, device="cpu")
    exp = dict(ref)
    exp[mod.key] = parse_module("x", ts).scaled(0.5).apply(ref[mod.key])
    assert_matches(out, to_layout(exp, table, "diffusers"), rtol=2e-6)


def test_4d_lora_on_linear_and_2d_lora_on_1x1_conv(tmp_path):
    """SD1 proj_in is a 1x1 conv (a 2-D LoRA unsqueezes), SDXL proj_in a Linear (a 4-D LoRA squeezes)."""
    g = torch.Generator().manual_seed(2)
    for arch, key in (("sd1", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
                      ("sdxl", "model.diffusion_model.input_blocks.4.1.proj_in.weight")):
        table = tiny_table(arch)
        mod = next(m for m in table.modules if m.key == key)
        ref = tiny_checkpoint(arch, seed=0)
        base = save(ref, tmp_path / f"{arch}.safetensors")
        out_c, in_c = mod.shape[0], mod.shape[1]
        if len(mod.shape) == 4:
            ts = {"lora_down.weight": _rn(g, 3, in_c), "lora_up.weight": _rn(g, out_c, 3)}
        else:
            ts = {"lora_down.weight": _rn(g, 3, in_c, 1, 1), "lora_up.weight": _rn(g, out_c, 3, 1, 1)}
        ts["alpha"] = torch.tensor(1.0)
        lora = _save_modules({mod.names["kohya"]: ts}, tmp_path / f"{arch}-l.safetensors")
        out = tmp_path / f"{arch}-o.safetensors"
        bake(base, [WeightedInput(lora, 1.5)], out, device="cpu")
        up = ts["lora_up.weight"].double().reshape(out_c, 3)
        down = ts["lora_down.weight"].double().reshape(3, in_c)
        exp = dict(ref)
        exp[key] = ref[key].double() + (1.5 / 3 * up @ down).reshape(ref[key].shape)
        assert_matches(out, exp)


def test_inpainting_conv_in_zero_pads_extra_channels(tmp_path):
    """A LoRA made for the 4-channel conv_in goes into the first 4 input channels of a 9-channel inpainting
    conv_in; the extra (mask, masked image) channels are unchanged."""
    from lorasurgery.arch import get_arch

    spec = get_arch("sd1")
    cfg = dict(spec.tiny_config())
    cfg["unet"] = dict(cfg["unet"], in_channels=9)
    table9 = spec.build(cfg)
    ref = tiny_checkpoint("sd1", seed=0, config=cfg)
    base = save(ref, tmp_path / "inpaint.safetensors")
    lora, items = lora_file(tmp_path, "sd1", groups=("attn", "extra"))
    out = tmp_path / "o.safetensors"
    bake(base, [WeightedInput(lora, 0.8)], out, device="cpu")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    conv_in = next(d for t, d in items.items() if t.module == key)
    exp = reference(table9, ref, [({t: d for t, d in items.items() if t.module != key}, 0.8)])
    exp[key] = ref[key].double().clone()
    exp[key][:, :4] += 0.8 * dense64(conv_in, (32, 4, 3, 3))
    assert_matches(out, exp)


# ------------------------------------------------------------------------------------------- dtypes, fp8


def test_fp8_base_upcast_add_cast_back(tmp_path):
    table = tiny_table("flux")
    ref = tiny_checkpoint("flux", seed=0)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in ref.items()}
    base = save(fp8, tmp_path / "base.safetensors")
    lora, items = lora_file(tmp_path, "flux", groups=("attn",), std=0.05)
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, 1.0)], out, device="cpu")
    exp = reference(table, {k: v.float() for k, v in fp8.items()}, [(items, 1.0)])
    with open_source(out) as src:
        for k in src.keys():
            got = src.get(k)
            assert got.dtype == fp8[k].dtype
            want = exp[k].float().to(fp8[k].dtype)
            assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got,
                               want.view(torch.uint8) if want.element_size() == 1 else want), k
    rb, ro = raw_data(base), raw_data(out)
    touched = {t.module for t in items}
    assert all(rb[k] == ro[k] for k in rb if k not in touched)
    assert report.fp8_tensors > 0 and report.fp8_relative_error is not None and report.fp8_relative_error > 0.01
    assert sum("fp8" in w for w in report.warnings) == 1
    assert report.lost_by_dtype["fp8_e4m3fn"][1] > 0


def test_scaled_fp8_is_dequantised_and_requantised(tmp_path):
    table = tiny_table("flux")
    ref = tiny_checkpoint("flux", seed=0)
    key = "double_blocks.0.img_attn.proj.weight"
    scale = torch.tensor(0.01)
    tensors = dict(ref)
    tensors[key] = (ref[key] / scale).to(torch.float8_e4m3fn)
    tensors[key[: -len("weight")] + "scale_weight"] = scale
    base = save(tensors, tmp_path / "base.safetensors")
    mod = next(m for m in table.modules if m.key == key)
    items = {t: d for t, d in tiny_lora_deltas(table, rank=2, alpha=1.0, groups=("attn",)).items()
             if t.module == key}
    lora = save(lora_tensors(items, table, "kohya"), tmp_path / "l.safetensors")
    out = tmp_path / "o.safetensors"
    bake(base, [WeightedInput(lora, 1.0)], out, device="cpu")
    d = next(iter(items.values()))
    w = tensors[key].float() * scale + d.dense(mod.shape)
    with open_source(out) as src:
        assert torch.equal(src.get(key).view(torch.uint8), (w / scale).to(torch.float8_e4m3fn).view(torch.uint8))
        assert torch.equal(src.get(key[: -len("weight")] + "scale_weight"), scale)


def test_dtype_option_casts_every_float_tensor(tmp_path):
    ref = tiny_checkpoint("sd1", seed=0)
    ref["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    base = save(ref, tmp_path / "base.safetensors")
    lora, items = lora_file(tmp_path, "sd1", groups=("attn",))
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, 1.0)], out, dtype="bf16", device="cpu")
    exp = reference(tiny_table("sd1"), {k: v for k, v in ref.items() if v.is_floating_point()}, [(items, 1.0)])
    with open_source(out) as src:
        assert src.get("cond_stage_model.transformer.text_model.embeddings.position_ids").dtype == torch.int64
        for k, v in exp.items():
            got = src.get(k)
            assert got.dtype == torch.bfloat16
            # one rounding to bf16 of the float32 result: within one bf16 ULP of the float64 reference
            torch.testing.assert_close(got.double(), v, rtol=2 ** -8, atol=1e-7, msg=k)
    assert report.tensors_cast > 0 and report.dtype == "bf16"


def test_tiny_delta_in_bf16_is_reported_lost(tmp_path):
    """A delta far below half an ULP of bf16 does not change the weights: the precision report says so."""
    base = save(tiny_checkpoint("sd1", seed=0, dtype=torch.bfloat16), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "sd1", groups=("attn",))
    out = tmp_path / "o.safetensors"
    report = bake(base, [WeightedInput(lora, 1e-5)], out, device="cpu")
    assert report.lost_fraction > 0.9
    assert report.weak_modules and report.weak_modules[0].ratio < 0.5
    assert any("kept less than" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------ other sources


def test_diffusers_folder_base_gives_a_folder(tmp_path):
    table = tiny_table("sdxl")
    ref = tiny_checkpoint("sdxl", seed=1)
    folder = save_diffusers_folder(to_layout(ref, table, "diffusers"), tmp_path / "pipe")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"stale")
    lora, items = lora_file(tmp_path, "sdxl", groups=("attn", "locon"))
    out = tmp_path / "baked"
    report = bake(folder, [WeightedInput(lora, 0.75)], out, device="cpu")
    assert (out / "model_index.json").read_text() == (folder / "model_index.json").read_text()
    assert (out / "tokenizer" / "vocab.json").exists() and (out / "unet" / "config.json").exists()
    assert not (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert report.skipped_files == ["unet/diffusion_pytorch_model.fp16.safetensors"]
    exp = to_layout(reference(table, ref, [(items, 0.75)]), table, "diffusers")
    with open_source(out) as src:
        for k in src.keys():
            torch.testing.assert_close(src.get(k).double(), exp[k].double(), rtol=1e-6, atol=1e-7)
    rows = json.loads(read_header(out / "unet" / "diffusion_pytorch_model.safetensors").metadata["lorasurgery.inputs"])
    assert rows[0]["sha256"] == open_source(folder).sha256()
    with pytest.raises(OutputError, match="exists"):
        bake(folder, [WeightedInput(lora, 0.75)], out, device="cpu")
    report2 = bake(folder, [WeightedInput(lora, 0.5)], out, device="cpu", overwrite=True)
    assert report2.inputs[0].weight == 0.5
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_sharded_base_gives_one_file(tmp_path):
    ref = tiny_checkpoint("flux", seed=0)
    keys = list(ref)
    half = len(keys) // 2
    parts = [{k: ref[k] for k in keys[:half]}, {k: ref[k] for k in keys[half:]}]
    names = ["m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"]
    for p, n in zip(parts, names):
        save(p, tmp_path / n)
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: names[0 if i < half else 1]
                                                                for i, k in enumerate(keys)}}))
    lora, items = lora_file(tmp_path, "flux", groups=("attn",))
    out = tmp_path / "o.safetensors"
    report = bake(index, [WeightedInput(lora, 1.0)], out, device="cpu")
    assert_matches(out, reference(tiny_table("flux"), ref, [(items, 1.0)]))
    assert report.base_sha256 == open_source(index).sha256()


# --------------------------------------------------------------------------------------------- plan errors


def _no_output(tmp_path: Path, name: str = "o.safetensors") -> None:
    assert not (tmp_path / name).exists()
    assert not any(p.name.startswith(f".{name}") for p in tmp_path.iterdir())


def test_unmatched_keys_error_then_allowed(tmp_path):
    ref = tiny_checkpoint("sd1", seed=0)
    base = save(ref, tmp_path / "base.safetensors")
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, groups=("attn",))
    tensors = lora_tensors(items, table, "kohya")
    extra = [(f"lora_unet_nowhere_{i}.lora_down.weight", torch.ones(2, 4)) for i in range(25)]
    lora = save(tensors + extra, tmp_path / "l.safetensors")
    with pytest.raises(PlanError) as exc:
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu")
    msg = str(exc.value)
    assert "25 LoRA keys" in msg and "lora_unet_nowhere_0.lora_down.weight" in msg and "… and 5 more" in msg
    assert "--allow-unmatched" in msg
    _no_output(tmp_path)
    report = bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu", allow_unmatched=True)
    assert report.unmatched_count == 25 and len(report.unmatched) == 20
    assert_matches(tmp_path / "o.safetensors", reference(table, ref, [(items, 1.0)]))


def test_lora_of_another_architecture(tmp_path):
    base = save(tiny_checkpoint("sd1", seed=0), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "sdxl", groups=("attn",))
    for allow in (False, True):
        with pytest.raises(PlanError, match=r"Stable Diffusion XL LoRA.*Stable Diffusion 1"):
            bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu", allow_unmatched=allow)
    _no_output(tmp_path)


def test_shape_mismatch_lists_keys(tmp_path):
    from lorasurgery.arch import get_arch

    spec = get_arch("flux")
    cfg = dict(spec.tiny_config(), hidden=128)
    base = save(tiny_checkpoint("flux", seed=0, config=cfg), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "flux", groups=("attn",))
    with pytest.raises(PlanError, match="does not fit"):
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu")
    _no_output(tmp_path)


def test_nonfinite_lora_module(tmp_path):
    ref = tiny_checkpoint("sd1", seed=0)
    base = save(ref, tmp_path / "base.safetensors")
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, groups=("attn",))
    tensors = dict(lora_tensors(items, table, "kohya"))
    bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
    tensors[bad] = tensors[bad].clone()
    tensors[bad][0, 0] = float("nan")
    lora = save(tensors, tmp_path / "l.safetensors")
    with pytest.raises(PlanError, match="attn1_to_q.*NaN or Inf"):
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu")
    _no_output(tmp_path)
    report = bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu", allow_nonfinite=True)
    assert len(report.nonfinite_skipped) == 1 and "attn1_to_q" in report.nonfinite_skipped[0]
    kept = {t: d for t, d in items.items() if "input_blocks.1.1.transformer_blocks.0.attn1.to_q" not in t.module}
    assert_matches(tmp_path / "o.safetensors", reference(table, ref, [(kept, 1.0)]))


def test_nonfinite_base_tensor(tmp_path):
    ref = tiny_checkpoint("flux", seed=0)
    key = "double_blocks.1.img_attn.proj.weight"
    ref[key] = ref[key].clone()
    ref[key][3, 3] = float("inf")
    base = save(ref, tmp_path / "base.safetensors")
    before = base.read_bytes()
    lora, items = lora_file(tmp_path, "flux", groups=("attn",))
    with pytest.raises(PlanError, match=rf"NaN or Inf.*{key}"):
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu")
    _no_output(tmp_path)
    assert base.read_bytes() == before
    report = bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu", allow_nonfinite=True)
    assert report.nonfinite_skipped and key in report.nonfinite_skipped[0]
    assert raw_data(tmp_path / "o.safetensors")[key] == raw_data(base)[key]


def test_output_checks(tmp_path):
    base = save(tiny_checkpoint("flux", seed=0), tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "flux", groups=("attn",))
    with pytest.raises(OutputError, match="overwrite the input"):
        bake(base, [WeightedInput(lora)], base, device="cpu", overwrite=True)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="--overwrite"):
        bake(base, [WeightedInput(lora)], out, device="cpu")
    assert out.read_bytes() == b"keep me"
    with pytest.raises(InputError, match="not a LoRA"):
        bake(base, [WeightedInput(base)], tmp_path / "x.safetensors", device="cpu")
    with pytest.raises(InputError, match="LoRA, not a base checkpoint"):
        bake(lora, [WeightedInput(lora)], tmp_path / "x.safetensors", device="cpu")
    with pytest.raises(PlanError, match="--dtype"):
        bake(base, [WeightedInput(lora)], tmp_path / "x.safetensors", device="cpu", dtype="fp8_e4m3fn")
    with pytest.raises(PlanError, match="given twice"):
        bake(base, [WeightedInput(lora), WeightedInput(lora, 0.5)], tmp_path / "x.safetensors", device="cpu")
    assert not (tmp_path / "x.safetensors").exists()


def test_text_encoder_modules_on_a_unet_only_base(tmp_path):
    table = tiny_table("sd1")
    ref = {k: v for k, v in tiny_checkpoint("sd1", seed=0).items() if k.startswith("model.diffusion_model.")}
    base = save(ref, tmp_path / "unet.safetensors")
    lora, items = lora_file(tmp_path, "sd1", groups=("attn",))
    with pytest.raises(PlanError, match="36 × module of the te1 component, which the base does not contain"):
        bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu")
    bake(base, [WeightedInput(lora)], tmp_path / "o.safetensors", device="cpu", allow_unmatched=True)
    unet_items = {t: d for t, d in items.items() if t.module.startswith("model.diffusion_model.")}
    assert_matches(tmp_path / "o.safetensors", reference(table, ref, [(unet_items, 1.0)]))


def test_plan_only_reads_and_maps(tmp_path):
    base = save(tiny_checkpoint("flux", seed=0), tmp_path / "base.safetensors")
    lora, items = lora_file(tmp_path, "flux", "peft", groups=("attn",), split_parts=True)
    with plan_bake(base, [WeightedInput(lora, 0.5)], tmp_path / "o.safetensors", device="cpu") as plan:
        assert plan.arch == "flux" and plan.layout == "bfl"
        assert len(plan.inputs[0].modules) == len(items)
        fused = plan.jobs["double_blocks.0.img_attn.qkv.weight"]
        assert sorted(c.rows for c in fused.contributions) == [(0, 64), (64, 128), (128, 192)]
        assert fused.mode == "chunk"
    _no_output(tmp_path)


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.floats(min_value=-3, max_value=3).filter(lambda x: abs(x) > 1e-3), seed=st.integers(0, 50))
def test_bake_then_negative_bake_returns_the_base(tmp_path, w, seed):
    d = tmp_path / f"neg-{seed}-{abs(hash(w)) % 10**8}"
    d.mkdir()
    ref = tiny_checkpoint("flux", seed=seed)
    base = save(ref, d / "base.safetensors")
    lora, _ = lora_file(d, "flux", "kohya", seed=seed, groups=("attn", "extra"))
    bake(base, [WeightedInput(lora, w)], d / "a.safetensors", device="cpu")
    bake(d / "a.safetensors", [WeightedInput(lora, -w)], d / "b.safetensors", device="cpu")
    with open_source(d / "b.safetensors") as src:
        for k, v in ref.items():
            torch.testing.assert_close(src.get(k), v, rtol=0, atol=4e-6 * max(1.0, abs(w)))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w1=st.floats(-2, 2), w2=st.floats(-2, 2), seed=st.integers(0, 50))
def test_two_loras_together_equal_one_after_the_other(tmp_path, w1, w2, seed):
    d = tmp_path / f"two-{seed}-{abs(hash((w1, w2))) % 10**8}"
    d.mkdir()
    ref = tiny_checkpoint("sd3", seed=seed)
    base = save(ref, d / "base.safetensors")
    l1, _ = lora_file(d, "sd3", "kohya", seed=seed, groups=("attn",))
    l2, _ = lora_file(d, "sd3", "peft", seed=seed + 1, groups=("attn", "extra"), split_parts=True)
    bake(base, [WeightedInput(l1, w1), WeightedInput(l2, w2)], d / "both.safetensors", device="cpu")
    bake(base, [WeightedInput(l1, w1)], d / "one.safetensors", device="cpu")
    bake(d / "one.safetensors", [WeightedInput(l2, w2)], d / "two.safetensors", device="cpu")
    with open_source(d / "both.safetensors") as a, open_source(d / "two.safetensors") as b:
        for k in a.keys():
            torch.testing.assert_close(a.get(k), b.get(k), rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli():
    """``lorasurgery`` with the merge command registered (the lead registers it in cli.COMMANDS)."""
    from click.testing import CliRunner

    from lorasurgery.cli import main
    from lorasurgery.commands.merge import command

    if command.name not in main.commands:
        main.add_command(command)

    def run(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    return run


def _sha(*paths: Path) -> list[str]:
    return [sha256_file(p) for p in paths]


def test_cli_bake_equals_library_and_json(tmp_path, cli):
    base = save(tiny_checkpoint("flux", seed=0, dtype=torch.bfloat16), tmp_path / "base.safetensors")
    l1, _ = lora_file(tmp_path, "flux", groups=("attn", "extra"))
    l2, _ = lora_file(tmp_path, "flux", seed=4, groups=("attn",))
    out = tmp_path / "cli.safetensors"
    r = cli("merge", f"{l1}:0.6", f"{l2}:-0.3:D00-S00=0.5", "--base", base, "-o", out, "--blocks", "S01=0",
            "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["inputs"][0]["weight"] == 0.6 and rep["inputs"][1]["blocks_given"] == "D00-S00=0.5"
    assert rep["tensors_changed"] > 0 and rep["unmatched_count"] == 0
    lib = tmp_path / "lib.safetensors"
    bake(base, [WeightedInput(l1, 0.6), WeightedInput(l2, -0.3, "D00-S00=0.5")], lib, blocks="S01=0",
         device="cpu")
    assert out.read_bytes() == lib.read_bytes()
    r = cli("merge", f"{l1}:0.6", "--base", base, "-o", tmp_path / "table.safetensors", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "baked table.safetensors" in r.output and "changed" in r.output


def _cli_error(cli, tmp_path, args, pattern, inputs):
    before = _sha(*inputs)
    r = cli("merge", *args)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    import re

    assert re.search(pattern, " ".join(r.output.split())), r.output
    assert _sha(*inputs) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_cli_errors(tmp_path, cli):
    ref = tiny_checkpoint("sd1", seed=0)
    base = save(ref, tmp_path / "base.safetensors")
    lora, _ = lora_file(tmp_path, "sd1", groups=("attn",))
    out = tmp_path / "o.safetensors"
    xl, _ = lora_file(tmp_path, "sdxl", groups=("attn",))
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, groups=("attn",))
    tensors = dict(lora_tensors(items, table, "kohya"))
    extra = save({**tensors, "lora_unet_nowhere.lora_down.weight": torch.ones(2, 4)}, tmp_path / "extra.safetensors")
    nan = dict(tensors)
    k = next(iter(nan))
    nan[k] = nan[k].clone().fill_(float("nan"))
    nan_lora = save(nan, tmp_path / "nan.safetensors")
    bad_base_t = dict(ref)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    bad_base_t[key] = bad_base_t[key].clone()
    bad_base_t[key][0, 0] = float("nan")
    bad_base = save(bad_base_t, tmp_path / "badbase.safetensors")
    cases = [
        ([lora, "--base", base, "-o", out, "--device", "cpu", "--blocks", "1,0,1"], r"--blocks.*3", [base, lora]),
        ([extra, "--base", base, "-o", out, "--device", "cpu"],
         r"1 LoRA keys do not apply.*lora_unet_nowhere\.lora_down\.weight.*--allow-unmatched", [base, extra]),
        ([xl, "--base", base, "-o", out, "--device", "cpu"], r"Stable Diffusion XL LoRA.*Stable Diffusion 1",
         [base, xl]),
        ([nan_lora, "--base", base, "-o", out, "--device", "cpu"], r"NaN or Inf.*--allow-nonfinite", [base, nan_lora]),
        ([lora, "--base", bad_base, "-o", out, "--device", "cpu"], r"NaN or Inf values in .*attn1\.to_q",
         [bad_base, lora]),
        ([lora, "--base", base, "-o", base, "--device", "cpu", "--overwrite"], r"overwrite the input", [base, lora]),
        ([lora, "--base", base, "-o", out, "--device", "cpu", "--dtype", "int8"], r"dtype", [base, lora]),
        ([tmp_path / "missing.safetensors", "--base", base, "-o", out, "--device", "cpu"], r"does not exist",
         [base]),
        ([lora, "--base", lora, "-o", out, "--device", "cpu"], r"is a LoRA, not a base checkpoint", [lora]),
    ]
    for args, pattern, inputs in cases:
        _cli_error(cli, tmp_path, args, pattern, inputs)
        assert not out.exists()
    out.write_bytes(b"old")
    _cli_error(cli, tmp_path, [lora, "--base", base, "-o", out, "--device", "cpu"], r"already exists.*--overwrite",
               [base, lora])
    assert out.read_bytes() == b"old"
    r = cli("merge", lora, "--base", base, "-o", out, "--device", "cpu", "--overwrite")
    assert r.exit_code == 0, r.output
    assert list(read_header(out).tensors) == list(read_header(base).tensors)
