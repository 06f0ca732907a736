"""Text-encoder tables checked against the real model classes and diffusers' own OpenCLIP conversion."""
from __future__ import annotations

from typing import Mapping

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)
from transformers.models.clip.modeling_clip import CLIPAttention

from lorasurgery.arch.text_encoders import (
    REAL_CLIP_G,
    REAL_CLIP_L,
    REAL_OPENCLIP_BIGG,
    REAL_OPENCLIP_H,
    REAL_T5XXL,
    TINY_CLIP_G,
    TINY_CLIP_L,
    TINY_OPENCLIP_BIGG,
    TINY_OPENCLIP_H,
    TINY_T5,
    EncoderTable,
    clip_text,
    openclip_text,
    t5_encoder,
)

SD1_PREFIX = "cond_stage_model.transformer.text_model."
SD2_PREFIX = "cond_stage_model.model."
SDXL_TE2_PREFIX = "conditioner.embedders.1.model."
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer.text_model."
T5_PREFIX = "text_encoders.t5xxl.transformer."


# ------------------------------------------------------------------------------------------ helpers


def _clip(cfg: Mapping, prefix: str = SD1_PREFIX, kp: str = "lora_te", dp: str = "text_encoder") -> EncoderTable:
    return clip_text(prefix, cfg, component="te1", block="BASE", kohya_prefix=kp, diffusers_prefix=dp)


def _openclip(cfg: Mapping, prefix: str = SDXL_TE2_PREFIX, kp: str = "lora_te2",
              dp: str = "text_encoder_2") -> EncoderTable:
    return openclip_text(prefix, cfg, component="te2", block="BASE", kohya_prefix=kp, diffusers_prefix=dp)


def _t5(cfg: Mapping) -> EncoderTable:
    return t5_encoder(T5_PREFIX, cfg, component="te3", block="T5", kohya_prefix="lora_te3",
                      diffusers_prefix="text_encoder_3")


