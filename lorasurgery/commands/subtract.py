"""``lorasurgery subtract B A``: the difference LoRA ΔB − ΔA."""
from __future__ import annotations

from pathlib import Path

import click

from ..ops.algebra import subtract
from ..ops.inputs import parse_weighted
from .merge import emit, progress_bar, rank_options

HELP = """Make the difference LoRA B − A (ΔW_B − ΔW_A per module).

\b
Exact by default: A's contribution is negated and the ranks concatenated (rank
r_A + r_B, alpha = rank). With --rank N (or --rank-method/--rank-param) the result is
the optimal rank-N truncation of the difference, computed from the factors; a
dynamic rule such as sv_fro drops the directions in which B and A cancel. Modules
present in only one input are kept with their sign. B and A may carry a weight and
a block spec (B.safetensors:1:OUTD): the result is w_B·ΔB − w_A·ΔA.

\b
This is the standard way to make a "difference" (slider) LoRA from two LoRAs
trained on image pairs. Without -o the output is <B stem>-minus-<A stem>.safetensors
in the current folder.
"""

EPILOG = """\b
Examples:
  lorasurgery subtract smiling.safetensors neutral.safetensors -o smile-slider.safetensors
  lorasurgery subtract after.safetensors before.safetensors --rank-method sv_fro --rank-param 0.98 --rank 64
"""


@click.command("subtract", help=HELP, epilog=EPILOG)
@click.argument("b", metavar="B[:WEIGHT[:BLOCKS]]")
@click.argument("a", metavar="A[:WEIGHT[:BLOCKS]]")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output .safetensors file.")
@rank_options
@click.option("--blocks", default=None, help="Block weights for both inputs (unless an input has its own spec).")
@click.option("--format", "fmt", type=click.Choice(("kohya", "peft")), default=None,
              help="Output key format (default per architecture: kohya, SD3 peft).")
@click.option("--dtype", default=None, help="Output dtype: keep (the inputs' widest, default), fp16, bf16 or fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (for SVDs).")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out modules the output format cannot name (listed) instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(b, a, output, rank, conv_rank, rank_method, rank_param, svd, seed, workers, blocks, fmt, dtype, device,
            drop_unsupported, as_json, overwrite) -> None:
    with progress_bar("subtract") as progress:
        report = subtract(parse_weighted(b), parse_weighted(a), output, rank=rank, rank_method=rank_method,
                          rank_param=rank_param, conv_rank=conv_rank, blocks=blocks, fmt=fmt, dtype=dtype,
                          device=device, svd=svd or "auto", seed=seed or 0, overwrite=overwrite,
                          drop_unsupported=drop_unsupported, workers=workers, progress=progress)
    emit(report, as_json)
