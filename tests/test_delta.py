"""Delta types against independent float64 references (math.md §1, LyCORIS / ComfyUI formulas).

The references below are written from the formulas, with explicit loops or direct einsums on the stored
(unflattened) shapes, never by calling into lorasurgery.delta. Alphas always differ from the ranks, so an
alpha/rank applied twice (pitfalls.md, LyCORIS row) cannot pass.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lorasurgery.delta import (
    BOFT,
    DORA_EPS,
    GLoRA,
    IA3,
    MODULE_SUFFIXES,
    OFT,
    Full,
    LoHa,
    LoKr,
    LowRank,
    Norm,
    classify_shapes,
    concat_lowrank,
    parse_module,
)
from lorasurgery.errors import InputError, PlanError

G = torch.Generator().manual_seed(1234)


def rn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=G).to(dtype)


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Elementwise check scaled by the reference's magnitude (float32 result vs float64 reference)."""
    assert tuple(actual.shape) == tuple(expected.shape), (actual.shape, expected.shape)
    assert actual.dtype == torch.float32
    e = f64(expected)
    tol = rtol * max(1.0, float(e.abs().max()))
    err = float((f64(actual) - e).abs().max()) if e.numel() else 0.0
    assert err <= tol, f"max abs error {err} > {tol}"


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------


def ref_lora_linear(up, down, alpha):
    s = alpha / down.shape[0]
    out, r = up.shape
    _, inn = down.shape
    u, d = f64(up), f64(down)
    res = torch.zeros(out, inn, dtype=torch.float64)
    for o in range(out):
        for i in range(inn):
            res[o, i] = sum(u[o, n] * d[n, i] for n in range(r))
    return s * res


def ref_locon(up4, down4, alpha):
    """up (out, r, 1, 1), down (r, in, kh, kw): ΔW[o,i,h,w] = s Σ_n up[o,n] down[n,i,h,w]."""
    s = alpha / down4.shape[0]
    return s * torch.einsum("on,nihw->oihw", f64(up4)[:, :, 0, 0], f64(down4))


def ref_tucker(up4, mid, down4, alpha):
    s = alpha / down4.shape[0]
    return s * torch.einsum("on,nphw,pi->oihw", f64(up4)[:, :, 0, 0], f64(mid), f64(down4)[:, :, 0, 0])


def ref_loha(w1a, w1b, w2a, w2b, alpha, shape):
    s = alpha / w1b.shape[0]
    p1 = (f64(w1a) @ f64(w1b).reshape(w1b.shape[0], -1)).reshape(shape)
    p2 = (f64(w2a) @ f64(w2b).reshape(w2b.shape[0], -1)).reshape(shape)
    return s * p1 * p2


def ref_loha_tucker(t1, w1a, w1b, t2, w2a, w2b, alpha):
    s = alpha / w1b.shape[0]
    T1 = torch.einsum("ijhw,io,jc->ochw", f64(t1), f64(w1a), f64(w1b))
    T2 = torch.einsum("ijhw,io,jc->ochw", f64(t2), f64(w2a), f64(w2b))
    return s * T1 * T2


def ref_kron4(W1, W2, s):
    """W1 (a, c), W2 (b, d[, kh, kw]): out[i1*b+i2, j1*d+j2, ...] = s W1[i1,j1] W2[i2,j2,...] by loops."""
    W1, W2 = f64(W1), f64(W2)
    a, c = W1.shape
    b, d = W2.shape[:2]
    res = torch.zeros(a * b, c * d, *W2.shape[2:], dtype=torch.float64)
    for i1, j1 in itertools.product(range(a), range(c)):
        res[i1 * b:(i1 + 1) * b, j1 * d:(j1 + 1) * d] = s * W1[i1, j1] * W2
    return res


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """Per output row, sqrt of the sum of squares over every other axis (explicit loop)."""
    return torch.stack([torch.sqrt((v[o] ** 2).sum()) for o in range(v.shape[0])])


def col_norms(v: torch.Tensor) -> torch.Tensor:
    """Per input channel, over output rows and kernel axes."""
    return torch.stack([torch.sqrt((v[:, i] ** 2).sum()) for i in range(v.shape[1])])


def ref_dora(W, dW, dora_scale, m):
    W, dW = f64(W), f64(dW)
    V = W + dW
    d = f64(dora_scale).reshape(-1)
    if dora_scale.shape[0] == W.shape[0] and dora_scale.numel() == W.shape[0]:
        n = row_norms(V) + DORA_EPS
        W2 = V * (d / n).reshape(-1, *([1] * (W.dim() - 1)))
    else:
        n = col_norms(V) + DORA_EPS
        W2 = V * (d / n).reshape(1, -1, *([1] * (W.dim() - 2)))
    return W + m * (W2 - W)


def ref_cayley(X: np.ndarray, constraint: float) -> np.ndarray:
    Q = X - np.swapaxes(X, -1, -2)
    if constraint > 0:
        qn = np.sqrt((Q ** 2).sum()) + 1e-8
        if qn > constraint:
            Q = Q * constraint / qn
    eye = np.eye(X.shape[-1])
    return np.einsum("...ij,...jk->...ik", eye + Q, np.linalg.inv(eye - Q))


