"""CUDA path of lorasurgery.ops.extract: batched decompositions, reader stream, agreement with the CPU."""
from __future__ import annotations

import pytest
import torch

from lorasurgery import linalg
from lorasurgery.errors import InputError
from lorasurgery.ops.extract import _exact, _randomized, extract, plan_extract
from lorasurgery.testing import tiny_table

from test_ops_extract import build_pair, readback, spectrum_matrix, worst_error

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("arch,tuned_layout", [("sdxl", "diffusers"), ("flux", "comfy"), ("sd3", None)])
def test_cuda_reproduces_rank_r_change(tmp_path, arch, tuned_layout):
    table, b, t, true = build_pair(tmp_path, arch, tuned_layout=tuned_layout)
    plan = plan_extract(b, t, tmp_path / "o.safetensors", rank=4, device="cuda")
    assert plan.device.type == "cuda"
    assert max(len(batch) for batch in plan.batches) > 1  # same-shaped modules are batched
    assert sorted(i for batch in plan.batches for i in batch) == list(range(len(plan.jobs)))
    rep = extract(b, t, tmp_path / "o.safetensors", rank=4, device="cuda", dtype="fp32")
    assert rep.ranks == {4: len(true)}
    assert any("batched" in m.driver for m in rep.modules)
    assert worst_error(rep.path, table, true) < 1e-4


def test_cuda_and_cpu_agree_and_cuda_is_deterministic(tmp_path):
    table, b, t, true = build_pair(tmp_path, "sd1", tuned_layout="diffusers", groups=("attn", "locon"))
    (tmp_path / "g1").mkdir()
    (tmp_path / "g2").mkdir()
    opts = dict(rank=3, conv_rank=2, dtype="fp32", svd="randomized")
    cpu = extract(b, t, tmp_path / "cpu.safetensors", device="cpu", **opts)
    g1 = extract(b, t, tmp_path / "g1" / "o.safetensors", device="cuda", **opts)
    g2 = extract(b, t, tmp_path / "g2" / "o.safetensors", device="cuda", **opts)
    assert g1.path.read_bytes() == g2.path.read_bytes()
    assert [(m.key, m.rank) for m in g1.modules] == [(m.key, m.rank) for m in cpu.modules]
    a, c = readback(g1.path, table), readback(cpu.path, table)
    for key in a:
        assert float((a[key] - c[key]).norm() / c[key].norm()) < 1e-4, key


def test_cuda_dynamic_rank_with_batched_exact_svd(tmp_path):
    table = tiny_table("sd1")
    linear = [m for m in table.modules if m.group == "attn" and m.kind == "linear" and m.shape == (32, 32)][:6]
    changes = {m.key: spectrum_matrix(32, 32, [4.0, 3.0, 2.0, 1.0, 0.5], seed=i) for i, m in enumerate(linear)}
    _, b, t, _ = build_pair(tmp_path, "sd1", changes=changes)
    rep = extract(b, t, tmp_path / "o.safetensors", rank=8, rank_method="sv_fro", rank_param=0.9,
                  svd="exact", device="cuda", dtype="fp32")
    assert [m.rank for m in rep.modules] == [2] * len(linear)
    assert all(m.driver.endswith("-batched") for m in rep.modules)
    for m in rep.modules:
        assert m.retained == pytest.approx(25 / 30.25, rel=1e-4)


def test_batched_randomized_equals_linalg_on_cuda():
    sig = torch.arange(1, 257, dtype=torch.float64) ** -0.5
    mats = [spectrum_matrix(256, 768, sig, seed=s).cuda() for s in range(4)]
    keys = [f"m{i}.weight" for i in range(4)]
    energies = [float(x.double().pow(2).sum()) for x in mats]
    got = _randomized(mats, 32, keys, energies, seed=3, power_iters=4)
    for x, key, g in zip(mats, keys, got):
        ref = linalg.svd_randomized(x, 32, seed=3, key=key)
        torch.testing.assert_close(g.S, ref.S, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g.U * g.S @ g.Vh, ref.U * ref.S @ ref.Vh, rtol=1e-3, atol=1e-5)
        exact = linalg.svd_exact(x.cpu())
        opt = float(exact.S[32:].double().pow(2).sum().sqrt())
        err = float((x - g.U * g.S @ g.Vh).norm())
        assert err / opt <= 1.005
    for x, g in zip(mats, _exact(mats, energies)):
        torch.testing.assert_close(g.S.cpu(), linalg.svd_exact(x.cpu()).S, rtol=1e-4, atol=1e-6)


def test_cuda_nan_names_the_module(tmp_path):
    table = tiny_table("flux")
    mod = next(m for m in table.modules if m.group == "attn" and m.component == "transformer")
    bad = torch.zeros(mod.shape)
    bad[1, 2] = float("inf")
    _, b, t, _ = build_pair(tmp_path, "flux", changes={mod.key: bad})
    with pytest.raises(InputError, match="NaN or Inf") as exc:
        extract(b, t, tmp_path / "o.safetensors", rank=2, device="cuda")
    assert mod.key in str(exc.value) and str(t) in str(exc.value)
    assert not (tmp_path / "o.safetensors").exists()
