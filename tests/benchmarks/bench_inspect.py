"""Benchmark: `inspect` time does not grow with tensor bytes (header-only).

Writes sparse checkpoints with the REAL key sets and shapes of SDXL and FLUX.1-dev (fp16/bf16; the data
section is a hole, so nothing is allocated on disk), plus the tiny models of the same architectures, and
times `inspect_file` on each in this process. Prints the ratio of each real-size time to its tiny
counterpart and to the tensor bytes.

Run: python tests/benchmarks/bench_inspect.py
"""
from __future__ import annotations

import json
import struct
import sys
import tempfile
import time
from pathlib import Path

from lorasurgery.arch import get_arch
from lorasurgery.inspect import inspect_file

ITEM = 2


def sparse_checkpoint(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str) -> int:
    header = {}
    pos = 0
    for k, shape in tensors.items():
        n = ITEM
        for s in shape:
            n *= s
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + pos)
    return pos


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for arch, dtype in (("sdxl", "F16"), ("flux", "BF16")):
            spec = get_arch(arch)
            for label, cfg in (("tiny", spec.tiny_config()), ("real", spec.real_config())):
                table = spec.build(cfg)
                p = Path(d) / f"{arch}-{label}.safetensors"
                nbytes = sparse_checkpoint(p, dict(table.tensors), dtype)
                inspect_file(p)  # warm caches (table building)
                t = best_of(lambda: inspect_file(p))
                rows.append((arch, label, len(table.tensors), nbytes, t))
        print(f"{'model':12} {'tensors':>8} {'tensor bytes':>14} {'inspect s':>10}")
        for arch, label, n, nbytes, t in rows:
            print(f"{arch + '-' + label:12} {n:>8} {nbytes:>14,} {t:>10.4f}")
        for arch in ("sdxl", "flux"):
            tiny = next(r for r in rows if r[0] == arch and r[1] == "tiny")
            real = next(r for r in rows if r[0] == arch and r[1] == "real")
            print(f"{arch}: bytes ratio real/tiny {real[3] / tiny[3]:,.0f}x, time ratio {real[4] / tiny[4]:.2f}x "
                  f"(tensor count ratio {real[2] / tiny[2]:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
