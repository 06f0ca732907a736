"""Stable Diffusion 2.x: LDM UNet (Linear ``proj_in``/``proj_out``, context 1024), OpenCLIP ViT-H text tower
(``cond_stage_model.model.``, fused ``attn.in_proj_weight``; kohya and diffusers name it as HF CLIP, diffusers
keeps 23 of its 24 layers and no projection), LDM VAE. Same UNet block structure and layouts as SD1
(``sd-17`` / ``sd-26``). 512-base vs 768-v (v-prediction) is not visible in the weights.
"""
from __future__ import annotations

from typing import Mapping

from .base import ArchSpec, ModelTable, Shape
from .text_encoders import REAL_OPENCLIP_H, TINY_OPENCLIP_H, openclip_text
from .unet import (
    REAL_SD_VAE,
    TINY_SD_VAE,
    UNetConfig,
    assemble,
    heads_for_width,
    openclip_config_from_shapes,
    unet_block_layouts,
    unet_config_from_shapes,
    unet_table,
    vae_config_from_shapes,
    vae_table,
)

__all__ = ["SD2", "TE_PREFIX", "CONTEXT_DIM", "attention_heads", "real_config", "tiny_config", "build",
           "config_from_shapes", "block_layouts"]

TE_PREFIX = "cond_stage_model.model."
CONTEXT_DIM = 1024
# Keys whose presence means another SD family (SD1's HF CLIP, SDXL's conditioner).
_FOREIGN_PREFIXES = ("cond_stage_model.transformer.", "conditioner.")

REAL_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(320, 640, 1280, 1280), num_res_blocks=2,
    depth=(1, 1, 1, 0), depth_middle=1, depth_output=(1, 1, 1, 0), context_dim=CONTEXT_DIM,
    linear_proj=True, time_embed_dim=1280, adm_in_channels=None,
)
TINY_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(32, 64, 64, 64), num_res_blocks=2,
    depth=(1, 1, 1, 0), depth_middle=1, depth_output=(1, 1, 1, 0), context_dim=CONTEXT_DIM,
    linear_proj=True, time_embed_dim=128, adm_in_channels=None,
)


def attention_heads(config: Mapping[str, object]) -> tuple[int, ...]:
    """Heads per level (LDM ``num_head_channels: 64``; diffusers ``attention_head_dim`` [5, 10, 20, 20])."""
    return tuple(heads_for_width(c) for c in UNetConfig.from_mapping(config["unet"]).channels)  # type: ignore[arg-type]


def real_config() -> dict[str, object]:
    """SD 2.x (512-base and 768-v share the weights' structure): UNet, OpenCLIP-H, VAE."""
    return {"unet": REAL_UNET.to_dict(), "text_encoder": dict(REAL_OPENCLIP_H), "vae": dict(REAL_SD_VAE)}


def tiny_config() -> dict[str, object]:
    """SD2 structure at demo size (context width 1024 kept for detection)."""
    return {"unet": TINY_UNET.to_dict(), "text_encoder": dict(TINY_OPENCLIP_H), "vae": dict(TINY_SD_VAE)}


def build(config: Mapping[str, object]) -> ModelTable:
    """Table of an SD2 checkpoint: ``model.diffusion_model.``, ``first_stage_model.`` (if ``vae``),
    ``cond_stage_model.model.`` (if ``text_encoder``)."""
    te_cfg = config.get("text_encoder")
    te = None if te_cfg is None else openclip_text(
        TE_PREFIX, te_cfg, component="te1", block="BASE", kohya_prefix="lora_te",  # type: ignore[arg-type]
        diffusers_prefix="text_encoder")
    vae = None if config.get("vae") is None else vae_table(config["vae"])  # type: ignore[arg-type]
    unet = unet_table(UNetConfig.from_mapping(config["unet"]), kohya_paths="diffusers")  # type: ignore[arg-type]
    return assemble("sd2", config, (unet, vae, te), reference_layout="ldm")


def config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """SD2 config from reference-layout shapes, or None: needs an LDM UNet with context width 1024 and no
    ``label_emb`` (unCLIP is not supported), and no HF-CLIP / ``conditioner.`` keys. TE and VAE are optional."""
    if any(k.startswith(_FOREIGN_PREFIXES) for k in shapes):
        return None
    unet = unet_config_from_shapes(shapes)
    if unet is None or unet.context_dim != CONTEXT_DIM or unet.adm_in_channels is not None:
        return None
    return {
        "unet": unet.to_dict(),
        "text_encoder": openclip_config_from_shapes(shapes, TE_PREFIX, REAL_OPENCLIP_H, diffusers_drops_last=True),
        "vae": vae_config_from_shapes(shapes),
    }


def block_layouts(config: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """``sd-17`` and ``sd-26``, as for SD1."""
    return unet_block_layouts(config, short="sd-17", full="sd-26")


SD2 = ArchSpec(
    name="sd2",
    title="Stable Diffusion 2.x",
    block_layouts=block_layouts,
    full_layout="sd-26",
    real_config=real_config,
    tiny_config=tiny_config,
    build=build,
    config_from_shapes=config_from_shapes,
)
