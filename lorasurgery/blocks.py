"""Block layouts, block-weight presets and block-spec parsing ("LBW", ``blocks.md``).

A *block weight* is one multiplier per model block. It scales delta-W linearly: a module in block ``b``
contributes ``w * w_b * delta-W`` (the ops apply it; this module only resolves the numbers).

Layouts
-------
A *layout* is an ordered tuple of block ids. Every architecture has one *full layout* (every block it has)
and the positional layouts it accepts by length (:data:`ARCH_LAYOUTS`, :func:`arch_layouts`):

========  ===========================  ==================================================
arch      full layout                  accepted by length
========  ===========================  ==================================================
sd1, sd2  ``sd-26``                    ``sd-17``, ``sd-26``
sdxl      ``sdxl-20``                  ``sdxl-12``, ``sdxl-20``
flux      ``flux-61``                  ``flux-61`` (``flux-58`` by name only)
sd3       ``sd3-<depth+5>``            ``sd3-<depth+5>`` (lorasurgery's own proposal)
========  ===========================  ==================================================

Short layouts (``sd-17``, ``sdxl-12``) are expanded to the full one *by block id*, never by position. The
blocks a short list leaves out are *omitted*: they get 1 (the "unnamed blocks keep 1" rule), and the list
is accepted only when the LoRA has no modules in them (``blocks.md`` section 8): LBW would give them 0 and
SuperMerger 1, so a LoRA with modules there has no unambiguous meaning. The check runs in
:func:`parse_block_spec` when ``present_blocks`` is given and can be repeated later with
:meth:`BlockWeights.check_present`. ``OTHER`` is a pseudo-block for modules in no block (``time_embed``,
``label_emb``, ``out``): addressable by name only, never part of a positional list, default 1.

Spec forms accepted by :func:`parse_block_spec`
-----------------------------------------------
* ``None`` or ``""``: every block (and OTHER) at 1.
* A preset name: ``"ALL0.5"``, ``"OUTD"``; optionally followed by ``ID=VALUE`` overrides:
  ``"OUTD,OUT05=0.5"``.
* A positional list: ``"1,0,0.5,..."`` or a sequence of numbers, whose length must be one of the
  architecture's layouts; optionally prefixed by a layout name (``"flux-58:1,0,..."``, required for the
  58-entry FLUX list) and followed by ``ID=VALUE`` overrides (``"<17 values>,IN00=0"``).
* ``ID=VALUE`` pairs: ``"IN04=0.5,MID=0,OTHER=1"``; ranges in layout order ``"IN04-OUT03=0"``;
  later pairs override earlier ones; unnamed blocks keep 1. ``MID`` is an alias of ``M00`` (SD/SDXL);
  on SD3 ``BASE`` sets ``CLIP_L``, ``CLIP_G`` and ``T5``. Ids are case-insensitive.
* A mapping ``{ID: value}`` or ``{preset: NAME, layout: NAME, values: [...], overrides: {ID: value}}``
  (the recipe form), a YAML node of either (errors then carry ``file:line:col``), or the path of a
  ``.yaml``/``.yml`` file holding one of them.

Values are finite floats (negative allowed) or the special values ``R`` (uniform in [0, 1]), ``U``
(uniform in [-0.5, 1.5]: the range of LBW's code; LBW's README says -1.5..1.5), both rounded to 3
decimals and drawn deterministically from ``sha256(seed, block id)`` (no global RNG), and ``X``, ``X+d``,
``X-d`` (the ``x`` argument plus an offset). Special values are resolved when the spec is parsed; the
resolved numbers are what :attr:`BlockWeights.values` and :attr:`BlockWeights.spec` record.

Presets
-------
Presets are data (:data:`BUILTIN_PRESETS`; user presets from :func:`load_preset_file`). Layout-independent:
``NONE``, ``ALL``, ``ALL0.5``: every block **and OTHER** at 0, 1, 0.5. This deliberately differs from LBW,
where keys in no block keep 1 under every preset: these presets mean "the whole LoRA at this strength", so
``NONE`` really disables a LoRA and ``ALL0.5`` equals weight 0.5 even for a LoCon with ``time_embed``
modules. All other presets leave OTHER at 1 unless their definition says otherwise. SD1/SD2 only (LBW
definitions in ``sd-17`` order): ``INS``, ``IND``, ``INALL``, ``MIDD``, ``OUTD``, ``OUTS``, ``OUTALL``. FLUX:
``FLUXALL`` (LBW) and lorasurgery's own ``FLUXDOUBLE``/``FLUXSINGLE``. SDXL: lorasurgery's own B-LoRA
presets ``BLORA_CONTENT``/``BLORA_STYLE``/``BLORA_BOTH``. A user preset of the same name and a length valid
for the architecture takes precedence over a built-in one.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Collection, Iterable, Mapping, Sequence, Union

import yaml

from .errors import PlanError

__all__ = [
    "OTHER",
    "LAYOUTS",
    "NAMED_ONLY_LAYOUTS",
    "ARCH_LAYOUTS",
    "ARCH_NAMED_ONLY",
    "ARCH_TITLES",
    "PRESET_LENGTHS",
    "sd3_layouts",
    "arch_layouts",
    "layout_for_length",
    "describe_layout",
    "Preset",
    "BUILTIN_PRESETS",
    "load_preset_file",
    "available_presets",
    "BlockWeights",
    "parse_block_spec",
    "format_table",
]

#: Pseudo-block of modules that belong to no block (``blocks.md`` section 7).
OTHER = "OTHER"


def _ids(prefix: str, indices: Iterable[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in indices)


_SD_26 = ("BASE", *_ids("IN", range(12)), "M00", *_ids("OUT", range(12)))
_SD_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(3, 12)))
_SDXL_20 = ("BASE", *_ids("IN", range(9)), "M00", *_ids("OUT", range(9)))
_SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *_ids("OUT", range(6)))
_FLUX_61 = ("CLIP", "T5", "IN", *_ids("D", range(19)), *_ids("S", range(38)), "OUT")
_FLUX_58 = ("BASE", *_ids("D", range(19)), *_ids("S", range(38)))

#: Every fixed layout, by name (``blocks.md`` section 1). SD3 layouts depend on depth: :func:`sd3_layouts`.
LAYOUTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "sd-17": _SD_17,
    "sd-26": _SD_26,
    "sdxl-12": _SDXL_12,
    "sdxl-20": _SDXL_20,
    "flux-61": _FLUX_61,
})

#: Layouts accepted only when written with their name, never by length. ``flux-58`` is the
#: ComfyUI-Inspire-Pack FLUX list (ltdrdata/ComfyUI-Inspire-Pack#162): BASE (text encoders and every other
#: non-block module, i.e. CLIP, T5, IN and OUT together) + 19 double + 38 single blocks.
NAMED_ONLY_LAYOUTS: Mapping[str, tuple[str, ...]] = MappingProxyType({"flux-58": _FLUX_58})

# Entries of named-only layouts that stand for several ids of the full layout.
_ENTRY_EXPANSIONS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "flux-58": {"BASE": ("CLIP", "T5", "IN", "OUT")},
}

#: arch -> (full layout name, layouts accepted by length). SD3 is depth-dependent: :func:`arch_layouts`.
ARCH_LAYOUTS: Mapping[str, tuple[str, tuple[str, ...]]] = MappingProxyType({
    "sd1": ("sd-26", ("sd-17", "sd-26")),
    "sd2": ("sd-26", ("sd-17", "sd-26")),
    "sdxl": ("sdxl-20", ("sdxl-12", "sdxl-20")),
    "flux": ("flux-61", ("flux-61",)),
})

#: arch -> layouts it accepts by explicit name only.
ARCH_NAMED_ONLY: Mapping[str, tuple[str, ...]] = MappingProxyType({"flux": ("flux-58",)})

#: Short display names used in messages.
ARCH_TITLES: Mapping[str, str] = MappingProxyType(
    {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX"})

# Id aliases accepted in ID=VALUE form, per arch (alias -> ids of the full layout).
_ALIASES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "sd1": {"MID": ("M00",)},
    "sd2": {"MID": ("M00",)},
    "sdxl": {"MID": ("M00",)},
    "sd3": {"BASE": ("CLIP_L", "CLIP_G", "T5")},
    "flux": {},
}

# Ids that are not valid for an arch but are common enough to deserve a precise explanation.
_ID_HINTS: Mapping[str, Mapping[str, str]] = {
    "flux": {
        "BASE": "FLUX has no BASE block: its text encoders have separate slots, CLIP (CLIP-L) and T5; "
                "write CLIP=v,T5=v (the BASE of the 58-entry flux-58 list also covers IN and OUT)",
        "TE": "FLUX's text encoders are CLIP (CLIP-L) and T5; write CLIP=v,T5=v",
        "M00": "FLUX has no middle block; its blocks are D00-D18 (double) and S00-S37 (single)",
        "MID": "FLUX has no middle block; its blocks are D00-D18 (double) and S00-S37 (single)",
    },
    "sd3": {
        "TE": "SD3's text encoders are CLIP_L, CLIP_G and T5 (BASE sets all three)",
        "CLIP": "SD3 has two CLIP encoders: CLIP_L and CLIP_G (BASE sets CLIP_L, CLIP_G and T5)",
        "M00": "SD3 has no middle block; its blocks are the joint blocks J00, J01, ...",
        "MID": "SD3 has no middle block; its blocks are the joint blocks J00, J01, ...",
    },
    "sdxl": {
        "TE": "SDXL's two text encoders are the single block BASE",
        "TE1": "SDXL's two text encoders are the single block BASE (no separate weight per encoder)",
        "TE2": "SDXL's two text encoders are the single block BASE (no separate weight per encoder)",
        "CLIP": "SDXL's two text encoders are the single block BASE",
    },
    "sd1": {"TE": "the text encoder is BASE", "CLIP": "the text encoder is BASE"},
    "sd2": {"TE": "the text encoder is BASE", "CLIP": "the text encoder is BASE"},
}

#: Lengths a line of a preset file may have, with the layout each length belongs to.
PRESET_LENGTHS: Mapping[int, str] = MappingProxyType({
    12: "sdxl-12", 17: "sd-17", 20: "sdxl-20", 26: "sd-26",
    29: "sd3-29 (depth 24: SD3/SD3.5-Medium)", 43: "sd3-43 (depth 38: SD3.5-Large)", 61: "flux-61",
})


def sd3_layouts(depth: int) -> dict[str, tuple[str, ...]]:
    """SD3/SD3.5 layout for ``depth`` joint blocks: ``{"sd3-<depth+5>": (CLIP_L, CLIP_G, T5, IN, J00.., OUT)}``.

    This layout is lorasurgery's own proposal (``blocks.md`` section 1); no other tool has one.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise PlanError(f"SD3 block layouts need the number of joint blocks (a positive integer); got {depth!r}.")
    ids = ("CLIP_L", "CLIP_G", "T5", "IN", *_ids("J", range(depth)), "OUT")
    return {f"sd3-{len(ids)}": ids}


