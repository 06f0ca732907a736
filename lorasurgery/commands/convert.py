"""``lorasurgery convert LORA --to kohya|peft``: the same ΔW in another key convention."""
from __future__ import annotations

from pathlib import Path

import click

from ..ops.algebra import convert
from .merge import emit

HELP = """Convert a LoRA to the kohya or diffusers/PEFT key convention, exactly.

\b
Reads every convention lorasurgery knows (kohya, diffusers/PEFT, legacy diffusers,
ComfyUI/BFL, XLabs, OneTrainer, LyCORIS wrapper). FLUX/SD3 q/k/v (and FLUX single-
block linear1 = q,k,v,mlp) are fused block-diagonally for kohya (scales kept exact)
and split for PEFT, OpenCLIP in_proj q/k/v likewise, the adaLN
shift/scale halves are swapped where diffusers stores them swapped, and PEFT output
has each module's scale folded into its factors. Every input key must be
understood, or the command fails listing the keys; modules the target format cannot
name fail the run unless --drop-unsupported (then they are listed). Metadata is
kept, hashes recomputed. Without -o the output is <stem>-<format>.safetensors.
"""

EPILOG = """\b
Examples:
  lorasurgery convert flux-diffusers.safetensors --to kohya -o flux-kohya.safetensors
  lorasurgery convert sdxl-kohya.safetensors --to peft --drop-unsupported
"""


@click.command("convert", help=HELP, epilog=EPILOG)
@click.argument("lora", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output .safetensors file.")
@click.option("--to", "to", type=click.Choice(("kohya", "peft")), required=True, help="Target key convention.")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out modules the target format cannot name (listed) instead of failing.")
@click.option("--dtype", default=None, help="Output dtype: keep (the input's, default), fp16, bf16 or fp32.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(lora, output, to, drop_unsupported, dtype, as_json, overwrite) -> None:
    report = convert(lora, output, to=to, drop_unsupported=drop_unsupported, dtype=dtype, overwrite=overwrite)
    emit(report, as_json)
