"""safetensors dtype strings, torch dtypes and user-facing dtype names.

The table covers every dtype that safetensors 0.8 can hand to torch (``safetensors.torch`` can load
it) and that torch 2.13 has. Two dtypes that safetensors knows but cannot load into torch
(``F8_E8M0`` and ``F4``, plus the 6-bit formats) are listed in :data:`UNLOADABLE` so the reader can
name them in a clear error instead of calling them unknown.
"""
from __future__ import annotations

import torch

from ..errors import PlanError

#: safetensors dtype string -> torch dtype, for every dtype lorasurgery reads and writes (dtypes missing
#: from an older torch are left out).
ST_TO_TORCH: dict[str, torch.dtype] = {
    st: getattr(torch, name)
    for st, name in [
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("C64", "complex64"), ("I64", "int64"), ("I32", "int32"),
        ("I16", "int16"), ("I8", "int8"), ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"),
        ("U8", "uint8"), ("BOOL", "bool"),
    ]
    if hasattr(torch, name)
}

#: torch dtype -> safetensors dtype string (inverse of :data:`ST_TO_TORCH`).
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

#: Bytes per element of each safetensors dtype.
ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1,
}

#: dtypes safetensors defines but cannot load into torch tensors (sub-byte or scale-only formats).
UNLOADABLE: frozenset[str] = frozenset({"F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})

#: The position of each dtype in safetensors' own ``Dtype`` enum. ``safetensors.torch.save`` lays
#: tensors out sorted by this rank *descending*, then by name; the legacy hash needs that layout.
#: Measured against safetensors 0.8 by saving one tensor of each dtype.
SAFETENSORS_ORDER: dict[str, int] = {
    name: i
    for i, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16",
         "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
    )
}

#: User-facing dtype names (CLI ``--dtype``, recipes) -> torch dtype.
USER_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}

_ALIASES: dict[str, str] = {
    "float16": "fp16", "half": "fp16", "f16": "fp16",
    "bfloat16": "bf16",
    "float32": "fp32", "float": "fp32", "f32": "fp32",
    "float64": "fp64", "double": "fp64", "f64": "fp64",
    "float8_e4m3fn": "fp8_e4m3fn", "f8_e4m3": "fp8_e4m3fn",
    "float8_e5m2": "fp8_e5m2", "f8_e5m2": "fp8_e5m2",
}


def to_torch(st_dtype: str) -> torch.dtype:
    """Return the torch dtype of a safetensors dtype string; ``KeyError`` if it is not supported."""
    return ST_TO_TORCH[st_dtype]


def to_safetensors(dtype: torch.dtype) -> str:
    """Return the safetensors dtype string of a torch dtype; ``KeyError`` if safetensors cannot store it."""
    return TORCH_TO_ST[dtype]


def itemsize(st_dtype: str) -> int:
    """Bytes per element of a supported safetensors dtype string."""
    return ITEMSIZE[st_dtype]


def is_float(st_dtype: str) -> bool:
    """True for floating-point safetensors dtypes (fp8 included, complex excluded)."""
    return ST_TO_TORCH[st_dtype].is_floating_point


def parse_dtype(name: str) -> torch.dtype:
    """Parse a user dtype name (``fp16``, ``bf16``, ``fp32``, ``fp64``, ``fp8_e4m3fn``, ``fp8_e5m2``).

    Matching ignores case and surrounding spaces; the spellings ``float16``, ``half``, ``bfloat16``,
    ``float32``, ``float``, ``float64``, ``double``, ``float8_e4m3fn`` and ``float8_e5m2`` are accepted
    too. Anything else raises :class:`~lorasurgery.errors.PlanError` listing the valid names.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key in USER_DTYPES:
        return USER_DTYPES[key]
    valid = ", ".join(USER_DTYPES)
    raise PlanError(
        f"Unknown dtype {name!r}. Use one of: {valid} (fp8 types store weights only; compute always "
        "happens in float32)."
    )


def dtype_name(dtype: torch.dtype) -> str:
    """The user-facing name of a torch dtype (``torch.float16`` -> ``fp16``), else its safetensors string."""
    for name, dt in USER_DTYPES.items():
        if dt == dtype:
            return name
    return TORCH_TO_ST.get(dtype, str(dtype).replace("torch.", ""))