def _check_arch(arch: str) -> str:
    """The architecture name in lower case; PlanError (with a suggestion) if it is not one of ARCH_TITLES."""
    if isinstance(arch, str) and arch.lower() in ARCH_TITLES:
        return arch.lower()
    near = difflib.get_close_matches(str(arch).lower(), list(ARCH_TITLES), n=1, cutoff=0.4)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise PlanError(f"Unknown architecture {arch!r} for block weights; expected one of "
                    f"{', '.join(ARCH_TITLES)}.{hint}")


def arch_layouts(arch: str, depth: int | None = None) -> tuple[str, dict[str, tuple[str, ...]]]:
    """``(full layout name, {name: ids})`` of every layout ``arch`` accepts by length, full layout included.

    ``depth`` (number of joint blocks) is required for ``"sd3"`` and ignored otherwise. Layouts accepted by
    name only (``flux-58``) are not included: see :data:`ARCH_NAMED_ONLY`.
    """
    arch = _check_arch(arch)
    if arch == "sd3":
        if depth is None:
            raise PlanError("SD3 block layouts depend on the number of joint blocks; it was not given "
                            "(it is read from the model or the LoRA: 24 for SD3/SD3.5-Medium, 38 for SD3.5-Large).")
        layouts = sd3_layouts(depth)
        return next(iter(layouts)), layouts
    full, names = ARCH_LAYOUTS[arch]
    return full, {name: LAYOUTS[name] for name in names}


def layout_for_length(arch: str, n: int, depth: int | None = None) -> str | None:
    """Name of the layout of ``arch`` that a positional list of ``n`` values follows, or None if none does.

    Only layouts accepted by length count (``flux-58`` is never chosen by length).
    """
    _, layouts = arch_layouts(arch, depth)
    for name, ids in layouts.items():
        if len(ids) == n:
            return name
    return None


_NUMBERED = re.compile(r"^(.*?[A-Z_])(\d+)$")


def describe_layout(ids: Sequence[str]) -> str:
    """Compact text of a layout: runs of three or more consecutive numbered ids become ranges.

    ``describe_layout(LAYOUTS["sd-17"])`` is ``"BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11"``.
    """
    parts: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if len(run) >= 3:
            parts.append(f"{run[0]}-{run[-1]}")
        else:
            parts.extend(run)
        run.clear()

    prev: tuple[str, int, int] | None = None
    for block in ids:
        m = _NUMBERED.match(block)
        key = (m.group(1), int(m.group(2)), len(m.group(2))) if m else None
        if key and prev and run and key[0] == prev[0] and key[2] == prev[2] and key[1] == prev[1] + 1:
            run.append(block)
        else:
            flush()
            run.append(block)
        prev = key
    flush()
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

RawValue = Union[float, str]  # a float, or a normalised special token: "R", "U", "X", "X+d", "X-d"

_X_RE = re.compile(r"^X\s*(?:([+-])\s*(\S.*))?$", re.IGNORECASE)
_VALUE_HELP = "a number, R (random 0..1), U (random -0.5..1.5), X, X+d or X-d"


