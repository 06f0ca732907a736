"""The data model every architecture table fills in.

An architecture is described as data: a :class:`ModelTable` lists every tensor of the model in its
*reference layout* (the single-file checkpoint: LDM/sgm for SD1/SD2/SDXL, ``model.diffusion_model.`` SD3
single file, bare BFL keys for FLUX) and, among them, every weight a LoRA can target
(:class:`ModuleSpec`). Everything else — detection, LoRA key maps, block weights, the tiny demo models,
bake and extract — reads these tables; nothing downstream branches on the architecture's name.

Canonical ids
-------------
* A *module id* is the reference-layout key of the weight tensor, e.g.
  ``model.diffusion_model.input_blocks.1.1.proj_in.weight``,
  ``cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight`` or
  ``double_blocks.0.img_attn.qkv.weight``.
* A *target id* is a module id, or for one part of a fused weight ``<module id>:<part>``
  (``double_blocks.0.img_attn.qkv.weight:q``). LoRAs address targets.

Naming schemes (keys of :attr:`ModuleSpec.names` / :attr:`Part.names`)
-------------------------------------------------------------------------
* ``"kohya"``: kohya module name without suffix (``lora_unet_down_blocks_0_attentions_0_proj_in``,
  ``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``, ``lora_unet_double_blocks_0_img_attn_qkv``).
  For OpenCLIP fused q/k/v the kohya names live on the parts (HF ``q_proj`` names).
* ``"diffusers"``: the diffusers/PEFT module path *with* its component prefix (``unet.``, ``transformer.``,
  ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``), e.g. ``unet.down_blocks.0.attentions.0.proj_in``.
  For FLUX/SD3 fused weights the diffusers names live on the parts (``transformer.transformer_blocks.0.attn.to_q``).
  The same path (minus the component prefix, plus ``.weight``) is the key in the diffusers component file.

Other LoRA spellings (ComfyUI ``diffusion_model.``, ``lora_transformer_``, ``lycoris_``, XLabs, legacy
diffusers) are derived from these two by the format adapters in :mod:`lorasurgery.formats`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Part:
    """One row block of a fused weight (FLUX ``qkv``/``linear1``, SD3 ``qkv``, OpenCLIP ``in_proj_weight``)."""

    name: str  # "q", "k", "v", "mlp"
    start: int  # first row in the fused weight
    stop: int  # one past the last row
    names: Mapping[str, str] = field(default_factory=dict)  # naming scheme -> LoRA module name of this part


@dataclass(frozen=True)
class ModuleSpec:
    """One weight a LoRA can target, in the reference layout."""

    key: str  # module id: reference-layout weight key
    shape: Shape  # weight shape in the reference layout (Linear (out, in); Conv (out, in, kh, kw))
    component: str  # "unet", "transformer", "te1", "te2", "te3"
    block: str | None  # block id in the architecture's full block layout; None = in no block (OTHER)
    names: Mapping[str, str] = field(default_factory=dict)  # naming scheme -> LoRA module name (whole module)
    parts: tuple[Part, ...] = ()  # non-empty for fused weights
    bias: str | None = None  # reference key of the bias, if the module has one
    # Naming schemes whose module stores rows with the two halves swapped relative to the reference
    # (diffusers ``norm_out.linear`` vs BFL ``final_layer.adaLN_modulation.1``).
    swapped_in: frozenset[str] = frozenset()
    # The reference tensor stores the transpose of the Linear weight (OpenCLIP ``text_projection``).
    transposed: bool = False
    # Kind of layer: "linear", "conv1x1", "conv" (kernel > 1).
    kind: str = "linear"
    # Which LoRA trainers target it: "attn" = a default kohya LoRA (SD: every Linear/1x1 conv inside the
    # attention transformers; text encoders: q/k/v/out_proj, fc1, fc2; FLUX/SD3: every Linear of the
    # double/single/joint blocks); "locon" = added by kohya LoCon (resnet convs, time_emb_proj,
    # conv_shortcut, down/upsamplers); "extra" = targetable weights no default trainer touches
    # (conv_in/out, time/label embeddings, FLUX/SD3 top-level layers, text_projection).
    group: str = "attn"

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"{self.key} has no part {name!r}")


@dataclass(frozen=True)
class Layout:
    """A file layout of an architecture: how reference keys are stored in a checkpoint of this layout.

    ``key_map`` maps reference tensor keys to ``(file_key, rows)`` lists: usually one entry with
    ``rows=None`` (the whole tensor). A fused reference weight stored split in this layout (diffusers FLUX
    ``to_q``/``to_k``/``to_v``) maps to several entries, each with the row range it holds. A reference key
    absent from the map is absent from files of this layout. ``swapped`` lists reference keys whose two row
    halves are swapped in this layout (adaLN final layers in diffusers). ``transposed`` lists reference keys
    whose file tensor in this layout is the transpose of the reference tensor (OpenCLIP ``text_projection``
    stored as the HF Linear ``text_projection.weight`` in diffusers).
    """

    name: str  # "ldm", "sgm", "diffusers", "bfl", "comfy", "sd3"
    key_map: Mapping[str, tuple[tuple[str, tuple[int, int] | None], ...]]
    swapped: frozenset[str] = frozenset()
    transposed: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ModelTable:
    """Everything about one concrete model (an architecture at a given configuration)."""

    arch: str  # "sd1", "sd2", "sdxl", "sd3", "flux"
    config: Mapping[str, object]  # derived parameters (levels, depths, widths, variant flags)
    tensors: Mapping[str, Shape]  # every tensor of the reference layout, in checkpoint order
    modules: tuple[ModuleSpec, ...]  # every LoRA-targetable weight (linear and conv, incl. LoCon targets)
    layouts: Mapping[str, Layout]  # every layout this model can be stored in


@dataclass(frozen=True)
class ArchSpec:
    """An architecture: how to build its table, its block layouts, and its identity."""

    name: str  # "sd1", "sd2", "sdxl", "sd3", "flux"
    title: str  # "Stable Diffusion 1.x", ...
    # Full block layout (ids in order) and the named positional layouts it accepts, e.g.
    # {"sd1-17": (...17 ids...), "sd1-26": (...26 ids...)}. Built from config for SD3 (depth).
    block_layouts: Callable[[Mapping[str, object]], Mapping[str, Sequence[str]]]
    full_layout: str  # name of the full layout in block_layouts
    real_config: Callable[[], Mapping[str, object]]  # the released model
    tiny_config: Callable[[], Mapping[str, object]]  # small widths/depths, same key structure
    build: Callable[[Mapping[str, object]], ModelTable]
    # Derive config from the shapes of a checkpoint given in reference-layout keys (after layout
    # normalisation). Returns None when the keys are not this architecture's.
    config_from_shapes: Callable[[Mapping[str, Shape]], Mapping[str, object] | None]
    # Other released variants (FLUX schnell, SD3.5 Large/Medium, the SDXL refiner): their key sets and
    # LoRA names are recognised too.
    variant_configs: Callable[[], Sequence[Mapping[str, object]]] = lambda: ()
