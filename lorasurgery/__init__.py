"""lorasurgery: offline LoRA model surgery for SD1.x/2.x, SDXL, SD3 and FLUX.1.

The command line is a thin shell over these functions::

    import lorasurgery
    report = lorasurgery.inspect_file("style.safetensors")          # header-only description (a dict)
    det = lorasurgery.detect("model.safetensors")                    # architecture, layout, evidence
    with lorasurgery.index_lora("style.safetensors") as lora:        # LoRA in canonical form, lazily
        for module, delta in lora.deltas():
            print(module.target.id, delta.algo, delta.rank)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .arch import ARCH_NAMES, get_arch  # noqa: E402
from .arch.detect import detect  # noqa: E402
from .errors import InputError, LoraSurgeryError, OutputError, PlanError  # noqa: E402
from .formats.read import index_lora  # noqa: E402
from .inspect import inspect_file  # noqa: E402
from .model import open_model  # noqa: E402

__all__ = [
    "ARCH_NAMES", "InputError", "LoraSurgeryError", "OutputError", "PlanError", "__version__", "detect",
    "get_arch", "index_lora", "inspect_file", "open_model",
]
