"""Benchmark of resize and svd merge against the dense approach existing tools use (not collected by pytest).

Usage::

    python tests/benchmarks/bench_algebra.py [--workdir DIR] [--rank 128] [--resize-rank 32] [--merge-rank 64]
        [--per-shape 1] [--device cpu|cuda] [--threads N] [--keep]

What it does:

1. Writes two SDXL-shaped rank-``--rank`` kohya LoRAs (fp16, alpha = rank/2): every default LoRA target of
   the real SDXL table (722 UNet attention modules, CLIP-L and OpenCLIP-bigG text-encoder q/k/v/out/fc1/fc2,
   986 kohya modules, real widths) with random factors. They are streamed to disk module by module.
2. In a fresh subprocess each (so peak RSS is that of the operation alone):
   * ``resize`` of the first LoRA to ``--resize-rank`` with :func:`lorasurgery.ops.algebra.resize`;
   * ``merge`` of both LoRAs (weights 0.6 and -0.4) to ``--merge-rank`` with ``merge_loras(method="svd")``;
   timed end to end (open, plan, every SVD, write with hashes, input sha256).
3. The dense baseline, as kohya's ``resize_lora.py``/``svd_merge_lora.py`` do it: materialise ΔW in float32
   (ΔW = Σ w·scale·up@down), ``torch.linalg.svd(ΔW)`` (full matrices, their default), keep the top-r
   triplets. Timing a full dense SVD of all 986 modules takes hours on a 2-core machine, so the baseline is
   timed on a fixed sample (``--per-shape`` modules of each of the 12 distinct module shapes, chosen with a
   fixed seed) and extrapolated by the number of modules of each shape; the output says so.
4. Errors on the same sample: ‖ΔW − ΔW_r‖_F of our written file and of the baseline's factors rounded to the
   same fp16 output, against the float64 dense target, plus their ratio to the Eckart–Young optimum.

Prints per operation: time (ours, baseline estimate), speed-up, error ratio, peak RSS of ours. ``--threads N``
gives both methods the same N cores: each phase is pinned to N cores (``sched_setaffinity``), the baseline
runs N torch intra-op threads, lorasurgery N parallel module workers with one intra-op thread each (its input
hashing thread shares those cores). The default lets each use every core its own way. Timings on a shared
machine move with its load: the load average is printed with the results.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorasurgery.arch import get_arch  # noqa: E402
from lorasurgery.delta import LowRank  # noqa: E402
from lorasurgery.formats.names import Target  # noqa: E402
from lorasurgery.formats.read import index_lora  # noqa: E402
from lorasurgery.formats.write import lora_tensors  # noqa: E402
from lorasurgery.io.writer import StreamingWriter, TensorSpec  # noqa: E402
from lorasurgery.testing import key_seed  # noqa: E402


def sdxl_table():
    spec = get_arch("sdxl")
    return spec.build(spec.real_config())


def targets(table):
    """Every default (``attn`` group) LoRA target of SDXL, OpenCLIP q/k/v as parts (kohya names them so)."""
    out = []
    for m in table.modules:
        if m.group != "attn":
            continue
        if m.parts:
            out.extend((Target(m.key, (p.name,)), p.stop - p.start, m.shape[1]) for p in m.parts)
        else:
            out.append((Target(m.key), m.shape[0], math.prod(m.shape[1:])))
    return out


def random_delta(t: Target, rows: int, cols: int, rank: int, seed: int, *, empty: bool = False) -> LowRank:
    if empty:
        return LowRank(up=torch.empty(rows, rank, dtype=torch.float16),
                       down=torch.empty(rank, cols, dtype=torch.float16), alpha=rank / 2)
    g = torch.Generator().manual_seed(key_seed(seed, t.id))
    up = (torch.randn(rows, rank, generator=g) * 0.02).half()
    down = (torch.randn(rank, cols, generator=g) * 0.02).half()
    return LowRank(up=up, down=down, alpha=rank / 2)


def module_tensors(t: Target, rows: int, cols: int, rank: int, seed: int, table, *, empty: bool = False):
    """kohya tensors of one module with alpha = rank/2 (≠ rank, as trainers write it): lora_tensors names and
    shapes them (its alpha policy writes alpha = rank with the 0.5 scale folded into up); the 0.5 is moved
    back into the alpha (up × 2 is exact in fp16)."""
    out = []
    for name, tensor in lora_tensors({t: random_delta(t, rows, cols, rank, seed, empty=empty)}, table, "kohya",
                                     dtype=torch.float16):
        if name.endswith(".alpha"):
            tensor = torch.tensor(rank / 2, dtype=torch.float32)
        elif name.endswith(".lora_up.weight") and not empty:
            tensor = tensor * 2
        out.append((name, tensor))
    return out


def write_lora_file(path: Path, table, rank: int, seed: int) -> None:
    """Stream a kohya LoRA to disk one module at a time (names and shapes from lora_tensors)."""
    ts = targets(table)
    specs = []
    for t, rows, cols in ts:  # pass 1: names and shapes from uninitialised factors
        for name, tensor in module_tensors(t, rows, cols, rank, seed, table, empty=True):
            specs.append(TensorSpec(name, tensor.dtype, tuple(tensor.shape)))
    with StreamingWriter(path, specs, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank / 2)},
                         overwrite=True) as w:
        for t, rows, cols in ts:
            for name, tensor in module_tensors(t, rows, cols, rank, seed, table):
                w.write(name, tensor)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------------
# phases run in subprocesses
# ------------------------------------------------------------------------------------------------------


def phase_ours(args) -> dict:
    from lorasurgery.ops.algebra import merge_loras, resize

    workers = args.threads or None  # the same number of cores as the baseline
    t0 = time.perf_counter()
    if args.phase == "resize":
        rep = resize(args.a, args.out, rank=args.resize_rank, device=args.device, overwrite=True, workers=workers)
    else:
        rep = merge_loras([(args.a, 0.6), (args.b, -0.4)], args.out, rank=args.merge_rank, device=args.device,
                          overwrite=True, workers=workers)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "modules": rep.modules,
            "bytes": rep.bytes}


def sample_targets(table, per_shape: int, seed: int = 0):
    by_shape: dict[tuple[int, int], list] = {}
    for t, rows, cols in targets(table):
        by_shape.setdefault((rows, cols), []).append(t)
    rng = random.Random(seed)
    sample = {shape: rng.sample(sorted(ts, key=lambda t: t.id), min(per_shape, len(ts)))
              for shape, ts in by_shape.items()}
    counts = {shape: len(ts) for shape, ts in by_shape.items()}
    return sample, counts


def phase_dense(args) -> dict:
    """Dense baseline on the sample + errors of ours and of the baseline on the same modules."""
    table = sdxl_table()
    sample, counts = sample_targets(table, args.per_shape)
    weights = [(args.a, 1.0)] if args.phase == "dense-resize" else [(args.a, 0.6), (args.b, -0.4)]
    rank = args.resize_rank if args.phase == "dense-resize" else args.merge_rank
    idxs = [(index_lora(p), w) for p, w in weights]
    mods = [{m.target: m for m in idx.modules} for idx, _ in idxs]
    with index_lora(args.out) as oidx:
        ours = {m.target: m for m in oidx.modules}
        per_shape = {}
        err_ours = err_dense = err_opt = 0.0
        for shape, ts in sample.items():
            times = []
            for t in ts:
                t0 = time.perf_counter()
                dw = None
                for (idx, w), mm in zip(idxs, mods):
                    d = idx.load(mm[t]).scaled(w)
                    term = d.dense(shape)  # materialise ΔW in float32
                    dw = term if dw is None else dw + term
                U, S, Vh = torch.linalg.svd(dw)  # full matrices, as kohya calls it
                up, down = U[:, :rank] * S[:rank], Vh[:rank]  # kohya: Σ into up
                times.append(time.perf_counter() - t0)
                ref = dw.double()
                base = (up.half().double() @ down.half().double())
                mine = oidx.load(ours[t]).dense(shape).double()
                s = torch.linalg.svdvals(ref)
                err_dense += float((ref - base).norm()) ** 2
                err_ours += float((ref - mine).norm()) ** 2
                err_opt += float(s[rank:].pow(2).sum())
            per_shape[f"{shape[0]}x{shape[1]}"] = {"count": counts[shape], "sampled": len(ts),
                                                   "seconds_each": sum(times) / len(times)}
    estimate = sum(v["count"] * v["seconds_each"] for v in per_shape.values())
    return {"estimate_seconds": estimate, "per_shape": per_shape, "sampled": sum(len(v) for v in sample.values()),
            "modules": sum(counts.values()), "err_ours": math.sqrt(err_ours), "err_dense": math.sqrt(err_dense),
            "err_optimal": math.sqrt(err_opt)}


def run_phase(args, phase: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--a", str(args.a), "--b", str(args.b),
           "--out", str(extra["out"]), "--rank", str(args.rank), "--resize-rank", str(args.resize_rank),
           "--merge-rank", str(args.merge_rank), "--per-shape", str(args.per_shape), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"phase {phase} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--resize-rank", type=int, default=32)
    ap.add_argument("--merge-rank", type=int, default=64)
    ap.add_argument("--per-shape", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="cores for both methods (each phase pinned to them): torch intra-op threads of the baseline "
                         "and lorasurgery's module workers (0: torch's default threads / one worker per core)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--a", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--b", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.phase and hasattr(os, "sched_setaffinity"):
            # both methods on the same N cores: lorasurgery's helper threads (input hashing) share them too
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    if args.phase in ("resize", "merge"):
        print(json.dumps(phase_ours(args)))
        return
    if args.phase in ("dense-resize", "dense-merge"):
        print(json.dumps(phase_dense(args)))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-algebra-"))
    work.mkdir(parents=True, exist_ok=True)
    table = sdxl_table()
    n = len(targets(table))
    args.a, args.b = work / f"sdxl-a-r{args.rank}.safetensors", work / f"sdxl-b-r{args.rank}.safetensors"
    t0 = time.perf_counter()
    for p, seed in ((args.a, 1), (args.b, 2)):
        if not p.exists():
            write_lora_file(p, table, args.rank, seed)
    print(f"inputs: 2 SDXL kohya LoRAs, {n} modules each (real widths), rank {args.rank}, fp16, "
          f"{args.a.stat().st_size / 2**20:.0f} MiB each (written in {time.perf_counter() - t0:.1f} s)")
    print(f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs; cores per method: "
          f"{args.threads or 'all'}{' (pinned)' if args.threads else ''} (baseline: torch intra-op threads; "
          f"ours: parallel module workers, one intra-op thread each); load average before: "
          f"{os.getloadavg()[0]:.2f}")
    rows = []
    for op, rank in (("resize", args.resize_rank), ("merge", args.merge_rank)):
        out = work / f"{op}-r{rank}.safetensors"
        ours = run_phase(args, op, out=out)
        dense = run_phase(args, f"dense-{op}", out=out)
        rows.append((op, rank, ours, dense))
        print(f"\n{op} to rank {rank} ({'1 LoRA' if op == 'resize' else '0.6·A − 0.4·B'}):")
        print(f"  ours (factored, end to end incl. I/O and hashes): {ours['seconds']:.1f} s, "
              f"peak RSS {ours['peak_rss_mb']:.0f} MiB, {ours['modules']} modules, "
              f"{ours['bytes'] / 2**20:.0f} MiB written")
        print(f"  dense baseline (materialise ΔW + full torch.linalg.svd): timed on {dense['sampled']} sampled "
              f"modules (one per distinct shape × {args.per_shape}), extrapolated to {dense['modules']} modules: "
              f"{dense['estimate_seconds']:.0f} s")
        for shape, v in dense["per_shape"].items():
            print(f"      {shape:>11}: {v['count']:4d} modules × {v['seconds_each']:.2f} s")
        print(f"  speed-up: {dense['estimate_seconds'] / ours['seconds']:.0f}× (load average now "
              f"{os.getloadavg()[0]:.2f})")
        print(f"  error on the sample (‖ΔW − ΔW_r‖F, fp16 output): ours {dense['err_ours']:.6g}, dense "
              f"{dense['err_dense']:.6g}, Eckart–Young optimum {dense['err_optimal']:.6g}; ours/dense = "
              f"{dense['err_ours'] / dense['err_dense']:.6f}, "
              f"ours/optimum = {dense['err_ours'] / dense['err_optimal']:.6f}")
    print("\nsummary")
    for op, rank, ours, dense in rows:
        ratio = dense["err_ours"] / dense["err_dense"]
        print(f"  {op:6} r{rank:<3}: ours {ours['seconds']:6.1f} s | dense ≈ {dense['estimate_seconds']:7.0f} s | "
              f"{dense['estimate_seconds'] / ours['seconds']:5.0f}× | error ratio {ratio:.6f} | "
              f"peak RSS {ours['peak_rss_mb']:.0f} MiB")
    if not args.keep and args.workdir is None:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
