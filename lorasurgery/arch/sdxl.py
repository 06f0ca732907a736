"""Stable Diffusion XL (base and refiner): sgm UNet (3 levels, transformer depths 0/2/10, Linear projections,
context 2048, ``label_emb`` for pooled text + size/crop conditioning), HF CLIP-L at ``conditioner.embedders.0``
and OpenCLIP bigG at ``conditioner.embedders.1`` (refiner: bigG alone at ``embedders.0``, context 1280, four
levels of 384..1536 channels, depth 4), LDM VAE. Reference layout ``"sgm"``; ``"diffusers"`` is the pipeline
folder (``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``). kohya names use LDM paths
(``lora_unet_input_blocks_4_1_...``, ``lora_te1_``, ``lora_te2_``). Block layouts ``sdxl-12`` / ``sdxl-20``.
"""
from __future__ import annotations

from typing import Mapping

from .base import ArchSpec, ModelTable, Shape
from .text_encoders import REAL_CLIP_L, REAL_OPENCLIP_BIGG, TINY_CLIP_L, TINY_OPENCLIP_BIGG, clip_text, openclip_text
from .unet import (
    REAL_SD_VAE,
    TINY_SD_VAE,
    UNetConfig,
    assemble,
    clip_config_from_shapes,
    heads_for_width,
    openclip_config_from_shapes,
    unet_block_layouts,
    unet_config_from_shapes,
    unet_table,
    vae_config_from_shapes,
    vae_table,
)

__all__ = ["SDXL", "TE1_PREFIX", "CONTEXT_DIMS", "te2_prefix", "attention_heads", "real_config",
           "refiner_config", "tiny_config", "build", "config_from_shapes", "block_layouts"]

TE1_PREFIX = "conditioner.embedders.0.transformer.text_model."
_EMBEDDERS = "conditioner.embedders."
# Cross-attention widths: base (CLIP-L 768 + bigG 1280 hidden states) and refiner (bigG alone).
CONTEXT_DIMS = (2048, 1280)
# Keys whose presence means SD1/SD2.
_FOREIGN_PREFIXES = ("cond_stage_model.",)

REAL_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(320, 640, 1280), num_res_blocks=2,
    depth=(0, 2, 10), depth_middle=10, depth_output=(0, 2, 10), context_dim=2048,
    linear_proj=True, time_embed_dim=1280, adm_in_channels=2816,  # pooled 1280 + 6 x 256 size/crop embeddings
)
# sgm refiner: model_channels 384, channel_mult [1, 2, 4, 4], attention at levels 1 and 2, depth 4,
# context 1280, adm 2560 (pooled 1280 + 5 x 256: sizes, crop, aesthetic score).
REFINER_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(384, 768, 1536, 1536), num_res_blocks=2,
    depth=(0, 4, 4, 0), depth_middle=4, depth_output=(0, 4, 4, 0), context_dim=1280,
    linear_proj=True, time_embed_dim=1536, adm_in_channels=2560,
)
# SDXL structure (blocks IN00..OUT08, attention-free top level, uneven depths so transformer_blocks.1
# exists) at demo size; context 2048 kept for detection; adm = pooled 32 + 6 x 8.
TINY_UNET = UNetConfig(
    in_channels=4, out_channels=4, channels=(32, 64, 64), num_res_blocks=2,
    depth=(0, 1, 2), depth_middle=2, depth_output=(0, 1, 2), context_dim=2048,
    linear_proj=True, time_embed_dim=128, adm_in_channels=80,
)


def te2_prefix(embedder: int) -> str:
    """Reference prefix of the OpenCLIP bigG tower at ``conditioner.embedders.<embedder>``."""
    return f"{_EMBEDDERS}{embedder}.model."


def attention_heads(config: Mapping[str, object]) -> tuple[int, ...]:
    """Heads per level (sgm ``num_head_channels: 64``; diffusers ``attention_head_dim`` [5, 10, 20])."""
    return tuple(heads_for_width(c) for c in UNetConfig.from_mapping(config["unet"]).channels)  # type: ignore[arg-type]


def real_config() -> dict[str, object]:
    """SDXL 1.0 base: UNet, CLIP-L (``embedders.0``), bigG (``embedders.1``), VAE."""
    return {"unet": REAL_UNET.to_dict(), "te1": dict(REAL_CLIP_L), "te2": dict(REAL_OPENCLIP_BIGG),
            "te2_embedder": 1, "vae": dict(REAL_SD_VAE)}


