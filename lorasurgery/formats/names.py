"""Every LoRA module-name spelling of an architecture, built forward from its table.

For each module (and each part of a fused module) of a :class:`~lorasurgery.arch.base.ModelTable`, this
derives the names every convention of ``formats.md`` §3 would give it, and returns one lookup from name
to :class:`Target`. Nothing is reverse-parsed: a name is known only if some module produces it.

Conventions (the ``scheme`` recorded for each name):

============  =====================================================================================
kohya         ``lora_unet_…`` / ``lora_te…`` names of the table (``names["kohya"]``, aliases)
kohya-dp      kohya names built from diffusers module paths (SDXL LoRAs named like SD1's)
peft          diffusers/PEFT ``unet.…``/``transformer.…``/``text_encoder.…`` paths
peft-raw      ``base_model.model.<path>`` (raw PEFT) and ``transformer.base_model.model.<path>``
comfy         ComfyUI ``diffusion_model.<checkpoint path>`` and ``text_encoders.<enc>.transformer.<path>``
bfl           bare checkpoint paths (FLUX BFL)
onetrainer    ``lora_transformer_<diffusers path>``
lycoris       ``lycoris_<diffusers path>`` (SimpleTuner's LyCORIS wrapper)
xlabs         XLabs FLUX ``double_blocks.i.processor.qkv_lora1`` …
============  =====================================================================================
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping

from ..arch.base import ModelTable, ModuleSpec

# ComfyUI names text encoders by role, not by diffusers component.
COMFY_TEXT_ENCODERS: Mapping[str, Mapping[str, str]] = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}

# XLabs FLUX names: (module path after "double_blocks.i." / "single_blocks.i.", parts covered).
XLABS_DOUBLE = {
    "processor.qkv_lora1": ("img_attn.qkv", None),
    "processor.qkv_lora2": ("txt_attn.qkv", None),
    "processor.proj_lora1": ("img_attn.proj", None),
    "processor.proj_lora2": ("txt_attn.proj", None),
}
XLABS_SINGLE = {
    "processor.qkv_lora": ("linear1", ("q", "k", "v")),
    "processor.proj_lora": ("linear2", None),
}

MAIN_COMPONENTS = ("unet.", "transformer.")


@dataclass(frozen=True)
class Target:
    """What a LoRA module addresses: a module id and, for fused weights, the part(s) it covers.

    ``parts`` is empty for a whole module, one name for a single part (``to_q`` of a fused ``qkv``), or
    several consecutive parts for names that cover a row range (XLabs single-block ``qkv``).
    """

    module: str
    parts: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return self.module + (":" + "+".join(self.parts) if self.parts else "")

    def __str__(self) -> str:
        return self.id


@dataclass(frozen=True)
class NameEntry:
    target: Target
    scheme: str


def _underscore(path: str) -> str:
    return path.replace(".", "_")


def _strip_weight(key: str) -> str:
    for suffix in (".weight", "_weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def _component_and_path(diffusers_name: str) -> tuple[str, str]:
    comp, _, path = diffusers_name.partition(".")
    return comp, path


def _names_for(arch: str, mod: ModuleSpec, name: str | None, kohya: str | None, target: Target,
               out: dict[str, NameEntry], conflicts: set[str]) -> None:
    def add(n: str, scheme: str) -> None:
        prev = out.get(n)
        if prev is not None and prev.target != target:
            conflicts.add(n)
            return
        out.setdefault(n, NameEntry(target, scheme))

    if kohya:
        add(kohya, "kohya")
    if name:
        add(name, "peft")
        comp, path = _component_and_path(name)
        if comp + "." in MAIN_COMPONENTS:
            add("base_model.model." + path, "peft-raw")
            add(comp + ".base_model.model." + path, "peft-raw")
            add(path, "peft")  # legacy attention-processor files without the "unet." prefix
            add("lora_unet_" + _underscore(path), "kohya-dp")
            add("lora_transformer_" + _underscore(path), "onetrainer")
            add("lycoris_" + _underscore(path), "lycoris")
        else:
            enc = COMFY_TEXT_ENCODERS.get(arch, {}).get(comp)
            if enc:
                add(f"text_encoders.{enc}.transformer.{path}", "comfy")


def build_names(arch: str, table: ModelTable) -> tuple[dict[str, NameEntry], set[str]]:
    """All module-name spellings of ``table`` -> target; also the names that two targets claim."""
    out: dict[str, NameEntry] = {}
    conflicts: set[str] = set()
    for mod in table.modules:
        whole = Target(mod.key)
        _names_for(arch, mod, mod.names.get("diffusers"), mod.names.get("kohya"), whole, out, conflicts)
        for scheme, alias in mod.names.items():
            if scheme not in ("diffusers", "kohya") and alias:
                out.setdefault(alias, NameEntry(whole, scheme))
        for part in mod.parts:
            pt = Target(mod.key, (part.name,))
            _names_for(arch, mod, part.names.get("diffusers"), part.names.get("kohya"), pt, out, conflicts)
            for scheme, alias in part.names.items():
                if scheme not in ("diffusers", "kohya") and alias:
                    out.setdefault(alias, NameEntry(pt, scheme))
        if mod.component in ("unet", "transformer"):
            path = _strip_weight(mod.key)
            if path.startswith("model.diffusion_model."):
                path = path[len("model.diffusion_model."):]
            out.setdefault("diffusion_model." + path, NameEntry(whole, "comfy"))
            out.setdefault(path, NameEntry(whole, "bfl"))
            _add_xlabs(path, mod, out)
    for n in conflicts:
        out.pop(n, None)
    return out, conflicts


def _add_xlabs(path: str, mod: ModuleSpec, out: dict[str, NameEntry]) -> None:
    for prefix, table in (("double_blocks.", XLABS_DOUBLE), ("single_blocks.", XLABS_SINGLE)):
        if not path.startswith(prefix):
            continue
        head = ".".join(path.split(".")[:2])  # double_blocks.i
        rest = path[len(head) + 1:]
        for xname, (sub, parts) in table.items():
            if sub == rest:
                if parts and not all(any(p.name == q for p in mod.parts) for q in parts):
                    continue
                out.setdefault(f"{head}.{xname}", NameEntry(Target(mod.key, parts or ()), "xlabs"))


@lru_cache(maxsize=None)
def variant_tables(arch: str) -> tuple[ModelTable, ...]:
    """Tables of an architecture's released variants, the main release first (cached)."""
    from ..arch import get_arch

    spec = get_arch(arch)
    return tuple(spec.build(cfg) for cfg in spec_configs(spec))


