"""FLUX.1 and SD3/SD3.5 tables: counts, blocks, fused parts, swaps, names, layouts, config recovery."""
from __future__ import annotations

from collections import Counter

import pytest

from lorasurgery.arch import get_arch
from lorasurgery.arch import flux, sd3
from lorasurgery.arch.base import ModelTable, ModuleSpec

FLUX_CONFIGS = {
    "dev": flux.real_config,
    "schnell": flux.schnell_config,
    "tiny": flux.tiny_config,
}
SD3_CONFIGS = {
    "sd3-medium": sd3.real_config,
    "sd3.5-large": sd3.sd35_large_config,
    "sd3.5-medium": sd3.sd35_medium_config,
    "tiny": sd3.tiny_config,
    "tiny-3.5m": sd3.tiny_sd35_medium_config,
}
TE_ROOT = "text_encoders."


def transformer_keys(table: ModelTable) -> list[str]:
    return [k for k in table.tensors if not k.startswith(TE_ROOT)]


def module(table: ModelTable, key: str) -> ModuleSpec:
    return next(m for m in table.modules if m.key == key)


def all_tables():
    for name, make in FLUX_CONFIGS.items():
        yield f"flux-{name}", flux.build(make())
    for name, make in SD3_CONFIGS.items():
        yield f"sd3-{name}", sd3.build(make())


ALL = dict(all_tables())


# ------------------------------------------------------------------------------------------- registry


def test_registry_finds_both_specs():
    assert get_arch("flux") is flux.FLUX
    assert get_arch("sd3") is sd3.SD3
    assert flux.FLUX.full_layout in flux.FLUX.block_layouts(flux.real_config())
    assert sd3.SD3.full_layout in sd3.SD3.block_layouts(sd3.real_config())


# ------------------------------------------------------------------------------------------- FLUX counts


def test_flux_dev_and_schnell_tensor_counts():
    dev, schnell = flux.build(flux.real_config()), flux.build(flux.schnell_config())
    assert len(transformer_keys(dev)) == 780  # 19 x 24 + 38 x 8 + 20
    assert len(transformer_keys(schnell)) == 776  # no guidance_in
    assert set(transformer_keys(dev)) - set(transformer_keys(schnell)) == {
        f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer") for p in ("weight", "bias")
    }
    per_double = [k for k in dev.tensors if k.startswith("double_blocks.3.")]
    per_single = [k for k in dev.tensors if k.startswith("single_blocks.30.")]
    assert len(per_double) == 24 and len(per_single) == 8