def refiner_config() -> dict[str, object]:
    """SDXL 1.0 refiner: UNet, bigG alone at ``embedders.0``, VAE."""
    return {"unet": REFINER_UNET.to_dict(), "te1": None, "te2": dict(REAL_OPENCLIP_BIGG),
            "te2_embedder": 0, "vae": dict(REAL_SD_VAE)}


def tiny_config() -> dict[str, object]:
    """SDXL base structure at demo size."""
    return {"unet": TINY_UNET.to_dict(), "te1": dict(TINY_CLIP_L), "te2": dict(TINY_OPENCLIP_BIGG),
            "te2_embedder": 1, "vae": dict(TINY_SD_VAE)}


def build(config: Mapping[str, object]) -> ModelTable:
    """Table of an SDXL checkpoint: ``model.diffusion_model.``, ``conditioner.embedders.*`` (each encoder
    optional), ``first_stage_model.`` (optional), in sgm module order."""
    te1_cfg, te2_cfg = config.get("te1"), config.get("te2")
    te1 = None if te1_cfg is None else clip_text(
        TE1_PREFIX, te1_cfg, component="te1", block="BASE", kohya_prefix="lora_te1",  # type: ignore[arg-type]
        diffusers_prefix="text_encoder")
    te2 = None if te2_cfg is None else openclip_text(
        te2_prefix(int(config["te2_embedder"])), te2_cfg, component="te2", block="BASE",  # type: ignore[arg-type]
        kohya_prefix="lora_te2", diffusers_prefix="text_encoder_2")
    vae = None if config.get("vae") is None else vae_table(config["vae"])  # type: ignore[arg-type]
    unet = unet_table(UNetConfig.from_mapping(config["unet"]), kohya_paths="ldm")  # type: ignore[arg-type]
    return assemble("sdxl", config, (unet, te1, te2, vae), reference_layout="sgm")


def _te2_embedder(shapes: Mapping[str, Shape]) -> int | None:
    """Index of the ``conditioner.embedders.N`` holding an OpenCLIP tower (lowest if several)."""
    tail = ".model.token_embedding.weight"
    found = [k[len(_EMBEDDERS):-len(tail)] for k in shapes if k.startswith(_EMBEDDERS) and k.endswith(tail)]
    indices = sorted(int(n) for n in found if n.isdigit())
    return indices[0] if indices else None


def config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """SDXL config from reference-layout shapes, or None: needs an sgm UNet with ``label_emb`` and context
    width 2048 (base) or 1280 (refiner), and no ``cond_stage_model.`` keys. Encoders and VAE are optional."""
    if any(k.startswith(_FOREIGN_PREFIXES) for k in shapes):
        return None
    unet = unet_config_from_shapes(shapes)
    if unet is None or unet.context_dim not in CONTEXT_DIMS or unet.adm_in_channels is None:
        return None
    embedder = _te2_embedder(shapes)
    te2 = None if embedder is None else openclip_config_from_shapes(
        shapes, te2_prefix(embedder), REAL_OPENCLIP_BIGG, diffusers_drops_last=False)
    return {
        "unet": unet.to_dict(),
        "te1": clip_config_from_shapes(shapes, TE1_PREFIX, REAL_CLIP_L),
        "te2": te2,
        "te2_embedder": None if te2 is None else embedder,
        "vae": vae_config_from_shapes(shapes),
    }


def block_layouts(config: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """``sdxl-12`` (BASE + attention blocks) and ``sdxl-20`` (BASE, IN00..IN08, M00, OUT00..OUT08).

    The refiner's four-level UNet has IN00..IN11 / OUT00..OUT11: its full list has 26 ids (its attention
    list again 12), kept under the same names.
    """
    return unet_block_layouts(config, short="sdxl-12", full="sdxl-20")


SDXL = ArchSpec(
    name="sdxl",
    title="Stable Diffusion XL",
    block_layouts=block_layouts,
    full_layout="sdxl-20",
    real_config=real_config,
    tiny_config=tiny_config,
    build=build,
    config_from_shapes=config_from_shapes,
    variant_configs=lambda: (refiner_config(),),
)