def _fmt(v: float) -> str:
    """Shortest text that reads back as exactly ``v`` (``1`` rather than ``1.0``)."""
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _finite(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise PlanError(f"{where}: {text!r} is not a valid block weight; expected {_VALUE_HELP}.") from None
    if not math.isfinite(v):
        raise PlanError(f"{where}: {text!r} is not a finite number; NaN and infinite block weights are not allowed.")
    return v + 0.0  # -0.0 -> 0.0


def _parse_token(token: str, where: str) -> RawValue:
    """One value as written: a finite float or a normalised special token."""
    t = token.strip()
    if not t:
        raise PlanError(f"{where}: empty value; expected {_VALUE_HELP}.")
    u = t.upper()
    if u in ("R", "U"):
        return u
    if u in ("XYZ", "ZYX"):
        raise PlanError(f"{where}: {t} is LBW's XYZ-plot marker; lorasurgery has no plot mode. "
                        f"Give {_VALUE_HELP}.")
    m = _X_RE.match(t)
    if m:
        if m.group(1) is None:
            return "X"
        d = _finite(m.group(2).strip(), where)
        offset = d if m.group(1) == "+" else -d
        if offset == 0:
            return "X"
        return f"X{'+' if offset > 0 else '-'}{_fmt(abs(offset))}"
    return _finite(t, where)


def _parse_value(value: Any, where: str) -> RawValue:
    """A value from Python data: a real number (not bool) or a string token."""
    if isinstance(value, bool) or value is None:
        raise PlanError(f"{where}: {value!r} is not a valid block weight; expected {_VALUE_HELP}.")
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v):
            raise PlanError(f"{where}: {value!r} is not a finite number; NaN and infinite block weights are not allowed.")
        return v + 0.0
    if isinstance(value, str):
        return _parse_token(value, where)
    raise PlanError(f"{where}: {value!r} ({type(value).__name__}) is not a valid block weight; expected {_VALUE_HELP}.")


def _is_value_token(token: str) -> bool:
    try:
        _parse_token(token, "")
    except PlanError:
        return False
    return True


