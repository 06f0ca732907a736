"""FLUX / SD3 tables against diffusers and transformers themselves.

* Real-size ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` built on the meta device from the released
  configs (written out here, no hub): their state-dict keys and shapes equal the image of our diffusers layout.
* Tiny models really instantiated: same comparison, and a strict ``load_state_dict`` of our converted tensors.
* diffusers' own single-file converters (``convert_flux_transformer_checkpoint_to_diffusers``,
  ``convert_sd3_transformer_checkpoint_to_diffusers``) applied to random reference checkpoints give exactly the
  tensors our layout map produces (row splits, shift/scale swaps), and the map inverts back to the reference.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_sd3_transformer_checkpoint_to_diffusers,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from lorasurgery.arch import flux, sd3
from lorasurgery.arch.base import ModelTable, Shape

pytestmark = pytest.mark.interop

TRANSFORMER = "transformer."
BIG = 1 << 20  # tensors with more elements are generated one column wide (the converters only move rows)


# ------------------------------------------------------------------------------------------- helpers


def flux_diffusers_kwargs(cfg) -> dict:
    """``FluxTransformer2DModel`` arguments for a FLUX table config."""
    head_dim = cfg["hidden"] // cfg["heads"]
    first = head_dim // 8
    rest = (head_dim - first) // 2
    return dict(patch_size=1, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                num_layers=cfg["depth_double"], num_single_layers=cfg["depth_single"],
                attention_head_dim=head_dim, num_attention_heads=cfg["heads"],
                joint_attention_dim=cfg["context_in"], pooled_projection_dim=cfg["vec_in"],
                guidance_embeds=cfg["guidance"], axes_dims_rope=(first, rest, rest))


def sd3_diffusers_kwargs(cfg) -> dict:
    """``SD3Transformer2DModel`` arguments for an SD3 table config."""
    return dict(sample_size=min(128, cfg["pos_embed_max_size"] * cfg["patch_size"]), patch_size=cfg["patch_size"],
                in_channels=cfg["in_channels"], num_layers=cfg["depth"],
                attention_head_dim=cfg["hidden"] // cfg["heads"], num_attention_heads=cfg["heads"],
                joint_attention_dim=cfg["context_in"], caption_projection_dim=cfg["hidden"],
                pooled_projection_dim=cfg["pooled"], out_channels=cfg["out_channels"],
                pos_embed_max_size=cfg["pos_embed_max_size"], qk_norm="rms_norm" if cfg["qk_norm"] else None,
                dual_attention_layers=tuple(cfg["dual_attention_layers"]))


def diffusers_image(table: ModelTable, component: str) -> dict[str, Shape]:
    """Keys and shapes of one diffusers component folder, as our layout map describes it."""
    out: dict[str, Shape] = {}
    for key, entries in table.layouts["diffusers"].key_map.items():
        shape = table.tensors[key]
        for file_key, rows in entries:
            if file_key.startswith(component):
                out[file_key[len(component):]] = shape if rows is None else (rows[1] - rows[0], *shape[1:])
    return out


def state_shapes(model: torch.nn.Module) -> dict[str, Shape]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_reference(table: ModelTable, keys, seed: int, *, narrow: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors per reference key. ``narrow``: tensors above :data:`BIG` elements keep their rows but get
    size 1 in every other dimension; row splits, swaps and renames (all the converters do) act the same."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        shape = table.tensors[key]
        n = 1
        for s in shape:
            n *= s
        if narrow and n > BIG:
            shape = (shape[0], *(1,) * (len(shape) - 1))
        out[key] = torch.randn(*shape, generator=g)
    return out


def to_layout(table: ModelTable, layout: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference tensors written in ``layout``: row splits and half swaps applied."""
    lay = table.layouts[layout]
    out = {}
    for key, t in tensors.items():
        if key in lay.swapped:
            first, second = t.chunk(2, dim=0)
            t = torch.cat([second, first])
        for file_key, rows in lay.key_map[key]:
            out[file_key] = t if rows is None else t[rows[0]:rows[1]]
    return out


def from_layout(table: ModelTable, layout: str, files: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """Re-assemble reference tensors from a file of ``layout`` (inverse of :func:`to_layout`)."""
    lay = table.layouts[layout]
    out = {}
    for key in keys:
        t = torch.cat([files[fk] for fk, _ in lay.key_map[key]])
        if key in lay.swapped:
            first, second = t.chunk(2, dim=0)
            t = torch.cat([second, first])
        out[key] = t
    return out


def transformer_keys(table: ModelTable) -> list[str]:
    return [k for k in table.tensors if not k.startswith("text_encoders.")]


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not bad, bad[:5]


# ------------------------------------------------------------------------------------------- key images


@pytest.mark.parametrize(("make", "count"), [(flux.real_config, 1160), (flux.schnell_config, 1156)])
def test_real_flux_keys_match_diffusers(make, count):
    cfg = make()
    table = flux.build(cfg)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_diffusers_kwargs(cfg))
    theirs = state_shapes(model)
    assert len(theirs) == count
    assert diffusers_image(table, TRANSFORMER) == theirs


@pytest.mark.parametrize(("make", "count"), [
    (sd3.real_config, 683), (sd3.sd35_large_config, 1227), (sd3.sd35_medium_config, 909)])