@lru_cache(maxsize=None)
def _names_of_table(arch: str, index: int) -> dict[str, NameEntry]:
    return build_names(arch, variant_tables(arch)[index])[0]


def names_of(arch: str, table: ModelTable | None = None) -> dict[str, NameEntry]:
    """Name lookup for ``table`` (default: the main release of ``arch``)."""
    if table is None:
        return _names_of_table(arch, 0)
    for i, t in enumerate(variant_tables(arch)):
        if t is table:
            return _names_of_table(arch, i)
    return build_names(arch, table)[0]


@lru_cache(maxsize=None)
def names_for_arch(arch: str) -> dict[str, NameEntry]:
    """Every name any released variant of ``arch`` uses (cached); for recognising files."""
    names: dict[str, NameEntry] = {}
    for i in range(len(variant_tables(arch))):
        for k, v in _names_of_table(arch, i).items():
            names.setdefault(k, v)
    return names


def best_table(arch: str, module_names: list[str]) -> ModelTable:
    """The released variant whose names cover most of ``module_names`` (the main release on ties)."""
    tables = variant_tables(arch)
    scores = [sum(1 for n in module_names if n in _names_of_table(arch, i)) for i in range(len(tables))]
    return tables[max(range(len(tables)), key=lambda i: (scores[i], -i))]


def spec_configs(spec) -> list[Mapping[str, object]]:
    """The configurations whose names a LoRA of this architecture may use (released variants)."""
    return [spec.real_config(), *spec.variant_configs()]