def _unit_draw(seed: int, block: str) -> float:
    """Deterministic u in [0, 1) from sha256 of (seed, block id)."""
    digest = hashlib.sha256(f"lorasurgery.blocks\x00{seed}\x00{block}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def _resolve_raw(raw: RawValue, block: str, seed: int, x: float, where: str) -> tuple[float, str]:
    """Resolved float and a note ("" for plain numbers)."""
    if isinstance(raw, float):
        return raw, ""
    if raw == "R":
        return round(_unit_draw(seed, block), 3) + 0.0, f"R (seed {seed})"
    if raw == "U":
        return round(2.0 * _unit_draw(seed, block) - 0.5, 3) + 0.0, f"U (seed {seed}, range -0.5..1.5)"
    offset = 0.0 if raw == "X" else float(raw[1:])
    v = x + offset
    if not math.isfinite(v):
        raise PlanError(f"{where}: {raw} with x={_fmt(x)} is not a finite number.")
    return v + 0.0, f"{raw} (x={_fmt(x)})"


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named block-weight setting.

    ``values`` holds one value per entry of a layout, or a single value that applies to every block of
    any architecture (layout-independent presets). ``layout`` names the layout the values follow; ``None``
    means "chosen by length for the target architecture" (user presets from LBW files). ``other`` is the
    value for OTHER (``None``: left at 1). Special tokens (``"R"``, ``"U"``, ``"X+0.5"``) are resolved
    when the preset is applied. ``origin`` says where it was defined (``"built-in"`` or ``"file:line"``).
    """

    name: str
    values: tuple[RawValue, ...]
    layout: str | None = None
    other: float | None = None
    origin: str = "built-in"
    description: str = ""

    @property
    def uniform(self) -> bool:
        """True when the preset sets every block of any architecture to one value."""
        return len(self.values) == 1

    def layout_for(self, arch: str, depth: int | None = None) -> str | None:
        """The layout name the preset uses on ``arch`` (``""`` for uniform presets), or None if it does not apply."""
        if self.uniform:
            return ""
        _, layouts = arch_layouts(arch, depth)
        if self.layout is not None:
            named = set(layouts) | set(ARCH_NAMED_ONLY.get(arch, ()))
            return self.layout if self.layout in named else None
        return layout_for_length(arch, len(self.values), depth)


def _layout_ids_any(name: str) -> tuple[str, ...] | None:
    if name in LAYOUTS:
        return LAYOUTS[name]
    if name in NAMED_ONLY_LAYOUTS:
        return NAMED_ONLY_LAYOUTS[name]
    m = re.fullmatch(r"sd3-(\d+)", name)
    if m and 5 < int(m.group(1)) <= 1005:
        return sd3_layouts(int(m.group(1)) - 5)[name]
    return None


def _layout_family(name: str) -> str:
    """Which architectures a layout name belongs to, for messages ("SD1/SD2", "SDXL", ...)."""
    archs = [a for a, (_, names) in ARCH_LAYOUTS.items() if name in names]
    archs += [a for a, names in ARCH_NAMED_ONLY.items() if name in names]
    if name.startswith("sd3-"):
        archs.append("sd3")
    return "/".join(ARCH_TITLES[a] for a in archs) or "unknown"


def _preset_from_data(name: str, data: Mapping[str, Any]) -> Preset:
    if "uniform" in data:
        v = float(data["uniform"])
        return Preset(name, (v,), None, v, "built-in", data["doc"])
    layout = data["layout"]
    ids = LAYOUTS[layout]
    if "values" in data:
        values = tuple(float(t) for t in data["values"].split(","))
        assert len(values) == len(ids), name
    else:
        filled = dict.fromkeys(ids, float(data["fill"]))
        for target, v in data.get("set", {}).items():
            first, _, last = target.partition("-")
            span = ids[ids.index(first): ids.index(last or first) + 1]
            filled.update(dict.fromkeys(span, float(v)))
        values = tuple(filled.values())
    other = data.get("other")
    return Preset(name, values, layout, None if other is None else float(other), "built-in", data["doc"])


# The built-in presets, as data. SD1/SD2 values are LBW's (blocks.md section 9), in sd-17 order.
_BUILTIN_PRESET_DATA: dict[str, dict[str, Any]] = {
    "NONE": {"uniform": 0, "doc": "every block and OTHER at 0 (any architecture)"},
    "ALL": {"uniform": 1, "doc": "every block and OTHER at 1 (any architecture)"},
    "ALL0.5": {"uniform": 0.5, "doc": "every block and OTHER at 0.5 (any architecture)"},
    "INS": {"layout": "sd-17", "values": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
            "doc": "LBW: BASE, IN01, IN02, IN04"},
    "IND": {"layout": "sd-17", "values": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
            "doc": "LBW: BASE, IN05, IN07, IN08"},
    "INALL": {"layout": "sd-17", "values": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
              "doc": "LBW: BASE, IN01-IN08"},
    "MIDD": {"layout": "sd-17", "values": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
             "doc": "LBW: BASE, IN05, IN07, IN08, M00, OUT03-OUT06"},
    "OUTD": {"layout": "sd-17", "values": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
             "doc": "LBW: BASE, OUT03-OUT06"},
    "OUTS": {"layout": "sd-17", "values": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
             "doc": "LBW: BASE, OUT07-OUT11"},
    "OUTALL": {"layout": "sd-17", "values": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
               "doc": "LBW: BASE, OUT03-OUT11"},
    "FLUXALL": {"layout": "flux-61", "fill": 1, "doc": "LBW: all 61 FLUX blocks at 1"},
    "FLUXDOUBLE": {"layout": "flux-61", "fill": 0, "set": {"CLIP": 1, "T5": 1, "IN": 1, "D00-D18": 1},
                   "doc": "lorasurgery: text encoders, IN and the double blocks D00-D18; single blocks and OUT at 0"},
    "FLUXSINGLE": {"layout": "flux-61", "fill": 0, "set": {"CLIP": 1, "T5": 1, "S00-S37": 1, "OUT": 1},
                   "doc": "lorasurgery: text encoders, the single blocks S00-S37 and OUT; IN and double blocks at 0"},
    # B-LoRA (yardenfren1996/B-LoRA): content = unet.up_blocks.0.attentions.0 = output_blocks.0.1 (OUT00),
    # style = unet.up_blocks.0.attentions.1 = output_blocks.1.1 (OUT01). B-LoRA trains only to_q/k/v/out of
    # those transformers; a block weight also covers the block's resnet, irrelevant for such a LoRA.
    "BLORA_CONTENT": {"layout": "sdxl-20", "fill": 0, "set": {"OUT00": 1}, "other": 0,
                      "doc": "lorasurgery (B-LoRA): only OUT00 (content); everything else incl. BASE and OTHER at 0"},
    "BLORA_STYLE": {"layout": "sdxl-20", "fill": 0, "set": {"OUT01": 1}, "other": 0,
                    "doc": "lorasurgery (B-LoRA): only OUT01 (style); everything else incl. BASE and OTHER at 0"},
    "BLORA_BOTH": {"layout": "sdxl-20", "fill": 0, "set": {"OUT00-OUT01": 1}, "other": 0,
                   "doc": "lorasurgery (B-LoRA): OUT00 (content) and OUT01 (style); everything else at 0"},
}

#: Built-in presets by name (see the module docstring for their semantics).
BUILTIN_PRESETS: Mapping[str, Preset] = MappingProxyType(
    {name: _preset_from_data(name, data) for name, data in _BUILTIN_PRESET_DATA.items()})

PresetTable = Mapping[str, Union[Preset, Sequence[Preset], Sequence[Union[float, str]]]]

_BAD_NAME_CHARS = re.compile(r"[\s,=:#]")


def _families_for_length(n: int) -> frozenset[str]:
    fams = {a for a, (_, names) in ARCH_LAYOUTS.items() if any(len(LAYOUTS[x]) == n for x in names)}
    if n in (29, 43):
        fams.add("sd3")
    return frozenset(fams)


def load_preset_file(path: str | os.PathLike[str]) -> dict[str, tuple[Preset, ...]]:
    """Read an LBW preset file: one ``NAME:v1,...,vn`` per line, n in :data:`PRESET_LENGTHS`.

    Blank lines and lines whose first non-blank character is ``#`` are skipped; a ``# comment`` after the
    values is allowed. Everything else must be a well-formed preset line: a missing ``:``, an invalid name,
    a value that is not a number or special token (NaN/inf included), a count not in
    :data:`PRESET_LENGTHS`, LBW elemental lines (``NAME:blocks:elements:ratio``) and a name defined twice
    for the same architecture raise :class:`PlanError` with ``file:line``. (LBW silently skips such lines.)
    The same name may be defined once per architecture family (e.g. a 17-value and a 12-value ``INS``).
    Returns name -> presets in file order.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PlanError(f"Block-weight preset file {str(p)!r} does not exist.", path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"Cannot read block-weight preset file {str(p)!r}: {e}.", path=p) from None
    lengths = ", ".join(str(n) for n in PRESET_LENGTHS)
    out: dict[str, list[Preset]] = {}
    first_line: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{p}:{lineno}"
        body = line.strip()
        if not body or body.startswith("#"):
            continue
        body = body.split("#", 1)[0].strip()
        name, colon, rest = body.partition(":")
        name = name.strip()
        if not colon:
            raise PlanError(f"{where}: {body!r} is not a preset line; expected NAME:v1,...,vn "
                            f"with {lengths} values (full-line comments start with '#').")
        if ":" in rest:
            raise PlanError(f"{where}: {body!r} looks like an LBW elemental preset (NAME:blocks:elements:ratio); "
                            "lorasurgery presets are plain block lists. Express per-module selections with key rules.")
        if not name or _BAD_NAME_CHARS.search(name) or _is_value_token(name):
            raise PlanError(f"{where}: invalid preset name {name!r}; a name is non-empty, has no spaces, ',', "
                            "'=', ':' or '#', and is not itself a value (a number, R, U or X).")
        items = _split_items(rest, f"{where}: preset {name}")
        values = tuple(_parse_token(it, f"{where}: preset {name}, value {k}") for k, it in enumerate(items, 1))
        n = len(values)
        if n not in PRESET_LENGTHS:
            known = "; ".join(f"{k} ({v})" for k, v in PRESET_LENGTHS.items())
            raise PlanError(f"{where}: preset {name} has {n} values; a preset line needs one of these counts: {known}.")
        for fam in _families_for_length(n):
            if (name, fam) in first_line:
                raise PlanError(f"{where}: preset {name} is defined again for {ARCH_TITLES[fam]} "
                                f"(first definition on line {first_line[(name, fam)]}); remove one of them.")
            first_line[(name, fam)] = lineno
        out.setdefault(name, []).append(Preset(name, values, None, None, where, f"{n} values from {p.name}"))
    return {k: tuple(v) for k, v in out.items()}


def _normalise_presets(presets: PresetTable | None) -> dict[str, tuple[Preset, ...]]:
    if not presets:
        return {}
    out: dict[str, tuple[Preset, ...]] = {}
    for name, entry in presets.items():
        if isinstance(entry, Preset):
            out[name] = (entry,)
        elif isinstance(entry, Sequence) and not isinstance(entry, str) and entry and all(
                isinstance(e, Preset) for e in entry):
            out[name] = tuple(entry)  # type: ignore[arg-type]
        elif isinstance(entry, Sequence) and not isinstance(entry, str):
            where = f"preset {name}"
            values = tuple(_parse_value(v, f"{where}, value {k}") for k, v in enumerate(entry, 1))
            if len(values) < 2:
                raise PlanError(f"{where}: a preset needs a full block list, got {len(values)} value(s).")
            out[name] = (Preset(name, values, None, None, "presets argument"),)
        else:
            raise PlanError(f"preset {name}: expected a Preset or a list of values, got {type(entry).__name__}.")
    return out


def _lookup_tables(arch: str, depth: int | None, presets: PresetTable | None
                   ) -> tuple[dict[str, Preset], dict[str, list[Preset]]]:
    """(applicable presets by name: user over built-in; every definition by name)."""
    user = _normalise_presets(presets)
    applicable: dict[str, Preset] = {}
    every: dict[str, list[Preset]] = {}
    for name, p in BUILTIN_PRESETS.items():
        every.setdefault(name, []).append(p)
        if p.layout_for(arch, depth) is not None:
            applicable[name] = p
    for name, defs in user.items():
        every.setdefault(name, []).extend(defs)
        fits = [p for p in defs if p.layout_for(arch, depth) is not None]
        if len(fits) > 1:
            raise PlanError(f"Preset {name} is defined more than once for {ARCH_TITLES[arch]} "
                            f"({', '.join(p.origin for p in fits)}); keep one definition per architecture.")
        if fits:
            applicable[name] = fits[0]
    return applicable, every


def available_presets(arch: str, depth: int | None = None, presets: PresetTable | None = None) -> dict[str, Preset]:
    """Presets usable on ``arch`` by name: built-ins that apply, overridden by user presets of a valid length."""
    arch = _check_arch(arch)
    return _lookup_tables(arch, depth, presets)[0]


# --------------------------------------------------------------------------------------------------
# Resolved block weights
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockWeights:
    """Resolved block weights: one finite float per block id of the full layout, plus ``OTHER``.

    ``values`` is ordered like the full layout with ``OTHER`` last. ``spec`` is the normalised spec: the
    resolved values in ``ID=VALUE`` form (runs of equal values as ranges, blocks at 1 left out, ``""`` when
    everything is 1), which :func:`parse_block_spec` reads back to the same values on the same architecture;
    it is what outputs embed as provenance. ``given`` is the spec as the user wrote it. ``omitted`` lists the
    blocks a short layout (``omitted_by``) left unspecified; they hold 1 and must contain no modules
    (:meth:`check_present`). ``notes`` explains values that came from special tokens (``R``, ``U``, ``X``).
    """

    values: Mapping[str, float]
    spec: str
    arch: str = ""
    layout: str = ""
    given: str = ""
    omitted: frozenset[str] = frozenset()
    omitted_by: str = ""
    notes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if OTHER not in self.values:
            raise ValueError("BlockWeights.values must contain OTHER")
        clean: dict[str, float] = {}
        for k, v in self.values.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise ValueError(f"BlockWeights value of {k} must be a finite number, got {v!r}")
            clean[k] = float(v) + 0.0
        object.__setattr__(self, "values", MappingProxyType(clean))
        object.__setattr__(self, "notes", MappingProxyType(dict(self.notes)))

    @property
    def blocks(self) -> tuple[str, ...]:
        """Block ids of the full layout, in order (without OTHER)."""
        return tuple(k for k in self.values if k != OTHER)

    @property
    def is_identity(self) -> bool:
        """True when every block and OTHER is exactly 1."""
        return all(v == 1.0 for v in self.values.values())

    def weight(self, block: str | None) -> float:
        """Weight of ``block`` (an id of the full layout); ``None`` or ``"OTHER"`` gives OTHER's weight."""
        key = OTHER if block is None else block
        try:
            return self.values[key]
        except KeyError:
            raise KeyError(f"block {block!r} is not in the {self.layout or 'full'} layout "
                           f"({describe_layout(self.blocks)})") from None

    def table(self) -> list[tuple[str, float]]:
        """Resolved ``(block id, weight)`` rows in layout order, ``("OTHER", w)`` last."""
        return list(self.values.items())

    def check_present(self, present_blocks: Collection[str | None], source: str = "--blocks") -> None:
        """Raise :class:`PlanError` if the LoRA has modules in blocks a short layout left unspecified.

        ``present_blocks`` are the block ids of the LoRA's modules (``None`` = OTHER). Ids outside the full
        layout are a programming error (:class:`ValueError`).
        """
        present = set(present_blocks)
        unknown = sorted(b for b in present if b is not None and b not in self.values)
        if unknown:
            raise ValueError(f"present_blocks has ids outside the {self.layout} layout: {unknown}")
        hit = [b for b in self.blocks if b in self.omitted and b in present]
        if not hit:
            return
        full = self.blocks
        example = ",".join(f"{b}=1" for b in hit[:3])
        raise PlanError(
            f"{source}: {self.omitted_by} does not cover {', '.join(hit)}, but the LoRA has modules there "
            f"(LBW would give them 0, SuperMerger 1, so the list has no single meaning). Give the full "
            f"{len(full)}-value {self.layout} list ({describe_layout(full)}), or add ID=VALUE pairs for those "
            f"blocks after the list or preset (e.g. '...,{example}'), or use ID=VALUE pairs only.")


# --------------------------------------------------------------------------------------------------
# Parsing: every input form becomes a _Spec, which _resolve turns into BlockWeights
# --------------------------------------------------------------------------------------------------


@dataclass
class _Assign:
    target: str
    value: RawValue
    where: str  # location of the value
    target_where: str = ""  # location of the block id, when it differs (mapping keys)


@dataclass
class _Spec:
    given: str
    where: str
    preset: tuple[str, str] | None = None  # (name, where)
    layout: tuple[str, str] | None = None  # (name, where)
    values: list[tuple[RawValue, str]] | None = None  # [(value, where)]
    assigns: list[_Assign] = field(default_factory=list)


def _split_items(text: str, where: str) -> list[str]:
    """Comma-separated items, stripped; one trailing comma is allowed, other empty items are errors."""
    items = [it.strip() for it in text.split(",")]
    if len(items) > 1 and items[-1] == "":
        items.pop()
    for k, it in enumerate(items, 1):
        if not it:
            raise PlanError(f"{where}: item {k} is empty (two commas in a row?) in {text.strip()!r}.")
    return items


_LAYOUT_PREFIX = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_.+-]*)\s*:(.*)$", re.DOTALL)


