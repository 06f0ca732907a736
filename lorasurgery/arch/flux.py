"""FLUX.1 (dev, schnell and their derivatives) as data.

The table is built by walking the BFL ``Flux`` model forward (``img_in``, ``time_in``, ``vector_in``,
``guidance_in``, ``txt_in``, the double-stream blocks, the single-stream blocks, ``final_layer``), then the
text encoders as ComfyUI stores them in all-in-one checkpoints.

Reference layout ("bfl"): bare BFL keys (``double_blocks.0.img_attn.qkv.weight``) for the transformer;
``text_encoders.clip_l.transformer.text_model.*`` (HF CLIP-L, with ComfyUI's ``text_projection.weight``),
``text_encoders.t5xxl.transformer.*`` (HF T5 v1.1 XXL, ``shared.weight`` only) and the two scalar
``text_encoders.{clip_l,t5xxl}.logit_scale`` of ComfyUI checkpoints. The BFL release itself ships the
transformer alone; the text encoders and the VAE are separate files. VAE tensors (``vae.*`` in ComfyUI
checkpoints) are not tabled: they are passed through untouched.

Layouts:

* ``"bfl"`` — identity (a BFL release file holds the transformer subset).
* ``"comfy"`` — ComfyUI/Forge checkpoints: ``model.diffusion_model.`` + BFL keys; text encoders unchanged.
* ``"diffusers"`` — the pipeline folder: ``transformer.`` + diffusers ``FluxTransformer2DModel`` keys, with
  ``qkv``/``linear1`` (weights and biases) split by rows into ``to_q``/``to_k``/``to_v``(/``proj_mlp``) and
  ``final_layer.adaLN_modulation.1`` stored with its shift/scale halves swapped (``norm_out.linear``);
  ``text_encoder.`` (``CLIPTextModel``, no projection) and ``text_encoder_2.`` (``T5EncoderModel``).

Components: ``transformer``, ``te1`` (CLIP-L, block ``CLIP``), ``te2`` (T5-XXL, block ``T5``). T5 is
FLUX's *second* text encoder (diffusers ``text_encoder_2``), hence ``te2``; its kohya prefix is nonetheless
``lora_te3`` (sd-scripts), and OneTrainer/ComfyUI's ``lora_te2`` spelling is recorded as the ``"kohya_alt"``
naming scheme on every T5 module.

Block layout ``"flux"`` (alias ``"flux-61"`` for the released depths): CLIP, T5, IN, D00..D18, S00..S37, OUT.

The generic pieces (:class:`DiTTableBuilder`, text-encoder config recovery) are shared with
:mod:`lorasurgery.arch.sd3`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .base import ArchSpec, Layout, ModelTable, ModuleSpec, Part, Shape
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
    "FLUX",
    "DiTTableBuilder",
    "MissingShape",
    "Split",
    "block_layouts",
    "build",
    "cfg_int",
    "clip_config_from_shapes",
    "config_from_shapes",
    "count_indexed",
    "dims",
    "find_prefix",
    "real_config",
    "schnell_config",
    "strip_prefix",
    "t5_config_from_shapes",
    "thirds",
    "tiny_config",
]

FileKeys = tuple[tuple[str, tuple[int, int] | None], ...]
Config = Mapping[str, object]

DIFFUSERS = "diffusers"


# ============================================================================================ shared DiT builder


@dataclass(frozen=True)
class Split:
    """One row block of a fused reference weight as diffusers stores it: LoRA part ``part`` covers rows
    ``[start, stop)`` and is the diffusers module ``path`` (relative to the transformer, no ``.weight``)."""

    part: str
    start: int
    stop: int
    path: str


def thirds(paths: Sequence[str], width: int) -> tuple[Split, ...]:
    """Splits q, k, v of a fused ``qkv`` weight with ``width`` rows per part, named by ``paths``."""
    return tuple(Split(name, j * width, (j + 1) * width, p) for j, (name, p) in enumerate(zip("qkv", paths)))


Diffusers = str | Sequence[Split] | None


@dataclass
class DiTTableBuilder:
    """Accumulates a diffusion transformer's tensors, LoRA modules and layout maps while its forward is walked.

    Transformer tensors are given by their *local* key (their key inside the transformer, e.g.
    ``double_blocks.0.img_attn.qkv.weight``). ``prefixes`` maps every single-file layout to the prefix its files
    put in front of local keys; the reference key is the local key under ``prefixes[reference]``. The
    ``"diffusers"`` layout gets explicit file keys under ``transformer.``. Text-encoder tensors keep their
    reference key in every single-file layout and use the encoder table's diffusers map.
    """

    reference: str
    prefixes: Mapping[str, str]
    component: str = "transformer"
    kohya_prefix: str = "lora_unet"
    diffusers_prefix: str = "transformer"
    tensors: dict[str, Shape] = field(default_factory=dict, init=False)
    modules: list[ModuleSpec] = field(default_factory=list, init=False)
    maps: dict[str, dict[str, FileKeys]] = field(default_factory=dict, init=False)  # layout -> key map
    swapped: set[str] = field(default_factory=set, init=False)  # reference keys swapped in diffusers

    def __post_init__(self) -> None:
        if self.reference not in self.prefixes:
            raise ValueError(f"reference layout {self.reference!r} not among {sorted(self.prefixes)}")
        self.maps = {name: {} for name in (*self.prefixes, DIFFUSERS)}

    # ------------------------------------------------------------------------------------------ tensors

    def ref(self, local: str) -> str:
        """Reference key of a transformer-local key."""
        return self.prefixes[self.reference] + local

    def _record(self, key: str, shape: Shape, single: Mapping[str, str], diffusers: FileKeys | None) -> None:
        if key in self.tensors:
            raise ValueError(f"duplicate tensor {key}")
        self.tensors[key] = shape
        for layout, file_key in single.items():
            self.maps[layout][key] = ((file_key, None),)
        if diffusers is not None:
            self.maps[DIFFUSERS][key] = diffusers

    def _diffusers_keys(self, diffusers: Diffusers, suffix: str) -> FileKeys | None:
        """diffusers file keys of a tensor: whole (``diffusers`` is a path) or split by rows."""
        if diffusers is None:
            return None
        if isinstance(diffusers, str):
            return ((f"{self.diffusers_prefix}.{diffusers}{suffix}", None),)
        return tuple((f"{self.diffusers_prefix}.{s.path}{suffix}", (s.start, s.stop)) for s in diffusers)

    def tensor(self, local: str, shape: Shape, diffusers: Diffusers, *, swapped: bool = False) -> str:
        """Record a transformer tensor (not a LoRA target on its own); returns its reference key.

        ``diffusers``: the full diffusers key (relative to the transformer), row splits whose paths are full
        keys, or None when diffusers does not store it. ``swapped``: diffusers stores the row halves swapped.
        """
        key = self.ref(local)
        single = {layout: prefix + local for layout, prefix in self.prefixes.items()}
        self._record(key, shape, single, self._diffusers_keys(diffusers, ""))
        if swapped:
            self.swapped.add(key)
        return key

    def linear(self, local: str, shape: Shape, *, block: str | None, group: str, diffusers: Diffusers,
               bias: bool = True, swapped: bool = False, kind: str = "linear") -> ModuleSpec:
        """Record a Linear/Conv LoRA target at transformer-local module path ``local`` (no ``.weight``).

        Adds ``<local>.weight`` (and ``.bias``) to the tensors and the module to the targets. kohya name:
        ``lora_unet_`` + ``local`` with dots turned into underscores. diffusers: a module path (whole module)
        or row splits (fused weight; names go on the parts, biases split alike).
        """
        w = self.ref(f"{local}.weight")
        single = {layout: f"{prefix}{local}.weight" for layout, prefix in self.prefixes.items()}
        self._record(w, shape, single, self._diffusers_keys(diffusers, ".weight"))
        b = None
        if bias:
            b = self.ref(f"{local}.bias")
            single_b = {layout: f"{prefix}{local}.bias" for layout, prefix in self.prefixes.items()}
            self._record(b, (shape[0],), single_b, self._diffusers_keys(diffusers, ".bias"))
        names = {"kohya": f"{self.kohya_prefix}_{local.replace('.', '_')}"}
        parts: tuple[Part, ...] = ()
        if isinstance(diffusers, str):
            names[DIFFUSERS] = f"{self.diffusers_prefix}.{diffusers}"
        elif diffusers is not None:
            parts = tuple(Part(s.part, s.start, s.stop, {DIFFUSERS: f"{self.diffusers_prefix}.{s.path}"})
                          for s in diffusers)
        swapped_in = frozenset({DIFFUSERS}) if swapped else frozenset()
        if swapped:
            self.swapped.update(k for k in (w, b) if k is not None)
        spec = ModuleSpec(key=w, shape=shape, component=self.component, block=block, names=names, parts=parts,
                          bias=b, swapped_in=swapped_in, kind=kind, group=group)
        self.modules.append(spec)
        return spec

    def plain(self, key: str, shape: Shape) -> None:
        """Record a non-transformer reference tensor kept verbatim in single-file layouts and absent from
        diffusers folders (ComfyUI's text-encoder ``logit_scale`` scalars)."""
        self._record(key, shape, {layout: key for layout in self.prefixes}, None)

    def encoder(self, table: EncoderTable, *, alt_names: Mapping[str, EncoderTable] | None = None,
                not_in_diffusers: Sequence[str] = ()) -> None:
        """Add a text encoder (reference keys as given, identity in single-file layouts).

        ``alt_names``: extra naming schemes taken from tables of the same encoder built with another prefix
        (modules matched by key). ``not_in_diffusers``: reference keys the diffusers component lacks (FLUX's
        CLIP-L ``text_projection``); their tensors leave the diffusers map and their modules lose the
        diffusers name.
        """
        if table.transposed:
            raise ValueError("transposed diffusers tensors are not supported in DiT tables")
        dropped = frozenset(not_in_diffusers)
        for key, shape in table.tensors.items():
            diffusers = None if key in dropped else table.diffusers_map.get(key)
            self._record(key, shape, {layout: key for layout in self.prefixes}, diffusers)
        extra = {scheme: {m.key: m for m in alt.modules} for scheme, alt in (alt_names or {}).items()}
        for module in table.modules:
            names = dict(module.names)
            for scheme, by_key in extra.items():
                names[scheme] = by_key[module.key].names["kohya"]
            if module.key in dropped:
                names.pop(DIFFUSERS, None)
            self.modules.append(dataclasses.replace(module, names=names))

    # ------------------------------------------------------------------------------------------ result

    def table(self, arch: str, config: Config) -> ModelTable:
        """The finished :class:`ModelTable`."""
        layouts = {
            name: Layout(name, dict(key_map), frozenset(self.swapped) if name == DIFFUSERS else frozenset())
            for name, key_map in self.maps.items()
        }
        return ModelTable(arch=arch, config=dict(config), tensors=dict(self.tensors), modules=tuple(self.modules),
                          layouts=layouts)


# ============================================================================================ shape helpers


def count_indexed(shapes: Mapping[str, Shape], template: str) -> int:
    """How many consecutive indices ``i = 0, 1, ...`` have ``template.format(i)`` in ``shapes``."""
    n = 0
    while template.format(n) in shapes:
        n += 1
    return n


def find_prefix(shapes: Mapping[str, Shape], detection_key: str) -> str | None:
    """The prefix under which ``detection_key`` occurs in ``shapes`` ('' when bare; None when absent)."""
    if detection_key in shapes:
        return ""
    for key in shapes:
        if key.endswith("." + detection_key):
            return key[: -len(detection_key)]
    return None


def strip_prefix(shapes: Mapping[str, Shape], prefix: str) -> dict[str, Shape]:
    """The entries of ``shapes`` under ``prefix``, with the prefix removed."""
    if not prefix:
        return dict(shapes)
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


class MissingShape(LookupError):
    """A tensor that config recovery needs is absent (or has another rank): not this model's file."""


def dims(shapes: Mapping[str, Shape], key: str, ndim: int) -> Shape:
    """The shape of ``key``, which must exist with ``ndim`` dimensions (else :class:`MissingShape`)."""
    shape = shapes.get(key)
    if shape is None or len(shape) != ndim:
        raise MissingShape(key)
    return tuple(shape)


def _known_heads(hidden: int, known: Sequence[Config], default_head_dim: int = 64) -> int:
    """Attention heads of a CLIP text encoder of width ``hidden`` (not readable from shapes): those of a
    known config of the same width, else ``hidden // default_head_dim``."""
    for cfg in known:
        if cfg.get("hidden") == hidden:
            return int(cfg["heads"])  # type: ignore[call-overload]
    return max(1, hidden // default_head_dim)


def clip_config_from_shapes(root: str, shapes: Mapping[str, Shape],
                            known: Sequence[Config]) -> dict[str, object] | None:
    """Config (as :func:`~lorasurgery.arch.text_encoders.clip_text` takes it) of an HF CLIP text model whose
    ``text_model.`` lies under ``root``; None when its token embedding is absent. ``known`` supplies the head
    count (matched by width)."""
    p = f"{root}text_model."
    try:
        vocab, hidden = dims(shapes, f"{p}embeddings.token_embedding.weight", 2)
        projection = shapes.get(f"{root}text_projection.weight")
        return {
            "hidden": hidden,
            "layers": count_indexed(shapes, p + "encoder.layers.{}.self_attn.q_proj.weight"),
            "heads": _known_heads(hidden, known),
            "intermediate": dims(shapes, f"{p}encoder.layers.0.mlp.fc1.weight", 2)[0],
            "vocab": vocab,
            "positions": dims(shapes, f"{p}embeddings.position_embedding.weight", 2)[0],
            "projection": projection[0] if projection is not None else None,
            "position_ids": f"{p}embeddings.position_ids" in shapes,
        }
    except MissingShape:
        return None


def t5_config_from_shapes(prefix: str, shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """Config (as :func:`~lorasurgery.arch.text_encoders.t5_encoder` takes it) of an HF T5 encoder under
    ``prefix``; None when its ``shared.weight`` (or another tensor read here) is absent."""
    attn = f"{prefix}encoder.block.0.layer.0.SelfAttention."
    try:
        vocab, hidden = dims(shapes, f"{prefix}shared.weight", 2)
        buckets, heads = dims(shapes, f"{attn}relative_attention_bias.weight", 2)
        return {
            "hidden": hidden,
            "layers": count_indexed(shapes, prefix + "encoder.block.{}.layer.0.SelfAttention.q.weight"),
            "heads": heads,
            "head_dim": dims(shapes, f"{attn}q.weight", 2)[0] // heads,
            "intermediate": dims(shapes, f"{prefix}encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 2)[0],
            "vocab": vocab,
            "buckets": buckets,
            "embed_tokens": f"{prefix}encoder.embed_tokens.weight" in shapes,
        }
    except MissingShape:
        return None


def cfg_int(config: Config, key: str) -> int:
    """A positive integer config value."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config {key!r} must be a positive int, got {value!r}")
    return value


# ============================================================================================ FLUX

CLIP_ROOT = "text_encoders.clip_l.transformer."
T5_ROOT = "text_encoders.t5xxl.transformer."
LOGIT_SCALES = ("text_encoders.clip_l.logit_scale", "text_encoders.t5xxl.logit_scale")
DETECTION_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
TIME_DIM = 256  # sinusoidal timestep / guidance embedding width

# ComfyUI's CLIP-L in FLUX checkpoints: HF CLIPTextModel plus text_projection, no position_ids buffer.
FLUX_CLIP_L: dict[str, object] = {**REAL_CLIP_L, "projection": REAL_CLIP_L["hidden"], "position_ids": False}
TINY_FLUX_CLIP_L: dict[str, object] = {**TINY_CLIP_L, "projection": TINY_CLIP_L["hidden"], "position_ids": False}
# ComfyUI stores only ``shared.weight`` (no tied ``encoder.embed_tokens.weight``).
FLUX_T5: dict[str, object] = {**REAL_T5XXL, "embed_tokens": False}
TINY_FLUX_T5: dict[str, object] = {**TINY_T5, "embed_tokens": False}


def real_config() -> dict[str, object]:
    """FLUX.1-dev (guidance-distilled: has ``guidance_in``)."""
    return {
        "hidden": 3072, "heads": 24, "depth_double": 19, "depth_single": 38, "mlp_ratio": 4.0,
        "in_channels": 64, "out_channels": 64, "context_in": 4096, "vec_in": 768, "guidance": True,
        "clip_l": dict(FLUX_CLIP_L), "t5": dict(FLUX_T5),
    }


def schnell_config() -> dict[str, object]:
    """FLUX.1-schnell: FLUX.1-dev without ``guidance_in``."""
    return {**real_config(), "guidance": False}


def tiny_config() -> dict[str, object]:
    """Same key structure as FLUX.1-dev at toy widths: H=64, 2 heads of 32 (diffusers ``axes_dims_rope``
    (8, 12, 12)), 2 double + 2 single blocks, guidance on, tiny CLIP-L and T5."""
    return {
        "hidden": 64, "heads": 2, "depth_double": 2, "depth_single": 2, "mlp_ratio": 4.0,
        "in_channels": 16, "out_channels": 16, "context_in": 32, "vec_in": 16, "guidance": True,
        "clip_l": dict(TINY_FLUX_CLIP_L), "t5": dict(TINY_FLUX_T5),
    }


@dataclass(frozen=True)
class _Dims:
    """Validated FLUX widths."""

    hidden: int
    head_dim: int
    mlp: int
    depth_double: int
    depth_single: int
    in_channels: int
    out_channels: int
    context_in: int
    vec_in: int
    guidance: bool

    @classmethod
    def of(cls, config: Config) -> "_Dims":
        hidden, heads = cfg_int(config, "hidden"), cfg_int(config, "heads")
        if hidden % heads:
            raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
        mlp = float(config["mlp_ratio"]) * hidden  # type: ignore[arg-type]
        if mlp != int(mlp) or mlp <= 0:
            raise ValueError(f"mlp_ratio {config['mlp_ratio']!r} does not give a whole MLP width")
        return cls(hidden, hidden // heads, int(mlp), cfg_int(config, "depth_double"),
                   cfg_int(config, "depth_single"), cfg_int(config, "in_channels"),
                   cfg_int(config, "out_channels"), cfg_int(config, "context_in"), cfg_int(config, "vec_in"),
                   bool(config["guidance"]))


@dataclass(frozen=True)
class _Stream:
    """diffusers names of one stream of a double block (paths relative to ``transformer_blocks.i.``)."""

    name: str  # BFL stream prefix: "img" / "txt"
    mod: str
    qkv: tuple[str, str, str]
    norm_q: str
    norm_k: str
    proj: str
    mlp_in: str
    mlp_out: str


_STREAMS = (
    _Stream("img", "norm1.linear", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.norm_q", "attn.norm_k",
            "attn.to_out.0", "ff.net.0.proj", "ff.net.2"),
    _Stream("txt", "norm1_context.linear", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "attn.norm_added_q", "attn.norm_added_k", "attn.to_add_out", "ff_context.net.0.proj",
            "ff_context.net.2"),
)

# Top-level MLP embedders, in BFL order: (BFL name, diffusers path, name of the _Dims input width or None for
# the sinusoidal timestep width, present only in guidance-distilled models).
_EMBEDDERS: tuple[tuple[str, str, str | None, bool], ...] = (
    ("time_in", "time_text_embed.timestep_embedder", None, False),
    ("vector_in", "time_text_embed.text_embedder", "vec_in", False),
    ("guidance_in", "time_text_embed.guidance_embedder", None, True),
)


def double_block_id(i: int) -> str:
    return f"D{i:02d}"


def single_block_id(i: int) -> str:
    return f"S{i:02d}"


def _double_block(b: DiTTableBuilder, d: _Dims, i: int) -> None:
    """``double_blocks.i``: per stream mod, qkv (+ q/k RMS norms), proj, two-layer MLP."""
    base, dif, blk, h = f"double_blocks.{i}.", f"transformer_blocks.{i}.", double_block_id(i), d.hidden
    for s in _STREAMS:
        b.linear(f"{base}{s.name}_mod.lin", (6 * h, h), block=blk, group="attn", diffusers=f"{dif}{s.mod}")
        b.linear(f"{base}{s.name}_attn.qkv", (3 * h, h), block=blk, group="attn",
                 diffusers=thirds([f"{dif}{p}" for p in s.qkv], h))
        b.tensor(f"{base}{s.name}_attn.norm.query_norm.scale", (d.head_dim,), f"{dif}{s.norm_q}.weight")
        b.tensor(f"{base}{s.name}_attn.norm.key_norm.scale", (d.head_dim,), f"{dif}{s.norm_k}.weight")
        b.linear(f"{base}{s.name}_attn.proj", (h, h), block=blk, group="attn", diffusers=f"{dif}{s.proj}")
        b.linear(f"{base}{s.name}_mlp.0", (d.mlp, h), block=blk, group="attn", diffusers=f"{dif}{s.mlp_in}")
        b.linear(f"{base}{s.name}_mlp.2", (h, d.mlp), block=blk, group="attn", diffusers=f"{dif}{s.mlp_out}")


def _single_block(b: DiTTableBuilder, d: _Dims, i: int) -> None:
    """``single_blocks.i``: linear1 = [q; k; v; mlp] rows, linear2, q/k norms, modulation."""
    base, dif, blk, h = f"single_blocks.{i}.", f"single_transformer_blocks.{i}.", single_block_id(i), d.hidden
    splits = (*thirds([f"{dif}attn.to_q", f"{dif}attn.to_k", f"{dif}attn.to_v"], h),
              Split("mlp", 3 * h, 3 * h + d.mlp, f"{dif}proj_mlp"))
    b.linear(f"{base}linear1", (3 * h + d.mlp, h), block=blk, group="attn", diffusers=splits)
    b.linear(f"{base}linear2", (h, h + d.mlp), block=blk, group="attn", diffusers=f"{dif}proj_out")
    b.tensor(f"{base}norm.query_norm.scale", (d.head_dim,), f"{dif}attn.norm_q.weight")
    b.tensor(f"{base}norm.key_norm.scale", (d.head_dim,), f"{dif}attn.norm_k.weight")
    b.linear(f"{base}modulation.lin", (3 * h, h), block=blk, group="attn", diffusers=f"{dif}norm.linear")


def _inputs(b: DiTTableBuilder, d: _Dims) -> None:
    """``img_in``, the MLP embedders (``guidance_in`` only for guidance-distilled models), ``txt_in``."""
    h = d.hidden
    b.linear("img_in", (h, d.in_channels), block="IN", group="extra", diffusers="x_embedder")
    for name, path, width, needs_guidance in _EMBEDDERS:
        if needs_guidance and not d.guidance:
            continue
        fan_in = TIME_DIM if width is None else getattr(d, width)
        b.linear(f"{name}.in_layer", (h, fan_in), block="IN", group="extra", diffusers=f"{path}.linear_1")
        b.linear(f"{name}.out_layer", (h, h), block="IN", group="extra", diffusers=f"{path}.linear_2")
    b.linear("txt_in", (h, d.context_in), block="IN", group="extra", diffusers="context_embedder")


def _final(b: DiTTableBuilder, d: _Dims) -> None:
    """``final_layer``: linear and the [shift; scale] adaLN projection (diffusers: [scale; shift])."""
    h = d.hidden
    b.linear("final_layer.linear", (d.out_channels, h), block="OUT", group="extra", diffusers="proj_out")
    b.linear("final_layer.adaLN_modulation.1", (2 * h, h), block="OUT", group="extra",
             diffusers="norm_out.linear", swapped=True)


def _encoders(b: DiTTableBuilder, config: Config) -> None:
    """CLIP-L and T5 under ``text_encoders.*`` (ComfyUI all-in-one layout) when configured."""
    clip_cfg, t5_cfg = config.get("clip_l"), config.get("t5")
    if clip_cfg is not None:
        clip = clip_text(f"{CLIP_ROOT}text_model.", clip_cfg, component="te1", block="CLIP",  # type: ignore[arg-type]
                         kohya_prefix="lora_te1", diffusers_prefix="text_encoder")
        # diffusers' FLUX text_encoder is a plain CLIPTextModel: no text_projection.
        b.encoder(clip, not_in_diffusers=[f"{CLIP_ROOT}text_projection.weight"])
        b.plain(LOGIT_SCALES[0], ())
    if t5_cfg is not None:
        def t5(kohya_prefix: str) -> EncoderTable:
            return t5_encoder(T5_ROOT, t5_cfg, component="te2", block="T5",  # type: ignore[arg-type]
                              kohya_prefix=kohya_prefix, diffusers_prefix="text_encoder_2")

        b.encoder(t5("lora_te3"), alt_names={"kohya_alt": t5("lora_te2")})
        b.plain(LOGIT_SCALES[1], ())


def build(config: Config) -> ModelTable:
    """The FLUX table for ``config`` (see :func:`real_config` for the keys)."""
    d = _Dims.of(config)
    b = DiTTableBuilder(reference="bfl", prefixes={"bfl": "", "comfy": "model.diffusion_model."})
    _inputs(b, d)
    for i in range(d.depth_double):
        _double_block(b, d, i)
    for i in range(d.depth_single):
        _single_block(b, d, i)
    _final(b, d)
    _encoders(b, config)
    return b.table("flux", config)


def block_layouts(config: Config) -> dict[str, tuple[str, ...]]:
    """``"flux"``: CLIP, T5, IN, D00.., S00.., OUT for the configured depths; also under ``"flux-<n>"``
    (``"flux-61"`` for FLUX.1)."""
    ids = ("CLIP", "T5", "IN",
           *(double_block_id(i) for i in range(cfg_int(config, "depth_double"))),
           *(single_block_id(i) for i in range(cfg_int(config, "depth_single"))), "OUT")
    return {"flux": ids, f"flux-{len(ids)}": ids}


def config_from_shapes(shapes: Mapping[str, Shape]) -> dict[str, object] | None:
    """FLUX config from checkpoint shapes (bare BFL keys or any prefix such as ``model.diffusion_model.``).

    None unless ``double_blocks.0.img_attn.norm.key_norm.scale`` is present, or when a tensor read here is
    missing (a partial file). Depths count the blocks, widths come from ``img_in``/``txt_in``/``vector_in``/
    ``final_layer``, dev vs schnell from ``guidance_in``. Text encoders come from ``text_encoders.*`` when
    present, else the released CLIP-L/T5 configs (the model has them even when the file does not).
    """
    prefix = find_prefix(shapes, DETECTION_KEY)
    if prefix is None:
        return None
    t = strip_prefix(shapes, prefix)
    try:
        hidden, in_channels = dims(t, "img_in.weight", 2)
        head_dim = dims(t, DETECTION_KEY, 1)[0]
        depth_double = count_indexed(t, "double_blocks.{}.img_attn.qkv.weight")
        depth_single = count_indexed(t, "single_blocks.{}.linear1.weight")
        if not depth_double or not depth_single or hidden % head_dim:
            return None
        transformer: dict[str, object] = {
            "hidden": hidden, "heads": hidden // head_dim, "depth_double": depth_double,
            "depth_single": depth_single, "mlp_ratio": dims(t, "double_blocks.0.img_mlp.0.weight", 2)[0] / hidden,
            "in_channels": in_channels, "out_channels": dims(t, "final_layer.linear.weight", 2)[0],
            "context_in": dims(t, "txt_in.weight", 2)[1], "vec_in": dims(t, "vector_in.in_layer.weight", 2)[1],
            "guidance": "guidance_in.in_layer.weight" in t,
        }
    except MissingShape:
        return None
    clip = clip_config_from_shapes(CLIP_ROOT, shapes, (FLUX_CLIP_L, TINY_FLUX_CLIP_L, REAL_CLIP_G, TINY_CLIP_G))
    t5 = t5_config_from_shapes(T5_ROOT, shapes)
    return {
        **transformer,
        "clip_l": clip if clip is not None else dict(FLUX_CLIP_L),
        "t5": t5 if t5 is not None else dict(FLUX_T5),
    }


FLUX = ArchSpec(
    name="flux",
    title="FLUX.1",
    block_layouts=block_layouts,
    full_layout="flux",
    real_config=real_config,
    tiny_config=tiny_config,
    build=build,
    config_from_shapes=config_from_shapes,
    variant_configs=lambda: (schnell_config(),),
)
