"""Cross-checks of the SD1/SD2/SDXL tables against diffusers itself.

* ``UNet2DConditionModel`` / ``AutoencoderKL`` / ``CLIPTextModel`` built from our configs (real sizes on the
  ``meta`` device, tiny ones on CPU) must have exactly the key set and shapes of our ``"diffusers"`` layout.
* diffusers' own single-file converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``)
  applied to a tiny LDM checkpoint must put every tensor where our map says.
* kohya's LoRA / LoCon target sets (Linear and 1x1 Conv2d inside ``Transformer2DModel``; every Conv2d and
  Linear inside ``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D``) must equal our "attn" / "locon" groups.
"""
from __future__ import annotations

from typing import Mapping

import pytest
import torch

from lorasurgery.arch import sd1, sd2, sdxl
from lorasurgery.arch.base import ModelTable
from lorasurgery.arch.unet import UNET_PREFIX, VAE_PREFIX, UNetConfig, diffusers_unet_config

pytestmark = pytest.mark.interop

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

CASES = {
    "sd1-real": (sd1, sd1.real_config),
    "sd1-tiny": (sd1, sd1.tiny_config),
    "sd2-real": (sd2, sd2.real_config),
    "sd2-tiny": (sd2, sd2.tiny_config),
    "sdxl-real": (sdxl, sdxl.real_config),
    "sdxl-refiner": (sdxl, sdxl.refiner_config),
    "sdxl-tiny": (sdxl, sdxl.tiny_config),
}
TINY = ("sd1-tiny", "sd2-tiny", "sdxl-tiny")


def _heads(mod, cfg):  # noqa: ANN001 - an arch module
    return mod.attention_heads(cfg)


def _diffusers_unet(mod, cfg: Mapping[str, object], device: str) -> UNet2DConditionModel:  # noqa: ANN001
    ucfg = UNetConfig.from_mapping(cfg["unet"])  # type: ignore[arg-type]
    with torch.device(device):
        return UNet2DConditionModel(**diffusers_unet_config(ucfg, attention_head_dim=_heads(mod, cfg)))


def _vae_kwargs(vcfg: Mapping[str, object]) -> dict[str, object]:
    chans = list(vcfg["channels"])  # type: ignore[call-overload]
    return {
        "in_channels": vcfg["in_channels"], "out_channels": vcfg["out_channels"], "block_out_channels": chans,
        "down_block_types": ["DownEncoderBlock2D"] * len(chans), "up_block_types": ["UpDecoderBlock2D"] * len(chans),
        "layers_per_block": vcfg["num_res_blocks"], "latent_channels": vcfg["z_channels"],
    }


def _image(table: ModelTable, component: str) -> dict[str, str]:
    """diffusers file key (without the component folder) -> reference key, for one component folder."""
    out: dict[str, str] = {}
    for ref, entries in table.layouts["diffusers"].key_map.items():
        for file_key, rows in entries:
            folder, _, key = file_key.partition(".")
            if folder == component:
                assert rows is None, f"{ref} is split in diffusers; SD UNet/VAE tensors never are"
                assert key not in out, f"two reference tensors map to {file_key}"
                out[key] = ref
    return out


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_unet_map_equals_diffusers_state_dict(case: str) -> None:
    mod, make = CASES[case]
    cfg = make()
    table = mod.build(cfg)
    model = _diffusers_unet(mod, cfg, "cpu" if case in TINY else "meta")
    image = _image(table, "unet")
    theirs = _shapes(model)
    assert set(image) == set(theirs)
    assert {k: table.tensors[r] for k, r in image.items()} == theirs
    # every UNet tensor of the reference layout is stored by diffusers
    assert set(image.values()) == {k for k in table.tensors if k.startswith(UNET_PREFIX)}


def test_real_unet_sizes_are_the_released_ones() -> None:
    """Exact released key counts through diffusers (formats.md section 4: 686 and 1680)."""
    for mod, expected in ((sd1, 686), (sdxl, 1680)):
        cfg = mod.real_config()
        assert len(_diffusers_unet(mod, cfg, "meta").state_dict()) == expected


def _ldm_unet_checkpoint(table: ModelTable, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in table.tensors.items() if k.startswith(UNET_PREFIX)}