def _spec_from_text(text: str, where: str) -> _Spec:
    spec = _Spec(given=text.strip(), where=where)
    body = text.strip()
    if not body:
        return spec
    m = _LAYOUT_PREFIX.match(body)
    if m:
        spec.layout = (m.group(1), where)
        body = m.group(2)
        if not body.strip():
            raise PlanError(f"{where}: layout name {spec.layout[0]!r} is not followed by values "
                            f"(expected '{spec.layout[0]}:v1,v2,...').")
    head: list[tuple[str, str]] = []
    for k, item in enumerate(_split_items(body, where), 1):
        iw = f"{where}: item {k} ({item!r})"
        if "=" in item:
            target, _, value = item.partition("=")
            spec.assigns.append(_Assign(target.strip(), _parse_token(value, iw), iw))
        elif spec.assigns:
            raise PlanError(f"{iw}: a preset name or positional values must come before the ID=VALUE pairs.")
        else:
            head.append((item, iw))
    if head and len(head) == 1 and not spec.layout and not _is_value_token(head[0][0]):
        spec.preset = head[0]
    elif head:
        for item, iw in head:
            if not _is_value_token(item):
                raise PlanError(f"{iw}: {item!r} is not a value; a block list holds only values ({_VALUE_HELP}), "
                                "and a preset name can only stand first and alone, followed by ID=VALUE pairs "
                                "(e.g. 'OUTD,OUT05=0.5').")
        spec.values = [(_parse_token(item, iw), iw) for item, iw in head]
    elif spec.layout:
        raise PlanError(f"{where}: layout name {spec.layout[0]!r} must be followed by values, not only ID=VALUE "
                        f"pairs (expected '{spec.layout[0]}:v1,v2,...').")
    return spec


@dataclass
class _Loc:
    """A located piece of input: a scalar, a list or a mapping, with a location for messages."""

    kind: str  # "scalar", "seq", "map"
    value: Any  # scalar value; list[_Loc]; list[tuple[_Loc, _Loc]]
    where: str


def _loc_from_python(obj: Any, where: str) -> _Loc:
    if isinstance(obj, Mapping):
        return _Loc("map", [(_Loc("scalar", k, f"{where}: key {k!r}"),
                             _loc_from_python(v, f"{where}: {k}")) for k, v in obj.items()], where)
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return _Loc("seq", [_loc_from_python(v, f"{where}: value {i}") for i, v in enumerate(obj, 1)], where)
    return _Loc("scalar", obj, where)


def _mark(node: yaml.Node) -> str:
    m = node.start_mark
    return f"{m.name}:{m.line + 1}:{m.column + 1}"


def _loc_from_node(node: yaml.Node) -> _Loc:
    where = _mark(node)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, str] = {}
        pairs = []
        for k, v in node.value:
            kl = _loc_from_node(k)
            if kl.kind != "scalar":
                raise PlanError(f"{kl.where}: a block-weight key must be a plain name.")
            key = str(kl.value).strip().upper()
            if key in seen:
                raise PlanError(f"{kl.where}: key {kl.value!r} appears twice (first at {seen[key]}).")
            seen[key] = kl.where
            pairs.append((kl, _loc_from_node(v)))
        return _Loc("map", pairs, where)
    if isinstance(node, yaml.SequenceNode):
        return _Loc("seq", [_loc_from_node(v) for v in node.value], where)
    value = None if node.tag == "tag:yaml.org,2002:null" else node.value
    return _Loc("scalar", value, where)