def ref_oft(W, blocks, alpha, rescale, m):
    Wn = f64(W).numpy()
    out = Wn.shape[0]
    n, bs, _ = blocks.shape
    R = ref_cayley(f64(blocks).numpy(), (alpha or 0) * out)
    W2 = np.zeros_like(Wn)
    for k in range(n):
        for mm in range(bs):
            for nn in range(bs):
                W2[k * bs + mm] += R[k, nn, mm] * Wn[k * bs + nn]
    if rescale is not None:
        W2 = W2 * f64(rescale).numpy().reshape(out, *([1] * (Wn.ndim - 1)))
    return torch.from_numpy(Wn + m * (W2 - Wn))


def ref_boft(W, blocks, alpha, rescale, m):
    Wn = f64(W).numpy()
    out = Wn.shape[0]
    M, n, b, _ = blocks.shape
    R = ref_cayley(f64(blocks).numpy(), (alpha or 0) * out)
    total = np.eye(out)
    for i in range(M):
        k = 2 ** i * (b // 2)
        # permutation: row r = c*2k + g*k + j goes to position p = c*2k + j*2 + g
        P = np.zeros((out, out))
        for c in range(out // (2 * k)):
            for g in range(2):
                for j in range(k):
                    P[c * 2 * k + j * 2 + g, c * 2 * k + g * k + j] = 1.0
        BD = np.zeros((out, out))
        for blk in range(n):
            BD[blk * b:(blk + 1) * b, blk * b:(blk + 1) * b] = R[i, blk]
        total = P.T @ BD @ P @ total
    W2 = np.einsum("or,r...->o...", total, Wn)
    if rescale is not None:
        W2 = W2 * f64(rescale).numpy().reshape(out, *([1] * (Wn.ndim - 1)))
    return torch.from_numpy(Wn + m * (W2 - Wn))


# ------------------------------------------------------------------------------------------------
# LoRA / LoCon / Tucker
# ------------------------------------------------------------------------------------------------


def test_lora_linear_dense_scale_once():
    up, down = rn(6, 3), rn(3, 5)
    d = parse_module("m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0)})
    assert isinstance(d, LowRank) and d.algo == "lora" and d.rank == 3 and not d.needs_base
    assert d.scale == pytest.approx(1 / 3)
    close(d.dense((6, 5)), ref_lora_linear(up, down, 1.0))
    close(d.scaled(-0.7).dense((6, 5)), -0.7 * ref_lora_linear(up, down, 1.0))


def test_lora_fp16_and_bf16_inputs_upcast():
    up, down = rn(4, 2, dtype=torch.float16), rn(2, 7, dtype=torch.bfloat16)
    d = parse_module("m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(3, dtype=torch.int64)})
    assert d.alpha == 3.0
    close(d.dense((4, 7)), ref_lora_linear(up, down, 3.0))


def test_locon_conv3x3():
    up, down = rn(8, 4, 1, 1), rn(4, 3, 3, 3)
    d = parse_module("c", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(2.5)})
    assert d.in_features == 27 and d.kernel == (3, 3)
    close(d.dense((8, 3, 3, 3)), ref_locon(up, down, 2.5))


def test_locon_tucker():
    up, mid, down = rn(7, 3, 1, 1), rn(3, 3, 3, 3), rn(3, 5, 1, 1)
    d = parse_module("t", {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": torch.tensor(5.0)})
    assert d.rank == 3 and d.in_features == 45
    close(d.dense((7, 5, 3, 3)), ref_tucker(up, mid, down, 5.0))
    B, A = d.factors()
    assert B.shape == (7, 3) and A.shape == (3, 45)
    close((B @ A).reshape(7, 5, 3, 3), ref_tucker(up, mid, down, 5.0))


def test_1x1_squeeze_and_unsqueeze():
    up, down = rn(6, 2), rn(2, 4)
    lin = LowRank(up=up, down=down, alpha=0.5)
    ref = ref_lora_linear(up, down, 0.5)
    close(lin.dense((6, 4, 1, 1)), ref.reshape(6, 4, 1, 1))
    conv = LowRank(up=up.reshape(6, 2, 1, 1), down=down.reshape(2, 4, 1, 1), alpha=0.5)
    close(conv.dense((6, 4)), ref)
    close(conv.dense((6, 4, 1, 1)), ref.reshape(6, 4, 1, 1))


def test_shape_mismatch_is_plan_error():
    d = LowRank(up=rn(8, 2, 1, 1), down=rn(2, 3, 3, 3), alpha=1.0, name="lora_unet_x", source="a.safetensors")
    close(d.dense((8, 27)), ref_locon(d.up, d.down, 1.0).reshape(8, 27))  # flattened matrix form
    with pytest.raises(PlanError, match="lora_unet_x"):
        d.dense((8, 27, 1, 1))  # 3x3 kernel onto a 1x1 conv target
    with pytest.raises(PlanError):
        d.dense((8, 3, 9))
    with pytest.raises(PlanError, match="a.safetensors"):
        d.dense((9, 3, 3, 3))
    with pytest.raises(PlanError):
        d.apply(torch.zeros(8, 3, 1, 1))


def test_alpha_rules():
    up, down = rn(3, 2), rn(2, 3)
    assert LowRank(up=up, down=down).scale == 1.0  # absent alpha: scale 1
    assert LowRank(up=up, down=down, alpha=0.0).scale == 0.0  # alpha 0: as ComfyUI/A1111 load it
    # a scale tensor wins over alpha/rank (formats.md §1 rule 3)
    d = parse_module("m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(8.0),
                           "scale": torch.tensor(0.25)})
    assert d.scale == 0.25
    close(d.dense((3, 3)), 0.25 * f64(up) @ f64(down))


def test_factors_and_apply_additive():
    up, down = rn(5, 3, 1, 1), rn(3, 2, 3, 3)
    d = LowRank(up=up, down=down, alpha=1.5, multiplier=-0.4)
    B, A = d.factors()
    close((B @ A).reshape(5, 2, 3, 3), -0.4 * ref_locon(up, down, 1.5))
    W = rn(5, 2, 3, 3, dtype=torch.float16)
    close(d.apply(W), f64(W) - 0.4 * ref_locon(up, down, 1.5))


def test_dora_output_axis_linear_and_multiplier():
    up, down, W = rn(6, 2), rn(2, 5), rn(6, 5)
    ds = (row_norms(f64(W)) * 1.3).float().reshape(6, 1)
    d = parse_module("m", {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(1.0), "dora_scale": ds})
    assert d.needs_base
    dW = ref_lora_linear(up, down, 1.0)
    close(d.apply(W), ref_dora(W, dW, ds, 1.0))
    close(d.scaled(0.6).apply(W), ref_dora(W, dW, ds, 0.6))
    close(d.scaled(0.0).apply(W), f64(W))  # A1111 form: m = 0 gives W back
    with pytest.raises(PlanError, match="base"):
        d.dense((6, 5))
    with pytest.raises(PlanError):
        d.factors()


def test_dora_input_axis_conv():
    up, down, W = rn(4, 2, 1, 1), rn(2, 3, 3, 3), rn(4, 3, 3, 3)
    ds = rn(1, 3, 1, 1).abs() + 0.5
    d = LowRank(up=up, down=down, alpha=3.0, dora_scale=ds, multiplier=0.8)
    close(d.apply(W), ref_dora(W, ref_locon(up, down, 3.0), ds, 0.8))


def test_dora_output_axis_conv():
    up, down, W = rn(4, 2, 1, 1), rn(2, 3, 3, 3), rn(4, 3, 3, 3)
    ds = rn(4, 1, 1, 1).abs() + 0.5
    d = LowRank(up=up, down=down, alpha=3.0, dora_scale=ds, multiplier=1.0)
    close(d.apply(W), ref_dora(W, ref_locon(up, down, 3.0), ds, 1.0))


def test_dora_bad_shape():
    with pytest.raises(InputError, match="dora_scale"):
        parse_module("m", {"lora_up.weight": rn(6, 2), "lora_down.weight": rn(2, 5), "dora_scale": rn(3, 1)})


# ------------------------------------------------------------------------------------------------
# LoHa
# ------------------------------------------------------------------------------------------------


def test_loha_linear_scale_once():
    w1a, w1b, w2a, w2b = rn(6, 4), rn(4, 5), rn(6, 4), rn(4, 5)
    d = parse_module("h", {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert isinstance(d, LoHa) and d.rank == 4 and d.scale == 0.25
    close(d.dense((6, 5)), ref_loha(w1a, w1b, w2a, w2b, 1.0, (6, 5)))


def test_loha_conv_flattened_and_4d():
    w1a, w1b, w2a, w2b = rn(6, 2), rn(2, 3 * 9), rn(6, 3), rn(3, 3 * 9)  # different ranks per pair
    d = LoHa(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=0.5)
    assert d.kernel is None and d.in_features == 27
    close(d.dense((6, 3, 3, 3)), ref_loha(w1a, w1b, w2a, w2b, 0.5, (6, 3, 3, 3)))
    d4 = LoHa(w1a=w1a, w1b=w1b.reshape(2, 3, 3, 3), w2a=w2a, w2b=w2b.reshape(3, 3, 3, 3), alpha=0.5)
    assert d4.kernel == (3, 3)
    close(d4.dense((6, 3, 3, 3)), ref_loha(w1a, w1b, w2a, w2b, 0.5, (6, 3, 3, 3)))
    close(d4.dense((6, 27)), ref_loha(w1a, w1b, w2a, w2b, 0.5, (6, 27)))
    with pytest.raises(PlanError):
        d4.dense((6, 3, 9, 1))


def test_loha_tucker():
    r = 3
    t1, w1a, w1b = rn(r, r, 3, 3), rn(r, 5), rn(r, 4)
    t2, w2a, w2b = rn(r, r, 3, 3), rn(r, 5), rn(r, 4)
    d = parse_module("h", {"hada_t1": t1, "hada_w1_a": w1a, "hada_w1_b": w1b, "hada_t2": t2, "hada_w2_a": w2a,
                           "hada_w2_b": w2b, "alpha": torch.tensor(2.0)})
    assert d.out_features == 5 and d.in_features == 36 and d.kernel == (3, 3)
    close(d.dense((5, 4, 3, 3)), ref_loha_tucker(t1, w1a, w1b, t2, w2a, w2b, 2.0))


def test_loha_dora():
    w1a, w1b, w2a, w2b, W = rn(5, 2), rn(2, 4), rn(5, 2), rn(2, 4), rn(5, 4)
    ds = rn(5, 1).abs() + 1
    d = LoHa(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=3.0, dora_scale=ds, multiplier=0.5)
    close(d.apply(W), ref_dora(W, ref_loha(w1a, w1b, w2a, w2b, 3.0, (5, 4)), ds, 0.5))


# ------------------------------------------------------------------------------------------------
# LoKr
# ------------------------------------------------------------------------------------------------


def test_lokr_full_full_ignores_alpha():
    w1, w2 = rn(2, 3), rn(4, 5)
    d = parse_module("k", {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})
    assert isinstance(d, LoKr) and d.rank is None and d.scale == 1.0
    close(d.dense((8, 15)), ref_kron4(w1, w2, 1.0))


def test_lokr_factored_w2_rank_from_w2b():
    w1, w2a, w2b = rn(2, 3), rn(4, 2), rn(2, 5)
    d = parse_module("k", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert d.rank == 2 and d.scale == 0.5
    close(d.dense((8, 15)), ref_kron4(w1, f64(w2a) @ f64(w2b), 0.5))


def test_lokr_both_factored_rank_from_w2b():
    w1a, w1b, w2a, w2b = rn(2, 4), rn(4, 3), rn(4, 2), rn(2, 5)
    d = LoKr(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, alpha=3.0)
    assert d.rank == 2
    close(d.dense((8, 15)), ref_kron4(f64(w1a) @ f64(w1b), f64(w2a) @ f64(w2b), 1.5))


def test_lokr_w1_factored_w2_full_rank_from_w1b():
    w1a, w1b, w2 = rn(2, 3), rn(3, 3), rn(4, 5)
    d = LoKr(w1a=w1a, w1b=w1b, w2=w2, alpha=0.75)
    assert d.rank == 3
    close(d.dense((8, 15)), ref_kron4(f64(w1a) @ f64(w1b), w2, 0.25))


def test_lokr_conv_full_w2():
    w1, w2 = rn(2, 3), rn(4, 2, 3, 3)
    d = LoKr(w1=w1, w2=w2, alpha=5.0)
    close(d.dense((8, 6, 3, 3)), ref_kron4(w1, w2, 1.0))


def test_lokr_conv_flattened_w2b():
    w1, w2a, w2b = rn(2, 3), rn(4, 2), rn(2, 2 * 9)
    d = parse_module("k", {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    assert d.kernel is None and d.in_features == 54
    W2 = (f64(w2a) @ f64(w2b)).reshape(4, 2, 3, 3)
    close(d.dense((8, 6, 3, 3)), ref_kron4(w1, W2, 0.5))


def test_lokr_conv_tucker():
    w1, t2, w2a, w2b = rn(2, 3), rn(2, 2, 3, 3), rn(2, 4), rn(2, 5)
    d = parse_module("k", {"lokr_w1": w1, "lokr_t2": t2, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(3.0)})
    W2 = torch.einsum("ijhw,ip,jq->pqhw", f64(t2), f64(w2a), f64(w2b))
    assert d.kernel == (3, 3) and d.out_features == 8 and d.in_features == 135
    close(d.dense((8, 15, 3, 3)), ref_kron4(w1, W2, 1.5))


def test_lokr_dora():
    w1, w2a, w2b, W = rn(2, 2), rn(3, 2), rn(2, 3), rn(6, 6)
    ds = rn(1, 6).abs() + 1
    d = LoKr(w1=w1, w2a=w2a, w2b=w2b, alpha=1.0, dora_scale=ds, multiplier=-0.3)
    close(d.apply(W), ref_dora(W, ref_kron4(w1, f64(w2a) @ f64(w2b), 0.5), ds, -0.3))


# ------------------------------------------------------------------------------------------------
# Full, Norm, IA3
# ------------------------------------------------------------------------------------------------


def test_full_and_bias():
    diff, diff_b = rn(4, 3, 3, 3, dtype=torch.float16), rn(4)
    d = parse_module("f", {"diff": diff, "diff_b": diff_b})
    assert isinstance(d, Full) and d.rank is None
    close(d.scaled(0.5).dense((4, 3, 3, 3)), 0.5 * f64(diff))
    close(d.scaled(0.5).dense_bias(), 0.5 * f64(diff_b))
    W = rn(4, 3, 3, 3)
    close(d.apply(W), f64(W) + f64(diff))
    b_only = parse_module("f", {"diff_b": diff_b})
    assert torch.equal(b_only.dense((4, 9)), torch.zeros(4, 9))
    close(b_only.dense_bias(), f64(diff_b))


def test_norm():
    w, b = rn(8), rn(8)
    d = parse_module("n", {"w_norm": w, "b_norm": b}).scaled(2.0)
    assert isinstance(d, Norm)
    close(d.dense((8,)), 2 * f64(w))
    close(d.dense_bias(), 2 * f64(b))
    with pytest.raises(PlanError):
        d.dense((4,))
    with pytest.raises(InputError, match="w_norm"):
        parse_module("n", {"b_norm": b})


@pytest.mark.parametrize("on_input", [0, 1])
def test_ia3_linear(on_input):
    W = rn(5, 4)
    v = rn(4 if on_input else 5)
    d = parse_module("i", {"weight": v, "on_input": torch.tensor(on_input)}).scaled(0.7)
    assert isinstance(d, IA3) and d.needs_base
    ref = f64(W).clone()
    for o in range(5):
        for i in range(4):
            ref[o, i] = W[o, i] * (1 + 0.7 * float(v[i if on_input else o]))
    close(d.apply(W), ref)
    with pytest.raises(PlanError):
        d.dense((5, 4))
    # the multiplier folds exactly into v
    folded = parse_module("i", d.tensors())
    assert folded.multiplier == 1.0
    close(folded.apply(W), ref)


def test_ia3_conv_output_axis():
    W = rn(3, 2, 3, 3)
    v = rn(1, 3, 1, 1)
    d = IA3(weight=v, on_input=torch.tensor(0))
    ref = f64(W) * (1 + f64(v).reshape(3, 1, 1, 1))
    close(d.apply(W), ref)
    with pytest.raises(PlanError):
        d.apply(rn(4, 2, 3, 3))


# ------------------------------------------------------------------------------------------------
# GLoRA
# ------------------------------------------------------------------------------------------------


def test_glora_new_layout_linear():
    out, inn, r = 6, 4, 2
    a1, a2, b1, b2, W = rn(inn, r), rn(r, inn), rn(out, r), rn(r, inn), rn(out, inn)
    d = parse_module("g", {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "alpha": torch.tensor(1.0)})
    assert isinstance(d, GLoRA) and d.layouts == ("new",) and d.rank == 2
    s = 0.5
    dW = s * (f64(b1) @ f64(b2) + f64(W) @ f64(a1) @ f64(a2))
    close(d.apply(W), f64(W) + dW)
    close(d.scaled(-2.0).apply(W), f64(W) - 2 * dW)
    folded = parse_module("g", d.scaled(-2.0).tensors())
    close(folded.apply(W), f64(W) - 2 * dW)


def test_glora_old_layout_linear():
    out, inn, r = 6, 4, 3
    a1, a2, b1, b2, W = rn(r, inn), rn(inn, r), rn(r, inn), rn(out, r), rn(out, inn)
    d = GLoRA(a1=a1, a2=a2, b1=b1, b2=b2, alpha=2.0)
    assert d.layouts == ("old",) and d.rank == 3
    dW = (2.0 / 3) * (f64(b2) @ f64(b1) + f64(W) @ f64(a2) @ f64(a1))
    close(d.apply(W), f64(W) + dW)


def test_glora_square_ambiguity_resolved_by_weight_shape():
    n, r = 4, 2
    # an old-layout file on a square n x n weight also looks like a new-layout module on an r x r weight
    a1, a2, b1, b2, W = rn(r, n), rn(n, r), rn(r, n), rn(n, r), rn(n, n)
    d = GLoRA(a1=a1, a2=a2, b1=b1, b2=b2, alpha=1.0)
    assert d.layouts == ("new", "old")
    dW = (1.0 / r) * (f64(b2) @ f64(b1) + f64(W) @ f64(a2) @ f64(a1))
    close(d.apply(W), f64(W) + dW)


def test_glora_new_layout_conv():
    out, inn, r = 5, 3, 2
    a1, a2, b1, b2 = rn(inn, r, 1, 1), rn(r, inn, 1, 1), rn(out, r, 1, 1), rn(r, inn, 3, 3)
    W = rn(out, inn, 3, 3)
    d = GLoRA(a1=a1, a2=a2, b1=b1, b2=b2, alpha=3.0)
    s = 1.5
    A = f64(a1)[:, :, 0, 0] @ f64(a2)[:, :, 0, 0]
    ref = torch.zeros(out, inn, 3, 3, dtype=torch.float64)
    for o, j, h, w in itertools.product(range(out), range(inn), range(3), range(3)):
        ref[o, j, h, w] = sum(W[o, i, h, w].double() * A[i, j] for i in range(inn))
    ref += torch.einsum("om,mihw->oihw", f64(b1)[:, :, 0, 0], f64(b2))
    close(d.apply(W), f64(W) + s * ref)


def test_glora_tucker_b():
    out, inn, r = 5, 3, 2
    a1, a2, b1, b2, bm = rn(inn, r, 1, 1), rn(r, inn, 1, 1), rn(out, r, 1, 1), rn(r, inn, 1, 1), rn(r, r, 3, 3)
    W = rn(out, inn, 3, 3)
    d = parse_module("g", {"a1.weight": a1, "a2.weight": a2, "b1.weight": b1, "b2.weight": b2, "bm.weight": bm,
                           "alpha": torch.tensor(1.0)})
    A = f64(a1)[:, :, 0, 0] @ f64(a2)[:, :, 0, 0]
    WA = torch.einsum("oihw,ij->ojhw", f64(W), A)
    B = torch.einsum("om,mnhw,ni->oihw", f64(b1)[:, :, 0, 0], f64(bm), f64(b2)[:, :, 0, 0])
    close(d.apply(W), f64(W) + 0.5 * (B + WA))


def test_glora_invalid_shapes():
    with pytest.raises(InputError, match="neither layout"):
        parse_module("g", {"a1.weight": rn(4, 2), "a2.weight": rn(3, 4), "b1.weight": rn(6, 2), "b2.weight": rn(2, 4)})


# ------------------------------------------------------------------------------------------------
# OFT / BOFT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 1e-3, 10.0])
@pytest.mark.parametrize("conv", [False, True])
def test_oft_against_reference(alpha, conv):
    n, bs = 3, 4
    blocks = rn(n, bs, bs) * 0.3
    W = rn(n * bs, 3, 3, 3) if conv else rn(n * bs, 5)
    tensors = {"oft_blocks": blocks}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha)
    d = parse_module("o", tensors)
    assert isinstance(d, OFT) and d.needs_base and d.out_features == 12
    close(d.apply(W), ref_oft(W, blocks, alpha, None, 1.0))
    close(d.scaled(0.4).apply(W), ref_oft(W, blocks, alpha, None, 0.4))


def test_oft_constraint_active_and_rescale():
    n, bs = 2, 3
    blocks = rn(n, bs, bs) * 5
    rescale = rn(n * bs, 1).abs() + 0.5
    W = rn(n * bs, 4)
    d = OFT(blocks=blocks, alpha=0.01, rescale=rescale)
    # constraint 0.01 * 6 is far below ||Q||, so the clamp is active
    assert d.constraint == pytest.approx(0.06)
    close(d.apply(W), ref_oft(W, blocks, 0.01, rescale, 1.0))
    close(d.scaled(-1.5).apply(W), ref_oft(W, blocks, 0.01, rescale, -1.5))


def test_oft_rotation_keeps_column_norms():
    d = OFT(blocks=rn(4, 2, 2))
    W = rn(8, 5)
    W2 = d.apply(W)
    torch.testing.assert_close(W2.norm(dim=0), W.norm(dim=0), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(W2, W)
    assert torch.allclose(OFT(blocks=torch.zeros(4, 2, 2)).apply(W), W)


@pytest.mark.parametrize("m_stages,n,b", [(1, 4, 2), (2, 4, 2), (3, 4, 2), (2, 2, 4), (3, 8, 2)])
def test_boft_against_reference(m_stages, n, b):
    blocks = rn(m_stages, n, b, b) * 0.4
    W = rn(n * b, 3)
    d = parse_module("b", {"oft_blocks": blocks, "alpha": torch.tensor(0.0)})
    assert isinstance(d, BOFT) and d.out_features == n * b
    close(d.apply(W), ref_boft(W, blocks, 0.0, None, 1.0))


def test_boft_conv_rescale_constraint_multiplier():
    blocks = rn(2, 2, 4, 4) * 3
    rescale = rn(8, 1, 1, 1).abs() + 0.5
    W = rn(8, 2, 3, 3)
    d = BOFT(blocks=blocks, alpha=0.02, rescale=rescale, multiplier=0.3)
    close(d.apply(W), ref_boft(W, blocks, 0.02, rescale, 0.3))


def test_boft_invalid_factorisation():
    with pytest.raises(InputError, match="butterfly"):
        parse_module("b", {"oft_blocks": rn(3, 2, 2, 2)})  # 2 blocks cannot take 3 stages
    with pytest.raises(InputError, match="butterfly"):
        parse_module("b", {"oft_blocks": rn(1, 2, 3, 3)})  # odd block size


def test_oft_multiplier_not_foldable():
    d = OFT(blocks=rn(2, 2, 2), alpha=1.0)
    assert set(d.tensors()) == {"oft_blocks", "alpha"}
    with pytest.raises(PlanError, match="folded"):
        d.scaled(0.5).tensors()
    with pytest.raises(PlanError):
        BOFT(blocks=rn(1, 2, 2, 2)).scaled(2).tensors()


# ------------------------------------------------------------------------------------------------
# tensors(), scaled(), to()
# ------------------------------------------------------------------------------------------------


def test_tensors_fold_into_one_factor_only():
    up, down, mid = rn(4, 2, 1, 1, dtype=torch.float16), rn(2, 3, 1, 1, dtype=torch.float16), rn(2, 2, 3, 3)
    d = LowRank(up=up, down=down, mid=mid, alpha=3.0)
    t1 = d.tensors()
    assert t1["lora_up.weight"] is up and t1["lora_down.weight"] is down and t1["lora_mid.weight"] is mid
    assert t1["alpha"].dtype == torch.float32 and t1["alpha"].ndim == 0 and float(t1["alpha"]) == 3.0
    t2 = d.scaled(-0.5).tensors()
    assert t2["lora_down.weight"] is down and t2["lora_mid.weight"] is mid
    assert t2["lora_up.weight"].dtype == torch.float16
    torch.testing.assert_close(t2["lora_up.weight"].float(), up.float() * -0.5)

    loha = LoHa(w1a=rn(4, 2), w1b=rn(2, 3), w2a=rn(4, 2), w2b=rn(2, 3), alpha=1.0, multiplier=3.0)
    t = loha.tensors()
    assert t["hada_w1_b"] is loha.w1b and t["hada_w2_a"] is loha.w2a and t["hada_w2_b"] is loha.w2b
    torch.testing.assert_close(t["hada_w1_a"], loha.w1a * 3)

    lokr = LoKr(w1a=rn(2, 1), w1b=rn(1, 2), w2=rn(2, 2), alpha=0.5, multiplier=2.0)
    t = lokr.tensors()
    assert t["lokr_w1_b"] is lokr.w1b and t["lokr_w2"] is lokr.w2
    torch.testing.assert_close(t["lokr_w1_a"], lokr.w1a * 2)


def test_dora_not_foldable():
    d = LowRank(up=rn(3, 1), down=rn(1, 3), dora_scale=rn(3, 1), alpha=2.0)
    assert "dora_scale" in d.tensors()
    with pytest.raises(PlanError, match="DoRA"):
        d.scaled(0.5).tensors()


def test_scaled_shares_tensors_and_to():
    d = LowRank(up=rn(3, 1), down=rn(1, 3), alpha=2.0, name="x")
    s = d.scaled(0.5).scaled(4.0)
    assert s.up is d.up and s.multiplier == 2.0 and s.name == "x"
    m = d.to("meta")
    assert isinstance(m, LowRank) and m.up.is_meta and m.alpha == 2.0 and d.up.device.type == "cpu"


# ------------------------------------------------------------------------------------------------
# parse_module errors, classify_shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors, needle, suffix",
    [
        ({"lora_up.weight": rn(4, 2), "lora_down.weight": rn(3, 5)}, "rank mismatch", "lora_up.weight"),
        ({"lora_up.weight": rn(4, 2), "alpha": torch.tensor(2.0)}, "lora_down.weight", "lora_down.weight"),
        ({"lora_down.weight": rn(2, 4)}, "lora_up.weight", "lora_up.weight"),
        ({"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "hada_w1_a": rn(4, 2)}, "lora", "hada_w1_a"),
        ({"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "lora_bias": rn(4)}, "unknown", "lora_bias"),
        ({"hada_w1_a": rn(4, 2), "hada_w1_b": rn(2, 3), "hada_w2_a": rn(4, 2)}, "hada_w2_b", "hada_w2_b"),
        ({"hada_w1_a": rn(4, 2), "hada_w1_b": rn(2, 3), "hada_w2_a": rn(4, 2), "hada_w2_b": rn(2, 3),
          "hada_t1": rn(2, 2, 3, 3)}, "Tucker", "hada_t2"),
        ({"hada_w1_a": rn(4, 2), "hada_w1_b": rn(2, 3), "hada_w2_a": rn(5, 2), "hada_w2_b": rn(2, 3)}, "inconsistent", "hada_w2_a"),
        ({"lokr_w1": rn(2, 2), "lokr_w1_a": rn(2, 1), "lokr_w2": rn(2, 2)}, "exclusive", "lokr_w1_a"),
        ({"lokr_w1": rn(2, 2)}, "W2", "lokr_w2_a"),
        ({"lokr_w1": rn(2, 2), "lokr_w2_a": rn(3, 2), "lokr_w2_b": rn(3, 4)}, "chain", "lokr_w2_b"),
        ({"oft_blocks": rn(4, 4)}, "3-D", "oft_blocks"),
        ({"oft_blocks": rn(2, 4, 4), "rescale": rn(5, 1)}, "rescale", "rescale"),
        ({"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "alpha": torch.ones(2)}, "one value", "alpha"),
        ({"alpha": torch.tensor(1.0)}, "no weight tensors", "alpha"),
        ({"weight": rn(4)}, "no weight tensors", "weight"),
        ({"diff": rn(4, 3), "diff_b": rn(5)}, "disagree", "diff_b"),
        ({"diff": rn(4, 3), "alpha": torch.tensor(1.0)}, "full", "alpha"),
        ({"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "alpha": torch.tensor(float("nan"))}, "finite", "alpha"),
    ],
)
def test_parse_errors_name_source_module_and_suffixes(tensors, needle, suffix):
    with pytest.raises(InputError) as exc:
        parse_module("lora_unet_mod", tensors, source="in.safetensors")
    msg = str(exc.value)
    assert "in.safetensors" in msg and "lora_unet_mod" in msg and suffix in msg, msg
    assert needle in msg, msg


def test_module_suffixes_cover_everything():
    expected = {
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "scale", "dora_scale", "hada_w1_a",
        "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b",
        "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff", "diff_b", "w_norm", "b_norm", "weight",
        "on_input", "oft_blocks", "rescale", "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight",
    }
    assert MODULE_SUFFIXES == expected


def _examples() -> list[dict[str, torch.Tensor]]:
    return [
        {"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "alpha": torch.tensor(1.0)},
        {"lora_up.weight": rn(4, 3, 1, 1), "lora_down.weight": rn(3, 2, 3, 3)},
        {"lora_up.weight": rn(4, 3, 1, 1), "lora_mid.weight": rn(3, 3, 3, 3), "lora_down.weight": rn(3, 2, 1, 1),
         "dora_scale": rn(4, 1, 1, 1)},
        {"hada_w1_a": rn(4, 2), "hada_w1_b": rn(2, 3), "hada_w2_a": rn(4, 2), "hada_w2_b": rn(2, 3), "alpha": torch.tensor(1.0)},
        {"hada_t1": rn(2, 2, 3, 3), "hada_w1_a": rn(2, 4), "hada_w1_b": rn(2, 3), "hada_t2": rn(2, 2, 3, 3),
         "hada_w2_a": rn(2, 4), "hada_w2_b": rn(2, 3)},
        {"weight": rn(4), "on_input": torch.tensor(0)},
        {"lokr_w1": rn(2, 2), "lokr_w2": rn(2, 3)},
        {"lokr_w1_a": rn(2, 1), "lokr_w1_b": rn(1, 2), "lokr_w2_a": rn(2, 3), "lokr_w2_b": rn(3, 3)},
        {"lokr_w1": rn(2, 2), "lokr_w1_a": None, "lokr_w2": rn(2, 3)},
        {"diff": rn(3, 3), "diff_b": rn(3)},
        {"w_norm": rn(3)},
        {"oft_blocks": rn(2, 2, 2), "alpha": torch.tensor(1.0)},
        {"oft_blocks": rn(2, 2, 2, 2), "rescale": rn(4, 1)},
        {"a1.weight": rn(3, 2), "a2.weight": rn(2, 3), "b1.weight": rn(5, 2), "b2.weight": rn(2, 3)},
        {"a1.weight": rn(2, 3), "a2.weight": rn(3, 2), "b1.weight": rn(2, 3), "b2.weight": rn(5, 2)},
    ]


@pytest.mark.parametrize("idx", range(15))
def test_classify_shapes_agrees_with_parse(idx):
    tensors = {k: v for k, v in _examples()[idx].items() if v is not None}
    d = parse_module("m", tensors)
    assert classify_shapes({k: tuple(v.shape) for k, v in tensors.items()}) == (d.algo, d.rank)


def test_classify_shapes_expected_values():
    assert classify_shapes({"lora_up.weight": (8, 4, 1, 1), "lora_down.weight": (4, 3, 3, 3), "alpha": ()}) == ("lora", 4)
    assert classify_shapes({"lokr_w1": (2, 2), "lokr_w2_a": (4, 3), "lokr_w2_b": (3, 4)}) == ("lokr", 3)
    assert classify_shapes({"lokr_w1": (2, 2), "lokr_w2": (4, 4)}) == ("lokr", None)
    assert classify_shapes({"oft_blocks": (3, 4, 8, 8)}) == ("boft", None)
    with pytest.raises(InputError, match="rank mismatch"):
        classify_shapes({"lora_up.weight": (8, 4), "lora_down.weight": (3, 5)})


def test_detection_order_first_hit():
    # "weight" is only (IA)^3 with on_input; next to LoRA tensors it is a leftover, not a second algorithm
    with pytest.raises(InputError, match="weight"):
        parse_module("m", {"lora_up.weight": rn(4, 2), "lora_down.weight": rn(2, 5), "weight": rn(4)})
    # LoHa before LoKr
    with pytest.raises(InputError, match="detected as loha"):
        parse_module("m", {"hada_w1_a": rn(4, 2), "hada_w1_b": rn(2, 3), "hada_w2_a": rn(4, 2),
                           "hada_w2_b": rn(2, 3), "lokr_w1": rn(2, 2)})


# ------------------------------------------------------------------------------------------------
# concat_lowrank
# ------------------------------------------------------------------------------------------------


def test_concat_exact_mixed_ranks_alphas_signs():
    a = LowRank(up=rn(6, 2), down=rn(2, 5), alpha=1.0, multiplier=0.8)
    b = LowRank(up=rn(6, 4), down=rn(4, 5), alpha=16.0, multiplier=-1.3)
    z = LowRank(up=rn(6, 3), down=rn(3, 5), alpha=2.0, multiplier=0.0)
    c = concat_lowrank([a, z, b])
    assert c.rank == 6 and c.alpha == 6.0 and c.scale == 1.0 and c.multiplier == 1.0
    ref = 0.8 * ref_lora_linear(a.up, a.down, 1.0) - 1.3 * ref_lora_linear(b.up, b.down, 16.0)
    close(c.dense((6, 5)), ref)


def test_concat_conv_and_tucker_fold():
    a = LowRank(up=rn(4, 2, 1, 1), down=rn(2, 3, 3, 3), alpha=3.0)
    t = LowRank(up=rn(4, 3, 1, 1), mid=rn(3, 3, 3, 3), down=rn(3, 3, 1, 1), alpha=1.0, multiplier=-0.5)
    c = concat_lowrank([a, t])
    assert c.up.shape == (4, 5, 1, 1) and c.down.shape == (5, 3, 3, 3) and c.mid is None
    ref = ref_locon(a.up, a.down, 3.0) - 0.5 * ref_tucker(t.up, t.mid, t.down, 1.0)
    close(c.dense((4, 3, 3, 3)), ref)


def test_concat_refusals():
    with pytest.raises(PlanError):
        concat_lowrank([])
    with pytest.raises(PlanError, match="weight 0"):
        concat_lowrank([LowRank(up=rn(2, 1), down=rn(1, 2), multiplier=0.0)])
    with pytest.raises(PlanError, match="base"):
        concat_lowrank([LowRank(up=rn(2, 1), down=rn(1, 2), dora_scale=rn(2, 1))])
    with pytest.raises(PlanError, match="different shapes"):
        concat_lowrank([LowRank(up=rn(2, 1), down=rn(1, 2)), LowRank(up=rn(3, 1), down=rn(1, 2))])
    with pytest.raises(PlanError, match="only LoRA"):
        concat_lowrank([Full(diff=rn(2, 2))])  # type: ignore[list-item]
