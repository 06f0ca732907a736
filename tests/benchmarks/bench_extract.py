"""Benchmark of ``lorasurgery extract`` against the way existing tools extract (not collected by pytest).

Usage::

    python tests/benchmarks/bench_extract.py [--pairs sdxl,flux] [--device cpu|cuda] [--rank 32]
        [--folder DIR] [--threads N] [--flux-blocks 2,4] [--depth-check] [--keep] [--json-out FILE]

For each pair it writes a synthetic base and tuned checkpoint with the REAL tables of the architecture
(real widths; fewer blocks), tuned = base + per module a change with a realistic decaying spectrum
(module i gets sigma_j ∝ j^-1/2, 1/j or 64 strong components + a flat tail, scaled to 3 % of the
weight's norm), plus small noise on every other tensor, stored in the architecture's usual dtype:

* ``sdxl``: SDXL (sgm layout, fp16): real UNet widths (320/640/1280, 2048 context) with one transformer
  block per attention, both text encoders at real width with 2 layers each, the real VAE;
* ``flux``: FLUX.1 (BFL layout, bf16): hidden 3072 with 2 double and 4 single blocks, no text encoders.

Then, in one worker process per pair (files already in the page cache for both):

* ours: :func:`lorasurgery.ops.extract.extract` (``--svd auto``, rank ``--rank``, fp32 output), timed,
  with the peak resident memory during the call (RssAnon and VmRSS sampled every 10 ms);
* baseline, "the way existing tools do it" (kohya ``extract_lora_from_models``, SuperMerger): for the same
  modules, load both tensors, materialise ΔW in float32 on the device, ``torch.linalg.svd`` (thin, the
  default driver), up = U_r S_r, down = V_r^T, save with safetensors — timed the same way;
* the error excess: per module ||ΔW − B A||_F of our file over the exact truncation error of the baseline
  (sqrt of the sum of the discarded sigma^2), max and mean.

``--depth-check`` additionally runs ours alone (fresh process each) on FLUX-width pairs with 1+2 and 2+4
blocks and reports the peak RSS of each: it must not grow with depth. ``--threads`` sets
``torch.set_num_threads`` in the workers (default: torch's default). Results are printed as a table and
as JSON (``--json-out``).
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
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from lorasurgery.arch import get_arch  # noqa: E402
from lorasurgery.io.writer import StreamingWriter, TensorSpec  # noqa: E402
from lorasurgery.testing import key_seed  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# synthetic checkpoints
# ----------------------------------------------------------------------------------------------------


def pair_config(name: str, doubles: int = 2, singles: int = 4) -> tuple[str, dict, torch.dtype]:
    if name == "sdxl":
        cfg = dict(get_arch("sdxl").real_config())
        unet = dict(cfg["unet"], depth=[0, 1, 1], depth_middle=1, depth_output=[0, 1, 1])
        te1 = dict(cfg["te1"], layers=2)
        te2 = dict(cfg["te2"], layers=2, diffusers_layers=2)
        return "sdxl", dict(cfg, unet=unet, te1=te1, te2=te2), torch.float16
    if name == "flux":
        cfg = dict(get_arch("flux").real_config(), depth_double=doubles, depth_single=singles)
        return "flux", cfg, torch.bfloat16
    raise SystemExit(f"unknown pair {name!r}: use sdxl or flux")


def spectrum(kind: int, p: int) -> torch.Tensor:
    j = torch.arange(1, p + 1, dtype=torch.float32)
    if kind == 0:
        return j ** -0.5
    if kind == 1:
        return 1.0 / j
    return torch.cat([torch.linspace(1.0, 0.2, min(64, p)), torch.full((max(0, p - 64),), 2e-3)])


def module_change(shape: tuple[int, ...], kind: int, weight_norm: float, seed: int) -> torch.Tensor:
    """ΔW = G1 diag(sigma) G2 (Gaussian G1, G2 of rank p <= 512), scaled to 3 % of the weight's norm."""
    m, n = shape[0], math.prod(shape[1:])
    p = min(m, n, 512)
    g = torch.Generator().manual_seed(seed)
    g1 = torch.randn(m, p, generator=g) / math.sqrt(m)
    g2 = torch.randn(p, n, generator=g) / math.sqrt(n)
    d = (g1 * spectrum(kind, p)) @ g2
    d *= 0.03 * weight_norm / float(d.norm())
    return d.reshape(shape)


