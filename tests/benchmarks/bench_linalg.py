"""Benchmark of the SVD back-ends in lorasurgery.linalg (not collected by pytest).

Usage::

    python tests/benchmarks/bench_linalg.py [--device cpu|cuda|both] [--rank 32] [--batch 4]
        [--shapes 3072x3072,3072x12288] [--factored-ranks 64,256,512] [--drivers]

For each shape it builds float32 matrices U diag(sigma) V^T with random orthonormal U, V and three spectra
(sigma_i = i^-1/2, 1/i, 64 strong components + a 1e-3 tail), then reports, in one process and on one
device:

* wall time of the exact thin SVD, the randomized SVD (q = max(2k, k + 10), 4 power iterations), the
  batched exact SVD of ``--batch`` such matrices and the factored SVD of a rank-R product, each with its
  speed-up over the exact SVD;
* the randomized SVD's error ratio ||M - M_k|| / ||M - M_k^opt|| against the optimal rank-k truncation
  (known from the spectrum), and the relative error of sigma_k;
* on CUDA with ``--drivers``: the exact SVD with each cuSOLVER driver (gesvd, gesvdj, gesvda).

Times are the best of ``--repeat`` runs after one warm-up; CUDA times synchronise the device.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lorasurgery.linalg import (  # noqa: E402
    default_sketch_size,
    svd_batched,
    svd_exact,
    svd_factored,
    svd_randomized,
)

SPECTRA: dict[str, Callable[[int], torch.Tensor]] = {
    "i^-1/2": lambda p: torch.arange(1, p + 1, dtype=torch.float32) ** -0.5,
    "1/i": lambda p: 1.0 / torch.arange(1, p + 1, dtype=torch.float32),
    "64+tail": lambda p: torch.cat([torch.linspace(1.0, 0.2, 64), torch.full((p - 64,), 1e-3)]),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: bool = True) -> tuple[float, object]:
    if warmup:
        fn()
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def orthonormal(rows: int, cols: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    G = torch.randn(rows, cols, generator=gen).to(device)
    return torch.linalg.qr(G).Q


def bench_shape(m: int, n: int, args: argparse.Namespace, device: torch.device) -> None:
    k, p = args.rank, min(m, n)
    gen = torch.Generator().manual_seed(m * 31 + n)
    U = orthonormal(m, p, gen, device)
    V = orthonormal(n, p, gen, device)
    print(f"\n== {m} x {n}, rank {k}, device {device} ==", flush=True)
    exact_time, first = None, None
    for name, make in SPECTRA.items():
        sigma = make(p).to(device)
        M = (U * sigma) @ V.T
        optimal = float(torch.linalg.vector_norm(sigma[k:].double()))
        if exact_time is None:  # timed once, on the first (slowest-decaying) spectrum
            first = M
            exact_time, ex = timed(lambda: svd_exact(M), device, args.repeat, warmup=False)
            print(f"exact ({ex.driver}): {exact_time:8.3f} s", flush=True)
            ex_err = float(torch.linalg.vector_norm((M - (ex.U[:, :k] * ex.S[:k]) @ ex.Vh[:k]).double()))
            print(f"  exact rank-{k} error / optimal: {ex_err / optimal:.6f}", flush=True)
            if device.type == "cuda" and args.drivers:
                for drv in ("gesvdj", "gesvda"):
                    t, r = timed(lambda: svd_exact(M, driver=drv), device, args.repeat, warmup=False)
                    err = float((r.S[:k] - ex.S[:k]).abs().max() / ex.S[0])
                    print(f"  exact driver {drv} ({r.driver}): {t:8.3f} s  "
                          f"(x{exact_time / t:.2f} vs gesvd)  max |dS|/S1 top-{k}: {err:.1e}", flush=True)
        q = default_sketch_size(k, m, n)
        t, r = timed(lambda: svd_randomized(M, k, seed=0, key=name), device, args.repeat)
        err = float(torch.linalg.vector_norm((M - (r.U * r.S) @ r.Vh).double()))
        s_err = abs(float(r.S[k - 1]) - float(sigma[k - 1])) / float(sigma[k - 1])
        print(f"randomized q={q} t=4 [{name:7s}]: {t:8.3f} s  (x{exact_time / t:7.1f} vs exact)  "
              f"error ratio {err / optimal:.6f}  sigma_k rel err {s_err:.1e}", flush=True)
    if args.batch > 1:
        # same spectrum as the timed exact SVD (LAPACK's time depends on it), different scales
        mats = [first * (1 + i) for i in range(args.batch)]
        t, _ = timed(lambda: svd_batched(mats), device, 1, warmup=False)
        del first
        print(f"batched x{args.batch}: {t:8.3f} s  = {t / args.batch:.3f} s per matrix "
              f"(x{exact_time * args.batch / t:.2f} vs {args.batch} exact)", flush=True)
        del mats
    for R in args.factored_ranks:
        if R >= p:
            continue
        B = torch.randn(m, R, generator=gen).to(device) / R**0.5
        A = torch.randn(R, n, generator=gen).to(device)
        t, f = timed(lambda: svd_factored(B, A), device, args.repeat)
        extra = ""
        if device.type == "cuda":
            t_named, _ = timed(lambda: svd_factored(B, A, driver="gesvd"), device, args.repeat)
            extra = f"; core on cusolver-gesvd: {t_named:.4f} s"
        print(f"factored R={R:4d}: {t:8.4f} s  (x{exact_time / t:8.1f} vs exact dense of this shape; "
              f"core {f.driver}{extra})", flush=True)


def warm_up(device: torch.device) -> None:
    """First calls initialise cuSOLVER / cuBLAS handles; keep that out of the timings."""
    M = torch.randn(256, 192, device=device)
    for drv in ((None, "gesvdj", "gesvda") if device.type == "cuda" else (None,)):
        svd_exact(M, driver=drv)
    svd_randomized(M, 8, seed=0)
    svd_factored(M[:, :16], M[:16])
    svd_batched([M, M])
    sync(device)


def crossover(args: argparse.Namespace, device: torch.device) -> None:
    """Exact vs randomized time around the choose_svd bound q = max(2k, k + 10) < min(m, n) / 2."""
    print(f"\n== crossover, device {device}: time(randomized) / time(exact); auto picks randomized when "
          f"2q < min(m, n) ==", flush=True)
    gen = torch.Generator().manual_seed(0)
    for m, n in [(320, 320), (320, 2880), (640, 640), (768, 768), (768, 3072), (1280, 1280), (1280, 5120),
                 (1280, 11520), (3072, 3072)]:
        M = (torch.randn(m, n, generator=gen) / (torch.arange(1, n + 1) ** 0.5)).to(device)
        t_exact, _ = timed(lambda: svd_exact(M), device, args.repeat, warmup=False)
        cells = []
        for k in (8, 16, 32, 64, 128, 256):
            q = default_sketch_size(k, m, n)
            if 2 * k >= min(m, n):
                break
            t, _ = timed(lambda: svd_randomized(M, k, seed=0), device, args.repeat)
            mark = "*" if 2 * max(2 * k, k + 10) < min(m, n) else " "
            cells.append(f"k={k}:q={q}{mark}{t / t_exact:5.2f}")
        print(f"{m:5d}x{n:<5d} exact {t_exact:7.3f} s | " + "  ".join(cells), flush=True)


def core_device(args: argparse.Namespace) -> None:
    """Factored-path core: float64 R x R SVD on the CPU vs on CUDA (gesvd)."""
    print("\n== float64 R x R core SVD: cpu vs cuda gesvd ==", flush=True)
    gen = torch.Generator().manual_seed(1)
    cuda = torch.device("cuda")
    for R in (32, 64, 128, 256, 512, 1024):
        C = torch.randn(R, R, generator=gen, dtype=torch.float64)
        Cg = C.to(cuda)
        t_cpu, _ = timed(lambda: torch.linalg.svd(C, full_matrices=False), torch.device("cpu"), 3)
        t_gpu, _ = timed(lambda: torch.linalg.svd(Cg, full_matrices=False, driver="gesvd"), cuda, 3)
        t_gpuj, _ = timed(lambda: torch.linalg.svd(Cg, full_matrices=False, driver="gesvdj"), cuda, 3)
        t_move, _ = timed(lambda: [t.to(cuda) for t in torch.linalg.svd(Cg.cpu(), full_matrices=False)], cuda, 3)
        print(f"R={R:5d}: cpu {t_cpu * 1e3:8.2f} ms  cuda gesvd {t_gpu * 1e3:8.2f} ms  gesvdj {t_gpuj * 1e3:8.2f} ms  "
              f"cuda->cpu->cuda {t_move * 1e3:8.2f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "both"])
    ap.add_argument("--shapes", default="3072x3072,3072x12288")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--factored-ranks", default="64,256,512")
    ap.add_argument("--drivers", action="store_true", help="also time gesvdj and gesvda on CUDA")
    ap.add_argument("--crossover", action="store_true", help="time exact vs randomized around the auto bound")
    ap.add_argument("--core", action="store_true", help="time the factored core SVD on CPU vs CUDA")
    ap.add_argument("--skip-shapes", action="store_true", help="skip the per-shape benchmark")
    args = ap.parse_args()
    args.factored_ranks = [int(x) for x in args.factored_ranks.split(",") if x]
    devices = ["cpu", "cuda"] if args.device == "both" else [args.device]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    for dev in devices:
        device = torch.device(dev)
        warm_up(device)
        if args.crossover:
            crossover(args, device)
        if dev == "cuda" and args.core:
            core_device(args)
        if args.skip_shapes:
            continue
        for spec in args.shapes.split(","):
            m, n = (int(v) for v in spec.lower().split("x"))
            bench_shape(m, n, args, device)


if __name__ == "__main__":
    main()
