"""Output metadata: kohya ``ss_*`` keys, SAI ``modelspec.*`` keys and ``lorasurgery.*`` provenance.

Everything is deterministic: structured values are canonical JSON (sorted keys, compact, no NaN),
dates appear only when given, and paths are reduced to their file names (no local folders leak into
shared files). Key tables: ``math.md`` section 13 and ``recipes.md`` "Provenance metadata keys".
"""
from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterable, Mapping

from ..errors import PlanError

SAI_MODEL_SPEC = "1.0.1"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class ArchInfo:
    """Metadata facts of one architecture string (``sd1``, ``sd2-v``, ``flux-schnell``, ...)."""

    family: str  # sd1 | sd2 | sdxl | sd3 | flux
    variant: str  # "" | "v" | "dev" | "schnell" | an SD3 variant such as "medium"
    network_module: str
    base_model_version: str
    architecture: str  # modelspec.architecture
    implementation: str
    resolution: str
    prediction_type: str | None
    v2: bool


def parse_arch(arch: str) -> ArchInfo:
    """Parse ``sd1``, ``sd2``, ``sd2-v``, ``sdxl``, ``sd3[-<variant>]``, ``flux``, ``flux-dev``, ``flux-schnell``.

    SD3 variants are free-form lowercase names (default ``medium``), written as
    ``stable-diffusion-3-<variant>/lora``. Raises :class:`PlanError` for anything else.
    """
    a = arch.strip().lower()
    family, _, variant = a.partition("-")
    if family == "sd1" and not variant:
        return ArchInfo("sd1", "", "networks.lora", "sd_v1", "stable-diffusion-v1/lora", IMPL_DIFFUSERS,
                        "512x512", "epsilon", False)
    if family == "sd2" and variant in ("", "v"):
        v = variant == "v"
        return ArchInfo("sd2", variant, "networks.lora", "sd_v2_v" if v else "sd_v2",
                        "stable-diffusion-v2-768-v/lora" if v else "stable-diffusion-v2-512/lora",
                        IMPL_DIFFUSERS, "768x768" if v else "512x512", "v" if v else "epsilon", True)
    if family == "sdxl" and not variant:
        return ArchInfo("sdxl", "", "networks.lora", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora",
                        IMPL_STABILITY, "1024x1024", "epsilon", False)
    if family == "sd3" and all(c.isalnum() or c in ".-_" for c in variant):
        variant = variant or "medium"
        # kohya writes SD3 LoRAs with the diffusers implementation and an epsilon prediction type.
        return ArchInfo("sd3", variant, "networks.lora_sd3", "sd3", f"stable-diffusion-3-{variant}/lora",
                        IMPL_DIFFUSERS, "1024x1024", "epsilon", False)
    if family == "flux" and variant in ("", "dev", "schnell"):
        variant = variant or "dev"
        return ArchInfo("flux", variant, "networks.lora_flux", "flux1", f"flux-1-{variant}/lora", IMPL_FLUX,
                        "1024x1024", None, False)
    raise PlanError(f"Unknown architecture {arch!r}. Use one of: sd1, sd2, sd2-v, sdxl, sd3, sd3-<variant>, "
                    "flux, flux-dev, flux-schnell.")


def canonical_json(obj: Any) -> str:
    """Compact JSON with sorted keys, UTF-8 kept, NaN/Infinity refused; Paths become file names."""
    def default(o: Any) -> Any:
        if isinstance(o, PurePath):
            return o.name
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        if isinstance(o, tuple):
            return list(o)
        raise TypeError(f"cannot store {type(o).__name__} in metadata JSON")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=default)


def _num(x: float) -> str:
    """A float as kohya writes alphas: Python's repr of float (``16.0``, ``0.5``)."""
    f = float(x)
    if not math.isfinite(f):
        raise PlanError(f"alpha {x!r} is not a finite number.")
    return repr(f)


def _uniform(values: Iterable[Any]) -> Any | None:
    vals = set(values)
    return next(iter(vals)) if len(vals) == 1 else None


