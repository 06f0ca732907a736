"""SD1/SD2/SDXL tables: counts, shapes, names, block membership, layouts and config recovery from shapes."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace

import pytest

from lorasurgery.arch import get_arch, sd1, sd2, sdxl
from lorasurgery.arch.base import ModelTable, ModuleSpec
from lorasurgery.arch.unet import (
    UNET_PREFIX,
    VAE_PREFIX,
    UNetConfig,
    diffusers_unet_config,
    heads_for_width,
    unet_config_from_shapes,
    unet_layers,
)

ARCHS = (sd1, sd2, sdxl)
P = UNET_PREFIX


def _unet_modules(table: ModelTable, group: str) -> list[ModuleSpec]:
    return [m for m in table.modules if m.component == "unet" and m.group == group]


def _module(table: ModelTable, key: str) -> ModuleSpec:
    return next(m for m in table.modules if m.key == key)


# ------------------------------------------------------------------------------------------------ counts


def test_sd15_counts() -> None:
    t = sd1.build(sd1.real_config())
    assert sum(k.startswith(P) for k in t.tensors) == 686
    assert len(_unet_modules(t, "attn")) == 192
    assert len(_unet_modules(t, "locon")) == 86
    assert len([m for m in t.modules if m.component == "te1" and m.group == "attn"]) == 72
    assert sum(k.startswith(VAE_PREFIX) for k in t.tensors) == 248


def _locon_kinds(table: ModelTable) -> Counter[str]:
    """LoCon layers by kind: the resnet layer name, or "downsampler" / "upsampler"."""
    kinds: Counter[str] = Counter()
    for m in _unet_modules(table, "locon"):
        path = m.names["diffusers"].split(".")
        kinds[next((p[:-1] for p in path if p.endswith("samplers")), path[-1])] += 1
    return kinds


def test_sd15_locon_composition() -> None:
    """The 86 LoCon layers: 22 resnets x (conv1, conv2, time_emb_proj) + 14 conv_shortcuts + 3 + 3 samplers."""
    assert _locon_kinds(sd1.build(sd1.real_config())) == {
        "conv1": 22, "conv2": 22, "time_emb_proj": 22, "conv_shortcut": 14, "downsampler": 3, "upsampler": 3}


def test_sdxl_counts() -> None:
    t = sdxl.build(sdxl.real_config())
    assert sum(k.startswith(P) for k in t.tensors) == 1680
    assert len(_unet_modules(t, "attn")) == 722
    assert len(_unet_modules(t, "locon")) == 66
    assert len([m for m in t.modules if m.component == "te1" and m.group == "attn"]) == 72
    te2 = [m for m in t.modules if m.component == "te2" and m.group == "attn"]
    assert sum(len(m.parts) or 1 for m in te2) == 192  # q/k/v counted as the HF modules kohya names


def test_sdxl_locon_composition() -> None:
    """The 66 LoCon layers: 17 resnets x 3 + 11 skip connections + 2 downsamplers + 2 upsamplers."""
    assert _locon_kinds(sdxl.build(sdxl.real_config())) == {
        "conv1": 17, "conv2": 17, "time_emb_proj": 17, "conv_shortcut": 11, "downsampler": 2, "upsampler": 2}


def test_extra_group() -> None:
    t = sdxl.build(sdxl.real_config())
    extra = {m.key[len(P):] for m in _unet_modules(t, "extra")}
    assert extra == {f"{k}.weight" for k in ("input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2",
                                             "label_emb.0.0", "label_emb.0.2")}
    t1 = sd1.build(sd1.real_config())
    assert {m.key[len(P):] for m in _unet_modules(t1, "extra")} == {
        f"{k}.weight" for k in ("input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2")}


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("key,shape", [
    ("input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
    ("input_blocks.0.0.weight", (320, 4, 3, 3)),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 768)),
    ("input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", (2560, 320)),
    ("input_blocks.1.1.transformer_blocks.0.ff.net.2.weight", (320, 1280)),
    ("input_blocks.4.0.skip_connection.weight", (640, 320, 1, 1)),
    ("input_blocks.3.0.op.weight", (320, 320, 3, 3)),
    ("output_blocks.0.0.in_layers.2.weight", (1280, 2560, 3, 3)),
    ("output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
    ("output_blocks.8.2.conv.weight", (640, 640, 3, 3)),
    ("output_blocks.11.0.skip_connection.weight", (320, 640, 1, 1)),
    ("time_embed.0.weight", (1280, 320)),
    ("out.2.weight", (4, 320, 3, 3)),
    ("out.0.bias", (320,)),
])
def test_sd15_shapes(key: str, shape: tuple[int, ...]) -> None:
    assert sd1.build(sd1.real_config()).tensors[P + key] == shape


@pytest.mark.parametrize("key,shape", [
    ("output_blocks.0.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
    ("input_blocks.4.1.proj_in.weight", (640, 640)),
    ("label_emb.0.0.weight", (1280, 2816)),
    ("label_emb.0.2.weight", (1280, 1280)),
    ("middle_block.1.transformer_blocks.9.norm3.weight", (1280,)),
    ("output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
    ("output_blocks.5.2.conv.weight", (640, 640, 3, 3)),
    ("output_blocks.8.0.skip_connection.weight", (320, 640, 1, 1)),
])
def test_sdxl_shapes(key: str, shape: tuple[int, ...]) -> None:
    assert sdxl.build(sdxl.real_config()).tensors[P + key] == shape


def test_sd2_linear_projection_and_openclip() -> None:
    t = sd2.build(sd2.real_config())
    assert t.tensors[P + "input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert t.tensors[P + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"] == (320, 1024)
    assert _module(t, P + "input_blocks.1.1.proj_in.weight").kind == "linear"
    assert _module(sd1.build(sd1.real_config()), P + "input_blocks.1.1.proj_in.weight").kind == "conv1x1"
    assert t.tensors["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)


def test_refiner_table() -> None:
    t = sdxl.build(sdxl.refiner_config())
    assert t.tensors[P + "label_emb.0.0.weight"] == (1536, 2560)
    assert t.tensors[P + "input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight"] == (768, 1280)
    assert P + "input_blocks.1.1.norm.weight" not in t.tensors  # top level has no attention
    assert t.tensors[P + "output_blocks.2.1.conv.weight"] == (1536, 1536, 3, 3)  # level 3: no attention
    assert t.tensors[P + "output_blocks.5.2.conv.weight"] == (1536, 1536, 3, 3)
    assert "conditioner.embedders.0.model.transformer.resblocks.31.attn.in_proj_weight" in t.tensors
    assert not any(k.startswith("conditioner.embedders.1.") for k in t.tensors)
    assert {m.component for m in t.modules} == {"unet", "te2"}


def test_modules_are_consistent_with_tensors() -> None:
    for mod in ARCHS:
        t = mod.build(mod.real_config())
        for m in t.modules:
            assert t.tensors[m.key] == m.shape
            assert m.bias is None or t.tensors[m.bias] == (m.shape[0],)
            assert m.kind == ("linear" if len(m.shape) == 2 else "conv1x1" if m.shape[2:] == (1, 1) else "conv")
        for scheme in ("kohya", "diffusers"):
            names = [m.names[scheme] for m in t.modules if scheme in m.names]
            names += [p.names[scheme] for m in t.modules for p in m.parts if scheme in p.names]
            assert len(names) == len(set(names)), (mod.__name__, scheme)


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("key,kohya,diffusers", [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.2.1.transformer_blocks.0.attn2.to_out.0",
     "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0",
     "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"),
    ("input_blocks.1.1.transformer_blocks.0.ff.net.0.proj",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("input_blocks.1.0.in_layers.2", "lora_unet_down_blocks_0_resnets_0_conv1", "unet.down_blocks.0.resnets.0.conv1"),
    ("input_blocks.4.0.skip_connection", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
     "unet.down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.4.0.emb_layers.1", "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
     "unet.down_blocks.1.resnets.0.time_emb_proj"),
    ("input_blocks.3.0.op", "lora_unet_down_blocks_0_downsamplers_0_conv", "unet.down_blocks.0.downsamplers.0.conv"),
    ("output_blocks.2.1.conv", "lora_unet_up_blocks_0_upsamplers_0_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.5.2.conv", "lora_unet_up_blocks_1_upsamplers_0_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    ("output_blocks.11.1.proj_out", "lora_unet_up_blocks_3_attentions_2_proj_out",
     "unet.up_blocks.3.attentions.2.proj_out"),
    ("middle_block.2.out_layers.3", "lora_unet_mid_block_resnets_1_conv2", "unet.mid_block.resnets.1.conv2"),
    ("input_blocks.0.0", "lora_unet_conv_in", "unet.conv_in"),
    ("time_embed.2", "lora_unet_time_embedding_linear_2", "unet.time_embedding.linear_2"),
])
def test_sd1_names(key: str, kohya: str, diffusers: str) -> None:
    m = _module(sd1.build(sd1.real_config()), f"{P}{key}.weight")
    assert m.names == {"kohya": kohya, "diffusers": diffusers}


@pytest.mark.parametrize("key,diffusers", [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("middle_block.1.transformer_blocks.9.ff.net.2", "unet.mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
    ("output_blocks.0.1.proj_in", "unet.up_blocks.0.attentions.0.proj_in"),
    ("input_blocks.1.0.in_layers.2", "unet.down_blocks.0.resnets.0.conv1"),
    ("input_blocks.1.0.out_layers.3", "unet.down_blocks.0.resnets.0.conv2"),
    ("input_blocks.1.0.emb_layers.1", "unet.down_blocks.0.resnets.0.time_emb_proj"),
    ("input_blocks.7.0.skip_connection", "unet.down_blocks.2.resnets.0.conv_shortcut"),
    ("input_blocks.3.0.op", "unet.down_blocks.0.downsamplers.0.conv"),
    ("output_blocks.2.2.conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.8.0.in_layers.2", "unet.up_blocks.2.resnets.2.conv1"),
    ("label_emb.0.0", "unet.add_embedding.linear_1"),
    ("out.2", "unet.conv_out"),
])
def test_sdxl_names(key: str, diffusers: str) -> None:
    m = _module(sdxl.build(sdxl.real_config()), f"{P}{key}.weight")
    assert m.names == {"kohya": "lora_unet_" + key.replace(".", "_"), "diffusers": diffusers}


def test_te_names_and_components() -> None:
    t1 = sd1.build(sd1.real_config())
    m = _module(t1, "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert m.names["kohya"] == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert (m.component, m.block) == ("te1", "BASE")
    t2 = sd2.build(sd2.real_config())
    fused = _module(t2, "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight")
    assert fused.part("k").names["kohya"] == "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    assert (fused.part("k").start, fused.part("k").stop) == (1024, 2048)
    tx = sdxl.build(sdxl.real_config())
    m = _module(tx, "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight")
    assert m.names == {"kohya": "lora_te1_text_model_encoder_layers_11_mlp_fc2",
                       "diffusers": "text_encoder.text_model.encoder.layers.11.mlp.fc2"}
    fused = _module(tx, "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight")
    assert fused.part("v").names == {"kohya": "lora_te2_text_model_encoder_layers_31_self_attn_v_proj",
                                     "diffusers": "text_encoder_2.text_model.encoder.layers.31.self_attn.v_proj"}
    assert (fused.component, fused.block) == ("te2", "BASE")


# ------------------------------------------------------------------------------------------------ blocks

SD_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
         "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
SD_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
SDXL_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))


@pytest.mark.parametrize("mod", ARCHS)
def test_block_layouts(mod) -> None:  # noqa: ANN001
    expected = {"sd1": {"sd-17": SD_17, "sd-26": SD_26}, "sd2": {"sd-17": SD_17, "sd-26": SD_26},
                "sdxl": {"sdxl-12": SDXL_12, "sdxl-20": SDXL_20}}[mod.__name__.rsplit(".", 1)[1]]
    for make in (mod.real_config, mod.tiny_config):
        layouts = mod.block_layouts(make())
        assert {k: tuple(v) for k, v in layouts.items()} == expected
    spec = get_arch(mod.__name__.rsplit(".", 1)[1])
    assert spec.full_layout in expected
    table = spec.build(spec.real_config())
    full = spec.block_layouts(spec.real_config())[spec.full_layout]
    assert {m.block for m in table.modules} - {None} == set(full)
    short = next(v for k, v in expected.items() if k != spec.full_layout)
    assert {m.block for m in table.modules if m.group == "attn"} == set(short)


def _sd_block_from_diffusers(path: str) -> str | None:
    """blocks.md section 2 index arithmetic (R = 2), applied to a diffusers module path."""
    if m := re.match(r"unet\.down_blocks\.(\d)\.(resnets|attentions)\.(\d)\.", path):
        return f"IN{3 * int(m[1]) + int(m[3]) + 1:02d}"
    if m := re.match(r"unet\.down_blocks\.(\d)\.downsamplers\.", path):
        return f"IN{3 * (int(m[1]) + 1):02d}"
    if m := re.match(r"unet\.up_blocks\.(\d)\.(resnets|attentions)\.(\d)\.", path):
        return f"OUT{3 * int(m[1]) + int(m[3]):02d}"
    if m := re.match(r"unet\.up_blocks\.(\d)\.upsamplers\.", path):
        return f"OUT{3 * int(m[1]) + 2:02d}"
    if path.startswith("unet.mid_block."):
        return "M00"
    if path == "unet.conv_in":
        return "IN00"
    assert path.split(".")[1] in {"time_embedding", "add_embedding", "conv_out"}, path
    return None


@pytest.mark.parametrize("mod", ARCHS)
def test_block_membership(mod) -> None:  # noqa: ANN001
    t = mod.build(mod.real_config())
    for m in t.modules:
        if m.component != "unet":
            assert m.block == "BASE"
            continue
        assert m.block == _sd_block_from_diffusers(m.names["diffusers"]), m.key
        ldm = m.key[len(P):]
        if ldm.startswith("input_blocks."):
            assert m.block == f"IN{int(ldm.split('.')[1]):02d}"
        elif ldm.startswith("output_blocks."):
            assert m.block == f"OUT{int(ldm.split('.')[1]):02d}"


def test_sdxl_block_contents() -> None:
    """blocks.md section 3: transformer depths per block."""
    t = sdxl.build(sdxl.real_config())
    depth: Counter[str] = Counter(m.block for m in t.modules if m.key.endswith(".attn1.to_q.weight"))
    assert depth == {"IN04": 2, "IN05": 2, "IN07": 10, "IN08": 10, "M00": 10, "OUT00": 10, "OUT01": 10,
                     "OUT02": 10, "OUT03": 2, "OUT04": 2, "OUT05": 2}
    assert _module(t, P + "output_blocks.2.2.conv.weight").block == "OUT02"
    assert _module(t, P + "label_emb.0.0.weight").block is None


# ------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("mod,ref", [(sd1, "ldm"), (sd2, "ldm"), (sdxl, "sgm")])
def test_layouts(mod, ref: str) -> None:  # noqa: ANN001
    t = mod.build(mod.tiny_config())
    assert set(t.layouts) == {ref, "diffusers"}
    assert dict(t.layouts[ref].key_map) == {k: ((k, None),) for k in t.tensors}
    files = [fk for entries in t.layouts["diffusers"].key_map.values() for fk, _ in entries]
    assert len(files) == len(set(files))
    assert {fk.split(".", 1)[0] for fk in files} == {
        "sd1": {"unet", "vae", "text_encoder"}, "sd2": {"unet", "vae", "text_encoder"},
        "sdxl": {"unet", "vae", "text_encoder", "text_encoder_2"}}[mod.__name__.rsplit(".", 1)[1]]
    unet_refs = {k for k in t.tensors if k.startswith(P)}
    assert unet_refs <= set(t.layouts["diffusers"].key_map)


def test_resnet_renames_in_map() -> None:
    km = sd1.build(sd1.real_config()).layouts["diffusers"].key_map
    assert km[P + "input_blocks.1.0.in_layers.0.weight"] == (("unet.down_blocks.0.resnets.0.norm1.weight", None),)
    assert km[P + "output_blocks.3.0.out_layers.0.bias"] == (("unet.up_blocks.1.resnets.0.norm2.bias", None),)
    assert km[P + "out.0.weight"] == (("unet.conv_norm_out.weight", None),)
    assert km[VAE_PREFIX + "decoder.up.0.block.2.conv2.weight"] == (
        ("vae.decoder.up_blocks.3.resnets.2.conv2.weight", None),)
    assert km[VAE_PREFIX + "encoder.mid.attn_1.proj_out.weight"] == (
        ("vae.encoder.mid_block.attentions.0.to_out.0.weight", None),)


# ------------------------------------------------------------------------------------------------ configs


def _variants() -> dict[str, tuple[object, dict]]:
    inpaint1 = sd1.real_config()
    inpaint1["unet"] = {**inpaint1["unet"], "in_channels": 9}  # type: ignore[dict-item]
    inpaint2 = sd2.tiny_config()
    inpaint2["unet"] = {**inpaint2["unet"], "in_channels": 9}  # type: ignore[dict-item]
    xl_inpaint = sdxl.tiny_config()
    xl_inpaint["unet"] = {**xl_inpaint["unet"], "in_channels": 9}  # type: ignore[dict-item]
    unet_only = {**sdxl.real_config(), "te1": None, "te2": None, "te2_embedder": None, "vae": None}
    te_less = {**sd1.tiny_config(), "text_encoder": None}
    vae_less = {**sd2.real_config(), "vae": None}
    tiny_refiner = {**sdxl.tiny_config(), "te1": None, "te2_embedder": 0}
    tiny_refiner["unet"] = {**tiny_refiner["unet"], "context_dim": 1280}  # type: ignore[dict-item]
    return {
        "sd1-real": (sd1, sd1.real_config()), "sd1-tiny": (sd1, sd1.tiny_config()),
        "sd2-real": (sd2, sd2.real_config()), "sd2-tiny": (sd2, sd2.tiny_config()),
        "sdxl-real": (sdxl, sdxl.real_config()), "sdxl-tiny": (sdxl, sdxl.tiny_config()),
        "sdxl-refiner": (sdxl, sdxl.refiner_config()), "sdxl-tiny-refiner": (sdxl, tiny_refiner),
        "sd1-inpaint": (sd1, inpaint1), "sd2-inpaint": (sd2, inpaint2), "sdxl-inpaint": (sdxl, xl_inpaint),
        "sdxl-unet-only": (sdxl, unet_only), "sd1-te-less": (sd1, te_less), "sd2-vae-less": (sd2, vae_less),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_config_round_trip_and_detection(name: str) -> None:
    mod, cfg = _variants()[name]
    shapes = mod.build(cfg).tensors  # type: ignore[attr-defined]
    assert mod.config_from_shapes(shapes) == cfg  # type: ignore[attr-defined]
    for other in ARCHS:
        if other is not mod:
            assert other.config_from_shapes(shapes) is None, other.__name__


def test_detection_tolerates_extra_keys() -> None:
    """EMA copies, schedule buffers and unknown keys do not prevent detection."""
    shapes = dict(sd1.build(sd1.real_config()).tensors)
    shapes.update({"alphas_cumprod": (1000,), "model_ema.decay": (), "model_ema.num_updates": (),
                   "model_ema.diffusion_modelinput_blocks00weight": (320, 4, 3, 3)})
    assert sd1.config_from_shapes(shapes) == sd1.real_config()


def test_detection_rejects_mismatches() -> None:
    base = dict(sd1.build(sd1.tiny_config()).tensors)
    missing = {k: s for k, s in base.items() if k != P + "output_blocks.5.1.proj_out.bias"}
    assert sd1.config_from_shapes(missing) is None
    reshaped = {**base, P + "input_blocks.4.0.emb_layers.1.weight": (64, 64)}
    assert sd1.config_from_shapes(reshaped) is None
    assert sd1.config_from_shapes({}) is None
    assert sdxl.config_from_shapes({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}) is None
    # a damaged text encoder or VAE is reported absent, the UNet still detected
    no_fc2 = {k: s for k, s in base.items() if not k.endswith("layers.1.mlp.fc2.weight")}
    cfg = sd1.config_from_shapes(no_fc2)
    assert cfg is not None and cfg["text_encoder"] is None and cfg["vae"] is not None
    # SD1 UNet with an SDXL-style label embedding is not SD1
    assert sd1.config_from_shapes({**base, P + "label_emb.0.0.weight": (128, 80)}) is None


def test_unet_config_from_shapes_derivation() -> None:
    """formats.md section 6 parameters read back from the released SDXL UNet."""
    cfg = unet_config_from_shapes(sdxl.build(sdxl.real_config()).tensors)
    assert cfg is not None
    assert (cfg.levels, cfg.num_res_blocks, cfg.depth, cfg.depth_middle, cfg.linear_proj, cfg.context_dim) == (
        3, 2, (0, 2, 10), 10, True, 2048)
    assert unet_config_from_shapes(sd1.build(sd1.real_config()).tensors) == sd1.REAL_UNET


def test_asymmetric_output_depths() -> None:
    """Output depths are read per level, independently of the input side."""
    cfg = replace(sdxl.TINY_UNET, depth_output=(1, 1, 3))
    layers = unet_layers(cfg)
    shapes = {f"{P}{layer.ldm}.weight": layer.shape for layer in layers}
    shapes.update({f"{P}{layer.ldm}.bias": (layer.shape[0],) for layer in layers if layer.bias})
    assert unet_config_from_shapes(shapes) == cfg
    up_top = [lay for lay in layers if lay.ldm.startswith("output_blocks.6.1.transformer_blocks.0.attn1.to_q")]
    assert len(up_top) == 1
    assert P + "output_blocks.6.1.transformer_blocks.0.attn1.to_q.weight" in shapes
    assert P + "output_blocks.8.2.conv.weight" not in shapes  # top level: no upsampler


def test_unet_config_validation() -> None:
    with pytest.raises(ValueError):
        replace(sd1.TINY_UNET, depth=(1, 1))
    with pytest.raises(ValueError):
        replace(sd1.TINY_UNET, depth_middle=0)
    with pytest.raises(ValueError):
        diffusers_unet_config(replace(sd1.TINY_UNET, depth=(1, 1, 1, 2)), attention_head_dim=8)
    assert UNetConfig.from_mapping(sd1.REAL_UNET.to_dict()) == sd1.REAL_UNET


def test_heads_convention() -> None:
    assert [heads_for_width(w) for w in (768, 1024, 1280, 320, 640, 32, 64)] == [12, 16, 20, 5, 10, 2, 1]
    assert sd2.attention_heads(sd2.real_config()) == (5, 10, 20, 20)
    assert sdxl.attention_heads(sdxl.real_config()) == (5, 10, 20)
    assert sd1.attention_heads(sd1.real_config()) == 8


def test_registry() -> None:
    for name in ("sd1", "sd2", "sdxl"):
        spec = get_arch(name)
        assert spec.name == name
        assert spec.config_from_shapes(spec.build(spec.tiny_config()).tensors) == spec.tiny_config()