@pytest.mark.parametrize("case", TINY)
def test_diffusers_single_file_converter_agrees_with_map(case: str) -> None:
    mod, make = CASES[case]
    cfg = make()
    table = mod.build(cfg)
    ckpt = _ldm_unet_checkpoint(table)
    ucfg = UNetConfig.from_mapping(cfg["unet"])  # type: ignore[arg-type]
    converted = convert_ldm_unet_checkpoint(ckpt, diffusers_unet_config(ucfg, attention_head_dim=_heads(mod, cfg)))
    image = _image(table, "unet")
    assert set(converted) == set(image)
    for dkey, ref in image.items():
        assert converted[dkey] is ckpt[ref], dkey
    model = _diffusers_unet(mod, cfg, "cpu")
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("case", ["sd1-real", "sd1-tiny", "sdxl-tiny"])
def test_vae_map_equals_diffusers(case: str) -> None:
    mod, make = CASES[case]
    cfg = make()
    table = mod.build(cfg)
    vcfg = cfg["vae"]
    with torch.device("meta" if case not in TINY else "cpu"):
        model = AutoencoderKL(**_vae_kwargs(vcfg))  # type: ignore[arg-type]
    theirs = _shapes(model)
    image = _image(table, "vae")
    assert set(image) == set(theirs)
    for key, ref in image.items():
        ours = table.tensors[ref]
        # mid-block attention: (C, C, 1, 1) conv in LDM, (C, C) Linear in diffusers — same numbers
        assert theirs[key] == ours or (len(ours) == 4 and ours[2:] == (1, 1) and theirs[key] == ours[:2]), key
    if case in TINY:
        gen = torch.Generator().manual_seed(1)
        ckpt = {k: torch.randn(s, generator=gen) for k, s in table.tensors.items() if k.startswith(VAE_PREFIX)}
        converted = convert_ldm_vae_checkpoint(ckpt, _vae_kwargs(vcfg))
        assert set(converted) == set(image)
        for key, ref in image.items():
            assert torch.equal(converted[key].reshape(ckpt[ref].shape), ckpt[ref]), key
        model.load_state_dict(converted, strict=True)


def _kohya_targets(model: torch.nn.Module, classes: tuple[str, ...], *, conv3x3: bool) -> set[str]:
    """kohya lora.py's selection: Linear / Conv2d children of modules whose class is in ``classes``;
    kxk convs only when ``conv3x3`` (LoCon)."""
    found: set[str] = set()
    for name, module in model.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            is_linear = type(child).__name__ == "Linear"
            is_conv = type(child).__name__ == "Conv2d"
            if not (is_linear or is_conv):
                continue
            if is_conv and child.kernel_size != (1, 1) and not conv3x3:
                continue
            found.add(f"{name}.{child_name}")
    return found


@pytest.mark.parametrize("case", ["sd1-real", "sdxl-real"])
def test_kohya_target_sets(case: str) -> None:
    """Default kohya LoRA = attn group (192 SD1.5 / 722 SDXL); LoCon adds the locon group (86 / 66):
    per resnet conv1, conv2, time_emb_proj (+ conv_shortcut where channels change), every down/upsampler conv."""
    mod, make = CASES[case]
    cfg = make()
    table = mod.build(cfg)
    model = _diffusers_unet(mod, cfg, "meta")
    attn = _kohya_targets(model, ("Transformer2DModel",), conv3x3=False)
    locon = _kohya_targets(model, ("ResnetBlock2D", "Downsample2D", "Upsample2D"), conv3x3=True)
    by_group = {g: {m.names["diffusers"][len("unet."):] for m in table.modules
                    if m.component == "unet" and m.group == g} for g in ("attn", "locon")}
    assert attn == by_group["attn"]
    assert locon == by_group["locon"]
    assert (len(attn), len(locon)) == {"sd1-real": (192, 86), "sdxl-real": (722, 66)}[case]
    if mod is sd1:
        # SD1 kohya names are the diffusers module paths, underscored
        kohya = {m.names["kohya"] for m in table.modules if m.component == "unet" and m.group != "extra"}
        assert kohya == {"lora_unet_" + p.replace(".", "_") for p in attn | locon}


@pytest.mark.parametrize("case", ["sd1-tiny", "sd2-tiny", "sdxl-tiny"])
def test_text_encoder_folders_match_transformers(case: str) -> None:
    """The composed diffusers layout puts each encoder in its pipeline folder with transformers' key set."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    mod, make = CASES[case]
    cfg = make()
    table = mod.build(cfg)
    encoders = {"sd1-tiny": [("text_encoder", cfg.get("text_encoder"), False)],
                "sd2-tiny": [("text_encoder", cfg.get("text_encoder"), False)],
                "sdxl-tiny": [("text_encoder", cfg.get("te1"), False),
                              ("text_encoder_2", cfg.get("te2"), True)]}[case]
    for folder, te, with_projection in encoders:
        assert isinstance(te, dict)
        hf = CLIPTextConfig(hidden_size=te["hidden"], num_hidden_layers=te.get("diffusers_layers", te["layers"]),
                            num_attention_heads=te["heads"], intermediate_size=te["intermediate"],
                            vocab_size=te["vocab"], max_position_embeddings=te["positions"],
                            projection_dim=te["projection"] or te["hidden"])
        with torch.device("meta"):
            model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(hf)
        theirs = {k for k in model.state_dict() if not k.endswith("position_ids")}
        ours: set[str] = set()
        for entries in table.layouts["diffusers"].key_map.values():
            ours |= {fk.partition(".")[2] for fk, _ in entries if fk.partition(".")[0] == folder}
        assert ours == theirs, folder
