"""Property tests for lorasurgery.delta: multiplier algebra, exact concatenation, tensors() round trip.

References are float64 sums/einsums computed here from the stored tensors.
"""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorasurgery.delta import (
    Delta,
    Full,
    GLoRA,
    IA3,
    LoHa,
    LoKr,
    LowRank,
    Norm,
    concat_lowrank,
    parse_module,
)

SETTINGS = settings(max_examples=30, deadline=None)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
multipliers = st.floats(min_value=-3.0, max_value=3.0, allow_nan=False).filter(lambda x: abs(x) > 1e-3)
factors = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False)
# alpha never equal to the rank by construction below (a non-integer offset), or absent
alphas = st.one_of(st.none(), st.floats(min_value=0.05, max_value=64.0).map(lambda a: a + 0.37))

# target geometries: (out, in, kernel)
geometries = st.sampled_from([(6, 5, ()), (4, 3, (1, 1)), (5, 2, (3, 3)), (3, 4, (3, 1))])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _shape(geom) -> tuple[int, ...]:
    out, inn, k = geom
    return (out, inn, *k)


@st.composite
def lowranks(draw, geom=None, allow_tucker: bool = True) -> tuple[LowRank, tuple[int, ...]]:
    """A random LoRA/LoCon/Tucker delta for ``geom`` with a signed multiplier."""
    geom = geom if geom is not None else draw(geometries)
    out, inn, k = geom
    g = _gen(draw(seeds))
    r = draw(st.integers(min_value=1, max_value=4))
    alpha = draw(alphas)
    mult = draw(multipliers)
    tucker = allow_tucker and len(k) == 2 and not all(x == 1 for x in k) and draw(st.booleans())
    if tucker:
        d = LowRank(up=_rn(g, out, r, 1, 1), mid=_rn(g, r, r, *k), down=_rn(g, r, inn, 1, 1), alpha=alpha, multiplier=mult)
    elif k:
        d = LowRank(up=_rn(g, out, r, 1, 1), down=_rn(g, r, inn, *k), alpha=alpha, multiplier=mult)
    else:
        d = LowRank(up=_rn(g, out, r), down=_rn(g, r, inn), alpha=alpha, multiplier=mult)
    return d, _shape(geom)


def ref_lowrank(d: LowRank) -> torch.Tensor:
    """float64 m·s·ΔW from the stored tensors (direct einsum on the unflattened shapes)."""
    r = d.down.shape[0]
    s = 1.0 if d.alpha is None else d.alpha / r
    up = d.up.double().reshape(d.up.shape[0], -1)
    if d.mid is not None:
        w = torch.einsum("on,nphw,pi->oihw", up, d.mid.double(), d.down.double()[:, :, 0, 0])
    else:
        w = torch.einsum("on,n...->o...", up, d.down.double())
    return d.multiplier * s * w


@st.composite
def any_additive(draw) -> tuple[Delta, tuple[int, ...]]:
    """LoRA, LoHa, LoKr, Full or Norm deltas with a signed multiplier, and a fitting target shape."""
    kind = draw(st.sampled_from(["lora", "loha", "loha_tucker", "lokr", "lokr_tucker", "full", "norm"]))
    g = _gen(draw(seeds))
    mult = draw(multipliers)
    alpha = draw(alphas)
    r = draw(st.integers(min_value=1, max_value=3))
    if kind == "lora":
        return draw(lowranks())
    if kind == "loha":
        d = LoHa(w1a=_rn(g, 5, r), w1b=_rn(g, r, 2 * 9), w2a=_rn(g, 5, r + 1), w2b=_rn(g, r + 1, 2 * 9),
                 alpha=alpha, multiplier=mult)
        return d, (5, 2, 3, 3)
    if kind == "loha_tucker":
        d = LoHa(t1=_rn(g, r, r, 3, 3), w1a=_rn(g, r, 4), w1b=_rn(g, r, 3), t2=_rn(g, r, r, 3, 3), w2a=_rn(g, r, 4),
                 w2b=_rn(g, r, 3), alpha=alpha, multiplier=mult)
        return d, (4, 3, 3, 3)
    if kind == "lokr":
        full1 = draw(st.booleans())
        w1 = dict(w1=_rn(g, 2, 3)) if full1 else dict(w1a=_rn(g, 2, r), w1b=_rn(g, r, 3))
        full2 = draw(st.booleans())
        w2 = dict(w2=_rn(g, 3, 2)) if full2 else dict(w2a=_rn(g, 3, r), w2b=_rn(g, r, 2))
        return LoKr(**w1, **w2, alpha=alpha, multiplier=mult), (6, 6)
    if kind == "lokr_tucker":
        d = LoKr(w1=_rn(g, 2, 2), t2=_rn(g, r, r, 3, 3), w2a=_rn(g, r, 3), w2b=_rn(g, r, 2), alpha=alpha, multiplier=mult)
        return d, (6, 4, 3, 3)
    if kind == "full":
        return Full(diff=_rn(g, 4, 3, 3, 3), diff_b=_rn(g, 4), multiplier=mult), (4, 3, 3, 3)
    return Norm(w_norm=_rn(g, 7), b_norm=_rn(g, 7), multiplier=mult), (7,)