_STRUCT_KEYS = ("preset", "layout", "values", "overrides")


def _scalar_text(loc: _Loc, what: str) -> str:
    if loc.kind != "scalar" or not isinstance(loc.value, str) or not loc.value.strip():
        raise PlanError(f"{loc.where}: {what} must be a name (text), got {loc.value!r}.")
    return loc.value.strip()


def _assigns_from_map(pairs: list[tuple[_Loc, _Loc]]) -> list[_Assign]:
    out = []
    for k, v in pairs:
        if v.kind != "scalar":
            raise PlanError(f"{v.where}: the value of block {k.value!r} must be a single value ({_VALUE_HELP}).")
        if k.value is None or (isinstance(k.value, bool)):
            raise PlanError(f"{k.where}: {k.value!r} is not a block id.")
        out.append(_Assign(str(k.value).strip(), _parse_value(v.value, v.where), v.where, k.where))
    return out


def _spec_from_loc(loc: _Loc, given: str) -> _Spec:
    if loc.kind == "scalar":
        if loc.value is None:
            return _Spec(given="", where=loc.where)
        if not isinstance(loc.value, str):
            raise PlanError(f"{loc.where}: {loc.value!r} is not a block-weight spec; give a preset name, a list of "
                            "values, ID=VALUE pairs or a mapping.")
        return _spec_from_text(loc.value, loc.where)
    if loc.kind == "seq":
        spec = _Spec(given=given, where=loc.where)
        spec.values = [(_seq_value(item), item.where) for item in loc.value]
        return spec
    keys = [str(k.value) for k, _ in loc.value]
    struct = [k for k in keys if k.lower() in _STRUCT_KEYS]
    if not struct:
        spec = _Spec(given=given, where=loc.where)
        spec.assigns = _assigns_from_map(loc.value)
        return spec
    if len(struct) != len(keys):
        odd = [k for k in keys if k.lower() not in _STRUCT_KEYS]
        k0 = next(k for k, _ in loc.value if str(k.value) == odd[0])
        near = difflib.get_close_matches(odd[0].lower(), _STRUCT_KEYS, n=1, cutoff=0.6)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise PlanError(f"{k0.where}: unexpected key {odd[0]!r} next to {', '.join(struct)}; a structured block "
                        f"spec has only the keys {', '.join(_STRUCT_KEYS)} (put block ids under 'overrides').{hint}")
    spec = _Spec(given=given, where=loc.where)
    parts = {str(k.value).lower(): v for k, v in loc.value}
    if "preset" in parts and "values" in parts:
        raise PlanError(f"{parts['values'].where}: give either 'preset' or 'values', not both.")
    if "preset" in parts:
        spec.preset = (_scalar_text(parts["preset"], "'preset'"), parts["preset"].where)
    if "layout" in parts:
        if "values" not in parts:
            raise PlanError(f"{parts['layout'].where}: 'layout' needs 'values' (the list in that layout).")
        spec.layout = (_scalar_text(parts["layout"], "'layout'"), parts["layout"].where)
    if "values" in parts:
        v = parts["values"]
        if v.kind == "seq":
            spec.values = [(_seq_value(item), item.where) for item in v.value]
        elif v.kind == "scalar" and isinstance(v.value, str):
            spec.values = [(_parse_token(it, f"{v.where}: value {i}"), f"{v.where}: value {i}")
                           for i, it in enumerate(_split_items(v.value, v.where), 1)]
        else:
            raise PlanError(f"{v.where}: 'values' must be a list of values.")
    if "overrides" in parts:
        o = parts["overrides"]
        if o.kind == "map":
            spec.assigns = _assigns_from_map(o.value)
        elif o.kind == "scalar" and o.value is None:
            spec.assigns = []
        else:
            raise PlanError(f"{o.where}: 'overrides' must be a mapping of block ids to values (e.g. {{OUT05: 0.5}}).")
    return spec


def _seq_value(item: _Loc) -> RawValue:
    if item.kind != "scalar":
        raise PlanError(f"{item.where}: a block list holds single values ({_VALUE_HELP}), not nested lists or mappings.")
    return _parse_value(item.value, item.where)


def _spec_from_yaml_file(path: Path, source: str) -> _Spec:
    try:
        with open(path, encoding="utf-8") as fh:
            node = yaml.compose(fh, Loader=yaml.SafeLoader)
    except FileNotFoundError:
        raise PlanError(f"{source}: block-weight file {str(path)!r} does not exist.", path=path) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise PlanError(f"{at}: not valid YAML: {e.problem or e}.", path=path) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PlanError(f"{source}: cannot read block-weight file {str(path)!r}: {e}.", path=path) from None
    if node is None:
        raise PlanError(f"{path}: the block-weight file is empty; expected a mapping of block ids to values, "
                        "a list of values, or {preset:, layout:, values:, overrides:}.", path=path)
    return _spec_from_loc(_loc_from_node(node), given=str(path))


