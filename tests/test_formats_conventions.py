"""Every LoRA key convention of formats.md §3 reads to the same ΔW as the canonical deltas it was made from.

Files in the less common conventions are made by renaming the keys of a file we write (the naming rules are
those of formats.md §3); diffusers' own writer produces the PEFT file with ``lora_adapter_metadata``.
"""
from collections import defaultdict

import pytest
import torch

from lorasurgery.formats.dense import module_dense
from lorasurgery.formats.read import index_lora
from lorasurgery.formats.write import lora_tensors
from lorasurgery.testing import save, tiny_lora_deltas, tiny_table


def dense(table, items):
    mods = {m.key: m for m in table.modules}
    groups = defaultdict(dict)
    for t, d in items.items():
        groups[t.module][t] = d
    return {k: module_dense(mods[k], g) for k, g in groups.items()}


def check(tmp_path, table, items, tensors, expect_format, name="x"):
    path = save(tensors, tmp_path / f"{name}.safetensors")
    with index_lora(path) as idx:
        assert idx.arch == table.arch
        assert idx.all_consumed, idx.problems()[:5]
        assert idx.key_format == expect_format
    with index_lora(path, table=table) as idx:
        got = dense(table, {m.target: d for m, d in idx.deltas()})
    want = dense(table, items)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def renamed(tensors, fn):
    out = {}
    for k, v in tensors:
        nk = fn(k)
        if nk is not None:
            out[nk] = v
    return out


def _mods(table):
    return {m.key: m for m in table.modules}


def test_comfy_generic_sd1(tmp_path):
    """ComfyUI `diffusion_model.<LDM path>` with lora_up/lora_down and alpha."""
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, rank=3, alpha=5.0, components=("unet",))
    kohya_to_key = {m.names["kohya"]: m.key for m in table.modules if m.names.get("kohya")}

    def fn(k):
        mod, _, sfx = k.partition(".")
        key = kohya_to_key[mod]
        return "diffusion_model." + key[len("model.diffusion_model."):-len(".weight")] + "." + sfx
    check(tmp_path, table, items, renamed(lora_tensors(items, table, "kohya"), fn), "comfy")


@pytest.mark.parametrize("suffixes", [("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")])
def test_bfl_flux(tmp_path, suffixes):
    """BFL bare `double_blocks.0.img_attn.qkv.lora_A.weight` (fused names)."""
    table = tiny_table("flux")
    items = tiny_lora_deltas(table, rank=3, alpha=None, components=("transformer",))
    kohya_to_key = {m.names["kohya"]: m.key for m in table.modules if m.names.get("kohya")}
    down, up = suffixes

    def fn(k):
        mod, _, sfx = k.partition(".")
        if sfx == "alpha":
            return None  # alpha is the rank here (scale 1): absent alpha means the same
        path = kohya_to_key[mod][: -len(".weight")]
        return path + "." + {"lora_down.weight": down, "lora_up.weight": up}[sfx]
    check(tmp_path, table, items, renamed(lora_tensors(items, table, "kohya"), fn), "bfl")


@pytest.mark.parametrize("prefix, scheme", [("lora_transformer_", "onetrainer"), ("lycoris_", "lycoris")])
def test_underscored_diffusers_paths_flux(tmp_path, prefix, scheme):
    """OneTrainer `lora_transformer_<path>` and SimpleTuner `lycoris_<path>` (split q/k/v)."""
    table = tiny_table("flux")
    items = tiny_lora_deltas(table, rank=2, alpha=3.0, split_parts=True, components=("transformer",))
    peft = lora_tensors(items, table, "peft")
    # give every module its own alpha tensor (these conventions carry .alpha)
    out = {}
    for k, v in peft:
        path, _, sfx = k.removeprefix("transformer.").rpartition(".lora_")
        name = prefix + path.replace(".", "_")
        out[name + (".lora_down.weight" if sfx == "A.weight" else ".lora_up.weight")] = v
        if sfx == "A.weight":
            out[name + ".alpha"] = torch.tensor(float(v.shape[0]))
    check(tmp_path, table, items, out, scheme)