def write_pair(folder: Path, name: str, doubles: int = 2, singles: int = 4) -> tuple[Path, Path, dict]:
    """Write base and tuned checkpoints (one tensor at a time); return their paths and a summary."""
    arch, cfg, dtype = pair_config(name, doubles, singles)
    table = get_arch(arch).build(cfg)
    keys = [k for k in table.tensors if not k.startswith("text_encoders.")]  # FLUX: transformer-only file
    modules = {m.key: m for m in table.modules if m.group == "attn"}
    specs = [TensorSpec(k, dtype, table.tensors[k]) for k in keys]
    tag = f"{name}-{doubles}d{singles}s" if name == "flux" else name
    bpath, tpath = folder / f"{tag}-base.safetensors", folder / f"{tag}-tuned.safetensors"
    t0 = time.perf_counter()
    nmod = 0
    with StreamingWriter(bpath, specs, {}, overwrite=True) as wb, \
            StreamingWriter(tpath, specs, {}, overwrite=True) as wt:
        for i, k in enumerate(keys):
            shape = tuple(table.tensors[k])
            g = torch.Generator().manual_seed(key_seed(0, k))
            w = torch.randn(shape, generator=g) * 0.02
            if k in modules:
                nmod += 1
                tuned = w + module_change(shape, nmod % 3, float(w.norm()), key_seed(1, k))
            else:
                tuned = w + torch.randn(shape, generator=g) * 2e-4
            wb.write(k, w.to(dtype))
            wt.write(k, tuned.to(dtype))
    info = {"arch": arch, "tensors": len(keys), "modules_changed": nmod, "bytes_each": bpath.stat().st_size,
            "build_s": round(time.perf_counter() - t0, 1)}
    return bpath, tpath, info


