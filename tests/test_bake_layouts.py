"""A bake gives the same model whatever layout the base is stored in (fused rows, swapped halves, DoRA)."""
import torch

from lorasurgery.delta import LowRank
from lorasurgery.formats.names import Target
from lorasurgery.formats.write import lora_tensors
from lorasurgery.model import open_model
from lorasurgery.ops.bake import bake
from lorasurgery.ops.inputs import WeightedInput
from lorasurgery.testing import randn, save, save_diffusers_folder, tiny_checkpoint, tiny_lora_deltas, tiny_table


def test_flux_bake_same_in_bfl_comfy_and_diffusers_layouts(tmp_path):
    table = tiny_table("flux")
    items = tiny_lora_deltas(table, rank=2, alpha=1.0, components=("transformer",), groups=("attn",))
    # a DoRA module on the layer whose halves diffusers stores swapped, and one on a fused qkv
    for key in ("final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_attn.qkv.weight"):
        mod = next(m for m in table.modules if m.key == key)
        out, inp = mod.shape
        items[Target(key)] = LowRank(up=randn((out, 2), 3, key + "u"), down=randn((2, inp), 3, key + "d"),
                                     alpha=2.0, dora_scale=1.0 + randn((out, 1), 3, key + "m"))
    lora = save(lora_tensors(items, table, "kohya"), tmp_path / "lora.safetensors")
    bases = {
        "bfl": save(tiny_checkpoint("flux", "bfl"), tmp_path / "bfl.safetensors"),
        "comfy": save(tiny_checkpoint("flux", "comfy"), tmp_path / "comfy.safetensors"),
        "diffusers": save_diffusers_folder(tiny_checkpoint("flux", "diffusers"), tmp_path / "diffusers"),
    }
    outs = {}
    for name, base in bases.items():
        out = tmp_path / (f"out-{name}" + ("" if name == "diffusers" else ".safetensors"))
        bake(base, [WeightedInput(lora, 0.7)], out, device="cpu")
        outs[name] = out
    with open_model(outs["bfl"]) as ref:
        keys = [k for k in ref.ref_keys() if not k.startswith("text_encoders.")]
        want = {k: ref.get_ref(k) for k in keys}
    with open_model(bases["bfl"]) as b:
        changed = [k for k in keys if not torch.equal(b.get_ref(k), want[k])]
    assert "final_layer.adaLN_modulation.1.weight" in changed and "double_blocks.0.img_attn.qkv.weight" in changed
    for name in ("comfy", "diffusers"):
        with open_model(outs[name]) as m:
            for k in keys:
                torch.testing.assert_close(m.get_ref(k), want[k], rtol=1e-6, atol=1e-7, msg=f"{name}: {k}")
