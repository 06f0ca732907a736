"""diffusers loads our kohya and PEFT outputs completely, with no warning, and applies exactly our ΔW."""
from collections import defaultdict

import pytest
import torch

from lorasurgery.formats.dense import module_dense, part_rows
from lorasurgery.formats.write import lora_tensors, swap_halves
from lorasurgery.testing import save, tiny_lora_deltas, tiny_table

from diffusers_oracle import load_lora, lora_deltas, models_for

pytestmark = pytest.mark.interop


def expected_by_diffusers_name(table, items):
    """diffusers module path -> our ΔW for it (fused modules sliced into their parts, halves swapped)."""
    groups = defaultdict(dict)
    for t, d in items.items():
        groups[t.module][t] = d
    mods = {m.key: m for m in table.modules}
    out = {}
    for key, g in groups.items():
        mod = mods[key]
        dense = module_dense(mod, g)
        if mod.names.get("diffusers"):
            if "diffusers" in mod.swapped_in:
                dense = swap_halves(dense)
            out[mod.names["diffusers"]] = dense
        else:
            for p, (a, b) in part_rows(mod, dense.shape[0]).items():
                out[mod.part(p).names["diffusers"]] = dense[a:b]
    return out


# diffusers' kohya-FLUX converter hard-codes the released widths (3072/12288), so the tiny FLUX model is
# loaded from PEFT only; the kohya FLUX output is checked at the real widths below.
CASES = [(a, f) for a in ("sd1", "sd2", "sdxl", "flux") for f in ("kohya", "peft") if (a, f) != ("flux", "kohya")]


@pytest.mark.parametrize("arch, fmt", CASES)
def test_diffusers_loads_everything_silently(tmp_path, arch, fmt):
    table = tiny_table(arch)
    comps = {"flux": ("transformer", "te1")}.get(arch)
    items = tiny_lora_deltas(table, rank=3, alpha=1.5, components=comps)
    if arch == "sd2":
        # diffusers' SD2 text encoder lacks the last OpenCLIP layer; such modules have no diffusers name
        items = {t: d for t, d in items.items() if table_mod(table, t).group == "attn"}
    path = save(lora_tensors(items, table, fmt), tmp_path / f"{arch}-{fmt}.safetensors")
    models = models_for(arch)
    records = load_lora(arch, path, models)
    assert records == [], records
    got = lora_deltas(models)
    want = expected_by_diffusers_name(table, items)
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for name, w in want.items():
        torch.testing.assert_close(got[name].reshape(w.shape), w, rtol=1e-5, atol=1e-7, msg=name)


def table_mod(table, target):
    return next(m for m in table.modules if m.key == target.module)


def test_diffusers_converts_real_width_kohya_flux(tmp_path):
    """Our fused kohya FLUX names and alphas, at the released widths, become exactly our split ΔW in diffusers."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    from diffusers_oracle import recorded_warnings
    from lorasurgery.arch import get_arch

    spec = get_arch("flux")
    table = spec.build(spec.real_config())
    # final_layer is left out: diffusers 0.39 converts kohya final-layer LoRAs to keys without the
    # "transformer." prefix (and ignores their alpha), so its loader never applies them.
    keep = ("double_blocks.0.", "single_blocks.0.")
    items = {t: d for t, d in tiny_lora_deltas(table, rank=2, alpha=3.0, groups=("attn", "extra"),
                                                  components=("transformer",)).items()
             if t.module.startswith(keep)}
    path = save(lora_tensors(items, table, "kohya"), tmp_path / "flux-kohya.safetensors")
    with recorded_warnings() as records:
        sd, alphas = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True)
    assert records == [], records
    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    modules = {n for n, _ in model.named_modules()}
    want = expected_by_diffusers_name(table, items)
    got = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")]
            b = sd[name + ".lora_B.weight"]
            scale = 1.0 if not alphas else float(alphas.get(name + ".alpha", a.shape[0])) / a.shape[0]
            got[name] = (b.float() @ a.float()) * scale
    assert {n.removeprefix("transformer.") for n in got} <= modules
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:10]
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-7, msg=name)
