"""Block layouts, presets and block-spec parsing (lorasurgery.blocks)."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgery.blocks import (
    ARCH_LAYOUTS,
    BUILTIN_PRESETS,
    LAYOUTS,
    NAMED_ONLY_LAYOUTS,
    OTHER,
    BlockWeights,
    Preset,
    arch_layouts,
    available_presets,
    describe_layout,
    format_table,
    layout_for_length,
    load_preset_file,
    parse_block_spec,
    sd3_layouts,
)
from lorasurgery.errors import PlanError

SD26 = LAYOUTS["sd-26"]
SD17 = LAYOUTS["sd-17"]
XL20 = LAYOUTS["sdxl-20"]
XL12 = LAYOUTS["sdxl-12"]
FLUX = LAYOUTS["flux-61"]
SD3_24 = sd3_layouts(24)["sd3-29"]

# (arch, depth, full layout ids)
ARCHS = [("sd1", None, SD26), ("sd2", None, SD26), ("sdxl", None, XL20), ("flux", None, FLUX), ("sd3", 24, SD3_24)]


def parse(spec, arch="sd1", **kw):
    return parse_block_spec(spec, arch=arch, **kw)


def vals(bw: BlockWeights) -> dict[str, float]:
    return dict(bw.values)


# ---- layouts -----------------------------------------------------------------------------------------


def test_layout_contents():
    assert len(SD17) == 17 and len(SD26) == 26 and len(XL12) == 12 and len(XL20) == 20 and len(FLUX) == 61
    assert SD17 == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                    "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert SD26[:3] == ("BASE", "IN00", "IN01") and SD26[12:15] == ("IN11", "M00", "OUT00") and SD26[-1] == "OUT11"
    assert XL12 == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
    assert XL20[9:12] == ("IN08", "M00", "OUT00") and XL20[-1] == "OUT08"
    assert FLUX[:4] == ("CLIP", "T5", "IN", "D00") and FLUX[21:23] == ("D18", "S00") and FLUX[-2:] == ("S37", "OUT")
    assert set(SD17) < set(SD26) and set(XL12) < set(XL20)
    flux58 = NAMED_ONLY_LAYOUTS["flux-58"]
    assert len(flux58) == 58 and flux58[0] == "BASE" and flux58[1:] == FLUX[3:-1]


def test_sd3_layouts():
    assert list(sd3_layouts(24)) == ["sd3-29"]
    ids = sd3_layouts(38)["sd3-43"]
    assert ids[:5] == ("CLIP_L", "CLIP_G", "T5", "IN", "J00") and ids[-2:] == ("J37", "OUT") and len(ids) == 43
    with pytest.raises(PlanError):
        sd3_layouts(0)


def test_arch_layouts():
    assert arch_layouts("sd1") == ("sd-26", {"sd-17": SD17, "sd-26": SD26})
    assert arch_layouts("sd2") == arch_layouts("sd1")
    assert arch_layouts("sdxl") == ("sdxl-20", {"sdxl-12": XL12, "sdxl-20": XL20})
    assert arch_layouts("flux") == ("flux-61", {"flux-61": FLUX})
    assert arch_layouts("sd3", 24) == ("sd3-29", {"sd3-29": SD3_24})
    assert ARCH_LAYOUTS["sdxl"][0] == "sdxl-20"
    with pytest.raises(PlanError, match="joint blocks"):
        arch_layouts("sd3")
    with pytest.raises(PlanError, match="Did you mean 'flux'"):
        arch_layouts("fluxx")
    assert arch_layouts("SDXL") == arch_layouts("sdxl")


def test_layout_for_length():
    assert layout_for_length("sd1", 17) == "sd-17"
    assert layout_for_length("sd2", 26) == "sd-26"
    assert layout_for_length("sdxl", 12) == "sdxl-12"
    assert layout_for_length("sdxl", 17) is None
    assert layout_for_length("flux", 61) == "flux-61"
    assert layout_for_length("flux", 58) is None  # named alternative only
    assert layout_for_length("sd3", 29, 24) == "sd3-29"
    assert layout_for_length("sd3", 43, 24) is None


def test_describe_layout():
    assert describe_layout(SD17) == "BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11"
    assert describe_layout(FLUX) == "CLIP, T5, IN, D00-D18, S00-S37, OUT"
    assert describe_layout(SD3_24) == "CLIP_L, CLIP_G, T5, IN, J00-J23, OUT"


# ---- empty, presets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,depth,full", ARCHS)
@pytest.mark.parametrize("spec", [None, "", "   "])
def test_empty_spec_is_identity(arch, depth, full, spec):
    bw = parse_block_spec(spec, arch=arch, depth=depth)
    assert list(bw.values) == [*full, OTHER]
    assert bw.is_identity and bw.spec == "" and bw.layout == arch_layouts(arch, depth)[0]


@pytest.mark.parametrize("arch,depth,full", ARCHS)
@pytest.mark.parametrize("name,value", [("NONE", 0.0), ("ALL", 1.0), ("ALL0.5", 0.5), ("all0.5", 0.5)])
def test_layout_independent_presets_cover_other(arch, depth, full, name, value):
    bw = parse_block_spec(name, arch=arch, depth=depth, present_blocks=[*full, None])
    assert set(bw.values.values()) == {value} and bw.weight(None) == value
    assert not bw.omitted


def test_sd1_presets_expand_by_name():
    bw = parse("OUTD")
    on = {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"}
    for block in SD17:
        assert bw.weight(block) == (1.0 if block in on else 0.0), block
    omitted = set(SD26) - set(SD17)
    assert bw.omitted == omitted and all(bw.weight(b) == 1.0 for b in omitted)
    assert bw.weight(OTHER) == 1.0  # LBW list presets leave OTHER alone
    assert bw.notes["IN00"] == "not in sd-17"
    assert parse("MIDD", "sd2").weight("IN05") == 1.0 and parse("MIDD", "sd2").weight("IN04") == 0.0


def test_sd1_preset_values_match_blocks_md():
    expected = {
        "INS": {"BASE", "IN01", "IN02", "IN04"},
        "IND": {"BASE", "IN05", "IN07", "IN08"},
        "INALL": {"BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08"},
        "MIDD": {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"},
        "OUTD": {"BASE", "OUT03", "OUT04", "OUT05", "OUT06"},
        "OUTS": {"BASE", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"},
        "OUTALL": {"BASE", *(f"OUT{i:02d}" for i in range(3, 12))},
    }
    for name, on in expected.items():
        p = BUILTIN_PRESETS[name]
        assert p.layout == "sd-17" and len(p.values) == 17
        assert {b for b, v in zip(SD17, p.values) if v == 1.0} == on, name


def test_short_preset_rejected_when_lora_has_modules_in_omitted_blocks():
    attention_only = [*SD17, None]
    assert parse("INS", present_blocks=attention_only).weight("IN04") == 1.0
    with pytest.raises(PlanError) as e:
        parse("INS", present_blocks=["IN01", "IN00", "OUT00"])
    msg = str(e.value)
    assert "INS" in msg and "IN00" in msg and "OUT00" in msg and "sd-26" in msg and "ID=VALUE" in msg
    # naming the omitted blocks resolves it
    bw = parse("INS,IN00=0,OUT00=0.5", present_blocks=["IN01", "IN00", "OUT00"])
    assert bw.weight("IN00") == 0.0 and bw.weight("OUT00") == 0.5 and "IN00" not in bw.omitted


def test_deferred_present_check():
    bw = parse("OUTS")
    bw.check_present(["OUT07", None])
    with pytest.raises(PlanError, match="IN03"):
        bw.check_present(["IN03"], source="recipe.yaml:4:9")
    with pytest.raises(ValueError):
        bw.check_present(["D00"])


@pytest.mark.parametrize("arch,depth", [("sdxl", None), ("flux", None), ("sd3", 24)])
@pytest.mark.parametrize("name", ["INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL"])
def test_sd1_presets_refused_elsewhere(arch, depth, name):
    with pytest.raises(PlanError) as e:
        parse_block_spec(name, arch=arch, depth=depth)
    msg = str(e.value)
    assert f"{name} is a preset for SD1/SD2" in msg and "not defined for" in msg and "ALL0.5" in msg


def test_flux_presets():
    assert set(parse("FLUXALL", "flux").values.values()) == {1.0}
    dbl = parse("FLUXDOUBLE", "flux")
    assert dbl.weight("D07") == 1.0 and dbl.weight("S07") == 0.0 and dbl.weight("CLIP") == 1.0
    assert dbl.weight("IN") == 1.0 and dbl.weight("OUT") == 0.0
    sgl = parse("FLUXSINGLE", "flux")
    assert sgl.weight("D07") == 0.0 and sgl.weight("S37") == 1.0 and sgl.weight("OUT") == 1.0
    with pytest.raises(PlanError, match="FLUX"):
        parse("FLUXALL", "sdxl")


def test_blora_presets():
    content = parse("BLORA_CONTENT", "sdxl")
    assert [b for b, v in content.table() if v != 0.0] == ["OUT00"]
    assert content.weight("BASE") == 0.0 and content.weight(None) == 0.0
    style = parse("BLORA_STYLE", "sdxl")
    assert [b for b, v in style.table() if v != 0.0] == ["OUT01"]
    both = parse("BLORA_BOTH", "sdxl")
    assert [b for b, v in both.table() if v != 0.0] == ["OUT00", "OUT01"]
    with pytest.raises(PlanError, match="SDXL"):
        parse("BLORA_STYLE", "sd1")


def test_unknown_preset_suggests():
    with pytest.raises(PlanError, match="Did you mean OUTD"):
        parse("OUTDD")
    with pytest.raises(PlanError, match="Did you mean ALL0.5"):
        parse("ALL05", "flux")
    with pytest.raises(PlanError, match=r"block id, not a preset.*IN04=0.5"):
        parse("IN04")


def test_preset_with_overrides():
    bw = parse("OUTD,OUT05=0.5,MID=0.25")
    assert bw.weight("OUT05") == 0.5 and bw.weight("OUT04") == 1.0 and bw.weight("M00") == 0.25
    bw = parse("ALL0.5,OTHER=1", "sdxl")
    assert bw.weight("IN04") == 0.5 and bw.weight(None) == 1.0


# ---- positional lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,depth,layout", [
    ("sd1", None, "sd-17"), ("sd1", None, "sd-26"), ("sd2", None, "sd-17"), ("sdxl", None, "sdxl-12"),
    ("sdxl", None, "sdxl-20"), ("flux", None, "flux-61"), ("sd3", 24, "sd3-29")])
def test_positional_lists_by_name(arch, depth, layout):
    ids = LAYOUTS.get(layout) or sd3_layouts(depth)[layout]
    values = [round(0.1 * i - 0.5, 6) for i in range(len(ids))]
    for spec in (",".join(map(str, values)), values, tuple(values), f"{layout}:" + ",".join(map(str, values))):
        bw = parse_block_spec(spec, arch=arch, depth=depth)
        for block, v in zip(ids, values):
            assert bw.weight(block) == v
        full = arch_layouts(arch, depth)[0]
        full_ids = (LAYOUTS.get(full) or sd3_layouts(depth)[full])
        assert bw.omitted == set(full_ids) - set(ids)
        assert all(bw.weight(b) == 1.0 for b in bw.omitted) and bw.weight(OTHER) == 1.0


def test_sdxl_12_expands_by_id_not_position():
    values = [0.0] * 12
    values[XL12.index("OUT00")] = 0.7
    bw = parse(values, "sdxl")
    assert bw.weight("OUT00") == 0.7 and bw.weight("IN08") == 0.0 and bw.weight("IN00") == 1.0
    with pytest.raises(PlanError, match="IN01"):
        parse(values, "sdxl", present_blocks=["IN01", "OUT00"])


def test_list_with_overrides_covers_omitted_blocks():
    text = ",".join(["1"] * 17) + ",IN00=0,IN03=0.5"
    bw = parse(text, present_blocks=["IN00", "IN03", "IN01"])
    assert bw.weight("IN00") == 0.0 and bw.weight("IN03") == 0.5


def test_flux58_only_by_name():
    values = ["0.5"] + ["1"] * 19 + ["0"] * 38
    bw = parse("flux-58:" + ",".join(values), "flux")
    for block in ("CLIP", "T5", "IN", "OUT"):
        assert bw.weight(block) == 0.5
    assert bw.weight("D18") == 1.0 and bw.weight("S00") == 0.0 and not bw.omitted
    structured = parse({"layout": "flux-58", "values": [float(v) for v in values]}, "flux")
    assert vals(structured) == vals(bw)
    with pytest.raises(PlanError) as e:
        parse(",".join(values), "flux")
    assert "flux-58" in str(e.value) and "61" in str(e.value) and "never by length" in str(e.value)


@pytest.mark.parametrize("arch,depth,n,valid", [
    ("sd1", None, 20, ["17", "26"]), ("sd2", None, 12, ["17", "26"]), ("sdxl", None, 17, ["12", "20"]),
    ("sdxl", None, 26, ["12", "20"]), ("flux", None, 57, ["61"]), ("sd3", 24, 43, ["29"]), ("sd1", None, 1, ["17"])])
def test_wrong_length(arch, depth, n, valid):
    with pytest.raises(PlanError) as e:
        parse_block_spec(",".join(["1"] * n), arch=arch, depth=depth)
    msg = str(e.value)
    assert f"{n} value" in msg and all(f"{v} values" in msg for v in valid) and "ID=VALUE" in msg


def test_seventeen_on_sdxl_names_the_trap():
    with pytest.raises(PlanError) as e:
        parse([1.0] * 17, "sdxl")
    msg = str(e.value)
    assert "sd-17" in msg and "SD1/SD2" in msg and "OUT00-OUT02" in msg and "never applies" in msg


def test_explicit_layout_errors():
    with pytest.raises(PlanError, match="layout for SD1/SD2"):
        parse("sd-17:" + ",".join(["1"] * 17), "sdxl")
    with pytest.raises(PlanError, match="has 17 entries"):
        parse("sd-17:" + ",".join(["1"] * 16), "sd1")
    with pytest.raises(PlanError, match=r"Did you mean sdxl-20.*'='"):
        parse("sdxl-21:" + ",".join(["1"] * 12), "sdxl")
    with pytest.raises(PlanError, match="not followed by values"):
        parse("sd-17:", "sd1")


def test_text_list_syntax_errors():
    with pytest.raises(PlanError, match="empty"):
        parse("1,,0" + ",1" * 14)
    assert parse(",".join(["1"] * 17) + ",").weight("BASE") == 1.0  # one trailing comma is fine
    with pytest.raises(PlanError, match="must come before"):
        parse("IN04=0,OUTD")
    with pytest.raises(PlanError, match="preset name can only stand first"):
        parse("OUTD," + ",".join(["1"] * 16))
    with pytest.raises(PlanError, match="not a valid block weight"):
        parse("IN04=half")


# ---- ID=VALUE ------------------------------------------------------------------------------------------


def test_id_value_pairs():
    bw = parse("IN04=0.5,OUT03=1,M00=0,OTHER=-0.5")
    assert bw.weight("IN04") == 0.5 and bw.weight("M00") == 0.0 and bw.weight(None) == -0.5
    assert bw.weight("IN05") == 1.0 and not bw.omitted
    assert parse("in04 = 0.5 , mid=0").weight("IN04") == 0.5  # case and spaces


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_mid_alias(arch):
    assert vals(parse("MID=0", arch)) == vals(parse("M00=0", arch))
    assert parse("MID=0", arch).spec == "M00=0"


def test_ranges_follow_layout_order():
    bw = parse("IN04-OUT03=0")
    zero = SD26[SD26.index("IN04"): SD26.index("OUT03") + 1]
    assert all(bw.weight(b) == 0.0 for b in zero) and bw.weight("IN03") == 1.0 and bw.weight("OUT04") == 1.0
    assert parse("IN05-MID=0.5", "sdxl").weight("IN08") == 0.5
    assert parse("BASE-OUT11=0,M00=1").weight("M00") == 1.0  # later pairs override
    with pytest.raises(PlanError, match="runs backwards.*IN04-OUT03"):
        parse("OUT03-IN04=0")
    with pytest.raises(PlanError, match="OTHER"):
        parse("IN04-OTHER=0")
    with pytest.raises(PlanError, match="not a block range"):
        parse("IN04-IN05-IN06=0")
    flux = parse("D00-S37=0.25", "flux")
    assert flux.weight("CLIP") == 1.0 and flux.weight("D00") == 0.25 and flux.weight("S37") == 0.25


def test_unknown_id_suggests():
    with pytest.raises(PlanError) as e:
        parse("IN4=0.5", "sdxl")
    msg = str(e.value)
    assert "'IN4'" in msg and "Did you mean IN04" in msg and "IN00-IN08" in msg and "OTHER" in msg
    with pytest.raises(PlanError, match="Did you mean OUT08"):
        parse("OUT09=0", "sdxl")  # SDXL has no OUT09
    with pytest.raises(PlanError, match="Did you mean D05"):
        parse("D5=0", "flux")
    with pytest.raises(PlanError, match="missing before '='"):
        parse("=0.5")


def test_flux_base_is_an_error():
    with pytest.raises(PlanError) as e:
        parse("BASE=0", "flux")
    assert "CLIP" in str(e.value) and "T5" in str(e.value)


def test_sd3_base_alias():
    bw = parse_block_spec("BASE=0,J05=0.5", arch="sd3", depth=24)
    assert bw.weight("CLIP_L") == bw.weight("CLIP_G") == bw.weight("T5") == 0.0
    assert bw.weight("IN") == 1.0 and bw.weight("J05") == 0.5
    assert bw.spec == "CLIP_L-T5=0,J05=0.5"
    with pytest.raises(PlanError, match="J23"):
        parse_block_spec("J24=0", arch="sd3", depth=24)
    assert parse_block_spec("BASE-IN=0.5", arch="sd3", depth=24).weight("IN") == 0.5


# ---- values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN"])
def test_nan_and_inf_rejected(bad):
    with pytest.raises(PlanError, match="finite"):
        parse(f"IN04={bad}")
    with pytest.raises(PlanError, match="finite"):
        parse([1.0] * 16 + [float(bad)])
    with pytest.raises(PlanError, match="finite"):
        parse({"IN04": float(bad)})


def test_bool_and_odd_values_rejected():
    with pytest.raises(PlanError):
        parse({"IN04": True})
    with pytest.raises(PlanError):
        parse([None] * 17)
    with pytest.raises(PlanError, match="XYZ"):
        parse("IN04=XYZ")
    with pytest.raises(PlanError):
        parse(object())  # type: ignore[arg-type]


def test_random_values_deterministic():
    spec = ",".join(["R"] * 26)
    a, b = parse(spec, seed=7), parse(spec, seed=7)
    assert vals(a) == vals(b)
    assert vals(a) != vals(parse(spec, seed=8))
    for block in SD26:
        v = a.weight(block)
        assert 0.0 <= v <= 1.0 and v == round(v, 3)
        assert a.notes[block] == "R (seed 7)"
    # per block: the value of IN04 does not depend on what else is random, or on the form
    assert parse("IN04=R", seed=7).weight("IN04") == a.weight("IN04")
    assert parse({"IN04": "r"}, seed=7).weight("IN04") == a.weight("IN04")
    u = parse(",".join(["U"] * 61), "flux", seed=3)
    assert all(-0.5 <= v <= 1.5 and v == round(v, 3) for b, v in u.table() if b != OTHER)
    assert len({v for b, v in u.table()}) > 10
    # the resolved numbers are recorded and read back
    assert vals(parse(a.spec)) == vals(a)


def test_x_values():
    bw = parse("IN04=X,IN05=X+0.25,IN07=x-1.5,OTHER=X", x=0.5)
    assert bw.weight("IN04") == 0.5 and bw.weight("IN05") == 0.75 and bw.weight("IN07") == -1.0
    assert bw.weight(None) == 0.5 and "x=0.5" in bw.notes["IN05"]
    assert parse("IN04=X").weight("IN04") == 1.0
    with pytest.raises(PlanError):
        parse("IN04=X+", x=0.5)
    with pytest.raises(PlanError, match="finite"):
        parse("IN04=X", x=float("nan"))


# ---- mappings and YAML ---------------------------------------------------------------------------------


def test_mapping_forms():
    assert vals(parse({"IN04": 0.5, "MID": 0})) == vals(parse("IN04=0.5,M00=0"))
    bw = parse({"preset": "OUTD", "overrides": {"OUT05": 0.5, "OTHER": 0}})
    assert bw.weight("OUT05") == 0.5 and bw.weight("BASE") == 1.0 and bw.weight(None) == 0.0
    bw = parse({"layout": "sdxl-12", "values": [1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]}, "sdxl")
    assert bw.weight("IN04") == 0.0 and bw.weight("OUT05") == 1.0
    with pytest.raises(PlanError, match="either 'preset' or 'values'"):
        parse({"preset": "ALL", "values": [1] * 17})
    with pytest.raises(PlanError, match="'overrides'"):
        parse({"preset": "ALL", "IN04": 0.5})
    with pytest.raises(PlanError, match="Did you mean 'values'"):
        parse({"layout": "sd-17", "valuse": [1] * 17})


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_file_mapping_and_structured(tmp_path):
    p = write(tmp_path, "b.yaml", "IN04: 0.5\nMID: 0\nOTHER: R\n")
    bw = parse(str(p), seed=1)
    assert bw.weight("IN04") == 0.5 and bw.weight("M00") == 0.0 and bw.weight(None) == parse("OTHER=R", seed=1).weight(None)
    assert bw.given == str(p)
    p2 = write(tmp_path, "s.yml", "preset: OUTD\noverrides:\n  OUT05: 0.5\n  IN00-IN03: 0\n")
    bw2 = parse(p2, present_blocks=["IN00", "OUT05"])
    assert bw2.weight("OUT05") == 0.5 and bw2.weight("IN02") == 0.0
    p3 = write(tmp_path, "l.yaml", "[" + ", ".join(["1"] * 12) + "]\n")
    assert parse(p3, "sdxl").is_identity
    p4 = write(tmp_path, "t.yaml", "OUTD,OUT05=0.5\n")
    assert parse(p4).weight("OUT05") == 0.5


def test_yaml_errors_have_line_numbers(tmp_path):
    p = write(tmp_path, "b.yaml", "IN04: 0.5\nM00: 0\nIN4: 1\n")
    with pytest.raises(PlanError) as e:
        parse(str(p), "sdxl")
    assert f"{p}:3:1" in str(e.value) and "Did you mean IN04" in str(e.value)
    p = write(tmp_path, "v.yaml", "layout: sd-17\nvalues:\n  - 1\n  - .nan\n" + "  - 1\n" * 15)
    with pytest.raises(PlanError, match=rf"{p}:4:5"):
        parse(p)
    p = write(tmp_path, "n.yaml", "IN04: nan\n")
    with pytest.raises(PlanError, match=rf"{p}:1:7.*finite"):
        parse(p)
    p = write(tmp_path, "bad.yaml", "IN04: 0.5\n  MID: [\n")
    with pytest.raises(PlanError, match=rf"{p}:2:\d+: not valid YAML"):
        parse(p)
    p = write(tmp_path, "dup.yaml", "IN04: 0.5\nin04: 1\n")
    with pytest.raises(PlanError, match=rf"{p}:2:1: key 'in04' appears twice \(first at {p}:1:1\)"):
        parse(p)
    p = write(tmp_path, "empty.yaml", "# nothing\n")
    with pytest.raises(PlanError, match="empty"):
        parse(p)
    with pytest.raises(PlanError, match="does not exist"):
        parse(str(tmp_path / "missing.yaml"))
    p = write(tmp_path, "t.yaml", "OUTD,OUT5=0.5\n")
    with pytest.raises(PlanError, match=rf"{p}:1:1: item 2.*Did you mean OUT05"):
        parse(p)


def test_yaml_node_from_a_recipe():
    text = "steps:\n  - blocks:\n      IN04: 0.5\n      OUT99: 1\n"
    node = yaml.compose(text)
    blocks = node.value[0][1].value[0].value[0][1]
    with pytest.raises(PlanError, match=r"<unicode string>:4:7: unknown block id 'OUT99'"):
        parse(blocks)
    good = yaml.compose("{preset: ALL0.5, overrides: {OUT05: 1}}")
    assert parse(good, "sdxl").weight("OUT05") == 1.0


# ---- preset files --------------------------------------------------------------------------------------

LBW_FILE = """# my presets
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
CHARA:1,1,1,1,1,0,0,0,1,1,1,1,1,1,1,0,0  # trailing comment