def test_flux_real_shapes():
    t = flux.build(flux.real_config()).tensors
    assert t["double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
    assert t["double_blocks.18.txt_mod.lin.weight"] == (18432, 3072)
    assert t["double_blocks.0.img_attn.norm.query_norm.scale"] == (128,)
    assert t["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert t["single_blocks.37.linear2.weight"] == (3072, 15360)
    assert t["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert t["img_in.weight"] == (3072, 64)
    assert t["txt_in.weight"] == (3072, 4096)
    assert t["vector_in.in_layer.weight"] == (3072, 768)
    assert t["time_in.in_layer.weight"] == (3072, 256)
    assert t["final_layer.linear.weight"] == (64, 3072)
    assert t["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert t["text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert t["text_encoders.clip_l.transformer.text_projection.weight"] == (768, 768)
    assert t["text_encoders.t5xxl.transformer.shared.weight"] == (32128, 4096)
    assert t["text_encoders.clip_l.logit_scale"] == () and t["text_encoders.t5xxl.logit_scale"] == ()
    assert "text_encoders.t5xxl.transformer.encoder.embed_tokens.weight" not in t


def test_flux_modules_per_block():
    dev = flux.build(flux.real_config())
    per_block = Counter(m.block for m in dev.modules)
    layout = flux.block_layouts(dev.config)["flux-61"]
    assert len(layout) == 61 and layout[:3] == ("CLIP", "T5", "IN") and layout[-1] == "OUT"
    assert set(per_block) == set(layout)  # every block has modules, no module outside the layout
    assert all(per_block[f"D{i:02d}"] == 10 for i in range(19))
    assert all(per_block[f"S{i:02d}"] == 3 for i in range(38))
    assert per_block["IN"] == 8 and per_block["OUT"] == 2
    assert per_block["CLIP"] == 12 * 6 + 1  # q/k/v/out, fc1, fc2 per layer + text_projection
    assert per_block["T5"] == 24 * 7
    schnell = flux.build(flux.schnell_config())
    assert Counter(m.block for m in schnell.modules)["IN"] == 6
    # a default kohya LoRA targets every Linear of the double/single blocks: 304 modules
    assert sum(1 for m in dev.modules if m.group == "attn" and m.component == "transformer") == 304
    assert {m.group for m in dev.modules if m.block in ("IN", "OUT")} == {"extra"}


def test_flux_components_and_text_encoder_names():
    t = flux.build(flux.real_config())
    assert {m.component for m in t.modules if m.block == "CLIP"} == {"te1"}
    assert {m.component for m in t.modules if m.block == "T5"} == {"te2"}
    q = module(t, "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")
    assert q.names == {"kohya": "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                       "diffusers": "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    t5q = module(t, "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight")
    assert t5q.names == {"kohya": "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
                         "kohya_alt": "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
                         "diffusers": "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q"}
    proj = module(t, "text_encoders.clip_l.transformer.text_projection.weight")
    assert "diffusers" not in proj.names and proj.group == "extra"  # diffusers FLUX uses CLIPTextModel


def test_flux_fused_parts():
    t = flux.build(flux.real_config())
    h = 3072
    qkv = module(t, "double_blocks.4.img_attn.qkv.weight")
    assert [(p.name, p.start, p.stop) for p in qkv.parts] == [("q", 0, h), ("k", h, 2 * h), ("v", 2 * h, 3 * h)]
    assert [p.names["diffusers"] for p in qkv.parts] == [
        f"transformer.transformer_blocks.4.attn.to_{x}" for x in "qkv"]
    assert qkv.names == {"kohya": "lora_unet_double_blocks_4_img_attn_qkv"}
    txt = module(t, "double_blocks.4.txt_attn.qkv.weight")
    assert [p.names["diffusers"] for p in txt.parts] == [
        f"transformer.transformer_blocks.4.attn.add_{x}_proj" for x in "qkv"]
    lin1 = module(t, "single_blocks.7.linear1.weight")
    assert [(p.name, p.start, p.stop) for p in lin1.parts] == [
        ("q", 0, h), ("k", h, 2 * h), ("v", 2 * h, 3 * h), ("mlp", 3 * h, 7 * h)]
    assert lin1.part("mlp").names == {"diffusers": "transformer.single_transformer_blocks.7.proj_mlp"}
    assert lin1.names == {"kohya": "lora_unet_single_blocks_7_linear1"}
    assert lin1.bias == "single_blocks.7.linear1.bias"


@pytest.mark.parametrize(("bfl", "diffusers"), [
    ("double_blocks.2.img_attn.proj", "transformer_blocks.2.attn.to_out.0"),
    ("double_blocks.2.txt_attn.proj", "transformer_blocks.2.attn.to_add_out"),
    ("double_blocks.2.img_mlp.0", "transformer_blocks.2.ff.net.0.proj"),
    ("double_blocks.2.img_mlp.2", "transformer_blocks.2.ff.net.2"),
    ("double_blocks.2.txt_mlp.0", "transformer_blocks.2.ff_context.net.0.proj"),
    ("double_blocks.2.txt_mlp.2", "transformer_blocks.2.ff_context.net.2"),
    ("double_blocks.2.img_mod.lin", "transformer_blocks.2.norm1.linear"),
    ("double_blocks.2.txt_mod.lin", "transformer_blocks.2.norm1_context.linear"),
    ("single_blocks.9.linear2", "single_transformer_blocks.9.proj_out"),
    ("single_blocks.9.modulation.lin", "single_transformer_blocks.9.norm.linear"),
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
    ("final_layer.linear", "proj_out"),
])
def test_flux_module_names(bfl, diffusers):
    m = module(ALL["flux-dev"], f"{bfl}.weight")
    assert m.names == {"kohya": "lora_unet_" + bfl.replace(".", "_"), "diffusers": f"transformer.{diffusers}"}
    assert m.bias == f"{bfl}.bias"


def test_flux_swaps():
    t = ALL["flux-dev"]
    assert [m.key for m in t.modules if m.swapped_in] == ["final_layer.adaLN_modulation.1.weight"]
    assert module(t, "final_layer.adaLN_modulation.1.weight").swapped_in == {"diffusers"}
    assert t.layouts["diffusers"].swapped == {"final_layer.adaLN_modulation.1.weight",
                                              "final_layer.adaLN_modulation.1.bias"}
    assert not t.layouts["bfl"].swapped and not t.layouts["comfy"].swapped


def test_flux_single_file_layouts():
    t = ALL["flux-dev"]
    bfl, comfy = t.layouts["bfl"].key_map, t.layouts["comfy"].key_map
    assert all(bfl[k] == ((k, None),) for k in t.tensors)
    assert comfy["double_blocks.0.img_attn.qkv.weight"] == (
        ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", None),)
    te = "text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wo.weight"
    assert comfy[te] == ((te, None),)
    diff = t.layouts["diffusers"].key_map
    assert diff["single_blocks.0.linear1.bias"] == (
        ("transformer.single_transformer_blocks.0.attn.to_q.bias", (0, 3072)),
        ("transformer.single_transformer_blocks.0.attn.to_k.bias", (3072, 6144)),
        ("transformer.single_transformer_blocks.0.attn.to_v.bias", (6144, 9216)),
        ("transformer.single_transformer_blocks.0.proj_mlp.bias", (9216, 21504)),
    )
    assert diff["double_blocks.1.txt_attn.norm.key_norm.scale"] == (
        ("transformer.transformer_blocks.1.attn.norm_added_k.weight", None),)
    assert diff["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] == (
        ("text_encoder.text_model.final_layer_norm.weight", None),)
    assert diff["text_encoders.t5xxl.transformer.shared.weight"] == (("text_encoder_2.shared.weight", None),)
    absent = set(t.tensors) - set(diff)
    assert absent == {"text_encoders.clip_l.transformer.text_projection.weight", *flux.LOGIT_SCALES}


# ------------------------------------------------------------------------------------------- SD3


def test_sd3_tensor_counts_and_shapes():
    medium = ALL["sd3-sd3-medium"]
    # per block x 10 + context 10 (+ 2 + 2 q/k norms in SD3.5); the last context block: qkv + adaLN only
    assert len(transformer_keys(medium)) == 23 * 20 + (10 + 4) + 17 == 491
    assert len(transformer_keys(ALL["sd3-sd3.5-large"])) == 37 * 24 + (12 + 6) + 17
    assert len(transformer_keys(ALL["sd3-sd3.5-medium"])) == 23 * 24 + (12 + 6) + 13 * 6 + 17
    t = medium.tensors
    p = "model.diffusion_model."
    assert t[f"{p}pos_embed"] == (1, 192 * 192, 1536)
    assert t[f"{p}x_embedder.proj.weight"] == (1536, 16, 2, 2)
    assert t[f"{p}joint_blocks.0.x_block.attn.qkv.weight"] == (4608, 1536)
    assert t[f"{p}joint_blocks.0.context_block.adaLN_modulation.1.weight"] == (9216, 1536)
    assert t[f"{p}joint_blocks.23.context_block.adaLN_modulation.1.weight"] == (3072, 1536)
    assert f"{p}joint_blocks.23.context_block.attn.proj.weight" not in t
    assert f"{p}joint_blocks.23.context_block.mlp.fc1.weight" not in t
    assert f"{p}joint_blocks.22.context_block.mlp.fc1.weight" in t
    assert t[f"{p}final_layer.linear.weight"] == (64, 1536)
    assert t[f"{p}y_embedder.mlp.0.weight"] == (1536, 2048)
    assert not any(".ln_q." in k for k in t)
    m35 = ALL["sd3-sd3.5-medium"].tensors
    assert m35[f"{p}joint_blocks.12.x_block.adaLN_modulation.1.weight"] == (9 * 1536, 1536)
    assert m35[f"{p}joint_blocks.13.x_block.adaLN_modulation.1.weight"] == (6 * 1536, 1536)
    assert f"{p}joint_blocks.13.x_block.attn2.qkv.weight" not in m35
    assert m35[f"{p}joint_blocks.12.x_block.attn2.ln_q.weight"] == (64,)
    assert m35[f"{p}joint_blocks.23.context_block.attn.ln_k.weight"] == (64,)
    assert m35[f"{p}pos_embed"] == (1, 384 * 384, 1536)
    large = ALL["sd3-sd3.5-large"].tensors
    assert large[f"{p}joint_blocks.37.x_block.attn.qkv.weight"] == (3 * 2432, 2432)
    assert t["text_encoders.clip_g.transformer.text_projection.weight"] == (1280, 1280)
    assert t["text_encoders.clip_l.transformer.text_projection.weight"] == (768, 768)
    assert t["text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"] == (1280, 5120)
    assert t["text_encoders.t5xxl.transformer.encoder.block.23.layer.0.SelfAttention.o.weight"] == (4096, 4096)


@pytest.mark.parametrize(("name", "depth", "dual"), [
    ("sd3-sd3-medium", 24, 0), ("sd3-sd3.5-large", 38, 0), ("sd3-sd3.5-medium", 24, 13), ("sd3-tiny-3.5m", 2, 1)])
def test_sd3_modules_per_block(name, depth, dual):
    t = ALL[name]
    per_block = Counter(m.block for m in t.modules)
    layout = sd3.block_layouts(t.config)[f"sd3-{depth + 5}"]
    assert layout == sd3.block_layouts(t.config)["sd3"]
    assert layout[:4] == ("CLIP_L", "CLIP_G", "T5", "IN") and layout[-1] == "OUT" and len(layout) == depth + 5
    assert set(per_block) == set(layout)
    for i in range(depth):
        expected = 5 + (5 if i < depth - 1 else 2) + (2 if i < dual else 0)
        assert per_block[f"J{i:02d}"] == expected, i
    assert per_block["IN"] == 6 and per_block["OUT"] == 2
    assert {m.component for m in t.modules if m.block.startswith("J")} == {"transformer"}
    assert {m.component for m in t.modules if m.block == "CLIP_L"} == {"te1"}
    assert {m.component for m in t.modules if m.block == "CLIP_G"} == {"te2"}
    assert {m.component for m in t.modules if m.block == "T5"} == {"te3"}


def test_sd3_names_parts_and_swaps():
    t = ALL["sd3-sd3.5-medium"]
    p = "model.diffusion_model."
    qkv = module(t, f"{p}joint_blocks.3.x_block.attn.qkv.weight")
    assert qkv.names == {"kohya": "lora_unet_joint_blocks_3_x_block_attn_qkv"}
    assert [(x.name, x.start, x.stop, x.names["diffusers"]) for x in qkv.parts] == [
        (n, j * 1536, (j + 1) * 1536, f"transformer.transformer_blocks.3.attn.to_{n}") for j, n in enumerate("qkv")]
    ctx = module(t, f"{p}joint_blocks.3.context_block.attn.qkv.weight")
    assert [x.names["diffusers"] for x in ctx.parts] == [
        f"transformer.transformer_blocks.3.attn.add_{n}_proj" for n in "qkv"]
    attn2 = module(t, f"{p}joint_blocks.0.x_block.attn2.qkv.weight")
    assert attn2.names == {"kohya": "lora_unet_joint_blocks_0_x_block_attn2_qkv"}
    assert attn2.part("v").names == {"diffusers": "transformer.transformer_blocks.0.attn2.to_v"}
    expected = {
        "joint_blocks.3.x_block.attn.proj": "transformer_blocks.3.attn.to_out.0",
        "joint_blocks.0.x_block.attn2.proj": "transformer_blocks.0.attn2.to_out.0",
        "joint_blocks.3.context_block.attn.proj": "transformer_blocks.3.attn.to_add_out",
        "joint_blocks.3.x_block.mlp.fc1": "transformer_blocks.3.ff.net.0.proj",
        "joint_blocks.3.x_block.mlp.fc2": "transformer_blocks.3.ff.net.2",
        "joint_blocks.3.context_block.mlp.fc1": "transformer_blocks.3.ff_context.net.0.proj",
        "joint_blocks.3.context_block.mlp.fc2": "transformer_blocks.3.ff_context.net.2",
        "joint_blocks.3.x_block.adaLN_modulation.1": "transformer_blocks.3.norm1.linear",
        "joint_blocks.3.context_block.adaLN_modulation.1": "transformer_blocks.3.norm1_context.linear",
        "joint_blocks.23.context_block.adaLN_modulation.1": "transformer_blocks.23.norm1_context.linear",
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    for local, diffusers in expected.items():
        m = module(t, f"{p}{local}.weight")
        assert m.names == {"kohya": "lora_unet_" + local.replace(".", "_"), "diffusers": f"transformer.{diffusers}"}
    assert module(t, f"{p}x_embedder.proj.weight").kind == "conv"
    swapped = {m.key for m in t.modules if m.swapped_in}
    assert swapped == {f"{p}final_layer.adaLN_modulation.1.weight",
                       f"{p}joint_blocks.23.context_block.adaLN_modulation.1.weight"}
    assert t.layouts["diffusers"].swapped == {s for k in swapped for s in (k, k[: -len("weight")] + "bias")}
    te = module(t, "text_encoders.clip_g.transformer.text_model.encoder.layers.5.mlp.fc2.weight")
    assert te.names == {"kohya": "lora_te2_text_model_encoder_layers_5_mlp_fc2",
                        "diffusers": "text_encoder_2.text_model.encoder.layers.5.mlp.fc2"}
    t5 = module(t, "text_encoders.t5xxl.transformer.encoder.block.5.layer.1.DenseReluDense.wi_1.weight")
    assert t5.names == {"kohya": "lora_te3_encoder_block_5_layer_1_DenseReluDense_wi_1",
                        "diffusers": "text_encoder_3.encoder.block.5.layer.1.DenseReluDense.wi_1"}
    proj = module(t, "text_encoders.clip_l.transformer.text_projection.weight")
    assert proj.names["diffusers"] == "text_encoder.text_projection"


def test_sd3_layouts():
    t = ALL["sd3-sd3-medium"]
    assert set(t.layouts) == {"sd3", "diffusers"}
    assert all(t.layouts["sd3"].key_map[k] == ((k, None),) for k in t.tensors)
    diff = t.layouts["diffusers"].key_map
    assert diff["model.diffusion_model.pos_embed"] == (("transformer.pos_embed.pos_embed", None),)
    assert diff["model.diffusion_model.joint_blocks.23.context_block.attn.qkv.bias"] == tuple(
        (f"transformer.transformer_blocks.23.attn.add_{n}_proj.bias", (j * 1536, (j + 1) * 1536))
        for j, n in enumerate("qkv"))
    assert diff["text_encoders.clip_g.transformer.text_projection.weight"] == (
        ("text_encoder_2.text_projection.weight", None),)
    assert diff["text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"] == (
        ("text_encoder_3.encoder.embed_tokens.weight", None),)
    assert set(t.tensors) == set(diff)


# ------------------------------------------------------------------------------------------- all tables


@pytest.mark.parametrize("name", sorted(ALL))
def test_modules_are_consistent_with_tensors(name):
    t = ALL[name]
    for m in t.modules:
        assert t.tensors[m.key] == m.shape, m.key
        if m.bias is not None:
            assert t.tensors[m.bias] == (m.shape[0],), m.bias
        if m.parts:
            bounds = [(p.start, p.stop) for p in m.parts]
            assert bounds[0][0] == 0 and bounds[-1][1] == m.shape[0]
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), m.key
        assert m.group in ("attn", "locon", "extra")
        assert m.kind == ("conv" if len(m.shape) == 4 else "linear")
    keys = [m.key for m in t.modules]
    assert len(keys) == len(set(keys))
    for scheme in ("kohya", "diffusers"):
        names = [m.names[scheme] for m in t.modules if scheme in m.names]
        names += [p.names[scheme] for m in t.modules for p in m.parts if scheme in p.names]
        assert len(names) == len(set(names)), scheme
    assert all("kohya" in m.names for m in t.modules)
    assert all(("diffusers" in m.names) != bool(m.parts) or m.key.endswith("text_projection.weight")
               for m in t.modules)


@pytest.mark.parametrize("name", sorted(ALL))
def test_layouts_cover_tensors_and_rows(name):
    t = ALL[name]
    for layout in t.layouts.values():
        assert set(layout.key_map) <= set(t.tensors)
        assert layout.swapped <= set(layout.key_map)
        file_keys = [fk for entries in layout.key_map.values() for fk, _ in entries]
        assert len(file_keys) == len(set(file_keys)), layout.name
        for key, entries in layout.key_map.items():
            rows = [r for _, r in entries]
            if rows == [None]:
                continue
            assert None not in rows, key
            assert rows[0][0] == 0 and rows[-1][1] == t.tensors[key][0], key  # type: ignore[index]
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])), key  # type: ignore[index]
    # every transformer tensor is stored in diffusers folders
    assert set(transformer_keys(t)) <= set(t.layouts["diffusers"].key_map)


# ------------------------------------------------------------------------------------------- config recovery


@pytest.mark.parametrize("name", sorted(FLUX_CONFIGS))
def test_flux_config_round_trip(name):
    cfg = FLUX_CONFIGS[name]()
    table = flux.build(cfg)
    assert flux.config_from_shapes(table.tensors) == cfg
    comfy = {fk: table.tensors[k] for k, entries in table.layouts["comfy"].key_map.items() for fk, _ in entries}
    assert flux.config_from_shapes(comfy) == cfg
    assert sd3.config_from_shapes(table.tensors) is None
    bare = {k: table.tensors[k] for k in transformer_keys(table)}
    got = flux.config_from_shapes(bare)
    assert got == {**cfg, "clip_l": flux.FLUX_CLIP_L, "t5": flux.FLUX_T5}  # released encoders by default
    assert got["guidance"] is (name != "schnell")


def test_flux_config_from_shapes_reads_variants():
    cfg = {**flux.tiny_config(), "in_channels": 24, "out_channels": 16, "depth_double": 3, "depth_single": 1,
           "heads": 4, "mlp_ratio": 2.0, "guidance": False, "clip_l": None, "t5": None}
    got = flux.config_from_shapes(flux.build(cfg).tensors)
    assert got == {**cfg, "clip_l": flux.FLUX_CLIP_L, "t5": flux.FLUX_T5}
    assert flux.config_from_shapes({"img_in.weight": (3072, 64)}) is None


@pytest.mark.parametrize("name", sorted(SD3_CONFIGS))
def test_sd3_config_round_trip(name):
    cfg = SD3_CONFIGS[name]()
    table = sd3.build(cfg)
    assert sd3.config_from_shapes(table.tensors) == cfg
    assert flux.config_from_shapes(table.tensors) is None
    bare = {k[len(sd3.PREFIX):]: s for k, s in table.tensors.items() if k.startswith(sd3.PREFIX)}
    assert sd3.config_from_shapes(bare) == {**cfg, **sd3.REAL_ENCODERS}


def test_sd3_config_without_t5_and_odd_widths():
    cfg = {**sd3.tiny_sd35_medium_config(), "depth": 3, "hidden": 96, "heads": 3, "t5": None,
           "dual_attention_layers": (0, 2), "pos_embed_max_size": 5}
    got = sd3.config_from_shapes(sd3.build(cfg).tensors)
    assert got == {**cfg, "t5": sd3.REAL_ENCODERS["t5"]}
    assert sd3.block_layouts(cfg)["sd3"][4:7] == ("J00", "J01", "J02")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        flux.build({**flux.tiny_config(), "heads": 5})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        sd3.build({**sd3.tiny_config(), "dual_attention_layers": (2,)})
    with pytest.raises(ValueError, match="positive int"):
        sd3.build({**sd3.tiny_config(), "depth": 0})


def test_partial_or_foreign_shapes_give_no_config():
    dev = flux.build(flux.tiny_config()).tensors
    assert flux.config_from_shapes({k: s for k, s in dev.items() if k != "img_in.weight"}) is None
    assert flux.config_from_shapes({**dev, "img_in.weight": (64, 16, 1, 1)}) is None
    assert sd3.config_from_shapes({f"{sd3.PREFIX}{sd3.DETECTION_KEY}": (768,)}) is None
    medium = sd3.build(sd3.tiny_config()).tensors
    assert sd3.config_from_shapes({**medium, f"{sd3.PREFIX}pos_embed": (1, 63, 128)}) is None
    # a partial text encoder falls back to the released one instead of failing
    clip = "text_encoders.clip_l.transformer.text_model."
    partial = {k: s for k, s in dev.items() if not k.startswith(clip + "encoder.")}
    assert flux.config_from_shapes(partial)["clip_l"] == flux.FLUX_CLIP_L


def _file_shapes(table: ModelTable, layout: str, component: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    for key, entries in table.layouts[layout].key_map.items():
        shape = table.tensors[key]
        for file_key, rows in entries:
            if file_key.startswith(component):
                out[file_key[len(component):]] = shape if rows is None else (rows[1] - rows[0], *shape[1:])
    return out


@pytest.mark.parametrize(("arch", "make", "layout", "component"), [
    (flux, flux.tiny_config, "comfy", ""),
    (flux, flux.tiny_config, "bfl", ""),
    (flux, flux.schnell_config, "comfy", ""),
    (flux, flux.tiny_config, "diffusers:transformer", "transformer."),
    (sd3, sd3.tiny_config, "sd3", ""),
    (sd3, sd3.real_config, "diffusers:transformer", "transformer."),
])
def test_detection_finds_arch_layout_and_config(arch, make, layout, component):
    from lorasurgery.arch.detect import detect_checkpoint

    cfg = make()
    table = arch.build(cfg)
    det = detect_checkpoint(_file_shapes(table, layout.partition(":")[0], component))
    assert (det.arch, det.layout, det.unmapped) == (table.arch, layout, [])
    own = {k: v for k, v in cfg.items() if not isinstance(v, dict)}
    assert {k: det.config[k] for k in own} == own