def test_legacy_diffusers_sd1(tmp_path):
    """diffusers <= 0.20 attention processors (`processor.to_q_lora.down`) and `lora_linear_layer` TE keys,
    and the ~0.21-0.24 `.lora.down.weight` spelling."""
    table = tiny_table("sd1")
    items = {t: d for t, d in tiny_lora_deltas(table, rank=2, alpha=None).items()}
    peft = lora_tensors(items, table, "peft")
    proc = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}

    def fn(k):
        path, _, sfx = k.rpartition(".lora_")
        ud = "down" if sfx == "A.weight" else "up"
        if path.startswith("text_encoder."):
            return f"{path}.lora_linear_layer.{ud}.weight"
        for tail, legacy in proc.items():
            if path.endswith(".attn1." + tail) or path.endswith(".attn2." + tail):
                head = path[: -len(tail) - 1]
                return f"{head}.processor.{legacy}.{ud}.weight"
        return f"{path}.lora.{ud}.weight"
    check(tmp_path, table, items, renamed(peft, fn), "peft")


def test_raw_peft_prefix(tmp_path):
    """Raw PEFT `base_model.model.<path>` (UNet only)."""
    table = tiny_table("sd1")
    items = tiny_lora_deltas(table, rank=2, alpha=None, components=("unet",))
    fn = lambda k: "base_model.model." + k.removeprefix("unet.")  # noqa: E731
    check(tmp_path, table, items, renamed(lora_tensors(items, table, "peft"), fn), "peft-raw")


def test_xlabs_flux(tmp_path):
    """XLabs `double_blocks.i.processor.qkv_lora1` (image qkv) and single-block `qkv_lora` (first 3H rows)."""
    from lorasurgery.delta import LowRank
    from lorasurgery.formats.names import Target

    table = tiny_table("flux")
    mods = _mods(table)
    g = torch.Generator().manual_seed(0)
    items, tensors = {}, {}
    for i in range(table.config["depth_double"]):
        for j, stream in ((1, "img"), (2, "txt")):
            for kind, sub in (("qkv", "attn.qkv"), ("proj", "attn.proj")):
                mod = mods[f"double_blocks.{i}.{stream}_{sub}.weight"]
                up, down = torch.randn(mod.shape[0], 2, generator=g), torch.randn(2, mod.shape[1], generator=g)
                tensors[f"double_blocks.{i}.processor.{kind}_lora{j}.down.weight"] = down
                tensors[f"double_blocks.{i}.processor.{kind}_lora{j}.up.weight"] = up
                items[Target(mod.key)] = LowRank(up=up, down=down)
    for i in range(table.config["depth_single"]):
        mod = mods[f"single_blocks.{i}.linear1.weight"]
        h = table.config["hidden"]
        up, down = torch.randn(3 * h, 2, generator=g), torch.randn(2, mod.shape[1], generator=g)
        tensors[f"single_blocks.{i}.processor.qkv_lora.down.weight"] = down
        tensors[f"single_blocks.{i}.processor.qkv_lora.up.weight"] = up
        items[Target(mod.key, ("q", "k", "v"))] = LowRank(up=up, down=down)
    check(tmp_path, table, items, tensors, "xlabs")


def test_peft_with_diffusers_adapter_metadata(tmp_path):
    """A PEFT file written by diffusers itself with lora_alpha != r in `lora_adapter_metadata`."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import get_peft_model_state_dict

    from diffusers_oracle import models_for

    unet = models_for("sd1")["unet"]
    cfg = LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(cfg)
    path = tmp_path / "diffusers.safetensors"
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=cfg.to_dict(),
        weight_name=path.name)
    want = {f"unet.{n}": m.get_delta_weight("default").float() for n, m in unet.named_modules()
            if isinstance(m, BaseTunerLayer) and "default" in m.lora_A}
    table = tiny_table("sd1")
    mods = _mods(table)
    with index_lora(path, table=table) as idx:
        assert idx.all_consumed and idx.key_format == "peft"
        got = {mods[m.target.module].names["diffusers"]: d.dense(mods[m.target.module].shape) for m, d in idx.deltas()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].reshape(got[k].shape), rtol=1e-5, atol=1e-7, msg=k)