LC-NF:1,1,1,1,1,1,1,1,1,1,1,1,1,1,0,1,1,0,0,0,1,1,1,1,1,1
INS:1,1,1,1,1,0,0,0,0,0,0,0
RAND:1,1,1,1,1,1,1,1,R,R,R,R,R,R,R,R,R
"""


def test_load_preset_file(tmp_path):
    p = write(tmp_path, "lbwpresets.txt", LBW_FILE)
    presets = load_preset_file(p)
    assert set(presets) == {"NONE", "CHARA", "LC-NF", "INS", "RAND"}
    assert presets["CHARA"][0].origin == f"{p}:3" and len(presets["CHARA"][0].values) == 17
    bw = parse("CHARA", presets=presets)
    assert bw.weight("IN07") == 0.0 and bw.weight("OUT10") == 0.0 and bw.weight("OUT09") == 1.0
    assert parse("LC-NF", presets=presets).weight("OUT00") == 0.0  # 26 values
    # a user NONE (17 values) shadows the built-in one on SD1: OTHER stays 1, blocks at 0
    assert parse("NONE", presets=presets).weight(None) == 1.0
    assert parse("NONE", "sdxl", presets=presets).weight(None) == 0.0  # built-in on SDXL
    # user INS with 12 values applies to SDXL; built-in INS still serves SD1
    xl = parse("INS", "sdxl", presets=presets)
    assert xl.weight("IN08") == 1.0 and xl.weight("M00") == 0.0
    assert parse("INS", presets=presets).weight("IN05") == 0.0
    r = parse("RAND", presets=presets, seed=5)
    assert r.weight("OUT03") == parse("OUT03=R", seed=5).weight("OUT03") and r.weight("BASE") == 1.0
    with pytest.raises(PlanError, match=r"CHARA.*has 17 values.*sd-17.*not defined for FLUX"):
        parse("CHARA", "flux", presets=presets)
    assert "CHARA" in available_presets("sd1", presets=presets)
    assert "CHARA" not in available_presets("sdxl", presets=presets)


@pytest.mark.parametrize("line,match", [
    ("FOO 1,0,1", "not a preset line"),
    ("FOO:1,0,1", "has 3 values"),
    ("FOO:" + ",".join(["1"] * 16) + ",abc", "value 17.*not a valid block weight"),
    ("FOO:" + ",".join(["1"] * 16) + ",nan", "finite"),
    ("ATTNDEEPON:IN05-OUT05:attn:1", "elemental"),
    ("XYZ:::1", "elemental"),
    ("0.5:" + ",".join(["1"] * 17), "invalid preset name"),
    (":" + ",".join(["1"] * 17), "invalid preset name"),
    ("FOO:1,1,1,1 1,1,1,1,1,1,1,1,1,1,1,1,1", "not a valid block weight"),
])
def test_preset_file_errors_have_line_numbers(tmp_path, line, match):
    p = write(tmp_path, "presets.txt", "# header\nOK:" + ",".join(["1"] * 12) + "\n" + line + "\n")
    with pytest.raises(PlanError, match=rf"{p}:3: .*{match}"):
        load_preset_file(p)


def test_preset_file_duplicates(tmp_path):
    ones17, ones26 = ",".join(["1"] * 17), ",".join(["1"] * 26)
    p = write(tmp_path, "d.txt", f"A:{ones17}\nB:{ones17}\nA:{ones26}\n")
    with pytest.raises(PlanError, match=rf"{p}:3: preset A is defined again for SD.*line 1"):
        load_preset_file(p)
    with pytest.raises(PlanError, match="does not exist"):
        load_preset_file(tmp_path / "none.txt")


def test_presets_argument_forms():
    table = {"MINE": [0.5] * 20, "OBJ": Preset("OBJ", (0.0,) * 12, origin="test")}
    assert parse("MINE", "sdxl", presets=table).weight("IN00") == 0.5
    assert parse("OBJ", "sdxl", presets=table).weight("IN00") == 1.0  # 12 values: IN00 not in sdxl-12
    both = {"P": [Preset("P", (0.0,) * 17), Preset("P", (0.5,) * 26)]}
    with pytest.raises(PlanError, match="more than once"):
        parse("P", presets=both)


# ---- BlockWeights, spec, table ------------------------------------------------------------------------


def test_blockweights_accessors():
    bw = parse("IN04=0.5,OTHER=2")
    assert bw.weight(None) == 2.0 and bw.weight(OTHER) == 2.0
    assert bw.table()[0] == ("BASE", 1.0) and bw.table()[-1] == (OTHER, 2.0)
    assert [b for b, _ in bw.table()] == [*SD26, OTHER]
    with pytest.raises(KeyError, match="D00"):
        bw.weight("D00")
    with pytest.raises(TypeError):
        bw.values["IN04"] = 1.0  # type: ignore[index]
    assert bw.spec == "IN04=0.5,OTHER=2" and bw.given == "IN04=0.5,OTHER=2"


def test_normalised_spec_compresses_runs():
    assert parse("NONE").spec == "BASE-OUT11=0,OTHER=0"
    assert parse("FLUXDOUBLE", "flux").spec == "S00-OUT=0"
    assert parse("IN04=0.5,IN05=0.5,IN07=-1").spec == "IN04-IN05=0.5,IN07=-1"


def test_format_table():
    bw = parse("INS,IN04=R", seed=2)
    cols, rows = format_table(bw)
    assert cols == ("block", "weight", "note")
    assert rows[0] == ("BASE", "1", "") and rows[-1][0] == OTHER
    row = dict((r[0], r) for r in rows)
    assert row["IN04"][2] == "R (seed 2)" and row["IN00"][2] == "not in sd-17" and row["IN05"][1] == "0"
    cols, rows = format_table(bw, modules={"IN01": 4, None: 2}, norms={"IN01": 0.123456, OTHER: 1.5})
    assert cols == ("block", "weight", "modules", "delta-W norm", "note")
    row = dict((r[0], r) for r in rows)
    assert row["IN01"][2:4] == ("4", "0.1235") and row[OTHER][2:4] == ("2", "1.5") and row["IN02"][2:4] == ("0", "-")


# ---- round trips ---------------------------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def full_list(draw):
    arch, depth, full = draw(st.sampled_from(ARCHS))
    values = draw(st.lists(finite, min_size=len(full), max_size=len(full)))
    return arch, depth, full, values


@settings(max_examples=60, deadline=None)
@given(full_list())
def test_full_lists_round_trip(case):
    arch, depth, full, values = case
    bw = parse_block_spec(values, arch=arch, depth=depth, present_blocks=[*full, None])
    expected = {b: v + 0.0 for b, v in zip(full, values)}
    assert {b: bw.weight(b) for b in full} == expected and bw.weight(None) == 1.0
    text = parse_block_spec(",".join(repr(v) for v in values), arch=arch, depth=depth)
    assert vals(text) == vals(bw)
    again = parse_block_spec(bw.spec, arch=arch, depth=depth)
    assert vals(again) == vals(bw) and again.spec == bw.spec


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=17, max_size=17), st.sampled_from(["sd1", "sd2"]))
def test_short_lists_round_trip_through_spec(values, arch):
    bw = parse_block_spec(values, arch=arch)
    assert all(bw.weight(b) == v + 0.0 for b, v in zip(SD17, values))
    assert vals(parse_block_spec(bw.spec, arch=arch)) == vals(bw)