# ----------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Peak RssAnon / VmRSS of this process, sampled from /proc/self/status."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period = period
        self.peak = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
        self.running = True

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("RssAnon", "VmRSS", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
        return out

    def run(self) -> None:
        while self.running:
            for k, v in self.read().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.join()
        for k, v in self.read().items():
            self.peak[k] = max(self.peak[k], v)
        return self.peak


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(base: Path, tuned: Path, out: Path, device: str, rank: int) -> dict:
    from lorasurgery.ops.extract import extract

    before = RssSampler.read()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    rep = extract(base, tuned, out, rank=rank, device=device, dtype="fp32", overwrite=True)
    sync(device)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    return {"seconds": seconds, "modules": len(rep.modules), "svd": sorted({m.svd for m in rep.modules}),
            "mean_retained": rep.mean_retained, "peak_rss_anon": peak["RssAnon"], "peak_vmrss": peak["VmRSS"],
            "rss_anon_before": before["RssAnon"], "other_diffs": len(rep.other_diffs), "timings": rep.timings,
            "keys": [m.key for m in rep.modules]}


def run_baseline(base: Path, tuned: Path, out: Path, keys: list[str], device: str, rank: int) -> dict:
    """Materialise ΔW, exact thin torch.linalg.svd per module, up = U S, down = V^T (kohya's way)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    tails: dict[str, float] = {}
    lora: dict[str, torch.Tensor] = {}
    with safe_open(str(base), "pt") as fb, safe_open(str(tuned), "pt") as ft:
        for k in keys:
            b = fb.get_tensor(k).to(device).float()
            t = ft.get_tensor(k).to(device).float()
            d = (t - b).reshape(b.shape[0], -1)
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            r = min(rank, S.numel())
            lora[k + ".lora_up"] = (U[:, :r] * S[:r]).cpu().contiguous()
            lora[k + ".lora_down"] = Vh[:r].cpu().contiguous()
            tails[k] = float(S[r:].double().pow(2).sum().sqrt())
    save_file(lora, str(out))
    sync(device)
    seconds = time.perf_counter() - t0
    peak = sampler.stop()
    return {"seconds": seconds, "peak_rss_anon": peak["RssAnon"], "peak_vmrss": peak["VmRSS"], "tails": tails}


def error_excess(ours: Path, base: Path, tuned: Path, tails: dict[str, float]) -> dict:
    """Per module ||ΔW − B A|| of our file over the exact truncation error."""
    from safetensors import safe_open

    from lorasurgery.formats.dense import module_dense
    from lorasurgery.formats.read import index_lora
    from lorasurgery.model import open_model

    ratios = []
    with index_lora(ours) as idx, open_model(base) as bm, open_model(tuned) as tm:
        mods = {m.key: m for m in bm.table.modules}
        pieces: dict[str, dict] = {}
        for lm, d in idx.deltas():  # fused modules may be stored as parts (OpenCLIP q/k/v): regroup
            pieces.setdefault(lm.target.module, {})[lm.target] = d
        for key, items in pieces.items():
            dw = tm.get_ref(key).float() - bm.get_ref(key).float()
            got = module_dense(mods[key], items, dw.shape)
            err = float((dw - got).double().norm())
            ratios.append(err / tails[key] if tails[key] > 0 else 1.0)
    return {"max_excess": max(ratios) - 1, "mean_excess": sum(ratios) / len(ratios) - 1, "modules": len(ratios)}


def worker(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tuned, folder = Path(args.base), Path(args.tuned), Path(args.folder)
    result: dict = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name()
        torch.zeros(1, device=args.device)  # context creation outside the timings
        torch.linalg.svd(torch.randn(64, 64, device=args.device))
    ours = run_ours(base, tuned, folder / "ours.safetensors", args.device, args.rank)
    keys = ours.pop("keys")
    result["ours"] = ours
    if args.worker == "both":
        base_res = run_baseline(base, tuned, folder / "baseline.safetensors", keys, args.device, args.rank)
        tails = base_res.pop("tails")
        result["baseline"] = base_res
        result["speedup"] = base_res["seconds"] / ours["seconds"]
        result["error"] = error_excess(folder / "ours.safetensors", base, tuned, tails)
    print("RESULT " + json.dumps(result))


def spawn(mode: str, base: Path, tuned: Path, folder: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--base", str(base), "--tuned", str(tuned),
           "--folder", str(folder), "--device", args.device, "--rank", str(args.rank)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", default="sdxl,flux")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--folder", default=None, help="where to write the checkpoints (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--flux-blocks", default="2,4", help="double,single blocks of the flux pair")
    ap.add_argument("--depth-check", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--worker", choices=["ours", "both"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--tuned", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    tmp = tempfile.TemporaryDirectory(dir=args.folder) if not args.keep else None
    folder = Path(tmp.name) if tmp else Path(args.folder or tempfile.mkdtemp())
    report: dict = {"pairs": {}, "depth": {}}
    try:
        for name in args.pairs.split(","):
            doubles, singles = (int(x) for x in args.flux_blocks.split(","))
            b, t, info = write_pair(folder, name, doubles, singles)
            print(f"[{name}] wrote 2 x {mib(info['bytes_each'])} ({info['tensors']} tensors, "
                  f"{info['modules_changed']} changed modules) in {info['build_s']} s", flush=True)
            res = spawn("both", b, t, folder, args)
            res["pair"] = info
            report["pairs"][name] = res
            o, bl, e = res["ours"], res["baseline"], res["error"]
            where = res.get("gpu") or f"{res['threads']} threads"
            print(f"[{name}] {res['device']} ({where}): ours {o['seconds']:.2f} s "
                  f"({o['modules']} modules, svd {'+'.join(o['svd'])}), baseline {bl['seconds']:.2f} s -> "
                  f"{res['speedup']:.1f}x; error excess max {100 * e['max_excess']:.3f} % mean "
                  f"{100 * e['mean_excess']:.4f} %; peak RssAnon ours {mib(o['peak_rss_anon'])} "
                  f"(VmRSS {mib(o['peak_vmrss'])}), baseline {mib(bl['peak_rss_anon'])}; our time split "
                  f"{o['timings']}", flush=True)
            if not args.keep:
                b.unlink()
                t.unlink()
            save_report(report, args.json_out)
        if args.depth_check:
            for d, s in ((1, 2), (2, 4)):
                b, t, info = write_pair(folder, "flux", d, s)
                res = spawn("ours", b, t, folder, args)
                report["depth"][f"{d}+{s}"] = {"bytes_each": info["bytes_each"], **res["ours"]}
                o = res["ours"]
                print(f"[depth {d}+{s}] 2 x {mib(info['bytes_each'])}: ours {o['seconds']:.2f} s, peak RssAnon "
                      f"{mib(o['peak_rss_anon'])} (before the call {mib(o['rss_anon_before'])}), "
                      f"peak VmRSS {mib(o['peak_vmrss'])}", flush=True)
                if not args.keep:
                    b.unlink()
                    t.unlink()
                save_report(report, args.json_out)
    finally:
        if tmp:
            tmp.cleanup()
    save_report(report, args.json_out)


def save_report(report: dict, path: str | None) -> None:
    report["load_average"] = os.getloadavg()
    report["max_rss_parent_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path:
        Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