def test_real_sd3_keys_match_diffusers(make, count):
    cfg = make()
    table = sd3.build(cfg)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**sd3_diffusers_kwargs(cfg))
    theirs = state_shapes(model)
    assert len(theirs) == count
    assert diffusers_image(table, TRANSFORMER) == theirs


@pytest.mark.parametrize(("arch", "make", "cls", "kwargs"), [
    (flux, flux.tiny_config, FluxTransformer2DModel, flux_diffusers_kwargs),
    (sd3, sd3.tiny_config, SD3Transformer2DModel, sd3_diffusers_kwargs),
    (sd3, sd3.tiny_sd35_medium_config, SD3Transformer2DModel, sd3_diffusers_kwargs),
])
def test_tiny_transformers_load_our_diffusers_layout(arch, make, cls, kwargs):
    cfg = make()
    table = arch.build(cfg)
    model = cls(**kwargs(cfg))
    assert diffusers_image(table, TRANSFORMER) == state_shapes(model)
    ref = random_reference(table, transformer_keys(table), seed=1)
    files = to_layout(table, "diffusers", ref)
    model.load_state_dict({k[len(TRANSFORMER):]: v for k, v in files.items()}, strict=True)
    back = {TRANSFORMER + k: v for k, v in model.state_dict().items()}
    assert_same_tensors(from_layout(table, "diffusers", back, ref), ref)


def test_tiny_flux_text_encoders_match_transformers():
    cfg = flux.tiny_config()
    table = flux.build(cfg)
    clip, t5 = cfg["clip_l"], cfg["t5"]
    clip_model = CLIPTextModel(CLIPTextConfig(
        hidden_size=clip["hidden"], intermediate_size=clip["intermediate"], num_hidden_layers=clip["layers"],
        num_attention_heads=clip["heads"], vocab_size=clip["vocab"], max_position_embeddings=clip["positions"]))
    assert diffusers_image(table, "text_encoder.") == state_shapes(clip_model)
    t5_model = T5EncoderModel(T5Config(
        d_model=t5["hidden"], d_kv=t5["head_dim"], d_ff=t5["intermediate"], num_layers=t5["layers"],
        num_heads=t5["heads"], vocab_size=t5["vocab"], relative_attention_num_buckets=t5["buckets"],
        feed_forward_proj="gated-gelu"))
    theirs = state_shapes(t5_model)
    assert theirs.pop("encoder.embed_tokens.weight") == theirs["shared.weight"]  # tied; ComfyUI keeps `shared`
    assert diffusers_image(table, "text_encoder_2.") == theirs


def test_tiny_sd3_text_encoders_match_transformers():
    cfg = sd3.tiny_config()
    table = sd3.build(cfg)
    for component, name in (("text_encoder.", "clip_l"), ("text_encoder_2.", "clip_g")):
        c = cfg[name]
        model = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
            num_attention_heads=c["heads"], vocab_size=c["vocab"], max_position_embeddings=c["positions"],
            projection_dim=c["projection"]))
        assert diffusers_image(table, component) == state_shapes(model), name
    t5 = cfg["t5"]
    t5_model = T5EncoderModel(T5Config(
        d_model=t5["hidden"], d_kv=t5["head_dim"], d_ff=t5["intermediate"], num_layers=t5["layers"],
        num_heads=t5["heads"], vocab_size=t5["vocab"], relative_attention_num_buckets=t5["buckets"],
        feed_forward_proj="gated-gelu"))
    assert diffusers_image(table, "text_encoder_3.") == state_shapes(t5_model)


# ------------------------------------------------------------------------------------------- converters


@pytest.mark.parametrize("make", [sd3.tiny_config, sd3.tiny_sd35_medium_config])
@pytest.mark.parametrize("prefixed", [True, False])
def test_sd3_map_matches_diffusers_single_file_converter(make, prefixed):
    table = sd3.build(make())
    ref = random_reference(table, transformer_keys(table), seed=2)
    checkpoint = {(k if prefixed else k[len(sd3.PREFIX):]): v for k, v in ref.items()}
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint  # the converter consumed every reference tensor
    ours = {k[len(TRANSFORMER):]: v for k, v in to_layout(table, "diffusers", ref).items()}
    assert_same_tensors(ours, theirs)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_map_matches_diffusers_single_file_converter(guidance):
    # diffusers' FLUX converter hard-codes inner_dim = 3072 for the linear1 split, so the check runs at the real
    # width with one double and one single block (large tensors one column wide).
    cfg = {**flux.tiny_config(), "hidden": 3072, "heads": 24, "depth_double": 1, "depth_single": 1,
           "guidance": guidance, "clip_l": None, "t5": None}
    table = flux.build(cfg)
    ref = random_reference(table, list(table.tensors), seed=3, narrow=True)
    assert ref["single_blocks.0.linear1.weight"].shape == (7 * 3072, 1)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ref.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    assert not checkpoint
    ours = {k[len(TRANSFORMER):]: v for k, v in to_layout(table, "diffusers", ref).items()}
    assert_same_tensors(ours, theirs)
    files = {TRANSFORMER + k: v for k, v in theirs.items()}
    assert_same_tensors(from_layout(table, "diffusers", files, ref), ref)
