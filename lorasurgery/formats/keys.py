"""Splitting LoRA file keys into (module name, tensor suffix), whatever the convention.

Every convention of ``formats.md`` §3 stores one module's tensors under ``<module name>.<suffix>``; only
the spelling of the suffix differs. This module maps each spelling to the kohya/LyCORIS suffix that
:func:`lorasurgery.delta.parse_module` understands, and rewrites the few conventions whose module names
carry extra path segments (legacy diffusers attention processors, ``lora_linear_layer``, ``.lora.``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# LyCORIS / kohya suffixes, spelled as delta.parse_module expects them.
LYCORIS_SUFFIXES: tuple[str, ...] = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "on_input", "oft_blocks", "rescale",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
)

# Other spellings of the same tensors -> kohya spelling. Checked longest first.
SUFFIX_ALIASES: dict[str, str] = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",  # diffusers ~0.21-0.24
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",  # legacy diffusers text encoder
    "lora_linear_layer.up.weight": "lora_up.weight",
    "down.weight": "lora_down.weight",  # legacy attention processors, XLabs
    "up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",  # PEFT DoRA
}

# Tensors that are not weight deltas at all; reported, never silently dropped.
FOREIGN_SUFFIXES: dict[str, str] = {
    "lora_B.bias": "a LoRA bias (BFL control LoRA): not a pure delta",
    "lora_up.bias": "a LoRA bias: not a pure delta",
    "bias_indices": "an old LyCORIS sparse bias, read by no loader",
    "bias_values": "an old LyCORIS sparse bias, read by no loader",
    "bias_size": "an old LyCORIS sparse bias, read by no loader",
}

_ALL_SUFFIXES = sorted(
    [(s, s) for s in LYCORIS_SUFFIXES] + list(SUFFIX_ALIASES.items()) + [(s, "") for s in FOREIGN_SUFFIXES],
    key=lambda kv: -len(kv[0]),
)

# Legacy diffusers attention-processor names: "<path>.processor.to_q_lora" -> "<path>.to_q".
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")
_PROCESSOR_TARGET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


@dataclass(frozen=True)
class SplitKey:
    """One file key taken apart."""

    key: str  # the file key as stored
    module: str  # module name in the file's convention (legacy spellings normalised)
    suffix: str  # kohya/LyCORIS suffix ("" for foreign tensors)
    spelling: str  # the suffix as written in the file
    foreign: str | None = None  # why the tensor is not a delta, for foreign tensors


def split_key(key: str, *, ia3_modules: frozenset[str] = frozenset()) -> SplitKey | None:
    """Split ``key`` into module name and suffix; ``None`` when no known suffix fits.

    ``ia3_modules`` names modules that carry an ``on_input`` tensor: only for those is a bare
    ``.weight`` suffix an (IA)^3 vector rather than part of a checkpoint key.
    """
    for spelling, canon in _ALL_SUFFIXES:
        if key.endswith("." + spelling):
            module = key[: -len(spelling) - 1]
            module = _normalise_module(module)
            foreign = FOREIGN_SUFFIXES.get(spelling)
            return SplitKey(key, module, canon, spelling, foreign)
    if key.endswith(".weight"):
        module = key[: -len(".weight")]
        if module in ia3_modules:
            return SplitKey(key, module, "weight", "weight")
    return None


def _normalise_module(module: str) -> str:
    m = _PROCESSOR.search(module)
    if m:
        module = module[: m.start()] + "." + _PROCESSOR_TARGET[m.group(1)]
    return module


def split_keys(keys: list[str]) -> tuple[list[SplitKey], list[str]]:
    """Split all keys of a file; returns (split keys, keys that fit no convention)."""
    ia3 = frozenset(k[: -len(".on_input")] for k in keys if k.endswith(".on_input"))
    done: list[SplitKey] = []
    unknown: list[str] = []
    for k in keys:
        s = split_key(k, ia3_modules=ia3)
        if s is None:
            unknown.append(k)
        else:
            done.append(s)
    return done, unknown


LORA_MARKERS = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "hada_w1_a",
                "lokr_w1", "lokr_w1_a", "diff", "oft_blocks", "down.weight", "a1.weight", "w_norm")


def looks_like_lora(keys: list[str]) -> bool:
    """True when most keys are LoRA tensors (rather than checkpoint weights)."""
    if not keys:
        return False
    hits = sum(1 for k in keys if any(k.endswith("." + m) for m in LORA_MARKERS) or k.endswith(".alpha"))
    return hits >= max(1, len(keys) // 2)