# ---- resolution -------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    arch: str
    depth: int | None
    full_name: str
    full: tuple[str, ...]
    layouts: dict[str, tuple[str, ...]]
    named_only: dict[str, tuple[str, ...]]
    aliases: Mapping[str, tuple[str, ...]]

    @property
    def title(self) -> str:
        return ARCH_TITLES[self.arch] + (f" (depth {self.depth})" if self.arch == "sd3" else "")

    @property
    def example(self) -> tuple[str, str]:
        """Two ids of the full layout to quote in messages (one early, one late)."""
        n = len(self.full)
        return self.full[n // 3], self.full[2 * n // 3]

    def ids_text(self) -> str:
        alias = "".join(f", {a} = {'+'.join(t)}" for a, t in self.aliases.items())
        return f"{describe_layout(self.full)}{alias}, and OTHER for modules in no block"


def _make_ctx(arch: str, depth: int | None) -> _Ctx:
    arch = _check_arch(arch)
    full_name, layouts = arch_layouts(arch, depth)
    named = {n: NAMED_ONLY_LAYOUTS[n] for n in ARCH_NAMED_ONLY.get(arch, ())}
    return _Ctx(arch, depth if arch == "sd3" else None, full_name, layouts[full_name], layouts, named,
                _ALIASES[arch])


def _suggest(word: str, candidates: Iterable[str]) -> str | None:
    cands = list(candidates)
    m = _NUMBERED.match(word)
    if m:
        padded = f"{m.group(1)}{int(m.group(2)):02d}"
        if padded in cands:
            return padded
    near = difflib.get_close_matches(word, cands, n=1, cutoff=0.5)
    return near[0] if near else None


def _id_targets(name: str, ctx: _Ctx, where: str) -> tuple[str, ...]:
    if name in ctx.full:
        return (name,)
    if name in ctx.aliases:
        return ctx.aliases[name]
    hint = _ID_HINTS.get(ctx.arch, {}).get(name)
    if hint:
        raise PlanError(f"{where}: {name} is not a block id of {ctx.title}: {hint}. Valid ids: {ctx.ids_text()}.")
    near = _suggest(name, [*ctx.full, *ctx.aliases, OTHER])
    hint = f" Did you mean {near}?" if near else ""
    raise PlanError(f"{where}: unknown block id {name!r} for {ctx.title}.{hint} Valid ids: {ctx.ids_text()}.")


def _targets(target: str, ctx: _Ctx, where: str) -> tuple[str, ...]:
    t = target.strip().upper()
    if not t:
        raise PlanError(f"{where}: a block id is missing before '=' (expected ID=VALUE, e.g. {ctx.example[0]}=0.5).")
    if t == OTHER:
        return (OTHER,)
    if "-" not in t:
        return _id_targets(t, ctx, where)
    ends = [e.strip() for e in t.split("-")]
    if len(ends) != 2 or not all(ends):
        raise PlanError(f"{where}: {target.strip()!r} is not a block range; a range is FIRST-LAST in layout order, "
                        f"e.g. {ctx.example[0]}-{ctx.example[1]}.")
    if OTHER in ends:
        raise PlanError(f"{where}: OTHER is not part of the block order and cannot end a range; set it alone (OTHER=v).")
    first = _id_targets(ends[0], ctx, where)[0]
    last = _id_targets(ends[1], ctx, where)[-1]
    i, j = ctx.full.index(first), ctx.full.index(last)
    if i > j:
        raise PlanError(f"{where}: range {target.strip()} runs backwards: {first} comes after {last} in the "
                        f"{ctx.full_name} order ({describe_layout(ctx.full)}); write {last}-{first}.")
    return ctx.full[i:j + 1]


def _other_length_owner(n: int, ctx: _Ctx) -> str:
    owners = []
    for arch, (_, names) in ARCH_LAYOUTS.items():
        if arch == ctx.arch or (ctx.arch in ("sd1", "sd2") and arch in ("sd1", "sd2")):
            continue
        for name in names:
            if len(LAYOUTS[name]) == n and name not in [o[1] for o in owners]:
                owners.append((_layout_family(name), name))
    if ctx.arch == "sd3":
        if n > 5:
            return (f" {n} values would fit an SD3 model with {n - 5} joint blocks; this one has {ctx.depth} "
                    f"(sd3-{ctx.depth + 5}).")
        return ""
    if n in (29, 43):
        owners.append(("SD3", f"sd3-{n}"))
    if not owners:
        return ""
    fam, name = owners[0]
    text = (f" {n} values is the layout {name} of {fam}; lorasurgery never applies a block list across "
            "architectures")
    if ctx.arch == "sdxl" and name == "sd-17":
        text += " (matched by name, SDXL OUT00-OUT02, the deepest output transformers, would silently get 0)"
    return text + "."


def _length_error(n: int, ctx: _Ctx, where: str) -> PlanError:
    options = " or ".join(f"{len(ids)} values ({name}: {describe_layout(ids)})" for name, ids in ctx.layouts.items())
    msg = f"{where}: {n} value{'s' if n != 1 else ''} given, but {ctx.title} block lists have {options}."
    named = [name for name, ids in ctx.named_only.items() if len(ids) == n]
    if named:
        name = named[0]
        msg += (f" {n} values is the {name} layout ({describe_layout(ctx.named_only[name])}); it is accepted only "
                f"with its name, never by length: '{name}:v1,...,v{n}' or {{layout: {name}, values: [...]}}.")
    else:
        msg += _other_length_owner(n, ctx)
    if n == 1:
        msg += " A single number is not a block list: to scale the whole LoRA use its weight or the ALL0.5-style presets."
    msg += (f" Give a list of one of these lengths, or ID=VALUE pairs for the blocks to change "
            f"(e.g. '{ctx.example[0]}=0.5,{ctx.example[1]}=0'); unnamed blocks keep 1.")
    return PlanError(msg)


def _layout_by_name(name: str, ctx: _Ctx, where: str) -> tuple[str, tuple[str, ...]]:
    if name in ctx.layouts:
        return name, ctx.layouts[name]
    if name in ctx.named_only:
        return name, ctx.named_only[name]
    valid = [*ctx.layouts, *ctx.named_only]
    if _layout_ids_any(name) is not None:
        raise PlanError(f"{where}: {name} is a layout for {_layout_family(name)}, not one of {ctx.title}'s; "
                        f"{ctx.title} layouts: {', '.join(valid)}. lorasurgery never applies a block list across "
                        "architectures.")
    near = _suggest(name, valid)
    hint = f" Did you mean {near}?" if near else ""
    raise PlanError(f"{where}: unknown block layout {name!r} for {ctx.title}; valid layouts: {', '.join(valid)}.{hint}"
                    " (ID=VALUE pairs use '=', e.g. IN04=0.5, not ':'.)")


def _apply_positional(layout: str, ids: tuple[str, ...], values: Sequence[tuple[RawValue, str]], ctx: _Ctx,
                      vals: dict[str, tuple[RawValue, str]]) -> set[str]:
    """Assign a positional list by id; returns the full-layout ids it left out."""
    expand = _ENTRY_EXPANSIONS.get(layout, {})
    covered: set[str] = set()
    for entry, (raw, where) in zip(ids, values):
        for block in expand.get(entry, (entry,)):
            vals[block] = (raw, where)
            covered.add(block)
    return set(ctx.full) - covered


def _preset_error(name: str, ctx: _Ctx, where: str, applicable: Mapping[str, Preset],
                  every: Mapping[str, list[Preset]]) -> PlanError:
    names = ", ".join(applicable)
    lengths = " or ".join(str(len(ids)) for ids in ctx.layouts.values())
    tail = (f" Presets for {ctx.title}: {names}. Define one in a preset file (NAME:v1,...,vn with {lengths} values), "
            f"or write ID=VALUE pairs (e.g. '{ctx.example[0]}=0.5').")
    defs = every.get(name)
    if defs:
        p = defs[0]
        if p.layout is not None:
            ids = _layout_ids_any(p.layout) or ()
            what = (f"{name} is a preset for {_layout_family(p.layout)} ({len(ids)} values in {p.layout} order: "
                    f"{describe_layout(ids)})")
        else:
            what = (f"{name} ({p.origin}) has {len(p.values)} values, "
                    f"the {PRESET_LENGTHS.get(len(p.values), str(len(p.values)) + '-entry')} layout")
        return PlanError(f"{where}: {what}; it is not defined for {ctx.title}.{tail}")
    if name.upper() in ctx.full or name.upper() in ctx.aliases or name.upper() == OTHER:
        return PlanError(f"{where}: {name} is a block id, not a preset; give it a value: {name.upper()}=0.5.{tail}")
    near = _suggest(name, list(applicable)) or _suggest(name.upper(), list(applicable))
    hint = f" Did you mean {near}?" if near else ""
    return PlanError(f"{where}: unknown preset {name!r} for {ctx.title}.{hint}{tail}")


def _find_preset(name: str, ctx: _Ctx, where: str, presets: PresetTable | None) -> Preset:
    applicable, every = _lookup_tables(ctx.arch, ctx.depth, presets)
    if name in applicable:
        return applicable[name]
    folded = [n for n in applicable if n.casefold() == name.casefold()]
    if len(folded) == 1:
        return applicable[folded[0]]
    raise _preset_error(name, ctx, where, applicable, every)


def _normal_spec(values: Mapping[str, float], full: tuple[str, ...]) -> str:
    parts: list[str] = []
    i = 0
    while i < len(full):
        v = values[full[i]]
        j = i
        while j + 1 < len(full) and values[full[j + 1]] == v:
            j += 1
        if v != 1.0:
            parts.append(f"{full[i]}={_fmt(v)}" if i == j else f"{full[i]}-{full[j]}={_fmt(v)}")
        i = j + 1
    if values[OTHER] != 1.0:
        parts.append(f"{OTHER}={_fmt(values[OTHER])}")
    return ",".join(parts)


def _resolve(spec: _Spec, ctx: _Ctx, *, present_blocks: Collection[str | None] | None, seed: int, x: float,
             presets: PresetTable | None, source: str) -> BlockWeights:
    default = (1.0, spec.where)
    vals: dict[str, tuple[RawValue, str]] = dict.fromkeys((*ctx.full, OTHER), default)
    omitted: set[str] = set()
    omitted_by = ""
    short_layout = ""
    if spec.preset is not None:
        name, where = spec.preset
        p = _find_preset(name, ctx, where, presets)
        pw = f"{where}: preset {p.name}" + ("" if p.origin == "built-in" else f" ({p.origin})")
        if p.uniform:
            for block in ctx.full:
                vals[block] = (p.values[0], pw)
        else:
            lname = p.layout_for(ctx.arch, ctx.depth)
            assert lname
            lname, ids = _layout_by_name(lname, ctx, where)
            omitted = _apply_positional(lname, ids, [(v, pw) for v in p.values], ctx, vals)
            omitted_by, short_layout = f"preset {p.name} ({len(ids)} values, {lname})", lname
        if p.other is not None:
            vals[OTHER] = (p.other, pw)
    elif spec.values is not None:
        n = len(spec.values)
        if spec.layout is not None:
            lname, ids = _layout_by_name(spec.layout[0], ctx, spec.layout[1])
            if len(ids) != n:
                raise PlanError(f"{spec.layout[1]}: layout {lname} has {len(ids)} entries ({describe_layout(ids)}), "
                                f"but {n} values were given.")
        else:
            found = layout_for_length(ctx.arch, n, ctx.depth)
            if found is None:
                raise _length_error(n, ctx, spec.where)
            lname, ids = found, ctx.layouts[found]
        omitted = _apply_positional(lname, ids, spec.values, ctx, vals)
        omitted_by, short_layout = f"the {n}-value {lname} list", lname
    for a in spec.assigns:
        for block in _targets(a.target, ctx, a.target_where or a.where):
            vals[block] = (a.value, a.where)
            omitted.discard(block)
    resolved: dict[str, float] = {}
    notes: dict[str, str] = {}
    for block, (raw, where) in vals.items():
        resolved[block], note = _resolve_raw(raw, block, seed, x, where)
        if note:
            notes[block] = note
    for block in omitted:
        notes[block] = f"not in {short_layout}"
    bw = BlockWeights(values=resolved, spec=_normal_spec(resolved, ctx.full), arch=ctx.arch, layout=ctx.full_name,
                      given=spec.given, omitted=frozenset(omitted), omitted_by=omitted_by, notes=notes)
    if present_blocks is not None:
        bw.check_present(present_blocks, source)
    return bw


def parse_block_spec(spec: str | os.PathLike[str] | Sequence[float | str] | Mapping[str, Any] | yaml.Node | None,
                     *, arch: str, depth: int | None = None,
                     present_blocks: Collection[str | None] | None = None, seed: int = 0, x: float = 1.0,
                     presets: PresetTable | None = None, source: str = "--blocks") -> BlockWeights:
    """Resolve a block-weight spec for ``arch`` into :class:`BlockWeights` (forms: module docstring).

    ``depth`` is the number of joint blocks (SD3 only). ``present_blocks`` are the block ids of the LoRA's
    modules (``None`` for modules in no block); when given, a short list or preset that leaves out a block
    holding modules is an error (otherwise the check is deferred to :meth:`BlockWeights.check_present`).
    ``seed`` drives ``R``/``U`` (per block, via sha256: independent of call order and of any global RNG;
    pass a different seed per input for independent draws), ``x`` is the value of ``X``. ``presets`` are
    user presets (:func:`load_preset_file`), which take precedence over built-ins of the same name when
    their length fits the architecture. ``source`` names the option or recipe field in messages. A string
    ending in ``.yaml``/``.yml`` (or any path object) is read as a YAML file. Every user error raises
    :class:`PlanError` saying what was given, what this architecture expects, and the nearest valid name.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"{source}: the block-weight seed must be an integer, got {seed!r}.")
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
        raise PlanError(f"{source}: x (the value of X in block weights) must be a finite number, got {x!r}.")
    ctx = _make_ctx(arch, depth)
    if spec is None:
        parsed = _Spec(given="", where=source)
    elif isinstance(spec, yaml.Node):
        parsed = _spec_from_loc(_loc_from_node(spec), given=_mark(spec))
    elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip().lower().endswith((".yaml", ".yml"))):
        path = Path(os.fspath(spec).strip()).expanduser()
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise PlanError(f"{source}: {str(path)!r}: block-weight files are YAML (.yaml/.yml); LBW preset files "
                            "(NAME:v1,...) are loaded as presets instead.")
        parsed = _spec_from_yaml_file(path, source)
    elif isinstance(spec, str):
        parsed = _spec_from_text(spec, source)
    elif isinstance(spec, Mapping):
        parsed = _spec_from_loc(_loc_from_python(spec, source), given=_given_text(spec))
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes):
        parsed = _spec_from_loc(_loc_from_python(list(spec), source), given=_given_text(spec))
    else:
        raise PlanError(f"{source}: {type(spec).__name__} is not a block-weight spec; give a preset name, a list of "
                        "values, ID=VALUE pairs, a mapping or a .yaml file.")
    return _resolve(parsed, ctx, present_blocks=present_blocks, seed=seed, x=float(x), presets=presets,
                    source=source)


def _given_text(obj: Any) -> str:
    def one(v: Any) -> str:
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v)):
            return _fmt(float(v))
        return str(v)

    if isinstance(obj, Mapping):
        return ",".join(f"{k}={one(v)}" if not isinstance(v, (Mapping, list, tuple)) else f"{k}={_given_text(v)}"
                        for k, v in obj.items())
    return "[" + ",".join(one(v) for v in obj) + "]"


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def format_table(bw: BlockWeights, *, modules: Mapping[str | None, int] | None = None,
                 norms: Mapping[str | None, float] | None = None) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """``(column names, rows)`` of the resolved per-block table, all cells as text, in layout order.

    Columns: ``block``, ``weight``, then ``modules`` (module count per block) when ``modules`` is given,
    ``delta-W norm`` when ``norms`` is given, and ``note`` (special-token origin such as ``R (seed 0)``,
    or ``not in sd-17`` for blocks a short list left out). Counts and norms are keyed by block id; ``None``
    and ``"OTHER"`` both address OTHER. The OTHER row is always last.
    """
    def get(table: Mapping[str | None, Any], block: str) -> Any:
        if block == OTHER:
            return table.get(OTHER, table.get(None))
        return table.get(block)

    columns: list[str] = ["block", "weight"]
    if modules is not None:
        columns.append("modules")
    if norms is not None:
        columns.append("delta-W norm")
    columns.append("note")
    rows: list[tuple[str, ...]] = []
    for block, w in bw.table():
        row = [block, _fmt(w)]
        if modules is not None:
            row.append(str(get(modules, block) or 0))
        if norms is not None:
            n = get(norms, block)
            row.append("-" if n is None else f"{n:.4g}")
        row.append(bw.notes.get(block, ""))
        rows.append(tuple(row))
    return tuple(columns), rows
