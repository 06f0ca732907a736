"""Detection from headers alone, for every architecture, variant and layout; LoRA names map both ways."""
import pytest

from lorasurgery.arch import ARCH_NAMES, get_arch
from lorasurgery.arch.detect import detect, detect_checkpoint
from lorasurgery.formats.names import build_names, names_for_arch, variant_tables
from lorasurgery.formats.read import index_lora
from lorasurgery.testing import save, tiny_checkpoint, tiny_lora


def file_shapes(table, layout):
    shapes = {}
    for rk, entries in table.layouts[layout].key_map.items():
        for fk, rows in entries:
            sh = tuple(table.tensors[rk])
            shapes[fk] = (rows[1] - rows[0],) + sh[1:] if rows else sh
    return shapes


def configs(arch):
    spec = get_arch(arch)
    return [("real", spec.real_config())] + [(f"variant{i}", c) for i, c in enumerate(spec.variant_configs())] + [
        ("tiny", spec.tiny_config())]


CASES = [(a, label, cfg, lay) for a in ARCH_NAMES for label, cfg in configs(a)
         for lay in get_arch(a).build(cfg).layouts]


@pytest.mark.parametrize("arch, label, cfg, layout", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_checkpoint_detection(arch, label, cfg, layout):
    table = get_arch(arch).build(cfg)
    det = detect_checkpoint(file_shapes(table, layout))
    assert (det.kind, det.arch, det.layout) == ("checkpoint", arch, layout)
    assert not det.ambiguous
    assert det.evidence


@pytest.mark.parametrize("arch", ["sd1", "sdxl", "flux"])
def test_single_component_file(arch):
    """A diffusers component file (keys without the folder prefix) is recognised as that component."""
    table = get_arch(arch).build(get_arch(arch).real_config())
    comp = "transformer" if arch == "flux" else "unet"
    shapes = {k.partition(".")[2]: v for k, v in file_shapes(table, "diffusers").items() if k.startswith(comp + ".")}
    det = detect_checkpoint(shapes)
    assert (det.arch, det.layout) == (arch, f"diffusers:{comp}")


def test_unknown_checkpoint():
    det = detect_checkpoint({"encoder.layer.0.weight": (4, 4), "decoder.bias": (4,)})
    assert det.kind == "unknown" and det.arch is None and det.evidence


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_lora_name_maps_to_a_checkpoint_key_and_back(arch):
    """kohya and diffusers names of every module (and part) resolve to that module, in every variant."""
    for table in variant_tables(arch):
        names, conflicts = build_names(arch, table)
        assert not conflicts, sorted(conflicts)[:5]
        for mod in table.modules:
            for scheme in ("kohya", "diffusers"):
                name = mod.names.get(scheme)
                if name:
                    assert names[name].target.module == mod.key and not names[name].target.parts
            for part in mod.parts:
                for scheme in ("kohya", "diffusers"):
                    name = part.names.get(scheme)
                    if name:
                        assert names[name].target.module == mod.key and names[name].target.parts == (part.name,)
            assert mod.key in table.tensors
            for lay in table.layouts.values():
                if mod.key in lay.key_map:
                    assert lay.key_map[mod.key]


def test_real_default_target_counts():
    """kohya's default targets: SD1.5 192 UNet + 72 TE; SDXL 722 UNet + 72 + 192 (issue #3)."""
    def count(arch, comp):
        t = variant_tables(arch)[0]
        n = 0
        for m in t.modules:
            if m.component == comp and m.group == "attn":
                n += len(m.parts) if m.parts and not m.names.get("kohya") else 1
        return n
    assert count("sd1", "unet") == 192 and count("sd1", "te1") == 72
    assert count("sdxl", "unet") == 722 and count("sdxl", "te1") == 72 and count("sdxl", "te2") == 192


@pytest.mark.parametrize("arch", ARCH_NAMES)
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_files_detected(tmp_path, arch, fmt):
    path = save(tiny_lora(arch, fmt), tmp_path / "l.safetensors")
    det = detect(path)
    assert (det.kind, det.arch) == ("lora", arch)
    assert det.key_format == fmt


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_tiny_checkpoint_files_detected(tmp_path, arch):
    for layout in get_arch(arch).build(get_arch(arch).tiny_config()).layouts:
        if layout == "diffusers":
            continue
        path = save(tiny_checkpoint(arch, layout), tmp_path / f"{layout}.safetensors")
        det = detect(path)
        assert (det.kind, det.arch, det.layout) == ("checkpoint", arch, layout)


def test_sd1_sd2_sdxl_loras_told_apart_by_widths(tmp_path):
    """SD1, SD2 and diffusers-named SDXL LoRAs share module names; cross-attention widths decide."""
    for arch in ("sd1", "sd2"):
        with index_lora(save(tiny_lora(arch, "peft"), tmp_path / f"{arch}.safetensors")) as idx:
            assert idx.arch == arch
    assert set(names_for_arch("sd1")) & set(names_for_arch("sd2"))
