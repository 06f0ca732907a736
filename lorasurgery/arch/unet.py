"""The LDM/sgm UNet and VAE of SD1.x, SD2.x and SDXL, enumerated forward from a small config.

One walk over the UNet's levels produces every weight-bearing layer with its LDM path
(``input_blocks.4.1.proj_in``), its diffusers path (``down_blocks.1.attentions.0.proj_in``), its shape, its
block id (``IN04``) and its LoRA role. From that list come the reference tensors (``model.diffusion_model.*``),
the LoRA targets (:class:`~lorasurgery.arch.base.ModuleSpec`) and the LDM -> diffusers key map — nothing is
ever parsed back from a name. :func:`unet_config_from_shapes` reads the config back from a checkpoint's
reference keys (``formats.md`` section 6) and accepts it only if the table it implies matches the file.

The same module holds the pieces every SD-family architecture shares: the LDM ``AutoencoderKL``
(``first_stage_model.*``), the recovery of text-encoder configs from shapes, and :func:`assemble`, which
joins component tables into a :class:`~lorasurgery.arch.base.ModelTable`.

Index rules (L levels, R resnets per level, x = ``down_blocks`` index from the top, ``up_blocks`` index from
the bottom, i = position in the level):

* ``down_blocks.x.{resnets,attentions}.i`` = ``input_blocks.{1 + (R+1)x + i}.{0,1}``; downsampler
  ``input_blocks.{(R+1)(x+1)}.0.op``;
* ``up_blocks.x.{resnets,attentions}.i`` = ``output_blocks.{(R+1)x + i}.{0,1}`` (i = 0..R); upsampler
  ``output_blocks.{(R+1)x + R}.{1 or 2}.conv`` (2 when that output block has a transformer);
* block ids: ``input_blocks.N`` -> ``IN{N:02}``, ``middle_block`` -> ``M00``, ``output_blocks.N`` ->
  ``OUT{N:02}``; ``time_embed``, ``label_emb`` and ``out`` are in no block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Mapping, Sequence

from .base import Layout, ModelTable, ModuleSpec, Shape
from .text_encoders import clip_text, openclip_text

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "UNetConfig",
    "Layer",
    "ComponentTable",
    "unet_layers",
    "unet_table",
    "unet_block_ids",
    "unet_block_layouts",
    "unet_config_from_shapes",
    "diffusers_unet_config",
    "vae_layers",
    "vae_table",
    "vae_config_from_shapes",
    "REAL_SD_VAE",
    "TINY_SD_VAE",
    "clip_config_from_shapes",
    "openclip_config_from_shapes",
    "heads_for_width",
    "table_matches",
    "assemble",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

FileKeys = tuple[tuple[str, tuple[int, int] | None], ...]
KohyaPaths = Literal["diffusers", "ldm"]


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class UNetConfig:
    """Shape-determining parameters of an LDM/sgm ``UNetModel`` (what a checkpoint's shapes reveal).

    Attention head counts are not among them: they change no tensor shape (see :func:`diffusers_unet_config`).
    """

    in_channels: int  # 4; 9 for inpainting UNets
    out_channels: int  # 4
    channels: tuple[int, ...]  # output channels of each level (model_channels * channel_mult); conv_in -> channels[0]
    num_res_blocks: int  # R, resnets per input level (output levels have R + 1)
    depth: tuple[int, ...]  # transformer depth of each input level (0 = no attention)
    depth_middle: int  # transformer depth of the middle block (>= 1)
    depth_output: tuple[int, ...]  # transformer depth of each output level, indexed like ``channels``
    context_dim: int  # in-features of every attn2.to_k / to_v (768 SD1, 1024 SD2, 2048 SDXL, 1280 refiner)
    linear_proj: bool  # proj_in/proj_out are Linear (SD2, SDXL) instead of 1x1 convs (SD1)
    time_embed_dim: int  # width of time_embed.0 / time_embed.2 (4 * channels[0] in the released models)
    adm_in_channels: int | None  # in-features of label_emb.0.0 (SDXL 2816, refiner 2560); None = no label_emb

    def __post_init__(self) -> None:
        levels = len(self.channels)
        if levels < 1 or self.num_res_blocks < 1:
            raise ValueError("a UNet needs at least one level and one resnet per level")
        if len(self.depth) != levels or len(self.depth_output) != levels:
            raise ValueError(f"depth and depth_output need one entry per level ({levels})")
        if self.depth_middle < 1:
            raise ValueError("the middle block always holds a transformer (depth_middle >= 1)")
        if min(self.depth + self.depth_output) < 0 or min(self.channels) < 1:
            raise ValueError("depths must be >= 0 and channels >= 1")

    @property
    def levels(self) -> int:
        """L, the number of resolution levels."""
        return len(self.channels)

    def to_dict(self) -> dict[str, object]:
        """Plain-value form stored in an architecture config (tuples, ints, bools, None)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "channels": tuple(self.channels),
            "num_res_blocks": self.num_res_blocks,
            "depth": tuple(self.depth),
            "depth_middle": self.depth_middle,
            "depth_output": tuple(self.depth_output),
            "context_dim": self.context_dim,
            "linear_proj": self.linear_proj,
            "time_embed_dim": self.time_embed_dim,
            "adm_in_channels": self.adm_in_channels,
        }

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, object]) -> "UNetConfig":
        """Inverse of :meth:`to_dict` (sequences may be lists)."""
        return cls(
            in_channels=int(cfg["in_channels"]),  # type: ignore[arg-type]
            out_channels=int(cfg["out_channels"]),  # type: ignore[arg-type]
            channels=tuple(int(c) for c in cfg["channels"]),  # type: ignore[union-attr]
            num_res_blocks=int(cfg["num_res_blocks"]),  # type: ignore[arg-type]
            depth=tuple(int(d) for d in cfg["depth"]),  # type: ignore[union-attr]
            depth_middle=int(cfg["depth_middle"]),  # type: ignore[arg-type]
            depth_output=tuple(int(d) for d in cfg["depth_output"]),  # type: ignore[union-attr]
            context_dim=int(cfg["context_dim"]),  # type: ignore[arg-type]
            linear_proj=bool(cfg["linear_proj"]),
            time_embed_dim=int(cfg["time_embed_dim"]),  # type: ignore[arg-type]
            adm_in_channels=None if cfg.get("adm_in_channels") is None
            else int(cfg["adm_in_channels"]),  # type: ignore[arg-type]
        )


