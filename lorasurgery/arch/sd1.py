"""Stable Diffusion 1.x: LDM UNet (1x1-conv ``proj_in``/``proj_out``, context 768), HF CLIP-L text encoder,
LDM VAE. Reference layout ``"ldm"`` (the single-file checkpoint); ``"diffusers"`` is the pipeline folder
(``unet/``, ``text_encoder/``, ``vae/``). kohya names use diffusers module paths (``lora_unet_down_blocks_0_...``,
``lora_te_text_model_...``). Block layouts ``sd-17`` / ``sd-26`` (blocks.md section 1).
"""
from __future__ import annotations

from typing import Mapping

from .base import ArchSpec, ModelTable, Shape
from .text_encoders import REAL_CLIP_L, TINY_CLIP_L, clip_text
from .unet import (
    REAL_SD_VAE,
    TINY_SD_VAE,
    UNetConfig,
    assemble,
    clip_config_from_shapes,
    unet_block_layouts,
    unet_config_from_shapes,
    unet_table,
    vae_config_from_shapes,
    vae_table,
)

__all__ = ["SD1", "TE_PREFIX", "CONTEXT_DIM", "attention_heads", "real_config", "tiny_config", "build",
           "config_from_shapes", "block_layouts"]

TE_PREFIX = "cond_stage_model.transformer.text_model."
CONTEXT_DIM = 768
# Keys whose presence means another SD family (SD2's OpenCLIP, SDXL's conditioner).
_FOREIGN_PREFIXES = ("cond_stage_model.model.", "conditioner.")

REAL_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(320, 640, 1280, 1280), num_res_blocks=2,
    depth=(1, 1, 1, 0), depth_middle=1, depth_output=(1, 1, 1, 0), context_dim=CONTEXT_DIM,
    linear_proj=False, time_embed_dim=1280, adm_in_channels=None,
)
# Same structure (blocks IN00..OUT11), tiny widths; the context width stays 768 so detection still works.
TINY_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(32, 64, 64, 64), num_res_blocks=2,
    depth=(1, 1, 1, 0), depth_middle=1, depth_output=(1, 1, 1, 0), context_dim=CONTEXT_DIM,
    linear_proj=False, time_embed_dim=128, adm_in_channels=None,
)


def attention_heads(config: Mapping[str, object]) -> int:
    """Heads of every UNet transformer: LDM ``num_heads: 8`` (diffusers ``attention_head_dim: 8``). Not
    visible in the weights."""
    return 8


def real_config() -> dict[str, object]:
    """SD 1.5 (``v1-5-pruned``): UNet, CLIP-L, VAE."""
    return {"unet": REAL_UNET.to_dict(), "text_encoder": dict(REAL_CLIP_L), "vae": dict(REAL_SD_VAE)}


def tiny_config() -> dict[str, object]:
    """SD1 structure at demo size."""
    return {"unet": TINY_UNET.to_dict(), "text_encoder": dict(TINY_CLIP_L), "vae": dict(TINY_SD_VAE)}


def build(config: Mapping[str, object]) -> ModelTable:
    """Table of an SD1 checkpoint: ``model.diffusion_model.``, ``first_stage_model.`` (if ``vae``),
    ``cond_stage_model.`` (if ``text_encoder``)."""
    te_cfg = config.get("text_encoder")
    te = None if te_cfg is None else clip_text(
        TE_PREFIX, te_cfg, component="te1", block="BASE", kohya_prefix="lora_te",  # type: ignore[arg-type]
        diffusers_prefix="text_encoder")
    vae = None if config.get("vae") is None else vae_table(config["vae"])  # type: ignore[arg-type]
    unet = unet_table(UNetConfig.from_mapping(config["unet"]), kohya_paths="diffusers")  # type: ignore[arg-type]
    return assemble("sd1", config, (unet, vae, te), reference_layout="ldm")


def config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """SD1 config from reference-layout shapes, or None: needs an LDM UNet with context width 768, no
    ``label_emb`` and no OpenCLIP / ``conditioner.`` keys. Text encoder and VAE are optional."""
    if any(k.startswith(_FOREIGN_PREFIXES) for k in shapes):
        return None
    unet = unet_config_from_shapes(shapes)
    if unet is None or unet.context_dim != CONTEXT_DIM or unet.adm_in_channels is not None:
        return None
    return {
        "unet": unet.to_dict(),
        "text_encoder": clip_config_from_shapes(shapes, TE_PREFIX, REAL_CLIP_L),
        "vae": vae_config_from_shapes(shapes),
    }


def block_layouts(config: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """``sd-17`` (BASE + attention blocks) and ``sd-26`` (BASE, IN00..IN11, M00, OUT00..OUT11)."""
    return unet_block_layouts(config, short="sd-17", full="sd-26")


SD1 = ArchSpec(
    name="sd1",
    title="Stable Diffusion 1.x",
    block_layouts=block_layouts,
    full_layout="sd-26",
    real_config=real_config,
    tiny_config=tiny_config,
    build=build,
    config_from_shapes=config_from_shapes,
)