def lora_metadata(
    arch: str,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    has_conv: bool,
    title: str,
    extra: Mapping[str, str] | None = None,
    *,
    conv_modules: Iterable[str] | None = None,
    network_module: str | None = None,
    base_model_version: str | None = None,
    date: str | None = None,
    merged_from: Iterable[str] = (),
    training_comment: str | None = None,
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata of a LoRA output (``math.md`` section 13).

    ``ranks``/``alphas`` map module ids to rank and alpha. ``ss_network_dim``/``ss_network_alpha`` hold
    the value shared by all linear modules, else ``Dynamic``; with ``has_conv`` the same rule over the
    conv modules fills ``conv_dim``/``conv_alpha`` in ``ss_network_args``. Conv modules are those in
    ``conv_modules``; if it is not given while ``has_conv`` is true, every module counts for both.
    ``network_module`` overrides the architecture's (``lycoris.kohya`` for LyCORIS), ``base_model_version``
    overrides ``ss_base_model_version`` (copy an SD3 input's). ``date`` (ISO-8601, seconds) is written
    only when given. ``merged_from`` are input titles, joined with ", ". ``extra`` (strings) is applied
    last and may override any key. No hash keys are written here: the writer fills them.
    """
    info = parse_arch(arch)
    if not ranks:
        raise PlanError("Cannot build LoRA metadata for an output without modules.")
    missing = sorted(set(ranks) - set(alphas))
    if missing:
        raise PlanError(f"No alpha for module {missing[0]!r} when building LoRA metadata.")
    conv = set(conv_modules) if conv_modules is not None else None
    lin_keys = [k for k in ranks if conv is None or k not in conv] or list(ranks)
    conv_keys = [k for k in ranks if conv is None or k in conv]

    def dim_alpha(keys: list[str]) -> tuple[str, str]:
        r = _uniform(int(ranks[k]) for k in keys)
        a = _uniform(float(alphas[k]) for k in keys)
        return (str(r) if r is not None else "Dynamic", _num(a) if a is not None else "Dynamic")

    dim, alpha = dim_alpha(lin_keys)
    args: dict[str, str] = {}
    if has_conv and conv_keys:
        args["conv_dim"], args["conv_alpha"] = dim_alpha(conv_keys)
    md: dict[str, str] = {
        "ss_network_module": network_module or info.network_module,
        "ss_network_dim": dim,
        "ss_network_alpha": alpha,
        "ss_network_args": canonical_json(args),
        "ss_v2": "True" if info.v2 else "False",
        "ss_base_model_version": base_model_version or info.base_model_version,
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": info.architecture,
        "modelspec.implementation": info.implementation,
        "modelspec.title": title,
        "modelspec.resolution": info.resolution,
        "modelspec.implementation_version": f"lorasurgery/{_version()}",
    }
    if info.prediction_type is not None:
        md["modelspec.prediction_type"] = info.prediction_type
    if date is not None:
        md["modelspec.date"] = date
    merged = [m for m in merged_from]
    if merged:
        md["modelspec.merged_from"] = ", ".join(merged)
    if training_comment is not None:
        md["ss_training_comment"] = training_comment
    for k, v in (extra or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise PlanError(f"Metadata entry {k!r} = {v!r} is not a string; metadata values must be strings.")
        md[k] = v
    return md


def title_of(path: str | Path, metadata: Mapping[str, str] | None = None) -> str:
    """An input's title for ``modelspec.merged_from``: its ``modelspec.title``, else its file stem."""
    t = (metadata or {}).get("modelspec.title")
    if t:
        return t
    name = Path(path).name
    for suffix in (".safetensors.index.json", ".safetensors"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _version() -> str:
    from .. import __version__

    return __version__


def _scrub(obj: Any) -> Any:
    """Replace Paths and absolute path strings by their file names, recursively."""
    if isinstance(obj, PurePath):
        return obj.name
    if isinstance(obj, str):
        return PurePath(obj).name if os.path.isabs(obj) else obj
    if isinstance(obj, Mapping):
        return {str(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_scrub(v) for v in obj)
    return obj


_INPUT_FIELDS = ("name", "path", "sha256", "size", "role", "weight")


def environment(device: str = "cpu", svd: str | None = None) -> dict[str, Any]:
    """Versions of Python, torch, safetensors and numpy plus the compute device and SVD mode."""
    import numpy
    import safetensors
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__, "device": str(device),
            "svd": svd}


def provenance(
    inputs: list[Mapping[str, Any]],
    options: Mapping[str, Any],
    seed: int | None,
    *,
    device: str = "cpu",
    svd: str | None = None,
) -> dict[str, str]:
    """The ``lorasurgery.*`` provenance keys (``recipes.md``), all strings, all deterministic.

    ``inputs`` are dicts with ``path`` (required) and optional ``name`` (default: file stem),
    ``sha256``, ``size``, ``role``, ``weight``; each becomes an object with exactly those six fields
    (null when unknown) and ``path`` reduced to the file name. ``options`` is the resolved recipe or
    command options, written as canonical JSON with Paths and absolute path strings reduced to file
    names. ``seed`` None omits ``lorasurgery.seed``.
    """
    rows = []
    for i, inp in enumerate(inputs):
        unknown = sorted(set(inp) - set(_INPUT_FIELDS))
        if unknown:
            raise PlanError(f"Input {i} has unknown provenance fields {unknown}; allowed: {list(_INPUT_FIELDS)}.")
        if "path" not in inp:
            raise PlanError(f"Input {i} has no 'path' for provenance metadata.")
        row = {f: inp.get(f) for f in _INPUT_FIELDS}
        row["path"] = PurePath(str(inp["path"])).name
        if row["name"] is None:
            row["name"] = title_of(row["path"])
        rows.append(_scrub(row))
    md = {
        "lorasurgery.version": _version(),
        "lorasurgery.recipe": canonical_json(_scrub(dict(options))),
        "lorasurgery.inputs": canonical_json(rows),
        "lorasurgery.env": canonical_json(environment(device, svd)),
    }
    if seed is not None:
        md["lorasurgery.seed"] = str(int(seed))
    return md
