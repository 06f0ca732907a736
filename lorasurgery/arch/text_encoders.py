"""Tables of the text encoders used by SD1/SD2/SDXL/SD3/FLUX checkpoints.

Three families, each built forward from a small config by walking the model's layers:

* :func:`clip_text` — Hugging Face ``CLIPTextModel`` (``CLIPTextModelWithProjection`` when
  ``projection`` is set): SD1 ``cond_stage_model.transformer.text_model.``, SDXL TE1
  ``conditioner.embedders.0.transformer.text_model.``, SD3/FLUX ``text_encoders.clip_l.transformer.text_model.``
  and SD3 ``text_encoders.clip_g.transformer.text_model.``.
* :func:`openclip_text` — OpenCLIP text tower with fused ``attn.in_proj_weight``: SD2
  ``cond_stage_model.model.`` (ViT-H) and SDXL TE2 ``conditioner.embedders.1.model.`` (ViT-bigG).
  diffusers stores these as HF ``CLIPTextModel(WithProjection)``: q/k/v are row thirds of the fused
  weight and ``text_projection`` is stored transposed.
* :func:`t5_encoder` — Hugging Face ``T5EncoderModel`` (T5 v1.1 gated feed-forward):
  ``text_encoders.t5xxl.transformer.`` in SD3 / FLUX all-in-one files.

Every builder returns an :class:`EncoderTable` whose keys are *reference* keys (the single-file checkpoint
spelling, under the given prefix) and whose ``diffusers_map`` gives the key(s) of the same tensor in the
diffusers component folder (prefixed with the component folder name, e.g. ``text_encoder_2.``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .base import ModuleSpec, Part, Shape

__all__ = [
    "EncoderTable",
    "clip_text",
    "openclip_text",
    "t5_encoder",
    "TINY_CLIP_L",
    "REAL_CLIP_L",
    "TINY_OPENCLIP_H",
    "REAL_OPENCLIP_H",
    "TINY_OPENCLIP_BIGG",
    "REAL_OPENCLIP_BIGG",
    "TINY_CLIP_G",
    "REAL_CLIP_G",
    "TINY_T5",
    "REAL_T5XXL",
]

FileKeys = tuple[tuple[str, tuple[int, int] | None], ...]

# The path of the text transformer inside an HF ``CLIPTextModel(WithProjection)`` (transformers < 5).
_HF_TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class EncoderTable:
    """One text encoder, in reference keys.

    ``tensors``: every tensor of the encoder in the reference layout, in state-dict order.
    ``modules``: every weight a LoRA can target, names filled for ``"kohya"`` and ``"diffusers"``.
    ``diffusers_map``: reference key -> ((diffusers file key, rows or None), ...); reference keys that the
    diffusers component does not store (``position_ids``, ``logit_scale``, SD2's unused last layer) are absent.
    ``transposed``: reference keys whose diffusers tensor is the transpose of the reference tensor
    (OpenCLIP ``text_projection`` -> HF ``text_projection.weight``).
    """

    tensors: dict[str, Shape]
    modules: tuple[ModuleSpec, ...]
    diffusers_map: dict[str, FileKeys]
    transposed: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------- configs

TINY_CLIP_L: dict[str, object] = {
    "hidden": 32, "layers": 2, "heads": 2, "intermediate": 37, "vocab": 1000, "positions": 77,
    "projection": None, "position_ids": True,
}
REAL_CLIP_L: dict[str, object] = {
    "hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072, "vocab": 49408, "positions": 77,
    "projection": None, "position_ids": True,
}
TINY_OPENCLIP_H: dict[str, object] = {
    "hidden": 32, "layers": 2, "heads": 2, "intermediate": 37, "vocab": 1000, "positions": 77,
    "projection": 32, "logit_scale": True, "diffusers_layers": 1, "diffusers_projection": False,
}
# SD2: the file holds all 24 resblocks and text_projection; diffusers' ``text_encoder`` is a 23-layer
# ``CLIPTextModel`` (SD2 conditions on the penultimate layer) without projection.
REAL_OPENCLIP_H: dict[str, object] = {
    "hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096, "vocab": 49408, "positions": 77,
    "projection": 1024, "logit_scale": True, "diffusers_layers": 23, "diffusers_projection": False,
}
TINY_OPENCLIP_BIGG: dict[str, object] = {
    "hidden": 32, "layers": 2, "heads": 2, "intermediate": 37, "vocab": 1000, "positions": 77,
    "projection": 32, "logit_scale": True, "diffusers_layers": 2, "diffusers_projection": True,
}
# SDXL TE2: diffusers' ``text_encoder_2`` is a 32-layer ``CLIPTextModelWithProjection``.
REAL_OPENCLIP_BIGG: dict[str, object] = {
    "hidden": 1280, "layers": 32, "heads": 20, "intermediate": 5120, "vocab": 49408, "positions": 77,
    "projection": 1280, "logit_scale": True, "diffusers_layers": 32, "diffusers_projection": True,
}
TINY_CLIP_G: dict[str, object] = {
    "hidden": 32, "layers": 2, "heads": 2, "intermediate": 37, "vocab": 1000, "positions": 77,
    "projection": 32, "position_ids": False,
}
# SD3 CLIP-G: HF ``CLIPTextModelWithProjection`` layout.
REAL_CLIP_G: dict[str, object] = {
    "hidden": 1280, "layers": 32, "heads": 20, "intermediate": 5120, "vocab": 49408, "positions": 77,
    "projection": 1280, "position_ids": False,
}
TINY_T5: dict[str, object] = {
    "hidden": 32, "layers": 2, "heads": 2, "head_dim": 16, "intermediate": 37, "vocab": 1000,
    "buckets": 32, "embed_tokens": True,
}
# T5 v1.1 XXL encoder (google/t5-v1_1-xxl): d_model 4096, 24 blocks, 64 heads x 64, d_ff 10240.
REAL_T5XXL: dict[str, object] = {
    "hidden": 4096, "layers": 24, "heads": 64, "head_dim": 64, "intermediate": 10240, "vocab": 32128,
    "buckets": 32, "embed_tokens": True,
}


def _cfg_int(cfg: Mapping[str, object], key: str, default: int | None = None) -> int:
    """An integer config value; ``default`` when absent (KeyError when absent and no default)."""
    if key not in cfg:
        if default is None:
            raise KeyError(f"text-encoder config lacks {key!r}")
        return default
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"text-encoder config {key!r} must be a non-negative int, got {value!r}")
    return value


def _cfg_opt_int(cfg: Mapping[str, object], key: str) -> int | None:
    """An optional integer (``None`` or absent -> ``None``)."""
    if cfg.get(key) is None:
        return None
    return _cfg_int(cfg, key)


def _cfg_bool(cfg: Mapping[str, object], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"text-encoder config {key!r} must be a bool, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------- builder


@dataclass
class _Acc:
    """Accumulates one encoder's tensors, modules and diffusers map while its layers are walked."""

    component: str
    block: str | None
    kohya_prefix: str
    diffusers_prefix: str
    tensors: dict[str, Shape] = field(default_factory=dict)
    modules: list[ModuleSpec] = field(default_factory=list)
    diffusers_map: dict[str, FileKeys] = field(default_factory=dict)
    transposed: set[str] = field(default_factory=set)

    def names(self, hf_path: str, *, diffusers: bool = True) -> dict[str, str]:
        """LoRA names of the HF module at ``hf_path`` (dotted, no ``.weight``), derived forward."""
        out = {"kohya": f"{self.kohya_prefix}_{hf_path.replace('.', '_')}"}
        if diffusers:
            out["diffusers"] = f"{self.diffusers_prefix}.{hf_path}"
        return out

    def tensor(self, key: str, shape: Shape, hf_key: str | None = None, *, transposed: bool = False) -> None:
        """Record a reference tensor; ``hf_key`` (component-relative) is its whole-tensor diffusers key."""
        if key in self.tensors:
            raise ValueError(f"duplicate tensor {key}")
        self.tensors[key] = shape
        if hf_key is not None:
            self.diffusers_map[key] = ((f"{self.diffusers_prefix}.{hf_key}", None),)
            if transposed:
                self.transposed.add(key)

    def split_tensor(self, key: str, shape: Shape, hf_keys: tuple[str, ...] | None) -> None:
        """Record a fused tensor stored in diffusers as equal row blocks under ``hf_keys``."""
        self.tensor(key, shape)
        if hf_keys is None:
            return
        n = shape[0] // len(hf_keys)
        self.diffusers_map[key] = tuple(
            (f"{self.diffusers_prefix}.{k}", (j * n, (j + 1) * n)) for j, k in enumerate(hf_keys)
        )

    def linear(self, key: str, shape: Shape, hf_path: str, *, bias: str | None, group: str = "attn",
               diffusers: bool = True, transposed: bool = False) -> None:
        """Record a Linear LoRA target named after the HF module ``hf_path``."""
        self.modules.append(ModuleSpec(
            key=key, shape=shape, component=self.component, block=self.block,
            names=self.names(hf_path, diffusers=diffusers), bias=bias, group=group, transposed=transposed,
        ))


# Per-layer structure of HF CLIP, in state-dict order: (module path, kind). Kinds give the shapes.
_HF_CLIP_LAYER: tuple[tuple[str, str], ...] = (
    ("self_attn.k_proj", "attn"),
    ("self_attn.v_proj", "attn"),
    ("self_attn.q_proj", "attn"),
    ("self_attn.out_proj", "attn"),
    ("layer_norm1", "norm"),
    ("mlp.fc1", "fc1"),
    ("mlp.fc2", "fc2"),
    ("layer_norm2", "norm"),
)

# Per-layer structure of an OpenCLIP resblock, in state-dict order: (OpenCLIP path, HF path(s), kind).
# The fused in-projection lists the HF q, k, v paths in row order.
_OPENCLIP_LAYER: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("ln_1", ("layer_norm1",), "norm"),
    ("attn.in_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "fused"),
    ("attn.out_proj", ("self_attn.out_proj",), "attn"),
    ("ln_2", ("layer_norm2",), "norm"),
    ("mlp.c_fc", ("mlp.fc1",), "fc1"),
    ("mlp.c_proj", ("mlp.fc2",), "fc2"),
)

_PART_NAMES = ("q", "k", "v")


def _linear_shape(kind: str, hidden: int, intermediate: int) -> Shape:
    """(out, in) of a CLIP layer Linear of the given kind."""
    return {"attn": (hidden, hidden), "fc1": (intermediate, hidden), "fc2": (hidden, intermediate)}[kind]


def _clip_layer(acc: _Acc, ref: str, hf: str, hidden: int, intermediate: int) -> None:
    """One HF CLIP encoder layer: reference base ``ref`` and HF base ``hf`` (both ending in a dot)."""
    for path, kind in _HF_CLIP_LAYER:
        w, b = f"{ref}{path}.weight", f"{ref}{path}.bias"
        if kind == "norm":
            acc.tensor(w, (hidden,), f"{hf}{path}.weight")
            acc.tensor(b, (hidden,), f"{hf}{path}.bias")
            continue
        shape = _linear_shape(kind, hidden, intermediate)
        acc.tensor(w, shape, f"{hf}{path}.weight")
        acc.tensor(b, (shape[0],), f"{hf}{path}.bias")
        acc.linear(w, shape, f"{hf}{path}", bias=b)


def _text_model_root(prefix: str) -> str:
    """The prefix of an HF CLIP model given the prefix of its ``text_model.`` (for ``text_projection``)."""
    if not prefix.endswith(_HF_TEXT_MODEL):
        raise ValueError(f"a CLIP prefix with a projection must end in {_HF_TEXT_MODEL!r}: {prefix!r}")
    return prefix[: -len(_HF_TEXT_MODEL)]


def clip_text(prefix: str, cfg: Mapping[str, object], *, component: str, block: str | None,
              kohya_prefix: str, diffusers_prefix: str) -> EncoderTable:
    """Table of an HF ``CLIPTextModel`` (``...WithProjection`` when ``cfg["projection"]``) under ``prefix``.

    ``prefix`` is the reference prefix of the ``text_model`` (e.g. ``cond_stage_model.transformer.text_model.``);
    ``text_projection.weight`` (projection set) sits beside ``text_model.``. ``cfg``: hidden, layers,
    intermediate, vocab, positions, projection (None or its width), position_ids (the file keeps the
    ``embeddings.position_ids`` buffer, shape (1, positions); diffusers files never store it).
    LoRA targets: q/k/v/out_proj, fc1, fc2 of every layer (group "attn"); text_projection (group "extra").
    """
    hidden, layers = _cfg_int(cfg, "hidden"), _cfg_int(cfg, "layers")
    intermediate, projection = _cfg_int(cfg, "intermediate"), _cfg_opt_int(cfg, "projection")
    acc = _Acc(component, block, kohya_prefix, diffusers_prefix)
    hf = _HF_TEXT_MODEL
    if _cfg_bool(cfg, "position_ids", False):
        acc.tensor(f"{prefix}embeddings.position_ids", (1, _cfg_int(cfg, "positions")))
    for name, rows in (("token_embedding", "vocab"), ("position_embedding", "positions")):
        acc.tensor(f"{prefix}embeddings.{name}.weight", (_cfg_int(cfg, rows), hidden),
                   f"{hf}embeddings.{name}.weight")
    for i in range(layers):
        _clip_layer(acc, f"{prefix}encoder.layers.{i}.", f"{hf}encoder.layers.{i}.", hidden, intermediate)
    for suffix in ("weight", "bias"):
        acc.tensor(f"{prefix}final_layer_norm.{suffix}", (hidden,), f"{hf}final_layer_norm.{suffix}")
    if projection is not None:
        key = f"{_text_model_root(prefix)}text_projection.weight"
        acc.tensor(key, (projection, hidden), "text_projection.weight")
        acc.linear(key, (projection, hidden), "text_projection", bias=None, group="extra")
    return EncoderTable(acc.tensors, tuple(acc.modules), acc.diffusers_map, frozenset(acc.transposed))


def _openclip_layer(acc: _Acc, ref: str, hf: str, hidden: int, intermediate: int, in_diffusers: bool) -> None:
    """One OpenCLIP resblock at reference base ``ref``; ``hf`` is the HF layer base it converts to."""
    group = "attn" if in_diffusers else "extra"
    for path, hf_paths, kind in _OPENCLIP_LAYER:
        if kind == "norm":
            for s in ("weight", "bias"):
                acc.tensor(f"{ref}{path}.{s}", (hidden,), f"{hf}{hf_paths[0]}.{s}" if in_diffusers else None)
        elif kind == "fused":
            w, b = f"{ref}{path}_weight", f"{ref}{path}_bias"
            n = len(hf_paths)
            acc.split_tensor(w, (n * hidden, hidden),
                             tuple(f"{hf}{p}.weight" for p in hf_paths) if in_diffusers else None)
            acc.split_tensor(b, (n * hidden,), tuple(f"{hf}{p}.bias" for p in hf_paths) if in_diffusers else None)
            parts = tuple(
                Part(name, j * hidden, (j + 1) * hidden, acc.names(f"{hf}{p}", diffusers=in_diffusers))
                for j, (name, p) in enumerate(zip(_PART_NAMES, hf_paths))
            )
            acc.modules.append(ModuleSpec(key=w, shape=(n * hidden, hidden), component=acc.component,
                                          block=acc.block, parts=parts, bias=b, group=group))
        else:
            shape = _linear_shape(kind, hidden, intermediate)
            w, b = f"{ref}{path}.weight", f"{ref}{path}.bias"
            hp = f"{hf}{hf_paths[0]}"
            acc.tensor(w, shape, f"{hp}.weight" if in_diffusers else None)
            acc.tensor(b, (shape[0],), f"{hp}.bias" if in_diffusers else None)
            acc.linear(w, shape, hp, bias=b, group=group, diffusers=in_diffusers)


def openclip_text(prefix: str, cfg: Mapping[str, object], *, component: str, block: str | None,
                  kohya_prefix: str, diffusers_prefix: str) -> EncoderTable:
    """Table of an OpenCLIP text tower under ``prefix`` (``cond_stage_model.model.``,
    ``conditioner.embedders.1.model.``), in open_clip's state-dict order.

    ``cfg``: hidden, layers, intermediate, vocab, positions, projection (width of ``text_projection``, stored
    (hidden, projection) and applied as ``x @ P``; None = absent), logit_scale (the file keeps the scalar
    ``logit_scale``), diffusers_layers (how many resblocks the diffusers ``CLIPTextModel`` keeps: SD2 drops its
    last, unused one; default all), diffusers_projection (diffusers stores ``text_projection.weight``, the
    transpose; default: projection set).

    LoRA names are the HF ones (kohya and diffusers name OpenCLIP layers as HF CLIP): the fused
    ``attn.in_proj_weight`` carries parts q, k, v named ``..._self_attn_{q,k,v}_proj``. Resblocks that diffusers
    drops keep kohya names but no diffusers names and are group "extra"; ``text_projection`` is group "extra",
    ``transposed=True``, with its reference (hidden, projection) shape.
    """
    hidden, layers = _cfg_int(cfg, "hidden"), _cfg_int(cfg, "layers")
    intermediate, projection = _cfg_int(cfg, "intermediate"), _cfg_opt_int(cfg, "projection")
    kept = _cfg_int(cfg, "diffusers_layers", layers)
    if kept > layers:
        raise ValueError(f"diffusers_layers {kept} exceeds layers {layers}")
    proj_in_diffusers = projection is not None and _cfg_bool(cfg, "diffusers_projection", True)
    acc = _Acc(component, block, kohya_prefix, diffusers_prefix)
    hf = _HF_TEXT_MODEL
    acc.tensor(f"{prefix}positional_embedding", (_cfg_int(cfg, "positions"), hidden),
               f"{hf}embeddings.position_embedding.weight")
    if projection is not None:
        key = f"{prefix}text_projection"
        acc.tensor(key, (hidden, projection), "text_projection.weight" if proj_in_diffusers else None,
                   transposed=proj_in_diffusers)
        acc.linear(key, (hidden, projection), "text_projection", bias=None, group="extra",
                   diffusers=proj_in_diffusers, transposed=True)
    if _cfg_bool(cfg, "logit_scale", True):
        acc.tensor(f"{prefix}logit_scale", ())
    for i in range(layers):
        _openclip_layer(acc, f"{prefix}transformer.resblocks.{i}.", f"{hf}encoder.layers.{i}.",
                        hidden, intermediate, i < kept)
    acc.tensor(f"{prefix}token_embedding.weight", (_cfg_int(cfg, "vocab"), hidden),
               f"{hf}embeddings.token_embedding.weight")
    for s in ("weight", "bias"):
        acc.tensor(f"{prefix}ln_final.{s}", (hidden,), f"{hf}final_layer_norm.{s}")
    return EncoderTable(acc.tensors, tuple(acc.modules), acc.diffusers_map, frozenset(acc.transposed))


# Module names of a T5 v1.1 encoder block, in state-dict order: self-attention, then the gated feed-forward.
_T5_ATTN = ("q", "k", "v", "o")
_T5_FF_GATED = ("wi_0", "wi_1", "wo")


def _t5_block(acc: _Acc, ref: str, hf: str, cfg: Mapping[str, object], first: bool) -> None:
    """One T5 encoder block at reference base ``ref`` (HF base ``hf``); block 0 holds the position bias."""
    hidden, inner = _cfg_int(cfg, "hidden"), _cfg_int(cfg, "heads") * _cfg_int(cfg, "head_dim")
    ff = _cfg_int(cfg, "intermediate")
    attn = "layer.0.SelfAttention."
    for name in _T5_ATTN:
        shape = (hidden, inner) if name == "o" else (inner, hidden)
        path = f"{attn}{name}"
        acc.tensor(f"{ref}{path}.weight", shape, f"{hf}{path}.weight")
        acc.linear(f"{ref}{path}.weight", shape, f"{hf}{path}", bias=None)
    if first:
        path = f"{attn}relative_attention_bias.weight"
        acc.tensor(f"{ref}{path}", (_cfg_int(cfg, "buckets"), _cfg_int(cfg, "heads")), f"{hf}{path}")
    acc.tensor(f"{ref}layer.0.layer_norm.weight", (hidden,), f"{hf}layer.0.layer_norm.weight")
    for name in _T5_FF_GATED:
        shape = (hidden, ff) if name == "wo" else (ff, hidden)
        path = f"layer.1.DenseReluDense.{name}"
        acc.tensor(f"{ref}{path}.weight", shape, f"{hf}{path}.weight")
        acc.linear(f"{ref}{path}.weight", shape, f"{hf}{path}", bias=None)
    acc.tensor(f"{ref}layer.1.layer_norm.weight", (hidden,), f"{hf}layer.1.layer_norm.weight")


def t5_encoder(prefix: str, cfg: Mapping[str, object], *, component: str, block: str | None,
               kohya_prefix: str, diffusers_prefix: str) -> EncoderTable:
    """Table of an HF ``T5EncoderModel`` (T5 v1.1: gated ``wi_0``/``wi_1``, no biases) under ``prefix``.

    ``cfg``: hidden (d_model), layers, heads, head_dim (d_kv), intermediate (d_ff), vocab, buckets (relative
    attention buckets), embed_tokens (the file also stores ``encoder.embed_tokens.weight``, tied to
    ``shared.weight``). LoRA targets: q, k, v, o, wi_0, wi_1, wo of every block (group "attn"), named
    ``<kohya_prefix>_encoder_block_N_layer_0_SelfAttention_q`` / ``<diffusers_prefix>.encoder.block.N....``.
    """
    hidden, vocab = _cfg_int(cfg, "hidden"), _cfg_int(cfg, "vocab")
    acc = _Acc(component, block, kohya_prefix, diffusers_prefix)
    acc.tensor(f"{prefix}shared.weight", (vocab, hidden), "shared.weight")
    if _cfg_bool(cfg, "embed_tokens", True):
        acc.tensor(f"{prefix}encoder.embed_tokens.weight", (vocab, hidden), "encoder.embed_tokens.weight")
    for i in range(_cfg_int(cfg, "layers")):
        _t5_block(acc, f"{prefix}encoder.block.{i}.", f"encoder.block.{i}.", cfg, i == 0)
    acc.tensor(f"{prefix}encoder.final_layer_norm.weight", (hidden,), "encoder.final_layer_norm.weight")
    return EncoderTable(acc.tensors, tuple(acc.modules), acc.diffusers_map, frozenset(acc.transposed))
