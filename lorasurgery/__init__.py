"""lorasurgery: offline LoRA model surgery for SD1.x/2.x, SDXL, SD3 and FLUX.1."""
__version__ = "0.1.0"