# ------------------------------------------------------------------------------------------------


@SETTINGS
@given(any_additive(), factors, factors)
def test_scaled_composes(ds, a, b):
    d, shape = ds
    x = d.scaled(a).scaled(b)
    y = d.scaled(a * b)
    assert math.isclose(x.multiplier, y.multiplier, rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(x.dense(shape), y.dense(shape), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(any_additive(), factors)
def test_dense_linear_in_multiplier(ds, c):
    d, shape = ds
    base = d.dense(shape).double()
    got = d.scaled(c).dense(shape).double()
    tol = 1e-5 * max(1.0, float(base.abs().max()) * abs(c))
    assert float((got - c * base).abs().max()) <= tol
    bias = d.dense_bias()
    if bias is not None:
        torch.testing.assert_close(d.scaled(c).dense_bias(), bias * c, rtol=1e-5, atol=1e-6)


@SETTINGS
@given(any_additive())
def test_tensors_round_trip(ds):
    d, shape = ds
    t = d.tensors()
    back = parse_module("m", t)
    assert back.algo == d.algo and back.multiplier == 1.0 and back.rank == d.rank
    ref = d.dense(shape).double()
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((back.dense(shape).double() - ref).abs().max()) <= tol
    if d.dense_bias() is not None:
        torch.testing.assert_close(back.dense_bias(), d.dense_bias(), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(lowranks())
def test_factors_product_equals_dense_and_reference(ds):
    d, shape = ds
    B, A = d.factors()
    assert B.shape == (d.out_features, d.down.shape[0] if d.mid is None else d.up.shape[1])
    ref = ref_lowrank(d)
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float(((B @ A).reshape(shape).double() - ref).abs().max()) <= tol
    assert float((d.dense(shape).double() - ref).abs().max()) <= tol


@st.composite
def lowrank_groups(draw):
    geom = draw(geometries)
    n = draw(st.integers(min_value=1, max_value=4))
    items = [draw(lowranks(geom=geom)) for _ in range(n)]
    return [d for d, _ in items], _shape(geom)


@SETTINGS
@given(lowrank_groups())
def test_concat_equals_sum(group):
    deltas, shape = group
    c = concat_lowrank(deltas)
    assert c.rank == sum(d.down.shape[0] if d.mid is None else d.up.shape[1] for d in deltas)
    assert c.alpha == float(c.rank) and c.scale == 1.0
    ref = sum(ref_lowrank(d) for d in deltas)
    got = c.dense(shape).double()
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= tol
    # the result is itself a writable LoRA that round-trips through parse_module
    back = parse_module("m", c.tensors())
    assert float((back.dense(shape).double() - ref).abs().max()) <= tol


@SETTINGS
@given(lowrank_groups(), st.integers(min_value=0, max_value=3))
def test_concat_leaves_out_zero_weights(group, zero_idx):
    deltas, shape = group
    zero_idx %= len(deltas)
    deltas = list(deltas)
    deltas[zero_idx] = deltas[zero_idx].scaled(0.0)
    if len(deltas) == 1:
        return
    c = concat_lowrank(deltas)
    kept = [d for i, d in enumerate(deltas) if i != zero_idx]
    assert c.rank == sum(d.down.shape[0] if d.mid is None else d.up.shape[1] for d in kept)
    ref = sum(ref_lowrank(d) for d in kept)
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert float((c.dense(shape).double() - ref).abs().max()) <= tol


@SETTINGS
@given(seeds, multipliers, st.booleans())
def test_w_dependent_apply_is_a1111_interpolation(seed, m, on_input):
    """For W-dependent deltas, apply at m equals W + m·(apply at 1 − W); IA3/GLoRA fold exactly."""
    g = _gen(seed)
    W = _rn(g, 6, 4)
    cases: list[Delta] = [
        IA3(weight=_rn(g, 4 if on_input else 6), on_input=torch.tensor(int(on_input))),
        GLoRA(a1=_rn(g, 4, 2), a2=_rn(g, 2, 4), b1=_rn(g, 6, 2), b2=_rn(g, 2, 4), alpha=1.3),
        LowRank(up=_rn(g, 6, 2), down=_rn(g, 2, 4), alpha=0.7, dora_scale=_rn(g, 6, 1).abs() + 0.5),
    ]
    for d in cases:
        full = d.apply(W).double()
        got = d.scaled(m).apply(W).double()
        ref = W.double() + m * (full - W.double())
        tol = 1e-5 * max(1.0, float(ref.abs().max()))
        assert float((got - ref).abs().max()) <= tol, d
        if d.algo in ("ia3", "glora"):
            back = parse_module("m", d.scaled(m).tensors())
            assert float((back.apply(W).double() - ref).abs().max()) <= tol, d
