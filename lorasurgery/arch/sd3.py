"""Stable Diffusion 3 / 3.5 (MMDiT) as data.

The table is built by walking the SAI ``MMDiT`` forward: ``x_embedder.proj`` (patch conv), ``t_embedder``,
``y_embedder`` (pooled text), ``context_embedder``, ``pos_embed``, the joint blocks (an ``x_block`` for the
image stream and a ``context_block`` for the text stream each), ``final_layer``; then the three text encoders
as the "incl. clips" single files store them.

Reference layout ("sd3"): the single file, ``model.diffusion_model.joint_blocks.N.{x_block,context_block}.
{attn.qkv, attn.proj, attn.ln_q, attn.ln_k, mlp.fc1, mlp.fc2, adaLN_modulation.1}``; SD3.5 adds the RMS
q/k norms ``attn.ln_q``/``attn.ln_k``; SD3.5-Medium adds ``x_block.attn2.*`` (a second self-attention) in its
first 13 blocks, whose ``x_block.adaLN_modulation.1`` then has 9H rows instead of 6H. The last block's
``context_block`` is "pre-only" (diffusers ``context_pre_only``): only ``attn.qkv`` (+ norms) and a 2H-row
``adaLN_modulation.1``. Text encoders: ``text_encoders.clip_l.transformer.`` (HF ``CLIPTextModelWithProjection``),
``text_encoders.clip_g.transformer.`` (same, 1280 wide, 32 layers), ``text_encoders.t5xxl.transformer.``.
Files may hold any subset (``sd3_medium.safetensors`` has no text encoders, ``..._incl_clips`` no T5). The
VAE (``first_stage_model.*``) is not tabled; it is passed through untouched.

Layouts: ``"sd3"`` (identity) and ``"diffusers"`` (``transformer.`` + ``SD3Transformer2DModel`` keys,
``qkv`` weights/biases split into ``to_q/to_k/to_v`` resp. ``add_{q,k,v}_proj`` resp. ``attn2.to_{q,k,v}``;
``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``). diffusers' single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``) swaps the shift/scale halves of exactly two tensors:
``final_layer.adaLN_modulation.1`` (``norm_out.linear``) and the *last* block's
``context_block.adaLN_modulation.1`` (``norm1_context.linear``); both are marked ``swapped_in={"diffusers"}``.

Block layout ``"sd3"`` (also ``"sd3-<depth+5>"``, e.g. ``"sd3-29"`` for the Medium models, ``"sd3-43"`` for
SD3.5-Large): CLIP_L, CLIP_G, T5, IN, J00..J{depth-1}, OUT — lorasurgery's own proposal (``blocks.md`` §5).
``BASE`` is an alias for CLIP_L + CLIP_G + T5, resolved by the block-spec parser, not by this table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from .base import ArchSpec, ModelTable, Shape
from .flux import (
    DiTTableBuilder,
    MissingShape,
    cfg_int,
    clip_config_from_shapes,
    count_indexed,
    dims,
    find_prefix,
    strip_prefix,
    t5_config_from_shapes,
    thirds,
)
from .text_encoders import (
    REAL_CLIP_G,
    REAL_CLIP_L,
    REAL_T5XXL,
    TINY_CLIP_G,
    TINY_CLIP_L,
    TINY_T5,
    EncoderTable,
    clip_text,
    t5_encoder,
)

__all__ = [
    "ENCODERS",
    "SD3",
    "block_layouts",
    "build",
    "config_from_shapes",
    "real_config",
    "sd35_large_config",
    "sd35_medium_config",
    "tiny_config",
    "tiny_sd35_medium_config",
]

Config = Mapping[str, object]

PREFIX = "model.diffusion_model."
DETECTION_KEY = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
TIME_DIM = 256  # sinusoidal timestep embedding width
HEAD_DIM = 64  # every released MMDiT: hidden = 64 * heads

SD3_CLIP_L: dict[str, object] = {**REAL_CLIP_L, "projection": REAL_CLIP_L["hidden"], "position_ids": False}
TINY_SD3_CLIP_L: dict[str, object] = {**TINY_CLIP_L, "projection": TINY_CLIP_L["hidden"], "position_ids": False}
# Configs whose CLIP head counts config recovery may reuse (heads do not show in CLIP shapes).
_KNOWN_CLIPS = (SD3_CLIP_L, TINY_SD3_CLIP_L, REAL_CLIP_G, TINY_CLIP_G)


@dataclass(frozen=True)
class Encoder:
    """One text-encoder slot of the SD3 single file."""

    key: str  # config key
    root: str  # reference prefix of the HF model
    block: str
    component: str
    kohya: str
    diffusers: str
    build: Callable[..., EncoderTable]  # clip_text / t5_encoder
    inner: str  # prefix the builder takes below ``root`` (HF CLIP's ``text_model.``)
    recover: Callable[[str, Mapping[str, Shape]], dict[str, object] | None]  # config from shapes at ``root``

    def table(self, cfg: Config) -> EncoderTable:
        return self.build(f"{self.root}{self.inner}", cfg, component=self.component, block=self.block,
                          kohya_prefix=self.kohya, diffusers_prefix=self.diffusers)


def _recover_clip(root: str, shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    return clip_config_from_shapes(root, shapes, _KNOWN_CLIPS)


ENCODERS: tuple[Encoder, ...] = (
    Encoder("clip_l", "text_encoders.clip_l.transformer.", "CLIP_L", "te1", "lora_te1", "text_encoder",
            clip_text, "text_model.", _recover_clip),
    Encoder("clip_g", "text_encoders.clip_g.transformer.", "CLIP_G", "te2", "lora_te2", "text_encoder_2",
            clip_text, "text_model.", _recover_clip),
    Encoder("t5", "text_encoders.t5xxl.transformer.", "T5", "te3", "lora_te3", "text_encoder_3",
            t5_encoder, "", t5_config_from_shapes),
)
REAL_ENCODERS: dict[str, dict[str, object]] = {
    "clip_l": SD3_CLIP_L, "clip_g": dict(REAL_CLIP_G), "t5": dict(REAL_T5XXL),
}
TINY_ENCODERS: dict[str, dict[str, object]] = {
    "clip_l": TINY_SD3_CLIP_L, "clip_g": dict(TINY_CLIP_G), "t5": dict(TINY_T5),
}


def _released(depth: int, *, pos_embed_max_size: int, qk_norm: bool, dual: tuple[int, ...]) -> dict[str, object]:
    """A released MMDiT: hidden = 64 * depth, heads = depth."""
    return {
        "depth": depth, "hidden": HEAD_DIM * depth, "heads": depth, "mlp_ratio": 4.0, "patch_size": 2,
        "in_channels": 16, "out_channels": 16, "pos_embed_max_size": pos_embed_max_size,
        "context_in": 4096, "pooled": 2048, "qk_norm": qk_norm, "dual_attention_layers": dual,
        **{name: dict(cfg) for name, cfg in REAL_ENCODERS.items()},
    }


def real_config() -> dict[str, object]:
    """SD3-Medium: 24 joint blocks, hidden 1536, no q/k norm."""
    return _released(24, pos_embed_max_size=192, qk_norm=False, dual=())


def sd35_large_config() -> dict[str, object]:
    """SD3.5-Large (and Large-Turbo): 38 joint blocks, hidden 2432, RMS q/k norm."""
    return _released(38, pos_embed_max_size=192, qk_norm=True, dual=())


def sd35_medium_config() -> dict[str, object]:
    """SD3.5-Medium (MMDiT-X): 24 joint blocks, RMS q/k norm, ``x_block.attn2`` in blocks 0-12."""
    return _released(24, pos_embed_max_size=384, qk_norm=True, dual=tuple(range(13)))


def tiny_config() -> dict[str, object]:
    """SD3-Medium's key structure at toy size: 2 joint blocks (hidden 128 = 64 * depth, 2 heads)."""
    return {
        "depth": 2, "hidden": 128, "heads": 2, "mlp_ratio": 4.0, "patch_size": 2, "in_channels": 16,
        "out_channels": 16, "pos_embed_max_size": 8, "context_in": 32, "pooled": 16, "qk_norm": False,
        "dual_attention_layers": (), **{name: dict(cfg) for name, cfg in TINY_ENCODERS.items()},
    }