# ------------------------------------------------------------------------------------------------ layers


@dataclass(frozen=True)
class Layer:
    """One weight-bearing layer: its paths in both layouts, weight shape and LoRA role.

    ``kind``: "norm" (GroupNorm/LayerNorm: weight and bias of shape (C,)), "linear", "conv1x1" or "conv".
    ``group``: the LoRA group ("attn", "locon", "extra"), None for norms (no LoRA target).
    """

    ldm: str  # path without the component prefix and without ".weight"
    diffusers: str  # diffusers path without component prefix and ".weight"
    shape: Shape
    kind: str
    group: str | None
    block: str | None
    bias: bool = True
    # Shape of the weight in the diffusers file when it differs (VAE attention: 1x1 conv -> Linear).
    diffusers_shape: Shape | None = None


def _norm(ldm: str, diffusers: str, width: int, block: str | None) -> Layer:
    return Layer(ldm, diffusers, (width,), "norm", None, block)


def _linear(ldm: str, diffusers: str, out: int, inp: int, group: str, block: str | None, *,
            bias: bool = True) -> Layer:
    return Layer(ldm, diffusers, (out, inp), "linear", group, block, bias)


def _conv(ldm: str, diffusers: str, out: int, inp: int, kernel: int, group: str | None,
          block: str | None) -> Layer:
    return Layer(ldm, diffusers, (out, inp, kernel, kernel), "conv1x1" if kernel == 1 else "conv", group, block)


def _unet_resnet(ldm: str, diff: str, cin: int, cout: int, temb: int, block: str) -> list[Layer]:
    """LDM ``ResBlock`` (in_layers, emb_layers, out_layers, skip_connection) = diffusers ``ResnetBlock2D``."""
    layers = [
        _norm(f"{ldm}.in_layers.0", f"{diff}.norm1", cin, block),
        _conv(f"{ldm}.in_layers.2", f"{diff}.conv1", cout, cin, 3, "locon", block),
        _linear(f"{ldm}.emb_layers.1", f"{diff}.time_emb_proj", cout, temb, "locon", block),
        _norm(f"{ldm}.out_layers.0", f"{diff}.norm2", cout, block),
        _conv(f"{ldm}.out_layers.3", f"{diff}.conv2", cout, cout, 3, "locon", block),
    ]
    if cin != cout:
        layers.append(_conv(f"{ldm}.skip_connection", f"{diff}.conv_shortcut", cout, cin, 1, "locon", block))
    return layers


