"""Baking against diffusers as the oracle (issue 4, "Correctness").

For tiny SD1, SDXL and FLUX models: diffusers/transformers models are built from configs matching our tiny
tables (``diffusers_oracle.models_for``), their weights are written as a single-file checkpoint in the
architecture's reference layout (LDM, sgm, BFL), and the same LoRA file is

* baked by lorasurgery into that checkpoint at weight ``w``, and
* loaded by diffusers' own loaders (``lora_state_dict`` + ``load_lora_into_unet`` / ``_transformer`` /
  ``_text_encoder``) and fused with ``fuse_lora(lora_scale=w)`` / ``fuse_text_encoder_lora``.

The fused diffusers weights, mapped back to the reference layout (q/k/v rows re-fused, OpenCLIP
``in_proj_weight`` re-assembled, adaLN halves and ``text_projection`` restored), must equal our output to
1e-6 relative in float32.
"""
from __future__ import annotations

import pytest
import torch

from lorasurgery.formats.write import lora_tensors
from lorasurgery.io.reader import open_source
from lorasurgery.ops.bake import bake
from lorasurgery.ops.inputs import WeightedInput
from lorasurgery.testing import save, tiny_checkpoint, tiny_lora_deltas, tiny_table

pytest.importorskip("diffusers")
from diffusers_oracle import load_lora, models_for  # noqa: E402

pytestmark = pytest.mark.interop

WEIGHT = 0.7


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A (possibly peft-injected) model's weights under their plain names (``base_layer`` dropped)."""
    out = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            continue
        out[k.replace(".base_layer.", ".")] = v.detach().clone()
    return out


def to_reference(table, models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Reference-layout tensors of every table tensor the diffusers models hold."""
    lay = table.layouts["diffusers"]
    sds = {comp: state(m) for comp, m in models.items()}
    out = {}
    for ref, shape in table.tensors.items():
        entries = lay.key_map.get(ref) or ()
        parts = []
        for fk, _ in entries:
            comp, _, key = fk.partition(".")
            if key not in sds.get(comp, {}):
                parts = []
                break
            parts.append(sds[comp][key].float())
        if not parts:
            continue
        t = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        if ref in lay.swapped:
            split = t.shape[0] - t.shape[0] // 2
            t = torch.cat([t[split:], t[:split]], 0)
        if ref in lay.transposed:
            t = t.T
        out[ref] = t.reshape(shape).contiguous()
    return out


def fuse(arch: str, models: dict[str, torch.nn.Module], scale: float) -> None:
    from diffusers.loaders.lora_base import fuse_text_encoder_lora

    for comp, m in models.items():
        if comp.startswith("text_encoder"):
            fuse_text_encoder_lora(m, lora_scale=scale)
        else:
            m.fuse_lora(lora_scale=scale)


CASES = {
    # arch: (LoRA format, components of the LoRA)
    "sd1": ("kohya", ("unet", "te1")),
    "sdxl": ("kohya", ("unet", "te1", "te2")),
    # diffusers' kohya-FLUX converter hard-codes the released widths, so the tiny FLUX LoRA is PEFT (split
    # q/k/v, which our bake places in the rows of the fused BFL qkv / linear1)
    "flux": ("peft", ("transformer", "te1")),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_bake_equals_diffusers_fuse(tmp_path, arch):
    fmt, comps = CASES[arch]
    table = tiny_table(arch)
    models = models_for(arch)
    ref = dict(tiny_checkpoint(arch, seed=5))
    from_models = to_reference(table, models)
    ref.update(from_models)
    base = save(ref, tmp_path / "base.safetensors")
    items = tiny_lora_deltas(table, rank=3, alpha=1.5, seed=4, components=comps, split_parts=fmt == "peft")
    lora = save(lora_tensors(items, table, fmt), tmp_path / f"lora-{fmt}.safetensors")
    out = tmp_path / "out.safetensors"
    report = bake(base, [WeightedInput(lora, WEIGHT)], out, device="cpu")
    assert report.unmatched_count == 0

    records = load_lora(arch, lora, models)
    assert records == [], records
    fuse(arch, models, WEIGHT)
    fused = to_reference(table, models)

    targets = {t.module for t in items}
    assert targets <= set(fused), sorted(targets - set(fused))[:5]
    changed = 0
    with open_source(out) as src:
        for key, want in fused.items():
            got = src.get(key).float()
            tol = 1e-6 * max(1.0, float(want.abs().max()))
            err = float((got - want).abs().max())
            assert err <= tol, f"{key}: |ours - diffusers| = {err:.3g} > {tol:.3g}"
            if key in targets:
                assert not torch.equal(want, from_models[key]), key  # the oracle really applied the LoRA
                changed += 1
    assert changed == len(targets) > 0