def tiny_sd35_medium_config() -> dict[str, object]:
    """SD3.5-Medium's key structure at toy size: q/k norms, ``attn2`` in block 0 only."""
    return {**tiny_config(), "qk_norm": True, "dual_attention_layers": (0,)}


@dataclass(frozen=True)
class _Dims:
    """Validated MMDiT widths."""

    depth: int
    hidden: int
    head_dim: int
    mlp: int
    patch: int
    in_channels: int
    out_channels: int
    positions: int
    context_in: int
    pooled: int
    qk_norm: bool
    dual: frozenset[int]

    @classmethod
    def of(cls, config: Config) -> "_Dims":
        hidden, heads = cfg_int(config, "hidden"), cfg_int(config, "heads")
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        mlp = float(config["mlp_ratio"]) * hidden  # type: ignore[arg-type]
        if mlp != int(mlp) or mlp <= 0:
            raise ValueError(f"mlp_ratio {config['mlp_ratio']!r} does not give a whole MLP width")
        depth = cfg_int(config, "depth")
        dual = frozenset(int(i) for i in config.get("dual_attention_layers", ()))  # type: ignore[attr-defined]
        if any(not 0 <= i < depth for i in dual):
            raise ValueError(f"dual_attention_layers {sorted(dual)} outside 0..{depth - 1}")
        return cls(depth, hidden, hidden // heads, int(mlp), cfg_int(config, "patch_size"),
                   cfg_int(config, "in_channels"), cfg_int(config, "out_channels"),
                   cfg_int(config, "pos_embed_max_size") ** 2, cfg_int(config, "context_in"),
                   cfg_int(config, "pooled"), bool(config.get("qk_norm", False)), dual)


