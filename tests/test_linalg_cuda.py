"""CUDA checks for lorasurgery.linalg: CPU and CUDA back-ends agree (skipped without a CUDA device)."""
from __future__ import annotations

import pytest
import torch

from lorasurgery.errors import InputError
from lorasurgery.linalg import (
    clamp_quantile,
    order_statistic_quantile,
    resolve_device,
    svd_batched,
    svd_exact,
    svd_factored,
    svd_for_rank,
    svd_randomized,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def spectrum_matrix(m: int, n: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 CPU matrix U diag(sigma) V^T with random orthonormal factors (built in float64)."""
    gen = torch.Generator().manual_seed(seed)
    p = sigma.numel()
    U = torch.linalg.qr(torch.randn(m, p, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, p, generator=gen, dtype=torch.float64)).Q
    return ((U * sigma.double()) @ V.T).float()


def assert_same_svd(a, b, *, s_rtol: float, v_atol: float, k: int | None = None) -> None:
    k = a.S.numel() if k is None else k
    sa, sb = a.S[:k].cpu().double(), b.S[:k].cpu().double()
    torch.testing.assert_close(sa, sb, rtol=s_rtol, atol=s_rtol * float(sa[0]))
    torch.testing.assert_close(a.U[:, :k].cpu(), b.U[:, :k].cpu(), atol=v_atol, rtol=0)
    torch.testing.assert_close(a.Vh[:k].cpu(), b.Vh[:k].cpu(), atol=v_atol, rtol=0)


def test_resolve_device_cuda():
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("shape", [(512, 300), (300, 512)])
def test_exact_cpu_cuda_agree(shape):
    m, n = shape
    sigma = torch.linspace(10.0, 0.1, min(m, n))
    M = spectrum_matrix(m, n, sigma, seed=1)
    cpu = svd_exact(M)
    gpu = svd_exact(M.cuda())
    assert gpu.U.is_cuda and gpu.driver == "cusolver-gesvd"
    # singular vectors: perturbation ~ eps * sigma_1 * sqrt(n) / gap, gap = 0.033 here
    assert_same_svd(cpu, gpu, s_rtol=1e-5, v_atol=5e-4)
    assert gpu.total_energy == pytest.approx(cpu.total_energy, rel=1e-5)
    for driver in ("gesvdj", "gesvda"):
        other = svd_exact(M.cuda(), driver=driver)
        assert other.driver in (f"cusolver-{driver}", "cpu-fallback")
        torch.testing.assert_close(other.S[:20].cpu(), cpu.S[:20], rtol=1e-4, atol=1e-4)


def test_exact_cuda_rejects_nan():
    with pytest.raises(InputError):
        svd_exact(torch.tensor([[1.0, float("inf")], [0.0, 1.0]], device="cuda"))


def test_randomized_same_omega_cpu_cuda():
    sigma = 1.0 / torch.arange(1, 769, dtype=torch.float64)
    M = spectrum_matrix(1024, 768, sigma, seed=2)
    cpu = svd_randomized(M, 32, seed=7, key="block.0")
    gpu = svd_randomized(M.cuda(), 32, seed=7, key="block.0")
    assert gpu.S.is_cuda
    assert_same_svd(cpu, gpu, s_rtol=1e-4, v_atol=1e-3, k=24)
    approx = (gpu.U.cpu().double() * gpu.S.cpu().double()) @ gpu.Vh.cpu().double()
    optimal = float(torch.sqrt((sigma[32:] ** 2).sum()))
    assert float(torch.linalg.norm(M.double() - approx)) / optimal <= 1.005
    again = svd_randomized(M.cuda(), 32, seed=7, key="block.0")
    torch.testing.assert_close(again.S, gpu.S, rtol=1e-6, atol=0)


def test_factored_cpu_cuda_agree():
    gen = torch.Generator().manual_seed(3)
    B = torch.randn(3072, 64, generator=gen) / 8
    A = torch.randn(64, 12288, generator=gen) / 8
    cpu = svd_factored(B, A)
    gpu = svd_factored(B.cuda(), A.cuda())
    assert gpu.U.is_cuda and gpu.S.shape == (64,)
    assert_same_svd(cpu, gpu, s_rtol=1e-5, v_atol=1e-4)
    assert gpu.total_energy == pytest.approx(cpu.total_energy, rel=1e-6)
    assert gpu.total_nuclear == pytest.approx(cpu.total_nuclear, rel=1e-6)
    # The 64 x 64 core is small: decomposed on the CPU unless a driver is named.
    assert gpu.driver.endswith("small-on-cpu")
    named = svd_factored(B.cuda(), A.cuda(), driver="gesvd")
    assert named.driver == "cusolver-gesvd"
    assert_same_svd(named, gpu, s_rtol=1e-5, v_atol=1e-4)


def test_batched_on_cuda_equals_per_matrix():
    sigma = torch.linspace(5.0, 0.5, 96)
    mats = [spectrum_matrix(160, 96, sigma * (1 + i), seed=10 + i) for i in range(5)]
    out = svd_batched([M.cuda() for M in mats])
    assert len(out) == 5
    for M, res in zip(mats, out):
        assert res.U.is_cuda and res.driver.startswith("cusolver")
        assert_same_svd(res, svd_exact(M), s_rtol=1e-5, v_atol=1e-4)


def test_clamp_quantile_cuda_matches_cpu_beyond_2_pow_24():
    gen = torch.Generator().manual_seed(5)
    up = torch.randn(1024, 256, generator=gen) * 0.1
    down = torch.randn(256, 65536, generator=gen) * 0.01
    x = torch.cat([up.flatten(), down.flatten()])
    assert float(order_statistic_quantile(x.cuda(), 0.99)) == pytest.approx(float(order_statistic_quantile(x, 0.99)), rel=1e-6)
    up_c, down_c = clamp_quantile(up, down, 0.99, split="up")
    up_g, down_g = clamp_quantile(up.cuda(), down.cuda(), 0.99, split="up")
    h_c = float(torch.cat([up_c.flatten(), down_c.flatten()]).max())
    h_g = float(torch.cat([up_g.flatten(), down_g.flatten()]).max())
    assert h_g == pytest.approx(h_c, rel=1e-4)
    # Compare the clamped products on a random probe (the full 1024 x 65536 product is not needed).
    probe = torch.randn(65536, 8, generator=gen)
    ref = up_c.double() @ (down_c.double() @ probe.double())
    got = (up_g.double() @ (down_g.double() @ probe.cuda().double())).cpu()
    assert float(torch.linalg.norm(got - ref)) <= 1e-3 * float(torch.linalg.norm(ref))


def test_svd_for_rank_on_cuda():
    sigma = torch.cat([torch.tensor([8.0, 6.0, 4.0, 2.0, 1.0]), torch.full((395,), 1e-3)])
    M = spectrum_matrix(600, 400, sigma, seed=6).cuda()
    res, r = svd_for_rank(M, "sv_ratio", 10, max_rank=32, seed=1, key="k")
    assert res.method == "randomized" and res.U.is_cuda and r == 5
    res, r = svd_for_rank(M, "sv_cumulative", 0.5, max_rank=32)
    assert res.method == "exact" and r == 2
