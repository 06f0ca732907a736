"""diffusers as an oracle: tiny diffusers/transformers models matching our tiny tables, and LoRA loading.

Used by the interop tests: build the models of an architecture's tiny configuration, load a LoRA file with
diffusers' own loaders (as a pipeline would), record every warning they emit, and read back each LoRA
layer's delta weight as peft computes it.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch

from lorasurgery.arch import get_arch
from lorasurgery.arch.unet import UNetConfig, diffusers_unet_config


def clip_model(te: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hf = CLIPTextConfig(hidden_size=te["hidden"], num_hidden_layers=te.get("diffusers_layers", te["layers"]),
                        num_attention_heads=te["heads"], intermediate_size=te["intermediate"],
                        vocab_size=te["vocab"], max_position_embeddings=te["positions"],
                        projection_dim=te.get("projection") or te["hidden"])
    torch.manual_seed(0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(hf)


def unet_model(arch: str, cfg: dict):
    from diffusers import UNet2DConditionModel

    mod = __import__(f"lorasurgery.arch.{arch}", fromlist=["x"])
    ucfg = UNetConfig.from_mapping(cfg["unet"])
    torch.manual_seed(0)
    return UNet2DConditionModel(**diffusers_unet_config(ucfg, attention_head_dim=mod.attention_heads(cfg)))


def flux_model(cfg: dict):
    from diffusers import FluxTransformer2DModel

    head_dim = cfg["hidden"] // cfg["heads"]
    first = head_dim // 8
    rest = (head_dim - first) // 2
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        num_layers=cfg["depth_double"], num_single_layers=cfg["depth_single"], attention_head_dim=head_dim,
        num_attention_heads=cfg["heads"], joint_attention_dim=cfg["context_in"],
        pooled_projection_dim=cfg["vec_in"], guidance_embeds=cfg["guidance"], axes_dims_rope=(first, rest, rest))


def models_for(arch: str) -> dict[str, torch.nn.Module]:
    """diffusers component name -> model, for the tiny configuration of ``arch``."""
    cfg = get_arch(arch).tiny_config()
    if arch in ("sd1", "sd2"):
        return {"unet": unet_model(arch, cfg), "text_encoder": clip_model(cfg["text_encoder"])}
    if arch == "sdxl":
        return {"unet": unet_model(arch, cfg), "text_encoder": clip_model(cfg["te1"]),
                "text_encoder_2": clip_model(cfg["te2"], projection=True)}
    if arch == "flux":
        return {"transformer": flux_model(cfg), "text_encoder": clip_model(cfg["clip_l"])}
    raise ValueError(arch)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def recorded_warnings() -> Iterator[list[str]]:
    """Every WARNING+ log record of diffusers/peft/transformers and every Python warning."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    out: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield out
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            out.extend(handler.messages)
            out.extend(f"warning: {w.message}" for w in caught
                       if not issubclass(w.category, (DeprecationWarning, FutureWarning)))


def load_lora(arch: str, path, models: dict[str, torch.nn.Module]) -> list[str]:
    """Load a LoRA file into ``models`` with diffusers' loaders for ``arch``; return the warnings."""
    from diffusers.loaders.lora_pipeline import (
        FluxLoraLoaderMixin,
        StableDiffusionLoraLoaderMixin,
        StableDiffusionXLLoraLoaderMixin,
    )

    with recorded_warnings() as records:
        if arch in ("sd1", "sd2"):
            m = StableDiffusionLoraLoaderMixin
            sd, alphas = m.lora_state_dict(str(path))
            m.load_lora_into_unet(sd, alphas, unet=models["unet"], adapter_name="t")
            m.load_lora_into_text_encoder(sd, alphas, text_encoder=models["text_encoder"], prefix="text_encoder",
                                          adapter_name="t")
        elif arch == "sdxl":
            m = StableDiffusionXLLoraLoaderMixin
            sd, alphas = m.lora_state_dict(str(path), unet_config=models["unet"].config)
            m.load_lora_into_unet(sd, alphas, unet=models["unet"], adapter_name="t")
            m.load_lora_into_text_encoder(sd, alphas, text_encoder=models["text_encoder"], prefix="text_encoder",
                                          adapter_name="t")
            m.load_lora_into_text_encoder(sd, alphas, text_encoder=models["text_encoder_2"],
                                          prefix="text_encoder_2", adapter_name="t")
        elif arch == "flux":
            m = FluxLoraLoaderMixin
            sd, alphas = m.lora_state_dict(str(path), return_alphas=True)
            m.load_lora_into_transformer(sd, alphas, transformer=models["transformer"], adapter_name="t")
            m.load_lora_into_text_encoder(sd, alphas, text_encoder=models["text_encoder"], prefix="text_encoder",
                                          adapter_name="t")
        else:
            raise ValueError(arch)
    return records


def lora_deltas(models: dict[str, torch.nn.Module], adapter: str = "t") -> dict[str, torch.Tensor]:
    """``component.module path`` -> ΔW as peft computes it, for every LoRA layer of every model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: dict[str, torch.Tensor] = {}
    for comp, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
                out[f"{comp}.{name}"] = module.get_delta_weight(adapter).detach().float()
    return out