def _proj(ldm: str, diff: str, width: int, linear: bool, block: str) -> Layer:
    if linear:
        return _linear(ldm, diff, width, width, "attn", block)
    return _conv(ldm, diff, width, width, 1, "attn", block)


def _attention(ldm: str, diff: str, width: int, kv_in: int, block: str) -> list[Layer]:
    """``CrossAttention``: bias-free q/k/v, biased to_out.0 (inner width = channel width)."""
    return [
        _linear(f"{ldm}.to_q", f"{diff}.to_q", width, width, "attn", block, bias=False),
        _linear(f"{ldm}.to_k", f"{diff}.to_k", width, kv_in, "attn", block, bias=False),
        _linear(f"{ldm}.to_v", f"{diff}.to_v", width, kv_in, "attn", block, bias=False),
        _linear(f"{ldm}.to_out.0", f"{diff}.to_out.0", width, width, "attn", block),
    ]


def _spatial_transformer(ldm: str, diff: str, width: int, depth: int, context: int, linear: bool,
                         block: str) -> list[Layer]:
    """LDM ``SpatialTransformer`` = diffusers ``Transformer2DModel``: norm, proj_in, blocks, proj_out.

    Each ``BasicTransformerBlock`` in state-dict order: attn1, ff (GEGLU, mult 4), attn2 (keys/values from the
    context), norm1..3; the internals are named identically in both layouts.
    """
    layers = [_norm(f"{ldm}.norm", f"{diff}.norm", width, block),
              _proj(f"{ldm}.proj_in", f"{diff}.proj_in", width, linear, block)]
    for t in range(depth):
        lb, db = f"{ldm}.transformer_blocks.{t}", f"{diff}.transformer_blocks.{t}"
        layers += _attention(f"{lb}.attn1", f"{db}.attn1", width, width, block)
        layers += [
            _linear(f"{lb}.ff.net.0.proj", f"{db}.ff.net.0.proj", 8 * width, width, "attn", block),
            _linear(f"{lb}.ff.net.2", f"{db}.ff.net.2", width, 4 * width, "attn", block),
        ]
        layers += _attention(f"{lb}.attn2", f"{db}.attn2", width, context, block)
        layers += [_norm(f"{lb}.norm{n}", f"{db}.norm{n}", width, block) for n in (1, 2, 3)]
    layers.append(_proj(f"{ldm}.proj_out", f"{diff}.proj_out", width, linear, block))
    return layers


def unet_layers(cfg: UNetConfig) -> list[Layer]:
    """Every weight-bearing layer of the UNet, in LDM state-dict order, from one walk over the levels."""
    ch0, temb, R = cfg.channels[0], cfg.time_embed_dim, cfg.num_res_blocks
    layers = [
        _linear("time_embed.0", "time_embedding.linear_1", temb, ch0, "extra", None),
        _linear("time_embed.2", "time_embedding.linear_2", temb, temb, "extra", None),
    ]
    if cfg.adm_in_channels is not None:
        layers += [
            _linear("label_emb.0.0", "add_embedding.linear_1", temb, cfg.adm_in_channels, "extra", None),
            _linear("label_emb.0.2", "add_embedding.linear_2", temb, temb, "extra", None),
        ]
    layers.append(_conv("input_blocks.0.0", "conv_in", ch0, cfg.in_channels, 3, "extra", "IN00"))
    skips, ch, n = [ch0], ch0, 1
    for level, cout in enumerate(cfg.channels):
        for i in range(R):
            ldm, diff, block = f"input_blocks.{n}", f"down_blocks.{level}", f"IN{n:02d}"
            layers += _unet_resnet(f"{ldm}.0", f"{diff}.resnets.{i}", ch, cout, temb, block)
            ch = cout
            if cfg.depth[level]:
                layers += _spatial_transformer(f"{ldm}.1", f"{diff}.attentions.{i}", ch, cfg.depth[level],
                                               cfg.context_dim, cfg.linear_proj, block)
            skips.append(ch)
            n += 1
        if level < cfg.levels - 1:
            layers.append(_conv(f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", ch, ch, 3,
                                "locon", f"IN{n:02d}"))
            skips.append(ch)
            n += 1
    layers += _unet_resnet("middle_block.0", "mid_block.resnets.0", ch, ch, temb, "M00")
    layers += _spatial_transformer("middle_block.1", "mid_block.attentions.0", ch, cfg.depth_middle,
                                   cfg.context_dim, cfg.linear_proj, "M00")
    layers += _unet_resnet("middle_block.2", "mid_block.resnets.1", ch, ch, temb, "M00")
    n = 0
    for x, level in enumerate(reversed(range(cfg.levels))):
        cout = cfg.channels[level]
        for i in range(R + 1):
            ldm, diff, block = f"output_blocks.{n}", f"up_blocks.{x}", f"OUT{n:02d}"
            layers += _unet_resnet(f"{ldm}.0", f"{diff}.resnets.{i}", ch + skips.pop(), cout, temb, block)
            ch = cout
            slot = 1
            if cfg.depth_output[level]:
                layers += _spatial_transformer(f"{ldm}.1", f"{diff}.attentions.{i}", ch, cfg.depth_output[level],
                                               cfg.context_dim, cfg.linear_proj, block)
                slot = 2
            if level > 0 and i == R:
                layers.append(_conv(f"{ldm}.{slot}.conv", f"{diff}.upsamplers.0.conv", ch, ch, 3, "locon", block))
            n += 1
    layers.append(_norm("out.0", "conv_norm_out", ch, None))
    layers.append(_conv("out.2", "conv_out", cfg.out_channels, ch, 3, "extra", None))
    return layers