@dataclass(frozen=True)
class _Attn:
    """diffusers names of one ``SelfAttention`` (paths relative to ``transformer_blocks.i.``)."""

    name: str  # reference name inside the half block: "attn" / "attn2"
    qkv: tuple[str, str, str]
    norm_q: str
    norm_k: str
    proj: str


@dataclass(frozen=True)
class _Stream:
    """diffusers names of one half of a joint block (paths relative to ``transformer_blocks.i.``)."""

    name: str  # "x_block" / "context_block"
    attn: _Attn
    mlp_in: str
    mlp_out: str
    mod: str


_X = _Stream("x_block", _Attn("attn", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.norm_q", "attn.norm_k",
                              "attn.to_out.0"), "ff.net.0.proj", "ff.net.2", "norm1.linear")
_CONTEXT = _Stream("context_block", _Attn("attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                                          "attn.norm_added_q", "attn.norm_added_k", "attn.to_add_out"),
                   "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear")
# SD3.5-Medium's second image-stream attention (x_block only).
_ATTN2 = _Attn("attn2", ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "attn2.norm_q", "attn2.norm_k", "attn2.to_out.0")


def joint_block_id(i: int) -> str:
    return f"J{i:02d}"


def _attention(b: DiTTableBuilder, d: _Dims, base: str, dif: str, a: _Attn, blk: str, *, pre_only: bool) -> None:
    """A ``SelfAttention`` at ``base + a.name``: qkv, proj (absent when pre-only), RMS q/k norms (SD3.5)."""
    h, at = d.hidden, f"{base}{a.name}"
    b.linear(f"{at}.qkv", (3 * h, h), block=blk, group="attn", diffusers=thirds([f"{dif}{p}" for p in a.qkv], h))
    if not pre_only:
        b.linear(f"{at}.proj", (h, h), block=blk, group="attn", diffusers=f"{dif}{a.proj}")
    if d.qk_norm:
        b.tensor(f"{at}.ln_q.weight", (d.head_dim,), f"{dif}{a.norm_q}.weight")
        b.tensor(f"{at}.ln_k.weight", (d.head_dim,), f"{dif}{a.norm_k}.weight")


def _half(b: DiTTableBuilder, d: _Dims, i: int, s: _Stream, *, pre_only: bool, dual: bool) -> None:
    """One ``DismantledBlock`` (x or context half of joint block ``i``)."""
    h, blk = d.hidden, joint_block_id(i)
    base, dif = f"joint_blocks.{i}.{s.name}.", f"transformer_blocks.{i}."
    _attention(b, d, base, dif, s.attn, blk, pre_only=pre_only)
    if dual:
        _attention(b, d, base, dif, _ATTN2, blk, pre_only=False)
    if not pre_only:
        b.linear(f"{base}mlp.fc1", (d.mlp, h), block=blk, group="attn", diffusers=f"{dif}{s.mlp_in}")
        b.linear(f"{base}mlp.fc2", (h, d.mlp), block=blk, group="attn", diffusers=f"{dif}{s.mlp_out}")
    # adaLN chunks: [shift, scale] when pre-only, 6 (shift/scale/gate for attn and mlp), 9 with attn2.
    chunks = 2 if pre_only else (9 if dual else 6)
    b.linear(f"{base}adaLN_modulation.1", (chunks * h, h), block=blk, group="attn", diffusers=f"{dif}{s.mod}",
             swapped=pre_only)


def _joint_block(b: DiTTableBuilder, d: _Dims, i: int) -> None:
    last = i == d.depth - 1
    _half(b, d, i, _X, pre_only=False, dual=i in d.dual)
    _half(b, d, i, _CONTEXT, pre_only=last, dual=False)


def _inputs(b: DiTTableBuilder, d: _Dims) -> None:
    """Patch conv, timestep and pooled-text MLPs, context projection, learned position table."""
    h = d.hidden
    b.linear("x_embedder.proj", (h, d.in_channels, d.patch, d.patch), block="IN", group="extra",
             diffusers="pos_embed.proj", kind="conv" if d.patch > 1 else "conv1x1")
    embedders = (("t_embedder", "timestep_embedder", TIME_DIM), ("y_embedder", "text_embedder", d.pooled))
    for name, path, fan_in in embedders:
        b.linear(f"{name}.mlp.0", (h, fan_in), block="IN", group="extra",
                 diffusers=f"time_text_embed.{path}.linear_1")
        b.linear(f"{name}.mlp.2", (h, h), block="IN", group="extra", diffusers=f"time_text_embed.{path}.linear_2")
    b.linear("context_embedder", (h, d.context_in), block="IN", group="extra", diffusers="context_embedder")
    b.tensor("pos_embed", (1, d.positions, h), "pos_embed.pos_embed")


def _final(b: DiTTableBuilder, d: _Dims) -> None:
    """``final_layer``: linear to patch pixels and the [shift; scale] adaLN projection (diffusers swaps)."""
    h = d.hidden
    b.linear("final_layer.linear", (d.patch * d.patch * d.out_channels, h), block="OUT", group="extra",
             diffusers="proj_out")
    b.linear("final_layer.adaLN_modulation.1", (2 * h, h), block="OUT", group="extra",
             diffusers="norm_out.linear", swapped=True)


def _encoders(b: DiTTableBuilder, config: Config) -> None:
    """CLIP-L, CLIP-G (HF ``CLIPTextModelWithProjection``) and T5 when configured."""
    for enc in ENCODERS:
        cfg = config.get(enc.key)
        if cfg is not None:
            b.encoder(enc.table(cfg))  # type: ignore[arg-type]


def build(config: Config) -> ModelTable:
    """The SD3/SD3.5 table for ``config`` (see :func:`real_config` for the keys)."""
    d = _Dims.of(config)
    b = DiTTableBuilder(reference="sd3", prefixes={"sd3": PREFIX})
    _inputs(b, d)
    for i in range(d.depth):
        _joint_block(b, d, i)
    _final(b, d)
    _encoders(b, config)
    return b.table("sd3", config)


def block_layouts(config: Config) -> dict[str, tuple[str, ...]]:
    """``"sd3"``: CLIP_L, CLIP_G, T5, IN, J00..J{depth-1}, OUT; also under ``"sd3-<depth+5>"``."""
    ids = ("CLIP_L", "CLIP_G", "T5", "IN", *(joint_block_id(i) for i in range(cfg_int(config, "depth"))), "OUT")
    return {"sd3": ids, f"sd3-{len(ids)}": ids}


def config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """SD3 config from checkpoint shapes (``model.diffusion_model.``-prefixed, bare or any other prefix).

    None unless ``joint_blocks.0.context_block.adaLN_modulation.1.bias`` is present, or when a tensor read here
    is missing or malformed (a partial file). depth = number of joint blocks; widths from ``x_embedder.proj``
    (hidden, in channels, patch), ``final_layer.linear``, ``context_embedder``, ``y_embedder``, ``pos_embed``
    (max size = sqrt of its positions); qk_norm from ``attn.ln_q``, whose width is the head width (without it
    heads do not show in any shape: hidden / 64, the released models' rule); dual attention from the blocks
    holding ``x_block.attn2``. Text encoders from ``text_encoders.*`` when present, else the released ones.
    """
    prefix = find_prefix(shapes, DETECTION_KEY)
    if prefix is None:
        return None
    t = strip_prefix(shapes, prefix)
    try:
        transformer = _transformer_config(t)
    except MissingShape:
        return None
    if transformer is None:
        return None
    encoders: dict[str, object] = {}
    for enc in ENCODERS:
        found = enc.recover(enc.root, shapes)
        encoders[enc.key] = found if found is not None else dict(REAL_ENCODERS[enc.key])
    return {**transformer, **encoders}


def _transformer_config(t: Mapping[str, Shape]) -> dict[str, object] | None:
    """The MMDiT part of :func:`config_from_shapes` from bare keys; None when the shapes are inconsistent."""
    hidden, in_channels, patch, _ = dims(t, "x_embedder.proj.weight", 4)
    depth = count_indexed(t, "joint_blocks.{}.x_block.attn.qkv.weight")
    ln_q = t.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q[0] if ln_q is not None else HEAD_DIM
    positions = dims(t, "pos_embed", 3)[1]
    side = math.isqrt(positions)
    if not depth or side * side != positions or (ln_q is not None and hidden % head_dim):
        return None
    return {
        "depth": depth, "hidden": hidden, "heads": max(1, hidden // head_dim) if hidden % head_dim == 0 else 1,
        "mlp_ratio": dims(t, "joint_blocks.0.x_block.mlp.fc1.weight", 2)[0] / hidden, "patch_size": patch,
        "in_channels": in_channels, "out_channels": dims(t, "final_layer.linear.weight", 2)[0] // (patch * patch),
        "pos_embed_max_size": side, "context_in": dims(t, "context_embedder.weight", 2)[1],
        "pooled": dims(t, "y_embedder.mlp.0.weight", 2)[1], "qk_norm": ln_q is not None,
        "dual_attention_layers": tuple(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in t),
    }


SD3 = ArchSpec(
    name="sd3",
    title="Stable Diffusion 3 / 3.5",
    block_layouts=block_layouts,
    full_layout="sd3",
    real_config=real_config,
    tiny_config=tiny_config,
    build=build,
    config_from_shapes=config_from_shapes,
    variant_configs=lambda: (sd35_large_config(), sd35_medium_config()),
)
