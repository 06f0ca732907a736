"""``lorasurgery resize LORA``: the optimal lower-rank version of a LoRA, module by module."""
from __future__ import annotations

from pathlib import Path

import click

from ..ops.algebra import resize
from .merge import emit, progress_bar, rank_options

HELP = """Change the rank of a LoRA: the optimal truncation of every module.

\b
--rank N: every module at rank N (modules of lower rank keep theirs; ranks are
  capped at what a module allows, min(out, in·kh·kw), and the cap is reported).
--rank-method sv_ratio|sv_fro|sv_cumulative --rank-param X: the minimal rank per
  module meeting the rule (no kohya "+1"), with --rank as an optional cap:
    sv_ratio ρ:       keep σ_i > σ_1/ρ
    sv_fro φ:         keep Σσ_i² ≥ φ²·‖ΔW‖F²
    sv_cumulative τ:  keep Σσ_i ≥ τ·Σσ
--conv-rank N: rank (or cap) for 3x3 convolutions.

\b
Low-rank modules are truncated from their factors (QR of the factors, small core,
no dense ΔW); LoHa/LoKr/full modules are densified and become LoRA pairs. The
effective scale is kept, the input's metadata is kept with ss_network_dim/alpha
rewritten ("Dynamic" when ranks vary) and the hashes recomputed. The output keeps
the input's convention (kohya or PEFT) unless --format is given. The closing table
lists each module's old rank, new rank and retained Frobenius norm and energy.
Without -o the output is <stem>-r<N>.safetensors (dynamic: <stem>-<method><X>).
"""

EPILOG = """\b
Examples:
  lorasurgery resize style-r128.safetensors --rank 32
  lorasurgery resize style.safetensors --rank-method sv_fro --rank-param 0.95 --rank 64 -o style-dyn.safetensors
  lorasurgery resize style.safetensors --rank 16 --json > ranks.json
"""


@click.command("resize", help=HELP, epilog=EPILOG)
@click.argument("lora", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Output .safetensors file.")
@rank_options
@click.option("--format", "fmt", type=click.Choice(("kohya", "peft")), default=None,
              help="Output key format (default: the input's).")
@click.option("--dtype", default=None, help="Output dtype: keep (the input's, default), fp16, bf16 or fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out modules the output format cannot name (listed) instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-module table as JSON.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(lora, output, rank, conv_rank, rank_method, rank_param, svd, seed, workers, fmt, dtype, device,
            drop_unsupported, as_json, overwrite) -> None:
    with progress_bar("resize") as progress:
        report = resize(lora, output, rank=rank, rank_method=rank_method, rank_param=rank_param,
                        conv_rank=conv_rank, fmt=fmt, dtype=dtype, device=device, svd=svd or "auto",
                        seed=seed or 0, overwrite=overwrite, drop_unsupported=drop_unsupported, workers=workers,
                        progress=progress)
    emit(report, as_json)