def unet_block_ids(cfg: UNetConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(every block id in order, the ids of blocks holding attention-group modules) for this UNet."""
    every: dict[str, None] = {}
    attn: dict[str, None] = {}
    for layer in unet_layers(cfg):
        if layer.block is None:
            continue
        every[layer.block] = None
        if layer.group == "attn":
            attn[layer.block] = None
    return tuple(every), tuple(attn)


def unet_block_layouts(config: Mapping[str, object], *, short: str, full: str) -> dict[str, tuple[str, ...]]:
    """Block layouts of an SD-family model: ``full`` = BASE + every UNet block in order, ``short`` = BASE +
    the blocks holding attention modules (what a default LoRA touches). ``config["unet"]`` is the UNet config.

    For the released SD1/SD2 UNet these are blocks.md's 26/17 lists, for SDXL its 20/12 lists.
    """
    every, attn = unet_block_ids(UNetConfig.from_mapping(config["unet"]))  # type: ignore[arg-type]
    return {short: ("BASE", *attn), full: ("BASE", *every)}


# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class ComponentTable:
    """One component (UNet, VAE, a text encoder) in reference keys: the same fields as
    :class:`~lorasurgery.arch.text_encoders.EncoderTable`, so :func:`assemble` takes either."""

    tensors: dict[str, Shape]
    modules: tuple[ModuleSpec, ...]
    diffusers_map: dict[str, FileKeys]
    transposed: frozenset[str] = field(default_factory=frozenset)


def _layer_tensors(layer: Layer) -> Iterator[tuple[str, Shape]]:
    """(suffix, reference shape) of the tensors a layer owns."""
    yield "weight", layer.shape
    if layer.bias:
        yield "bias", (layer.shape[0],)


def _component(layers: Iterable[Layer], *, prefix: str, diffusers_prefix: str, component: str,
               kohya_prefix: str | None, kohya_paths: KohyaPaths = "diffusers") -> ComponentTable:
    """Tensors, LoRA modules and diffusers map of ``layers`` stored under ``prefix``.

    ``kohya_prefix`` None: the component has no LoRA targets (VAE). Otherwise kohya names are
    ``<kohya_prefix>_<path>`` with the diffusers or LDM path (``kohya_paths``) dots replaced by underscores.
    """
    tensors: dict[str, Shape] = {}
    dmap: dict[str, FileKeys] = {}
    modules: list[ModuleSpec] = []
    for layer in layers:
        for suffix, shape in _layer_tensors(layer):
            key = f"{prefix}{layer.ldm}.{suffix}"
            if key in tensors:
                raise ValueError(f"duplicate tensor {key}")
            tensors[key] = shape
            dmap[key] = ((f"{diffusers_prefix}.{layer.diffusers}.{suffix}", None),)
        if kohya_prefix is None or layer.group is None:
            continue
        path = layer.diffusers if kohya_paths == "diffusers" else layer.ldm
        modules.append(ModuleSpec(
            key=f"{prefix}{layer.ldm}.weight",
            shape=layer.shape,
            component=component,
            block=layer.block,
            names={"kohya": f"{kohya_prefix}_{path.replace('.', '_')}",
                   "diffusers": f"{diffusers_prefix}.{layer.diffusers}"},
            bias=f"{prefix}{layer.ldm}.bias" if layer.bias else None,
            kind=layer.kind,
            group=layer.group,
        ))
    return ComponentTable(tensors, tuple(modules), dmap)


def unet_table(cfg: UNetConfig, *, kohya_paths: KohyaPaths) -> ComponentTable:
    """The UNet under ``model.diffusion_model.``: LoRA names ``lora_unet_<diffusers or LDM path>`` and
    ``unet.<diffusers path>``, diffusers file keys ``unet.<diffusers path>.weight``."""
    return _component(unet_layers(cfg), prefix=UNET_PREFIX, diffusers_prefix="unet", component="unet",
                      kohya_prefix="lora_unet", kohya_paths=kohya_paths)


def table_matches(tensors: Mapping[str, Shape], shapes: Mapping[str, Shape]) -> bool:
    """True when every tensor of a table is present in ``shapes`` with the same shape."""
    return all(k in shapes and tuple(shapes[k]) == tuple(s) for k, s in tensors.items())


# ------------------------------------------------------------------------------------ config from shapes


def _indices(shapes: Mapping[str, Shape], head: str) -> set[int]:
    """Integers N of the keys ``<head>N.<...>`` (dotted checkpoint keys; the index is its own field)."""
    out: set[int] = set()
    for key in shapes:
        if key.startswith(head):
            field_ = key[len(head):].split(".", 1)[0]
            if field_.isdigit():
                out.add(int(field_))
    return out


def _transformer_depth(shapes: Mapping[str, Shape], base: str) -> int:
    """Number of consecutive ``<base>transformer_blocks.t`` present (0 when there is no transformer)."""
    t = 0
    while f"{base}transformer_blocks.{t}.attn1.to_q.weight" in shapes:
        t += 1
    return t


def unet_config_from_shapes(shapes: Mapping[str, Shape]) -> UNetConfig | None:
    """The :class:`UNetConfig` of the ``model.diffusion_model.*`` tensors in ``shapes`` (formats.md §6).

    L = downsamplers + 1; R from the number of input blocks (L(R+1)); channels from each level's first
    resnet; depths from the transformer blocks of each level's first input/output block and of the middle
    block; proj kind from ``proj_in`` ndim; context width from ``attn2.to_k``. Returns None when the keys are
    not an LDM UNet or when the table implied by the derived config differs from the file in any key or shape.
    """
    p = UNET_PREFIX
    conv_in, conv_out, temb = (shapes.get(f"{p}{k}.weight") for k in ("input_blocks.0.0", "out.2", "time_embed.0"))
    if conv_in is None or conv_out is None or temb is None or len(conv_in) != 4:
        return None
    blocks = _indices(shapes, f"{p}input_blocks.")
    downs = sorted(n for n in blocks if f"{p}input_blocks.{n}.0.op.weight" in shapes)
    levels = len(downs) + 1
    if not blocks or (max(blocks) + 1) % levels:
        return None
    R = (max(blocks) + 1) // levels - 1
    if R < 1 or downs != [(R + 1) * (x + 1) for x in range(levels - 1)]:
        return None
    firsts = [1 + (R + 1) * x for x in range(levels)]
    widths = [shapes.get(f"{p}input_blocks.{n}.0.out_layers.3.weight") for n in firsts]
    to_k = [s for k, s in shapes.items() if k.startswith(p) and k.endswith(".attn2.to_k.weight")]
    proj = shapes.get(f"{p}middle_block.1.proj_in.weight")
    if any(w is None for w in widths) or not to_k or proj is None:
        return None
    adm = shapes.get(f"{p}label_emb.0.0.weight")
    try:
        cfg = UNetConfig(
            in_channels=conv_in[1],
            out_channels=conv_out[0],
            channels=tuple(w[0] for w in widths),  # type: ignore[index]
            num_res_blocks=R,
            depth=tuple(_transformer_depth(shapes, f"{p}input_blocks.{n}.1.") for n in firsts),
            depth_middle=_transformer_depth(shapes, f"{p}middle_block.1."),
            depth_output=tuple(_transformer_depth(shapes, f"{p}output_blocks.{(R + 1) * (levels - 1 - x)}.1.")
                               for x in range(levels)),
            context_dim=to_k[0][1],
            linear_proj=len(proj) == 2,
            time_embed_dim=temb[0],
            adm_in_channels=None if adm is None else adm[1],
        )
    except ValueError:
        return None
    if not table_matches(unet_table(cfg, kohya_paths="ldm").tensors, shapes):
        return None
    return cfg


# ------------------------------------------------------------------------------------ diffusers config


def heads_for_width(width: int) -> int:
    """Attention heads of a transformer of the given width under the SD-family convention.

    Heads are not stored in any weight. The released models use 64-wide heads (CLIP-L 12, OpenCLIP-H 16,
    bigG 20, SD2/SDXL UNet levels width/64); widths below 64 or not divisible by 64 (the tiny demo models) use
    16-wide heads, at least one.
    """
    if width >= 64 and width % 64 == 0:
        return width // 64
    return max(1, width // 16)


def diffusers_unet_config(cfg: UNetConfig, *, attention_head_dim: int | Sequence[int],
                          addition_time_embed_dim: int = 256) -> dict[str, object]:
    """Keyword arguments of diffusers ``UNet2DConditionModel`` for this UNet (its ``config.json`` body).

    ``attention_head_dim`` is diffusers' (mis-named) per-level head *count*: SD1 8, SD2/SDXL width/64.
    diffusers gives the middle block the depth of the last level's entry, so that entry carries
    ``depth_middle``; a last level that has attention with another depth cannot be expressed (ValueError).
    A ``label_emb`` becomes the SDXL ``text_time`` additional embedding.
    """
    last = cfg.levels - 1
    if cfg.depth[last] and cfg.depth[last] != cfg.depth_middle:
        raise ValueError("diffusers ties the middle-block depth to the last level's depth")
    down = [d if d else 1 for d in cfg.depth]
    down[last] = cfg.depth_middle
    out: dict[str, object] = {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in cfg.depth],
        "up_block_types": ["CrossAttnUpBlock2D" if cfg.depth_output[lv] else "UpBlock2D"
                           for lv in reversed(range(cfg.levels))],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.linear_proj,
        "transformer_layers_per_block": down,
        "reverse_transformer_layers_per_block": [cfg.depth_output[lv] or 1 for lv in reversed(range(cfg.levels))],
        "time_embedding_dim": cfg.time_embed_dim,
        "attention_head_dim": (attention_head_dim if isinstance(attention_head_dim, int)
                               else list(attention_head_dim)),
    }
    if cfg.adm_in_channels is not None:
        out.update(addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                   projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return out


# ------------------------------------------------------------------------------------------------ VAE

# LDM AutoencoderKL (``first_stage_model.``) configs: ch * ch_mult per level, num_res_blocks, z_channels.
REAL_SD_VAE: dict[str, object] = {
    "in_channels": 3, "out_channels": 3, "channels": (128, 256, 512, 512), "num_res_blocks": 2, "z_channels": 4,
}
TINY_SD_VAE: dict[str, object] = {
    "in_channels": 3, "out_channels": 3, "channels": (32, 64), "num_res_blocks": 1, "z_channels": 4,
}


def _vae_resnet(ldm: str, diff: str, cin: int, cout: int) -> list[Layer]:
    """LDM VAE ``ResnetBlock`` (no time embedding) = diffusers ``ResnetBlock2D`` (nin_shortcut -> conv_shortcut)."""
    layers = [
        _norm(f"{ldm}.norm1", f"{diff}.norm1", cin, None),
        _conv(f"{ldm}.conv1", f"{diff}.conv1", cout, cin, 3, None, None),
        _norm(f"{ldm}.norm2", f"{diff}.norm2", cout, None),
        _conv(f"{ldm}.conv2", f"{diff}.conv2", cout, cout, 3, None, None),
    ]
    if cin != cout:
        layers.append(_conv(f"{ldm}.nin_shortcut", f"{diff}.conv_shortcut", cout, cin, 1, None, None))
    return layers


def _vae_attention(ldm: str, diff: str, width: int) -> list[Layer]:
    """LDM ``AttnBlock`` (1x1 conv q/k/v/proj_out) = diffusers ``Attention`` (Linear to_q/k/v/to_out.0)."""
    layers = [_norm(f"{ldm}.norm", f"{diff}.group_norm", width, None)]
    for name, dname in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        layers.append(Layer(f"{ldm}.{name}", f"{diff}.{dname}", (width, width, 1, 1), "conv1x1", None, None,
                            diffusers_shape=(width, width)))
    return layers


def _vae_mid(side: str, width: int) -> list[Layer]:
    return [
        *_vae_resnet(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", width, width),
        *_vae_attention(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", width),
        *_vae_resnet(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", width, width),
    ]


def vae_layers(cfg: Mapping[str, object]) -> list[Layer]:
    """Every layer of the LDM ``AutoencoderKL`` (encoder, decoder, quant convs) in state-dict order."""
    chans = tuple(int(c) for c in cfg["channels"])  # type: ignore[union-attr]
    R, z = int(cfg["num_res_blocks"]), int(cfg["z_channels"])  # type: ignore[call-overload]
    image_in, image_out = int(cfg["in_channels"]), int(cfg["out_channels"])  # type: ignore[call-overload]
    last = len(chans) - 1
    layers = [_conv("encoder.conv_in", "encoder.conv_in", chans[0], image_in, 3, None, None)]
    ch = chans[0]
    for i, cout in enumerate(chans):
        for j in range(R):
            layers += _vae_resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", ch, cout)
            ch = cout
        if i < last:
            layers.append(_conv(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv",
                                ch, ch, 3, None, None))
    layers += _vae_mid("encoder", ch)
    layers += [_norm("encoder.norm_out", "encoder.conv_norm_out", ch, None),
               _conv("encoder.conv_out", "encoder.conv_out", 2 * z, ch, 3, None, None),
               _conv("decoder.conv_in", "decoder.conv_in", ch, z, 3, None, None)]
    layers += _vae_mid("decoder", ch)
    # The decoder is built from the deepest level up but stored by level index (``up.0`` = top level).
    ups: dict[int, list[Layer]] = {}
    for i in reversed(range(len(chans))):
        x, cout, level = last - i, chans[i], []
        for j in range(R + 1):
            level += _vae_resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{x}.resnets.{j}", ch, cout)
            ch = cout
        if i > 0:
            level.append(_conv(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{x}.upsamplers.0.conv",
                               ch, ch, 3, None, None))
        ups[i] = level
    for i in range(len(chans)):
        layers += ups[i]
    layers += [_norm("decoder.norm_out", "decoder.conv_norm_out", ch, None),
               _conv("decoder.conv_out", "decoder.conv_out", image_out, ch, 3, None, None),
               _conv("quant_conv", "quant_conv", 2 * z, 2 * z, 1, None, None),
               _conv("post_quant_conv", "post_quant_conv", z, z, 1, None, None)]
    return layers


def vae_table(cfg: Mapping[str, object]) -> ComponentTable:
    """The VAE under ``first_stage_model.``; diffusers keys ``vae.<path>`` (no LoRA targets).

    The mid-block attention q/k/v/proj_out are (C, C, 1, 1) convs in the reference layout and (C, C) Linear
    weights in diffusers (same data, reshape when moving between the two).
    """
    return _component(vae_layers(cfg), prefix=VAE_PREFIX, diffusers_prefix="vae", component="vae",
                      kohya_prefix=None)


def vae_config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """The VAE config of the ``first_stage_model.*`` tensors, or None when absent or not an LDM VAE."""
    p = VAE_PREFIX
    conv_in, dec_in, dec_out = (shapes.get(f"{p}{k}.weight") for k in
                                ("encoder.conv_in", "decoder.conv_in", "decoder.conv_out"))
    if conv_in is None or dec_in is None or dec_out is None:
        return None
    levels = sorted(_indices(shapes, f"{p}encoder.down."))
    widths = [shapes.get(f"{p}encoder.down.{i}.block.0.conv1.weight") for i in levels]
    if not levels or levels != list(range(len(levels))) or any(w is None for w in widths):
        return None
    cfg: dict[str, object] = {
        "in_channels": conv_in[1],
        "out_channels": dec_out[0],
        "channels": tuple(w[0] for w in widths),  # type: ignore[index]
        "num_res_blocks": len(_indices(shapes, f"{p}encoder.down.0.block.")),
        "z_channels": dec_in[1],
    }
    return cfg if table_matches(vae_table(cfg).tensors, shapes) else None


# ------------------------------------------------------------------------------- text-encoder configs


def clip_config_from_shapes(shapes: Mapping[str, Shape], prefix: str, template: Mapping[str, object],
                            ) -> dict[str, object] | None:
    """Config of an HF CLIP text model whose ``text_model`` sits at ``prefix`` (None when absent).

    Shape fields come from the file (hidden, layers, intermediate, vocab, positions, projection,
    position_ids); every other field (flags the weights cannot show) is taken from ``template``; heads follow
    :func:`heads_for_width`. None as well when the encoder table of the derived config differs from the file.
    """
    tok = shapes.get(f"{prefix}embeddings.token_embedding.weight")
    pos = shapes.get(f"{prefix}embeddings.position_embedding.weight")
    fc1 = shapes.get(f"{prefix}encoder.layers.0.mlp.fc1.weight")
    if tok is None or pos is None or fc1 is None:
        return None
    root = prefix[: -len("text_model.")] if prefix.endswith("text_model.") else None
    proj = shapes.get(f"{root}text_projection.weight") if root is not None else None
    cfg = {
        **template,
        "hidden": tok[1], "layers": len(_indices(shapes, f"{prefix}encoder.layers.")),
        "heads": heads_for_width(tok[1]), "intermediate": fc1[0], "vocab": tok[0], "positions": pos[0],
        "projection": None if proj is None else proj[0],
        "position_ids": f"{prefix}embeddings.position_ids" in shapes,
    }
    table = clip_text(prefix, cfg, component="te", block=None, kohya_prefix="te", diffusers_prefix="te")
    return cfg if table_matches(table.tensors, shapes) else None


def openclip_config_from_shapes(shapes: Mapping[str, Shape], prefix: str, template: Mapping[str, object],
                                *, diffusers_drops_last: bool) -> dict[str, object] | None:
    """Config of an OpenCLIP text tower at ``prefix`` (None when absent).

    ``diffusers_drops_last``: the diffusers text encoder keeps all but the last resblock (SD2) instead of all
    of them (SDXL). ``diffusers_projection`` and other flags come from ``template``. None as well when the
    encoder table of the derived config differs from the file.
    """
    tok = shapes.get(f"{prefix}token_embedding.weight")
    pos = shapes.get(f"{prefix}positional_embedding")
    fc = shapes.get(f"{prefix}transformer.resblocks.0.mlp.c_fc.weight")
    if tok is None or pos is None or fc is None:
        return None
    layers = len(_indices(shapes, f"{prefix}transformer.resblocks."))
    proj = shapes.get(f"{prefix}text_projection")
    cfg = {
        **template,
        "hidden": tok[1], "layers": layers, "heads": heads_for_width(tok[1]), "intermediate": fc[0],
        "vocab": tok[0], "positions": pos[0], "projection": None if proj is None else proj[1],
        "logit_scale": f"{prefix}logit_scale" in shapes,
        # A file re-assembled from a diffusers folder holds only the layers diffusers keeps (and no
        # text_projection, which diffusers drops together with the last SD2 layer): all of them are kept.
        "diffusers_layers": layers - 1 if diffusers_drops_last and proj is not None else layers,
    }
    table = openclip_text(prefix, cfg, component="te", block=None, kohya_prefix="te", diffusers_prefix="te")
    return cfg if table_matches(table.tensors, shapes) else None


# ------------------------------------------------------------------------------------------------ assemble


def assemble(arch: str, config: Mapping[str, object], components: Sequence[object], *,
             reference_layout: str) -> ModelTable:
    """Join component tables (:class:`ComponentTable` or ``EncoderTable``; None entries skipped) into a
    :class:`ModelTable` with two layouts: ``reference_layout`` (identity map over every tensor) and
    ``"diffusers"`` (component-folder keys; tensors diffusers does not store are absent)."""
    tensors: dict[str, Shape] = {}
    modules: list[ModuleSpec] = []
    dmap: dict[str, FileKeys] = {}
    transposed: set[str] = set()
    for comp in components:
        if comp is None:
            continue
        clash = tensors.keys() & comp.tensors.keys()  # type: ignore[attr-defined]
        if clash:
            raise ValueError(f"components overlap on {sorted(clash)[:3]}")
        tensors.update(comp.tensors)  # type: ignore[attr-defined]
        modules.extend(comp.modules)  # type: ignore[attr-defined]
        dmap.update(comp.diffusers_map)  # type: ignore[attr-defined]
        transposed.update(getattr(comp, "transposed", ()))
    identity = {k: ((k, None),) for k in tensors}
    return ModelTable(
        arch=arch,
        config=config,
        tensors=tensors,
        modules=tuple(modules),
        layouts={reference_layout: Layout(reference_layout, identity),
                 "diffusers": Layout("diffusers", dmap, transposed=frozenset(transposed))},
    )
