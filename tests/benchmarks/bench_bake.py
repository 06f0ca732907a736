"""Benchmark: baking a rank-64 LoRA into real-width checkpoints, against the I/O floor.

Run on demand (not part of the test suite)::

    python tests/benchmarks/bench_bake.py                      # FLUX (bf16) and SDXL-shaped (fp16), device auto
    python tests/benchmarks/bench_bake.py --case flux --device cpu --double 2 --single 2
    python tests/benchmarks/bench_bake.py --small              # quick check with fewer blocks

Cases (real layer widths, only the number of blocks reduced):

* ``flux``: a BFL FLUX.1 transformer (hidden 3072, MLP 12288; ``--double`` double and ``--single`` single
  blocks; bf16) and a kohya LoRA of rank 64 on every Linear of those blocks (fused qkv / linear1 included).
* ``sdxl``: an sgm SDXL checkpoint (320/640/1280 channels, transformer depth 2 per level and in the middle,
  CLIP-L and OpenCLIP-bigG with ``--te-layers`` layers at full width, incl. the 49408-token embeddings; fp16)
  and a kohya LoRA of rank 64 on every attention module of the UNet and both text encoders.

Each measured run is a fresh subprocess, so its peak RSS (``ru_maxrss`` of the child) is its own:

* ``floor``: read the base tensor by tensor with the same sequential reads and write a copy through the same
  streaming writer (which hashes what it writes) — the I/O floor of any streamed bake.
* ``bake``: :func:`lorasurgery.ops.bake.bake` with the LoRA at weight 0.8 (which also hashes the base).

Each is run ``--repeat`` times alternately (page cache equally warm for both); the minimum wall time is
reported. Targets (issue 4): bake within 1.5x of the floor; peak RSS under 1.5 GiB plus the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def flux_config(double: int, single: int) -> dict:
    from lorasurgery.arch import get_arch

    return dict(get_arch("flux").real_config(), depth_double=double, depth_single=single, clip_l=None, t5=None)


def sdxl_config(te_layers: int) -> dict:
    from lorasurgery.arch import get_arch

    c = get_arch("sdxl").real_config()
    return dict(c, unet=dict(c["unet"], depth=(0, 2, 2), depth_middle=2, depth_output=(0, 2, 2)),
                te1=dict(c["te1"], layers=te_layers), te2=dict(c["te2"], layers=te_layers, diffusers_layers=te_layers),
                vae=None)


def write_base(arch: str, cfg: dict, dtype, path: Path) -> tuple[int, int]:
    """Stream random tensors of the table to ``path``; return (file bytes, largest tensor bytes)."""
    import torch

    from lorasurgery.arch import get_arch
    from lorasurgery.io.writer import StreamingWriter, TensorSpec

    table = get_arch(arch).build(cfg)
    g = torch.Generator().manual_seed(0)
    specs = [TensorSpec(k, dtype, s) for k, s in table.tensors.items()]
    with StreamingWriter(path, specs, {"modelspec.title": f"bench-{arch}"}, overwrite=True) as w:
        for s in specs:
            w.write(s.name, (torch.randn(s.shape, generator=g) * 0.02).to(dtype))
    return path.stat().st_size, max(s.nbytes for s in specs)


def write_lora(arch: str, cfg: dict, dtype, rank: int, path: Path) -> int:
    import torch

    from lorasurgery.arch import get_arch
    from lorasurgery.delta import LowRank
    from lorasurgery.formats.names import Target
    from lorasurgery.formats.write import lora_tensors
    from lorasurgery.testing import save

    table = get_arch(arch).build(cfg)
    g = torch.Generator().manual_seed(1)
    items = {}
    for m in table.modules:
        if m.group != "attn":
            continue
        out_f = m.shape[1] if m.transposed else m.shape[0]
        in_shape = (m.shape[0],) if m.transposed else tuple(m.shape[1:])
        r = min(rank, out_f, math.prod(in_shape))
        up = torch.randn((out_f, r) + ((1, 1) if len(m.shape) == 4 else ()), generator=g) * 0.01
        down = torch.randn((r,) + in_shape, generator=g) * 0.01
        items[Target(m.key)] = LowRank(up=up, down=down, alpha=rank / 2)
    save(lora_tensors(items, table, "kohya", dtype=dtype), path)
    return len(items)


def child_floor(base: str, out: str) -> dict:
    """Read every tensor in file order and write a copy through the streaming writer."""
    from lorasurgery.io.reader import read_header
    from lorasurgery.io.writer import StreamingWriter, TensorSpec
    from lorasurgery.ops.bake import _read_exact

    t0 = time.perf_counter()
    h = read_header(base)
    specs = [TensorSpec(k, i.torch_dtype, i.shape) for k, i in h.tensors.items()]
    with open(base, "rb", buffering=0) as f, StreamingWriter(out, specs, h.metadata, overwrite=True) as w:
        _read_exact(f, h.data_offset, Path(base))
        for k, i in h.tensors.items():
            raw = _read_exact(f, i.nbytes, Path(base))
            w.write(k, raw.view(i.torch_dtype).reshape(i.shape))
    return {"seconds": time.perf_counter() - t0}


def child_bake(base: str, lora: str, out: str, device: str) -> dict:
    from lorasurgery.ops.bake import bake
    from lorasurgery.ops.inputs import WeightedInput

    t0 = time.perf_counter()
    r = bake(base, [WeightedInput(Path(lora), 0.8)], out, device=device, overwrite=True)
    return {"seconds": time.perf_counter() - t0, "plan_seconds": r.plan_seconds, "changed": r.tensors_changed, "copied": r.tensors_copied,
            "lost_fraction": r.lost_fraction, "relative_error": r.relative_error, "device": r.device,
            "weak": len(r.weak_modules)}


def run_child(kind: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter; return its result with the child's peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over all children so far
    res["peak_rss_bytes"] = res.get("self_peak_kib", peak) * 1024
    res["max_children_kib"] = max(before, peak)
    return res


def bench_case(name: str, arch: str, cfg: dict, dtype, args, work: Path) -> dict:
    base = work / f"{name}-base.safetensors"
    lora = work / f"{name}-lora-r{args.rank}.safetensors"
    t = time.perf_counter()
    size, largest = write_base(arch, cfg, dtype, base)
    modules = write_lora(arch, cfg, dtype, args.rank, lora)
    print(f"[{name}] base {size / GIB:.2f} GiB ({largest / 2**20:.0f} MiB largest tensor), LoRA {modules} modules "
          f"rank {args.rank} {lora.stat().st_size / 2**20:.0f} MiB; generated in {time.perf_counter() - t:.0f} s",
          flush=True)
    floors, bakes = [], []
    out = work / f"{name}-out.safetensors"
    for _ in range(args.repeat):
        floors.append(run_child("floor", str(base), str(out)))
        out.unlink()
        bakes.append(run_child("bake", str(base), str(lora), str(out), args.device))
        out.unlink()
    floor = min(f["seconds"] for f in floors)
    bk = min(b["seconds"] for b in bakes)
    plan_s = min(b["plan_seconds"] for b in bakes)
    rss = max(b["peak_rss_bytes"] for b in bakes)
    floor_rss = max(f["peak_rss_bytes"] for f in floors)
    limit = 1.5 * GIB + largest
    row = {"case": name, "file_gib": size / GIB, "largest_mib": largest / 2**20, "floor_s": floor, "bake_s": bk,
           "ratio": bk / floor, "plan_s": plan_s, "bake_rss_gib": rss / GIB, "floor_rss_gib": floor_rss / GIB,
           "rss_limit_gib": limit / GIB, "device": bakes[0]["device"], "changed": bakes[0]["changed"],
           "copied": bakes[0]["copied"], "lost_fraction": bakes[0]["lost_fraction"],
           "ok_time": bk <= 1.5 * floor, "ok_rss": rss <= limit}
    print(f"[{name}] floor {floor:.2f} s ({size / floor / GIB:.2f} GiB/s), bake {bk:.2f} s (plan {plan_s:.2f} s) "
          f"on {row['device']} "
          f"-> {row['ratio']:.2f}x the floor [{'ok' if row['ok_time'] else 'OVER 1.5x'}]; peak RSS bake "
          f"{rss / GIB:.2f} GiB (floor {floor_rss / GIB:.2f} GiB), limit {limit / GIB:.2f} GiB "
          f"[{'ok' if row['ok_rss'] else 'OVER'}]; {row['changed']} tensors changed, {row['copied']} copied",
          flush=True)
    for p in (base, lora):
        if not args.keep:
            p.unlink()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["flux", "sdxl", "both"], default="both")
    ap.add_argument("--double", type=int, default=2, help="FLUX double blocks")
    ap.add_argument("--single", type=int, default=2, help="FLUX single blocks")
    ap.add_argument("--te-layers", type=int, default=4, help="SDXL text-encoder layers (each encoder)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="1 double + 1 single block, 2 TE layers")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        res = child_floor(*rest) if kind == "floor" else child_bake(*rest)
        res["self_peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(res))
        return
    import torch

    if args.small:
        args.double, args.single, args.te_layers = 1, 1, 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-bake-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, cuda={torch.cuda.is_available()}, workdir {work}")
    rows = []
    if args.case in ("flux", "both"):
        rows.append(bench_case("flux", "flux", flux_config(args.double, args.single), torch.bfloat16, args, work))
    if args.case in ("sdxl", "both"):
        rows.append(bench_case("sdxl", "sdxl", sdxl_config(args.te_layers), torch.float16, args, work))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