def _hf_clip(cfg: Mapping, *, layers: int | None = None, projection: bool) -> torch.nn.Module:
    """An HF CLIP text model with the table config's sizes (on the current default device)."""
    config = CLIPTextConfig(
        hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"] if layers is None else layers,
        num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"], vocab_size=cfg["vocab"],
        max_position_embeddings=cfg["positions"], projection_dim=cfg.get("projection") or cfg["hidden"],
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _hf_t5(cfg: Mapping) -> torch.nn.Module:
    config = T5Config(
        d_model=cfg["hidden"], d_kv=cfg["head_dim"], d_ff=cfg["intermediate"], num_layers=cfg["layers"],
        num_heads=cfg["heads"], vocab_size=cfg["vocab"], relative_attention_num_buckets=cfg["buckets"],
        feed_forward_proj="gated-gelu",
    )
    return T5EncoderModel(config)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _diffusers_image(table: EncoderTable, component: str) -> dict[str, tuple[int, ...]]:
    """Diffusers file keys (component prefix removed) -> shapes, in table order, from the map."""
    out: dict[str, tuple[int, ...]] = {}
    for ref, entries in table.diffusers_map.items():
        shape = table.tensors[ref]
        if ref in table.transposed:
            shape = shape[::-1]
        for file_key, rows in entries:
            assert file_key.startswith(component + ".")
            sub = shape if rows is None else (rows[1] - rows[0], *shape[1:])
            out[file_key[len(component) + 1:]] = sub
    return out


def _to_diffusers(table: EncoderTable, ckpt: Mapping[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """Apply the table's map to reference tensors: the diffusers component state dict it describes."""
    out = {}
    for ref, entries in table.diffusers_map.items():
        t = ckpt[ref].T if ref in table.transposed else ckpt[ref]
        for file_key, rows in entries:
            out[file_key[len(component) + 1:]] = t if rows is None else t[rows[0]:rows[1]]
    return out


def _random_checkpoint(table: EncoderTable, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in table.tensors.items()}


def _targets(table: EncoderTable, group: str = "attn") -> int:
    """LoRA targets of a group, counting each part of a fused weight."""
    return sum(len(m.parts) or 1 for m in table.modules if m.group == group)


# ------------------------------------------------------------------------------------------ HF CLIP


@pytest.mark.parametrize("cfg", [TINY_CLIP_L, REAL_CLIP_L], ids=["tiny", "real"])
def test_clip_l_matches_hf_clip_text_model(cfg):
    table = _clip(cfg)
    with torch.device("meta"):
        hf = _shapes(_hf_clip(cfg, projection=False))
    image = _diffusers_image(table, "text_encoder")
    assert list(image.items()) == list(hf.items())
    # reference keys are the same HF keys under the prefix, in the same order, plus the position_ids buffer
    assert list(table.tensors) == [f"{SD1_PREFIX}embeddings.position_ids"] + [
        SD1_PREFIX + k.removeprefix("text_model.") for k in hf
    ]
    assert table.tensors[f"{SD1_PREFIX}embeddings.position_ids"] == (1, 77)
    assert f"{SD1_PREFIX}embeddings.position_ids" not in table.diffusers_map


def test_clip_l_real_counts_and_names():
    table = _clip(REAL_CLIP_L)
    assert len(table.tensors) == 197  # 196 weights + position_ids in the SD1.5 release file
    assert _targets(table) == 72 and len(table.modules) == 72
    q = next(m for m in table.modules if m.key == f"{SD1_PREFIX}encoder.layers.11.self_attn.q_proj.weight")
    assert q.names == {
        "kohya": "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
        "diffusers": "text_encoder.text_model.encoder.layers.11.self_attn.q_proj",
    }
    assert q.bias == f"{SD1_PREFIX}encoder.layers.11.self_attn.q_proj.bias"
    fc1 = next(m for m in table.modules if m.names["kohya"].endswith("layers_0_mlp_fc1"))
    assert fc1.shape == (3072, 768) and fc1.component == "te1" and fc1.block == "BASE"
    assert {m.names["kohya"].split("layers_0_")[-1] for m in table.modules if "_layers_0_" in m.names["kohya"]} == {
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"}


@pytest.mark.parametrize("cfg", [TINY_CLIP_G, REAL_CLIP_G], ids=["tiny", "real"])
def test_clip_g_matches_hf_with_projection(cfg):
    table = _clip(cfg, SD3_CLIP_G_PREFIX, "lora_te2", "text_encoder_2")
    with torch.device("meta"):
        hf = _shapes(_hf_clip(cfg, projection=True))
    assert list(_diffusers_image(table, "text_encoder_2").items()) == list(hf.items())
    proj = "text_encoders.clip_g.transformer.text_projection.weight"
    assert list(table.tensors)[-1] == proj
    module = next(m for m in table.modules if m.key == proj)
    assert module.group == "extra" and not module.transposed and module.bias is None
    assert module.names == {"kohya": "lora_te2_text_projection", "diffusers": "text_encoder_2.text_projection"}
    assert not table.transposed
    if cfg is REAL_CLIP_G:
        assert _targets(table) == 192 and len(table.tensors) == 32 * 16 + 5


def test_clip_projection_needs_text_model_prefix():
    with pytest.raises(ValueError, match="text_model"):
        _clip(TINY_CLIP_G, "text_encoders.clip_g.transformer.")
    # without a projection any prefix works (old SD1 files lack the ``text_model.`` level)
    table = _clip(TINY_CLIP_L, "cond_stage_model.transformer.")
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc2.weight" in table.tensors


def test_missing_or_bad_config_values_raise():
    cfg = dict(TINY_CLIP_L)
    del cfg["intermediate"]
    with pytest.raises(KeyError, match="intermediate"):
        _clip(cfg)
    with pytest.raises(ValueError, match="hidden"):
        _clip({**TINY_CLIP_L, "hidden": "32"})
    with pytest.raises(ValueError, match="diffusers_layers"):
        _openclip({**TINY_OPENCLIP_BIGG, "diffusers_layers": 3})


# ------------------------------------------------------------------------------------------ OpenCLIP


@pytest.mark.parametrize(
    ("cfg", "prefix", "layers", "projection", "count"),
    [
        (TINY_OPENCLIP_H, SD2_PREFIX, 1, False, 2 * 12 + 6),
        (REAL_OPENCLIP_H, SD2_PREFIX, 23, False, 24 * 12 + 6),
        (TINY_OPENCLIP_BIGG, SDXL_TE2_PREFIX, 2, True, 2 * 12 + 6),
        (REAL_OPENCLIP_BIGG, SDXL_TE2_PREFIX, 32, True, 32 * 12 + 6),
    ],
    ids=["tiny-h", "real-h", "tiny-bigg", "real-bigg"],
)
def test_openclip_diffusers_image_matches_hf(cfg, prefix, layers, projection, count):
    table = _openclip(cfg, prefix)
    assert len(table.tensors) == count
    with torch.device("meta"):
        hf = _shapes(_hf_clip(cfg, layers=layers, projection=projection))
    assert _diffusers_image(table, "text_encoder_2") == hf
    # every diffusers key is produced exactly once
    file_keys = [k for entries in table.diffusers_map.values() for k, _ in entries]
    assert len(file_keys) == len(set(file_keys)) == len(hf)


def test_openclip_bigg_reference_keys():
    table = _openclip(REAL_OPENCLIP_BIGG)
    p = SDXL_TE2_PREFIX
    assert table.tensors[f"{p}text_projection"] == (1280, 1280)
    assert table.tensors[f"{p}logit_scale"] == ()
    assert table.tensors[f"{p}positional_embedding"] == (77, 1280)
    assert table.tensors[f"{p}token_embedding.weight"] == (49408, 1280)
    assert table.tensors[f"{p}transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert table.tensors[f"{p}transformer.resblocks.31.attn.in_proj_bias"] == (3840,)
    assert table.tensors[f"{p}transformer.resblocks.9.mlp.c_proj.bias"] == (1280,)  # SDXL detection key
    assert table.tensors[f"{p}transformer.resblocks.0.mlp.c_fc.weight"] == (5120, 1280)
    assert table.transposed == frozenset({f"{p}text_projection"})
    assert table.diffusers_map[f"{p}transformer.resblocks.0.attn.in_proj_weight"] == (
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight", (0, 1280)),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.weight", (1280, 2560)),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.weight", (2560, 3840)),
    )


def test_openclip_bigg_modules():
    table = _openclip(REAL_OPENCLIP_BIGG)
    assert _targets(table) == 192
    fused = [m for m in table.modules if m.parts]
    assert len(fused) == 32
    m = fused[5]
    assert m.key == f"{SDXL_TE2_PREFIX}transformer.resblocks.5.attn.in_proj_weight" and m.names == {}
    assert m.shape == (3840, 1280) and m.bias == f"{SDXL_TE2_PREFIX}transformer.resblocks.5.attn.in_proj_bias"
    assert [(p.name, p.start, p.stop) for p in m.parts] == [("q", 0, 1280), ("k", 1280, 2560), ("v", 2560, 3840)]
    assert m.part("v").names == {
        "kohya": "lora_te2_text_model_encoder_layers_5_self_attn_v_proj",
        "diffusers": "text_encoder_2.text_model.encoder.layers.5.self_attn.v_proj",
    }
    c_fc = next(x for x in table.modules if x.key.endswith("resblocks.5.mlp.c_fc.weight"))
    assert c_fc.names["kohya"] == "lora_te2_text_model_encoder_layers_5_mlp_fc1" and c_fc.shape == (5120, 1280)
    proj = next(x for x in table.modules if x.key == f"{SDXL_TE2_PREFIX}text_projection")
    assert proj.transposed and proj.group == "extra" and proj.bias is None
    assert proj.names == {"kohya": "lora_te2_text_projection", "diffusers": "text_encoder_2.text_projection"}


def test_openclip_h_last_layer_is_extra():
    """SD2 keeps all 24 resblocks in the file; diffusers/kohya use 23: layer 23 is no default target."""
    table = _openclip(REAL_OPENCLIP_H, SD2_PREFIX, "lora_te", "text_encoder")
    assert _targets(table) == 23 * 6
    extra = [m for m in table.modules if m.group == "extra"]
    assert {m.key for m in extra if "resblocks" in m.key} == {
        f"{SD2_PREFIX}transformer.resblocks.23.{s}"
        for s in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    }
    for m in extra:
        assert "diffusers" not in m.names and all("diffusers" not in p.names for p in m.parts)
    assert next(m for m in extra if m.parts).part("q").names["kohya"] == (
        "lora_te_text_model_encoder_layers_23_self_attn_q_proj")
    assert not any("resblocks.23." in k for k in table.diffusers_map)
    assert f"{SD2_PREFIX}text_projection" not in table.diffusers_map and not table.transposed


@pytest.mark.parametrize(
    ("cfg", "prefix"), [(TINY_OPENCLIP_BIGG, SDXL_TE2_PREFIX), (TINY_OPENCLIP_H, SD2_PREFIX)], ids=["bigg", "h"]
)
def test_openclip_map_values_match_diffusers_conversion(cfg, prefix):
    """Our map applied to random reference tensors equals diffusers' ``convert_open_clip_checkpoint``."""
    table = _openclip(cfg, prefix)
    ckpt = _random_checkpoint(table)
    model = _hf_clip(cfg, projection=True)
    theirs = convert_open_clip_checkpoint(model, ckpt, prefix=prefix)
    ours = _to_diffusers(table, ckpt, "text_encoder_2")
    # diffusers converts every resblock present (its SD2 ignore list names the real file's 24th block only)
    # and the SD2 text_projection; our map leaves out exactly what the table says diffusers drops
    dropped = {k for k in theirs if k not in ours}
    kept_layers = cfg.get("diffusers_layers", cfg["layers"])
    expected_dropped = {k for k in theirs if any(f"layers.{i}." in k for i in range(kept_layers, cfg["layers"]))}
    assert dropped == expected_dropped
    # SD2's text_projection: diffusers ignores it (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE), the table drops it too
    assert ("text_projection.weight" in ours) == cfg["diffusers_projection"] == ("text_projection.weight" in theirs)
    assert set(ours) <= set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    # the converted state dict loads into the HF model with nothing missing (bigG: full model)
    if cfg is TINY_OPENCLIP_BIGG:
        result = model.load_state_dict(ours, strict=True)
        assert not result.missing_keys and not result.unexpected_keys


def test_openclip_in_proj_rows_are_q_k_v():
    """Row order check by computation: torch's MultiheadAttention with the fused weight equals HF
    CLIPAttention with q/k/v/out taken through the table's map."""
    cfg = TINY_OPENCLIP_BIGG
    table = _openclip(cfg)
    ckpt = _random_checkpoint(table, seed=3)
    ours = _to_diffusers(table, ckpt, "text_encoder_2")
    h, ref, hf = cfg["hidden"], f"{SDXL_TE2_PREFIX}transformer.resblocks.0.", "text_model.encoder.layers.0."
    mha = torch.nn.MultiheadAttention(h, cfg["heads"], batch_first=True)
    mha.load_state_dict({
        "in_proj_weight": ckpt[ref + "attn.in_proj_weight"], "in_proj_bias": ckpt[ref + "attn.in_proj_bias"],
        "out_proj.weight": ckpt[ref + "attn.out_proj.weight"], "out_proj.bias": ckpt[ref + "attn.out_proj.bias"],
    })
    config = CLIPTextConfig(hidden_size=h, num_attention_heads=cfg["heads"])
    config._attn_implementation = "eager"
    attn = CLIPAttention(config)
    attn.load_state_dict({k.removeprefix(hf + "self_attn."): v for k, v in ours.items()
                          if k.startswith(hf + "self_attn.")})
    x = torch.randn(2, 5, h, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        got = attn(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_openclip_text_projection_transpose_by_computation():
    """OpenCLIP applies ``x @ P``; the mapped HF ``text_projection`` Linear gives the same result."""
    table = _openclip({**TINY_OPENCLIP_BIGG, "projection": 24})
    key = f"{SDXL_TE2_PREFIX}text_projection"
    assert table.tensors[key] == (32, 24)
    ckpt = _random_checkpoint(table)
    weight = _to_diffusers(table, ckpt, "text_encoder_2")["text_projection.weight"]
    assert weight.shape == (24, 32)
    x = torch.randn(3, 32)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight), x @ ckpt[key])


# ------------------------------------------------------------------------------------------ T5


@pytest.mark.parametrize("cfg", [TINY_T5, REAL_T5XXL], ids=["tiny", "real"])
def test_t5_matches_hf_t5_encoder(cfg):
    table = _t5(cfg)
    with torch.device("meta"):
        hf = _shapes(_hf_t5(cfg))
    assert list(_diffusers_image(table, "text_encoder_3").items()) == list(hf.items())
    assert list(table.tensors) == [T5_PREFIX + k for k in hf]
    assert not table.transposed


def test_t5_xxl_modules():
    table = _t5(REAL_T5XXL)
    assert len(table.modules) == 24 * 7 and _targets(table) == 168
    assert all(m.bias is None and m.group == "attn" and m.component == "te3" for m in table.modules)
    q = table.modules[0]
    assert q.key == f"{T5_PREFIX}encoder.block.0.layer.0.SelfAttention.q.weight" and q.shape == (4096, 4096)
    assert q.names == {"kohya": "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
                       "diffusers": "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q"}
    wo = next(m for m in table.modules if m.key.endswith("block.23.layer.1.DenseReluDense.wo.weight"))
    assert wo.shape == (4096, 10240) and wo.names["kohya"] == "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo"
    assert table.tensors[f"{T5_PREFIX}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    assert not any("relative_attention_bias" in k and ".block.0." not in k for k in table.tensors)
    no_embed = _t5({**REAL_T5XXL, "embed_tokens": False})
    assert set(table.tensors) - set(no_embed.tensors) == {f"{T5_PREFIX}encoder.embed_tokens.weight"}


# ------------------------------------------------------------------------------------------ all tables


ALL_TABLES = {
    "clip-l": lambda: _clip(REAL_CLIP_L),
    "clip-g": lambda: _clip(REAL_CLIP_G, SD3_CLIP_G_PREFIX, "lora_te2", "text_encoder_2"),
    "openclip-h": lambda: _openclip(REAL_OPENCLIP_H, SD2_PREFIX, "lora_te", "text_encoder"),
    "openclip-bigg": lambda: _openclip(REAL_OPENCLIP_BIGG),
    "t5": lambda: _t5(REAL_T5XXL),
}


@pytest.mark.parametrize("name", list(ALL_TABLES))
def test_modules_consistent_with_tensors_and_map(name):
    table = ALL_TABLES[name]()
    component = next(iter(table.diffusers_map.values()))[0][0].split(".")[0]
    kohya_names: list[str] = []
    for m in table.modules:
        assert table.tensors[m.key] == m.shape
        if m.bias is not None:
            assert table.tensors[m.bias] == (m.shape[0],)
        entries = table.diffusers_map.get(m.key, ())
        if m.parts:
            assert m.parts[0].start == 0 and m.parts[-1].stop == m.shape[0]
            assert all(a.stop == b.start for a, b in zip(m.parts, m.parts[1:]))
            kohya_names += [p.names["kohya"] for p in m.parts]
            if "diffusers" in m.parts[0].names:
                assert entries == tuple((p.names["diffusers"] + ".weight", (p.start, p.stop)) for p in m.parts)
        else:
            kohya_names.append(m.names["kohya"])
            if "diffusers" in m.names:
                assert entries == ((m.names["diffusers"] + ".weight", None),)
                assert m.names["diffusers"].startswith(component + ".")
    assert len(kohya_names) == len(set(kohya_names))
    assert all(key in table.tensors for key in table.diffusers_map)
    assert table.transposed <= set(table.diffusers_map)
