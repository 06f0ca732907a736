"""Delta types: the canonical in-memory form of one module's change.

A :class:`Delta` holds the tensors of **one** LoRA/LyCORIS module exactly as they were loaded (any dtype,
any device) plus a linear ``multiplier``. Every computation upcasts to float32 first (``math.md`` §10).

Algorithms (``Delta.algo``) and their formulas (``math.md`` §1; LyCORIS 3.x sources cited per class):

========  =====================================================  ==========
algo      class                                                  needs base
========  =====================================================  ==========
lora      :class:`LowRank` (LoRA, LoCon, Tucker LoCon, DyLoRA)   with DoRA
loha      :class:`LoHa` (plain and Tucker)                       with DoRA
lokr      :class:`LoKr` (full / factored W1, W2; Tucker W2)      with DoRA
full      :class:`Full` (``diff``, ``diff_b``)                   no
norm      :class:`Norm` (``w_norm``, ``b_norm``)                 no
ia3       :class:`IA3`                                           yes
glora     :class:`GLoRA` (both layouts)                          yes
oft       :class:`OFT` (Diag-OFT)                                yes
boft      :class:`BOFT` (butterfly OFT)                          yes
========  =====================================================  ==========

Multiplier semantics (``math.md`` §1, ``blocks.md``): for additive algorithms the applied weight is
``W + m·ΔW``; for algorithms that depend on the base weight it is the A1111 form ``W + m·(W'' − W)``, where
``W''`` is the weight the algorithm produces at full strength. (LyCORIS instead interpolates the DoRA
magnitude factor or the OFT rotation; the two agree at m = 1 only.)

Scale rules (``formats.md`` §1): scale = ``alpha / r`` per module with r the algorithm's rank dimension; a
``scale`` tensor wins over alpha; absent alpha means scale 1. **alpha = 0 means scale 0**, as every
inference loader computes it (ComfyUI and A1111/Forge divide the stored alpha by the rank; ``pitfalls.md``:
"alpha 0 read as loaders do (no effect)"). Trainers (kohya ``networks/lora.py``, LyCORIS module
constructors) replace a 0 or missing alpha by the rank *before* saving, so they never write 0; a stored 0
comes from third-party converters and loads as a no-op. Callers may warn when :attr:`LowRank.alpha` is 0.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Mapping, Sequence

import torch

from .errors import InputError, PlanError

Shape = tuple[int, ...]

_F32 = torch.float32
#: Added to every DoRA norm, as LyCORIS ``apply_weight_decompose`` and ComfyUI ``weight_decompose`` do
#: (``torch.finfo(float32).eps``; the norm is computed in float32 here).
DORA_EPS: float = float(torch.finfo(torch.float32).eps)
#: Added to ‖Q‖_F before the OFT/BOFT norm clamp (LyCORIS ``get_r``: ``torch.norm(q) + 1e-8``).
OFT_NORM_EPS: float = 1e-8

# --------------------------------------------------------------------------------------------------
# suffixes
# --------------------------------------------------------------------------------------------------

_LORA_KEYS = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})
_LOHA_KEYS = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_IA3_KEYS = frozenset({"on_input"})
_LOKR_KEYS = frozenset(
    {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
)
_FULL_KEYS = frozenset({"diff", "diff_b"})
_NORM_KEYS = frozenset({"w_norm", "b_norm"})
_OFT_KEYS = frozenset({"oft_blocks"})
_GLORA_KEYS = frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"})

#: Tensors each algorithm may carry besides its detection keys.
_ALLOWED: dict[str, frozenset[str]] = {
    "lora": _LORA_KEYS | {"alpha", "scale", "dora_scale"},
    "loha": _LOHA_KEYS | {"alpha", "scale", "dora_scale"},
    "ia3": _IA3_KEYS | {"weight"},
    "lokr": _LOKR_KEYS | {"alpha", "scale", "dora_scale"},
    "full": _FULL_KEYS,
    "norm": _NORM_KEYS,
    "oft": _OFT_KEYS | {"alpha", "rescale"},
    "boft": _OFT_KEYS | {"alpha", "rescale"},
    "glora": _GLORA_KEYS | {"alpha"},
}

#: Every per-module tensor suffix lorasurgery understands (kohya / LyCORIS spelling, without the
#: leading dot). Format adapters split ``"<module name>.<suffix>"`` keys by the longest suffix in here.
MODULE_SUFFIXES: frozenset[str] = frozenset().union(*_ALLOWED.values()) | {"alpha", "scale"}

#: LyCORIS detection order (``formats.md`` §3.8): the first algorithm whose keys are present wins.
_DETECTION: tuple[tuple[str, frozenset[str]], ...] = (
    ("lora", _LORA_KEYS),
    ("loha", _LOHA_KEYS),
    ("ia3", _IA3_KEYS),
    ("lokr", _LOKR_KEYS),
    ("full", _FULL_KEYS),
    ("norm", _NORM_KEYS),
    ("oft", _OFT_KEYS),  # 3-D oft_blocks: Diag-OFT, 4-D: BOFT (decided below)
    ("glora", _GLORA_KEYS),
)


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def _ones(kernel: Sequence[int]) -> bool:
    """True for a 1x1 (or absent) kernel."""
    return all(int(k) == 1 for k in kernel)


def _kernel_compatible(kernel: Sequence[int], target: Sequence[int]) -> bool:
    """A delta kernel fits a target kernel when equal, or when both are 1x1/absent (Linear ⇄ 1x1 conv)."""
    if _ones(kernel) and _ones(target):
        return True
    return tuple(int(k) for k in kernel) == tuple(int(k) for k in target)


def _shape_str(t: torch.Tensor | None) -> str:
    return "None" if t is None else "(" + ", ".join(str(int(s)) for s in t.shape) + ")"


def _f32(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    return t.to(device=device if device is not None else t.device, dtype=_F32)


def _where(source: str) -> str | None:
    return source or None


def _fold(t: torch.Tensor, c: float) -> torch.Tensor:
    """``c · t`` computed in float32 and cast back to ``t``'s dtype (the tensor itself when c == 1)."""
    if c == 1.0:
        return t
    return (t.to(_F32) * c).to(t.dtype)


def _with_scale_tensors(delta: Any, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``alpha`` (float32 0-dim), ``scale`` and ``dora_scale`` tensors a LoRA/LoHa/LoKr delta holds."""
    if delta.alpha is not None:
        out["alpha"] = _alpha_tensor(delta.alpha)
    if delta.scale_tensor is not None:
        out["scale"] = delta.scale_tensor
    if delta.dora_scale is not None:
        out["dora_scale"] = delta.dora_scale
    return out


def _alpha_tensor(value: float) -> torch.Tensor:
    """Alpha as written by lorasurgery: a float32 0-dim tensor (``formats.md`` §1 rule 4)."""
    return torch.tensor(float(value), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Delta(abc.ABC):
    """One module's change. Subclasses are frozen dataclasses; tensors are kept exactly as loaded.

    Attributes:
        multiplier: user/block weight m, applied linearly (``W + m·ΔW``; A1111 form for W-dependent).
        name: module name used in error messages (file key prefix or canonical id).
        source: file the module came from, used in error messages.
    """

    multiplier: float = 1.0
    name: str = ""
    source: str = ""

    algo: ClassVar[str] = ""

    # ---- description ---------------------------------------------------------------------------

    @property
    def needs_base(self) -> bool:
        """True when the result depends on the base weight W (IA3, GLoRA, OFT, BOFT, DoRA)."""
        return False

    @property
    def out_features(self) -> int | None:
        """Output rows of the target weight (None when the tensors do not determine it)."""
        return None

    @property
    def in_features(self) -> int | None:
        """Flattened ``in·kh·kw`` of the target weight (None when the tensors do not determine it)."""
        return None

    @property
    def kernel(self) -> tuple[int, ...] | None:
        """Spatial kernel of the target (``()`` for Linear); None when unknown (flattened storage)."""
        return None

    @property
    def rank(self) -> int | None:
        """Rank dimension used for the alpha scale; None when not applicable."""
        return None

    def _label(self) -> str:
        return f"module '{self.name}'" if self.name else "module"

    def __repr__(self) -> str:
        parts = [f"algo={self.algo!r}", f"name={self.name!r}", f"multiplier={self.multiplier!r}"]
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                parts.append(f"{f.name}={tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}")
            elif f.name not in ("multiplier", "name", "source") and v is not None:
                parts.append(f"{f.name}={v!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # ---- checks --------------------------------------------------------------------------------

    def _bad(self, message: str, suffixes: Sequence[str] = ()) -> InputError:
        extra = f" (tensors: {', '.join(suffixes)})" if suffixes else ""
        return InputError(f"{self._label()}: {message}{extra}.", _where(self.source))

    def _check_shape(self, shape: Shape) -> None:
        """Raise :class:`PlanError` unless the target weight shape fits this delta."""
        out, inf, k = self.out_features, self.in_features, self.kernel
        ok = len(shape) >= 1
        if ok and out is not None:
            ok = shape[0] == out
        if ok and inf is not None:
            ok = len(shape) >= 2 and _prod(shape[1:]) == inf
        if ok and k is not None and len(shape) > 2:  # 2-D targets: the flattened matrix form
            ok = _kernel_compatible(k, shape[2:])
        if not ok:
            want = f"{out if out is not None else '?'} output rows"
            if inf is not None:
                want += f" and {inf} flattened inputs"
            if k is not None and not _ones(k):
                want += f" with a {'x'.join(map(str, k))} kernel"
            raise PlanError(
                f"{self._label()} ({self.algo}) does not fit a target weight of shape {tuple(shape)}: "
                f"its tensors describe a weight with {want}. Check that the LoRA was made for this "
                f"model and that its keys map to the right modules.",
                _where(self.source),
            )

    def _refuse_base(self, what: str) -> PlanError:
        return PlanError(
            f"{self._label()} is a {self.algo}{' (DoRA)' if self._has_dora() else ''} module, whose "
            f"change depends on the base weight; {what} needs that weight. Bake it into a base "
            f"checkpoint (apply) and re-extract instead.",
            _where(self.source),
        )

    def _has_dora(self) -> bool:
        return getattr(self, "dora_scale", None) is not None

    # ---- algebra -------------------------------------------------------------------------------

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        """Float32 ΔW (algorithm scale applied, multiplier not) as ``(out, in·kh·kw)``."""
        raise PlanError(f"{self._label()} ({self.algo}) has no weight-independent ΔW.", _where(self.source))

    def dense(self, shape: Sequence[int]) -> torch.Tensor:
        """Float32 ``m·ΔW`` in the target weight shape.

        Accepted shapes: the delta's own weight shape; a 2-D ``(out, in·kh·kw)`` shape, which gives the
        flattened matrix (row-major ``(in, kh, kw)``; this is how a 4-D 1x1 delta fits a Linear target); and
        any 3-D+ shape with the same out, flattened in and kernel (a 2-D delta fits a ``(out, in, 1, 1)``
        target). Other kernels raise :class:`PlanError`, as do deltas that need the base weight.
        """
        shape = tuple(int(s) for s in shape)
        if self.needs_base:
            raise self._refuse_base("a weight-independent ΔW")
        self._check_shape(shape)
        return (self._inner_flat() * float(self.multiplier)).reshape(shape)

    def dense_bias(self) -> torch.Tensor | None:
        """Float32 ``m·Δbias`` (``diff_b``, ``b_norm``), or None when the module has no bias change."""
        return None

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        """W'' (full strength) for W-dependent algorithms; ``weight`` is float32 in target shape."""
        raise PlanError(f"{self._label()} ({self.algo}) is additive.", _where(self.source))

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Float32 result weight: ``W + m·ΔW``, or ``W + m·(W'' − W)`` for W-dependent algorithms.

        ``weight`` is the target weight in its own shape (any dtype); the result has the same shape and
        is computed in float32 on ``weight``'s device.
        """
        w = weight.to(_F32)
        m = float(self.multiplier)
        if not self.needs_base:
            self._check_shape(tuple(w.shape))
            return w + (self._inner_flat(w.device) * m).reshape(w.shape)
        w2 = self._transform(w)
        if m == 1.0:
            return w2
        return w + m * (w2 - w)

    def scaled(self, c: float) -> "Delta":
        """The same delta with ``multiplier · c`` (tensors shared, nothing computed)."""
        return replace(self, multiplier=float(self.multiplier) * float(c))

    @abc.abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Suffix → tensor (kohya/LyCORIS spelling) for pass-through writing.

        Tensors are returned as stored, except that alpha is re-emitted as a float32 0-dim tensor
        (``formats.md`` §1 rule 4) and a multiplier ≠ 1 is folded into exactly one up-like factor (computed
        in float32, cast back to that tensor's dtype). Raises :class:`PlanError` where the multiplier
        cannot be folded (DoRA, OFT, BOFT).
        """

    def to(self, device: torch.device | str) -> "Delta":
        """The same delta with every tensor moved to ``device`` (dtypes kept)."""
        changes: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = v.to(device)
        return replace(self, **changes)

    def _refuse_fold(self) -> PlanError:
        return PlanError(
            f"{self._label()} is a {self.algo}{' (DoRA)' if self._has_dora() else ''} module with "
            f"multiplier {self.multiplier}: its change depends non-linearly on the base weight, so the "
            f"multiplier cannot be folded into its tensors. Bake it into a base checkpoint and re-extract, "
            f"or use multiplier 1.",
            _where(self.source),
        )


# --------------------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------------------


def _dora_axis(dora_scale: torch.Tensor, out: int | None, in_ch: int | None) -> int | None:
    """0 when ``dora_scale`` is per output row ``(out, 1[, 1, 1])``, 1 when per input column
    ``(1, in[, 1, 1])``; None when its shape fits neither (``math.md`` §1: decide the axis from the shape).
    """
    s = tuple(int(x) for x in dora_scale.shape)
    if len(s) >= 1 and (out is None or s[0] == out) and _prod(s[1:]) == 1:
        return 0
    if len(s) >= 2 and s[0] == 1 and _prod(s[2:]) == 1 and (in_ch is None or s[1] == in_ch):
        return 1
    return None


def _dora_transform(delta: Delta, dora_scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """W'' = V·d/‖V‖ with V = W + ΔW_inner (LyCORIS ``apply_weight_decompose``, ``math.md`` §1).

    The norm is taken per output row over all other axes for ``(out, 1[, 1, 1])`` scales, or per input
    channel over the output and kernel axes for ``(1, in[, 1, 1])`` scales; ``DORA_EPS`` is added to it.
    (ComfyUI's ``weight_decompose`` divides by the norm of the *original* W on the output axis; LyCORIS,
    which trains these files, uses V, and so does lorasurgery.)
    """
    shape = tuple(w.shape)
    delta._check_shape(shape)
    axis = _dora_axis(dora_scale, shape[0], shape[1] if len(shape) >= 2 else None)
    if axis is None:
        raise PlanError(
            f"{delta._label()}: dora_scale of shape {_shape_str(dora_scale)} fits neither the output rows "
            f"nor the input channels of the target weight {shape}.",
            _where(delta.source),
        )
    v = w + delta._inner_flat(w.device).reshape(shape)
    d = _f32(dora_scale, w.device).reshape(-1)
    bshape = [1] * len(shape)
    if axis == 0:
        norm = v.reshape(shape[0], -1).norm(dim=1)
        bshape[0] = shape[0]
    else:
        norm = v.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
        bshape[1] = shape[1]
    return v * (d / (norm + DORA_EPS)).reshape(bshape)


def _scale_value(scale_tensor: torch.Tensor | None, alpha: float | None, rank: int | None) -> float:
    """``scale`` tensor if present, else alpha/rank; alpha None → 1, alpha 0 → 0 (see module docstring)."""
    if scale_tensor is not None:
        return float(scale_tensor.detach().to(torch.float64).reshape(-1)[0].item())
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / float(rank)


# --------------------------------------------------------------------------------------------------
# LoRA / LoCon / Tucker LoCon
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class LowRank(Delta):
    """LoRA / LoCon / Tucker (CP) LoCon, optionally with DoRA (``math.md`` §1, ``formats.md`` §2).

    * Linear: up ``(out, r)``, down ``(r, in)``; ΔW = s·up@down.
    * Conv: up ``(out, r, 1, 1)``, down ``(r, in, kh, kw)``; ΔW = s·unflatten(up(out,r) @ down(r, in·kh·kw)).
    * Tucker: down ``(r, in, 1, 1)``, mid ``(r, r, kh, kw)``, up ``(out, r, 1, 1)``;
      ΔW[o,i,h,w] = s·Σ_{n,p} up[o,n]·mid[n,p,h,w]·down[p,i] (LyCORIS ``rebuild_tucker``).
    * s = ``scale`` tensor if present, else alpha / ``down.shape[0]`` (alpha None → 1, 0 → 0).
    * DoRA (``dora_scale``): W'' = V·d/‖V‖ with V = W + ΔW (see :func:`_dora_transform`).
    """

    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    scale_tensor: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    algo: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        up, down, mid = self.up, self.down, self.mid
        names = ["lora_up.weight", "lora_down.weight"] + (["lora_mid.weight"] if mid is not None else [])
        if up.ndim not in (2, 3, 4, 5) or not _ones(up.shape[2:]):
            raise self._bad(f"lora_up.weight has shape {_shape_str(up)}; expected (out, r) or (out, r, 1, 1)", names)
        if down.ndim < 2:
            raise self._bad(f"lora_down.weight has shape {_shape_str(down)}; expected (r, in[, kh, kw])", names)
        if mid is None:
            if up.shape[1] != down.shape[0]:
                raise self._bad(
                    f"rank mismatch: lora_up.weight {_shape_str(up)} has rank {up.shape[1]} but "
                    f"lora_down.weight {_shape_str(down)} has rank {down.shape[0]}",
                    names,
                )
        else:
            if mid.ndim < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0] or not _ones(down.shape[2:]):
                raise self._bad(
                    f"Tucker shapes do not chain: lora_up.weight {_shape_str(up)}, lora_mid.weight "
                    f"{_shape_str(mid)}, lora_down.weight {_shape_str(down)}; expected (out, r, 1, 1), "
                    f"(r, r, kh, kw), (r, in, 1, 1)",
                    names,
                )
        if self.scale_tensor is not None and self.scale_tensor.numel() != 1:
            raise self._bad(f"scale must hold one value, has shape {_shape_str(self.scale_tensor)}", ["scale"])
        if self.dora_scale is not None and _dora_axis(self.dora_scale, self.out_features, int(down.shape[1])) is None:
            raise self._bad(
                f"dora_scale has shape {_shape_str(self.dora_scale)}; expected ({self.out_features}, 1, ...) "
                f"or (1, {int(down.shape[1])}, ...)",
                ["dora_scale"],
            )

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    @property
    def rank(self) -> int:
        """``down.shape[0]`` (the rank the loaders divide alpha by)."""
        return int(self.down.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        if self.mid is not None:
            return int(self.down.shape[1]) * _prod(self.mid.shape[2:])
        return _prod(self.down.shape[1:])

    @property
    def kernel(self) -> tuple[int, ...]:
        if self.mid is not None:
            return tuple(int(k) for k in self.mid.shape[2:])
        return tuple(int(k) for k in self.down.shape[2:])

    @property
    def scale(self) -> float:
        """``scale`` tensor value if present, else alpha/rank (alpha None → 1, alpha 0 → 0)."""
        return _scale_value(self.scale_tensor, self.alpha, self.rank)

    def _raw_factors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(up ``(out, r_up)``, down with the Tucker mid folded ``(r_up, in·kh·kw)``), float32, unscaled.

        Tucker fold (``math.md`` §9): A'[n,i,h,w] = Σ_p M[n,p,h,w]·A[p,i].
        """
        b = _f32(self.up, device).reshape(self.up.shape[0], -1)
        a = _f32(self.down, device)
        if self.mid is None:
            return b, a.reshape(a.shape[0], -1)
        m = _f32(self.mid, device)
        a2 = a.reshape(a.shape[0], a.shape[1])
        folded = torch.einsum("np...,pi->ni...", m, a2)
        return b, folded.reshape(folded.shape[0], -1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 (B, A) with ``B = m·s·up`` ``(out, R)`` and ``A`` ``(R, in·kh·kw)`` (Tucker mid folded),
        so that ``(B @ A).reshape(shape) == dense(shape)``. Refused for DoRA (needs the base weight)."""
        if self.needs_base:
            raise self._refuse_base("a factored ΔW")
        b, a = self._raw_factors()
        return b * (float(self.multiplier) * self.scale), a

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        b, a = self._raw_factors(device)
        return (b * self.scale) @ a

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        assert self.dora_scale is not None
        return _dora_transform(self, self.dora_scale, weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``lora_up.weight`` (× multiplier), ``lora_down.weight``, optional ``lora_mid.weight``, ``alpha``
        (float32 0-dim), ``scale``, ``dora_scale``. DoRA with multiplier ≠ 1 raises :class:`PlanError`."""
        if self.dora_scale is not None and self.multiplier != 1.0:
            raise self._refuse_fold()
        out = {"lora_up.weight": _fold(self.up, float(self.multiplier)), "lora_down.weight": self.down}
        if self.mid is not None:
            out["lora_mid.weight"] = self.mid
        return _with_scale_tensors(self, out)


# --------------------------------------------------------------------------------------------------
# LoHa
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class LoHa(Delta):
    """LoHa: ΔW = s·(W1a W1b) ⊙ (W2a W2b) (LyCORIS ``functional/loha.py`` ``diff_weight``).

    * Plain: ``hada_w1_a`` ``(out, r)``, ``hada_w1_b`` ``(r, in·kh·kw)`` (or ``(r, in, kh, kw)``), same for
      w2 (its rank may differ); conv deltas are unflattened to the target shape.
    * Tucker: ``hada_t1`` ``(r, r, kh, kw)``, ``hada_w1_a`` ``(r, out)``, ``hada_w1_b`` ``(r, in)``;
      T1[o,c,h,w] = Σ_{i,j} t1[i,j,h,w]·w1_a[i,o]·w1_b[j,c], likewise T2; ΔW = s·T1 ⊙ T2.
    * s = ``scale`` tensor, else alpha / ``hada_w1_b.shape[0]`` (applied **once**; LyCORIS ``merge_to``
      applies it twice, ``pitfalls.md``).
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    scale_tensor: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    algo: ClassVar[str] = "loha"

    def __post_init__(self) -> None:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if (self.t1 is None) != (self.t2 is None):
            raise self._bad("Tucker LoHa needs both hada_t1 and hada_t2", ["hada_t1", "hada_t2"])
        shapes = ", ".join(f"{n} {_shape_str(t)}" for n, t in zip(names, (self.w1a, self.w1b, self.w2a, self.w2b)))
        if self.t1 is None:
            ok = all(t.ndim >= 2 for t in (self.w1a, self.w1b, self.w2a, self.w2b))
            ok = ok and _ones(self.w1a.shape[2:]) and _ones(self.w2a.shape[2:])
            ok = ok and self.w1a.shape[1] == self.w1b.shape[0] and self.w2a.shape[1] == self.w2b.shape[0]
            ok = ok and self.w1a.shape[0] == self.w2a.shape[0]
            ok = ok and _prod(self.w1b.shape[1:]) == _prod(self.w2b.shape[1:])
            ok = ok and (self.w1b.ndim == 2 or self.w2b.ndim == 2 or self.w1b.shape[1:] == self.w2b.shape[1:])
            if not ok:
                raise self._bad(
                    f"inconsistent shapes {shapes}; expected w_a (out, r), w_b (r, in[·kh·kw]) for both pairs",
                    names,
                )
        else:
            t1, t2 = self.t1, self.t2
            assert t2 is not None
            ok = t1.ndim >= 3 and t2.ndim >= 3 and t1.shape[2:] == t2.shape[2:]
            ok = ok and all(t.ndim == 2 for t in (self.w1a, self.w1b, self.w2a, self.w2b))
            ok = ok and t1.shape[0] == self.w1a.shape[0] and t1.shape[1] == self.w1b.shape[0]
            ok = ok and t2.shape[0] == self.w2a.shape[0] and t2.shape[1] == self.w2b.shape[0]
            ok = ok and self.w1a.shape[1] == self.w2a.shape[1] and self.w1b.shape[1] == self.w2b.shape[1]
            if not ok:
                raise self._bad(
                    f"inconsistent Tucker shapes {shapes}, hada_t1 {_shape_str(t1)}, hada_t2 {_shape_str(t2)}; "
                    f"expected t (r, r, kh, kw), w_a (r, out), w_b (r, in)",
                    names + ["hada_t1", "hada_t2"],
                )
        if self.scale_tensor is not None and self.scale_tensor.numel() != 1:
            raise self._bad(f"scale must hold one value, has shape {_shape_str(self.scale_tensor)}", ["scale"])
        if self.dora_scale is not None and _dora_axis(self.dora_scale, self.out_features, self._in_channels()) is None:
            raise self._bad(f"dora_scale has shape {_shape_str(self.dora_scale)}, which fits neither axis", ["dora_scale"])

    def _in_channels(self) -> int | None:
        if self.t1 is not None or self.w1b.ndim > 2:
            return int(self.w1b.shape[1])
        return None

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    @property
    def rank(self) -> int:
        """``hada_w1_b.shape[0]``."""
        return int(self.w1b.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    @property
    def in_features(self) -> int:
        if self.t1 is not None:
            return int(self.w1b.shape[1]) * _prod(self.t1.shape[2:])
        return _prod(self.w1b.shape[1:])

    @property
    def kernel(self) -> tuple[int, ...] | None:
        if self.t1 is not None:
            return tuple(int(k) for k in self.t1.shape[2:])
        if self.w1b.ndim > 2:
            return tuple(int(k) for k in self.w1b.shape[2:])
        if self.w2b.ndim > 2:
            return tuple(int(k) for k in self.w2b.shape[2:])
        return None  # 2-D w_b: Linear, or a conv stored flattened

    @property
    def scale(self) -> float:
        return _scale_value(self.scale_tensor, self.alpha, self.rank)

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        if self.t1 is None:
            def pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                af = _f32(a, device).reshape(a.shape[0], -1)
                bf = _f32(b, device).reshape(b.shape[0], -1)
                return af @ bf

            p1, p2 = pair(self.w1a, self.w1b), pair(self.w2a, self.w2b)
        else:
            assert self.t2 is not None

            def tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                r = torch.einsum("ij...,io,jc->oc...", _f32(t, device), _f32(a, device), _f32(b, device))
                return r.reshape(r.shape[0], -1)

            p1 = tucker(self.t1, self.w1a, self.w1b)
            p2 = tucker(self.t2, self.w2a, self.w2b)
        return (p1 * p2) * self.scale

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        assert self.dora_scale is not None
        return _dora_transform(self, self.dora_scale, weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ``hada_*`` tensors with the multiplier folded into ``hada_w1_a`` only, plus ``alpha``
        (float32 0-dim), ``scale``, ``dora_scale``."""
        if self.dora_scale is not None and self.multiplier != 1.0:
            raise self._refuse_fold()
        out = {
            "hada_w1_a": _fold(self.w1a, float(self.multiplier)),
            "hada_w1_b": self.w1b,
            "hada_w2_a": self.w2a,
            "hada_w2_b": self.w2b,
        }
        if self.t1 is not None and self.t2 is not None:
            out["hada_t1"] = self.t1
            out["hada_t2"] = self.t2
        return _with_scale_tensors(self, out)


# --------------------------------------------------------------------------------------------------
# LoKr
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class LoKr(Delta):
    """LoKr: ΔW = s·(W1 ⊗ W2) (LyCORIS ``functional/lokr.py`` ``make_kron``; ``math.md`` §1).

    * W1 = ``lokr_w1`` ``(a, c)`` or ``lokr_w1_a (a, r) @ lokr_w1_b (r, c)``.
    * W2 = ``lokr_w2`` ``(b, d[, kh, kw])``; or ``lokr_w2_a (b, r) @ lokr_w2_b`` with ``lokr_w2_b``
      ``(r, d)``, ``(r, d·kh·kw)`` (flattened conv) or ``(r, d, kh, kw)``; or Tucker
      W2[p,q,h,w] = Σ_{i,j} t2[i,j,h,w]·w2_a[i,p]·w2_b[j,q] with ``lokr_t2 (r, r, kh, kw)``,
      ``w2_a (r, b)``, ``w2_b (r, d)``.
    * For conv W1 is treated as ``a×c×1×1`` and the Kronecker product is taken over the first two axes;
      flattened, this equals the 2-D ``kron(W1, W2.reshape(b, -1))``, which is how it is computed.
    * r = ``lokr_w2_b.shape[0]`` if present, else ``lokr_w1_b.shape[0]``; s = ``scale`` tensor, else
      alpha / r; **s = 1 when both W1 and W2 are stored full** (alpha ignored, as LyCORIS and ComfyUI do).
    """

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    scale_tensor: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    algo: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        # W1
        if self.w1 is not None:
            if self.w1a is not None or self.w1b is not None:
                raise self._bad("lokr_w1 and lokr_w1_a/lokr_w1_b are mutually exclusive", ["lokr_w1", "lokr_w1_a", "lokr_w1_b"])
            if self.w1.ndim < 2 or not _ones(self.w1.shape[2:]):
                raise self._bad(f"lokr_w1 has shape {_shape_str(self.w1)}; expected (a, c)", ["lokr_w1"])
        else:
            if self.w1a is None or self.w1b is None:
                raise self._bad("W1 needs lokr_w1, or both lokr_w1_a and lokr_w1_b", ["lokr_w1_a", "lokr_w1_b"])
            if self.w1a.ndim != 2 or self.w1b.ndim != 2 or self.w1a.shape[1] != self.w1b.shape[0]:
                raise self._bad(
                    f"lokr_w1_a {_shape_str(self.w1a)} and lokr_w1_b {_shape_str(self.w1b)} do not chain; "
                    f"expected (a, r) and (r, c)",
                    ["lokr_w1_a", "lokr_w1_b"],
                )
        # W2
        if self.w2 is not None:
            if self.w2a is not None or self.w2b is not None or self.t2 is not None:
                raise self._bad("lokr_w2 and lokr_w2_a/lokr_w2_b/lokr_t2 are mutually exclusive", ["lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"])
            if self.w2.ndim < 2:
                raise self._bad(f"lokr_w2 has shape {_shape_str(self.w2)}; expected (b, d[, kh, kw])", ["lokr_w2"])
        else:
            if self.w2a is None or self.w2b is None:
                raise self._bad("W2 needs lokr_w2, or both lokr_w2_a and lokr_w2_b", ["lokr_w2_a", "lokr_w2_b"])
            if self.t2 is None:
                if self.w2a.ndim != 2 or self.w2b.ndim < 2 or self.w2a.shape[1] != self.w2b.shape[0]:
                    raise self._bad(
                        f"lokr_w2_a {_shape_str(self.w2a)} and lokr_w2_b {_shape_str(self.w2b)} do not chain; "
                        f"expected (b, r) and (r, d[·kh·kw])",
                        ["lokr_w2_a", "lokr_w2_b"],
                    )
            else:
                t2 = self.t2
                if (
                    t2.ndim < 3 or self.w2a.ndim != 2 or self.w2b.ndim != 2
                    or t2.shape[0] != self.w2a.shape[0] or t2.shape[1] != self.w2b.shape[0]
                ):
                    raise self._bad(
                        f"Tucker shapes do not chain: lokr_t2 {_shape_str(t2)}, lokr_w2_a {_shape_str(self.w2a)}, "
                        f"lokr_w2_b {_shape_str(self.w2b)}; expected (r, r, kh, kw), (r, b), (r, d)",
                        ["lokr_t2", "lokr_w2_a", "lokr_w2_b"],
                    )
        if self.scale_tensor is not None and self.scale_tensor.numel() != 1:
            raise self._bad(f"scale must hold one value, has shape {_shape_str(self.scale_tensor)}", ["scale"])
        if self.dora_scale is not None:
            k = self.kernel
            in_ch = self.in_features // _prod(k) if k is not None else None
            if _dora_axis(self.dora_scale, self.out_features, in_ch) is None:
                raise self._bad(f"dora_scale has shape {_shape_str(self.dora_scale)}, which fits neither axis", ["dora_scale"])

    # shapes of the two Kronecker factors
    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        assert self.w1a is not None and self.w1b is not None
        return int(self.w1a.shape[0]), int(self.w1b.shape[1])

    def _w2_rows_cols(self) -> tuple[int, int]:
        """(b, d·kh·kw) of W2."""
        if self.w2 is not None:
            return int(self.w2.shape[0]), _prod(self.w2.shape[1:])
        assert self.w2a is not None and self.w2b is not None
        if self.t2 is not None:
            return int(self.w2a.shape[1]), int(self.w2b.shape[1]) * _prod(self.t2.shape[2:])
        return int(self.w2a.shape[0]), _prod(self.w2b.shape[1:])

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    @property
    def both_full(self) -> bool:
        """True when W1 and W2 are both stored full (scale forced to 1)."""
        return self.w1 is not None and self.w2 is not None

    @property
    def rank(self) -> int | None:
        """``lokr_w2_b.shape[0]`` if present, else ``lokr_w1_b.shape[0]``; None when both are full."""
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return None

    @property
    def out_features(self) -> int:
        return self._w1_shape()[0] * self._w2_rows_cols()[0]

    @property
    def in_features(self) -> int:
        return self._w1_shape()[1] * self._w2_rows_cols()[1]

    @property
    def kernel(self) -> tuple[int, ...] | None:
        if self.w2 is not None:
            return tuple(int(k) for k in self.w2.shape[2:])
        if self.t2 is not None:
            return tuple(int(k) for k in self.t2.shape[2:])
        assert self.w2b is not None
        if self.w2b.ndim > 2:
            return tuple(int(k) for k in self.w2b.shape[2:])
        return None  # 2-D lokr_w2_b: Linear, or a conv stored flattened

    @property
    def scale(self) -> float:
        if self.scale_tensor is not None:
            return _scale_value(self.scale_tensor, None, None)
        if self.both_full:
            return 1.0
        return _scale_value(None, self.alpha, self.rank)

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        if self.w1 is not None:
            w1 = _f32(self.w1, device).reshape(self.w1.shape[0], self.w1.shape[1])
        else:
            assert self.w1a is not None and self.w1b is not None
            w1 = _f32(self.w1a, device) @ _f32(self.w1b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device).reshape(self.w2.shape[0], -1)
        elif self.t2 is not None:
            assert self.w2a is not None and self.w2b is not None
            w2 = torch.einsum("ij...,ip,jq->pq...", _f32(self.t2, device), _f32(self.w2a, device), _f32(self.w2b, device))
            w2 = w2.reshape(w2.shape[0], -1)
        else:
            assert self.w2a is not None and self.w2b is not None
            w2 = _f32(self.w2a, device) @ _f32(self.w2b, device).reshape(self.w2b.shape[0], -1)
        return torch.kron(w1, w2) * self.scale

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        assert self.dora_scale is not None
        return _dora_transform(self, self.dora_scale, weight)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The ``lokr_*`` tensors with the multiplier folded into ``lokr_w1`` (or ``lokr_w1_a``) only,
        plus ``alpha`` (float32 0-dim), ``scale``, ``dora_scale``."""
        if self.dora_scale is not None and self.multiplier != 1.0:
            raise self._refuse_fold()
        m = float(self.multiplier)
        out: dict[str, torch.Tensor] = {}
        if self.w1 is not None:
            out["lokr_w1"] = _fold(self.w1, m)
        else:
            assert self.w1a is not None and self.w1b is not None
            out["lokr_w1_a"] = _fold(self.w1a, m)
            out["lokr_w1_b"] = self.w1b
        if self.w2 is not None:
            out["lokr_w2"] = self.w2
        else:
            assert self.w2a is not None and self.w2b is not None
            out["lokr_w2_a"] = self.w2a
            out["lokr_w2_b"] = self.w2b
            if self.t2 is not None:
                out["lokr_t2"] = self.t2
        return _with_scale_tensors(self, out)


# --------------------------------------------------------------------------------------------------
# Full, Norm
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Full(Delta):
    """Full difference: ΔW = ``diff`` (weight shape), Δbias = ``diff_b``; no scale (``math.md`` §1).

    ``diff`` may be absent when only the bias changes (ComfyUI accepts a lone ``diff_b``); ΔW is then 0.
    """

    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None

    algo: ClassVar[str] = "full"

    def __post_init__(self) -> None:
        if self.diff is None and self.diff_b is None:
            raise self._bad("a full module needs diff and/or diff_b", ["diff", "diff_b"])
        if self.diff is not None and self.diff.ndim < 1:
            raise self._bad("diff is a scalar; expected the weight's shape", ["diff"])
        if self.diff_b is not None and self.diff_b.ndim != 1:
            raise self._bad(f"diff_b has shape {_shape_str(self.diff_b)}; expected (out,)", ["diff_b"])
        if self.diff is not None and self.diff_b is not None and self.diff.shape[0] != self.diff_b.shape[0]:
            raise self._bad(
                f"diff {_shape_str(self.diff)} and diff_b {_shape_str(self.diff_b)} disagree on the output size",
                ["diff", "diff_b"],
            )

    @property
    def out_features(self) -> int:
        if self.diff is not None:
            return int(self.diff.shape[0])
        assert self.diff_b is not None
        return int(self.diff_b.shape[0])

    @property
    def in_features(self) -> int | None:
        if self.diff is None or self.diff.ndim < 2:
            return None
        return _prod(self.diff.shape[1:])

    @property
    def kernel(self) -> tuple[int, ...] | None:
        if self.diff is None or self.diff.ndim < 2:
            return None
        return tuple(int(k) for k in self.diff.shape[2:])

    def _check_shape(self, shape: Shape) -> None:
        if self.diff is not None and self.diff.ndim == 1 and tuple(shape) != tuple(self.diff.shape):
            raise PlanError(
                f"{self._label()} (full) holds a 1-D diff {_shape_str(self.diff)} but the target weight "
                f"has shape {tuple(shape)}.",
                _where(self.source),
            )
        super()._check_shape(shape)

    def dense(self, shape: Sequence[int]) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        self._check_shape(shape)
        if self.diff is None:
            dev = self.diff_b.device if self.diff_b is not None else None
            return torch.zeros(shape, dtype=_F32, device=dev)
        return (_f32(self.diff) * float(self.multiplier)).reshape(shape)

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        if self.diff is None:
            assert self.diff_b is not None
            raise PlanError(f"{self._label()} changes only the bias.", _where(self.source))
        d = _f32(self.diff, device)
        return d.reshape(d.shape[0], -1)

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.to(_F32)
        return w + self.dense(tuple(w.shape)).to(w.device)

    def dense_bias(self) -> torch.Tensor | None:
        if self.diff_b is None:
            return None
        return _f32(self.diff_b) * float(self.multiplier)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``diff`` and ``diff_b``, each multiplied by the multiplier."""
        m = float(self.multiplier)
        out: dict[str, torch.Tensor] = {}
        if self.diff is not None:
            out["diff"] = _fold(self.diff, m)
        if self.diff_b is not None:
            out["diff_b"] = _fold(self.diff_b, m)
        return out


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Norm(Delta):
    """Norm-layer change: Δγ = ``w_norm`` ``(C,)``, Δβ = ``b_norm`` ``(C,)`` (LyCORIS ``modules/norms.py``)."""

    w_norm: torch.Tensor
    b_norm: torch.Tensor | None = None

    algo: ClassVar[str] = "norm"

    def __post_init__(self) -> None:
        if self.w_norm.ndim != 1:
            raise self._bad(f"w_norm has shape {_shape_str(self.w_norm)}; expected (C,)", ["w_norm"])
        if self.b_norm is not None and tuple(self.b_norm.shape) != tuple(self.w_norm.shape):
            raise self._bad(
                f"b_norm {_shape_str(self.b_norm)} does not match w_norm {_shape_str(self.w_norm)}",
                ["w_norm", "b_norm"],
            )

    @property
    def out_features(self) -> int:
        return int(self.w_norm.shape[0])

    def _check_shape(self, shape: Shape) -> None:
        if _prod(shape) != self.out_features or len(shape) < 1 or shape[0] != self.out_features:
            raise PlanError(
                f"{self._label()} (norm) holds w_norm {_shape_str(self.w_norm)} but the target weight "
                f"has shape {tuple(shape)}.",
                _where(self.source),
            )

    def _inner_flat(self, device: torch.device | None = None) -> torch.Tensor:
        return _f32(self.w_norm, device)

    def dense_bias(self) -> torch.Tensor | None:
        if self.b_norm is None:
            return None
        return _f32(self.b_norm) * float(self.multiplier)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``w_norm`` and ``b_norm``, each multiplied by the multiplier."""
        m = float(self.multiplier)
        out = {"w_norm": _fold(self.w_norm, m)}
        if self.b_norm is not None:
            out["b_norm"] = _fold(self.b_norm, m)
        return out


# --------------------------------------------------------------------------------------------------
# (IA)^3
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class IA3(Delta):
    """(IA)^3: W'' = W ⊙ (1 + v) (LyCORIS ``modules/ia3.py`` ``make_weight``).

    v (``weight``: ``(C,)`` for Linear, ``(1, C, 1, 1)`` for conv) scales output rows, or input channels
    when ``on_input`` is true. With the multiplier, W + m·(W'' − W) = W + m·W ⊙ v, which is linear in v: the
    multiplier folds exactly into ``weight``.
    """

    weight: torch.Tensor
    on_input: torch.Tensor

    algo: ClassVar[str] = "ia3"

    def __post_init__(self) -> None:
        if self.on_input.numel() != 1:
            raise self._bad(f"on_input must hold one value, has shape {_shape_str(self.on_input)}", ["on_input"])
        s = tuple(int(x) for x in self.weight.shape)
        nontrivial = [x for x in s if x != 1]
        if self.weight.ndim < 1 or self.weight.numel() == 0 or len(nontrivial) > 1 or (len(s) > 1 and s[0] != 1 and _prod(s[1:]) != 1):
            raise self._bad(f"weight has shape {_shape_str(self.weight)}; expected (C,) or (1, C, 1, 1)", ["weight"])

    @property
    def is_on_input(self) -> bool:
        """Value of ``on_input`` (False for a meta tensor, whose value is unknown)."""
        if self.on_input.is_meta:
            return False
        return bool(self.on_input.reshape(-1)[0].item())

    @property
    def channels(self) -> int:
        return int(self.weight.numel())

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def out_features(self) -> int | None:
        return None if self.is_on_input else self.channels

    @property
    def in_features(self) -> int | None:
        return self.channels if self.is_on_input and self.weight.ndim == 1 else None

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(weight.shape)
        axis = 1 if self.is_on_input else 0
        if len(shape) <= axis or shape[axis] != self.channels:
            raise PlanError(
                f"{self._label()} (ia3) scales {self.channels} {'input' if axis else 'output'} channels but "
                f"the target weight has shape {shape}.",
                _where(self.source),
            )
        bshape = [1] * len(shape)
        bshape[axis] = self.channels
        v = _f32(self.weight, weight.device).reshape(bshape)
        return weight * (1.0 + v)

    def tensors(self) -> dict[str, torch.Tensor]:
        """``weight`` (× multiplier, exact since ΔW is linear in v) and ``on_input`` unchanged."""
        return {"weight": _fold(self.weight, float(self.multiplier)), "on_input": self.on_input}


# --------------------------------------------------------------------------------------------------
# GLoRA
# --------------------------------------------------------------------------------------------------


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class GLoRA(Delta):
    """GLoRA: W'' = W + s·(B + W·A) (LyCORIS ``modules/glora.py``; ComfyUI ``weight_adapter/glora.py``).

    Two layouts, chosen by which one is shape-valid (``math.md`` §1):

    * ``"new"`` (LyCORIS >= 3.0): a1 ``(in, r)``, a2 ``(r, in)``, b1 ``(out, r)``, b2 ``(r, in[, kh, kw])``,
      optional Tucker ``bm`` ``(r, r, kh, kw)`` with b2 ``(r, in, 1, 1)``. B = b1·b2 (Tucker:
      B[o,i,h,w] = Σ b1[o,m]·bm[m,n,h,w]·b2[n,i]); W·A contracts the input-channel axis:
      (W·A)[o,j,...] = Σ_{i,k} W[o,i,...]·a1[i,k]·a2[k,j]. r = ``a2.shape[0]``.
    * ``"old"``: a1 ``(r, in)``, a2 ``(in, r)``, b1 ``(r, in)``, b2 ``(out, r)``; ΔW = s·(b2·b1 + W·a2·a1) on
      flattened matrices (A1111 ``network_glora.py``). r = ``a1.shape[0]``.

    Both layouts are shape-valid only for square Linear targets; the target weight's shape then decides
    (as ComfyUI does), and when it fits both the new layout is used. s = alpha / r (alpha None → 1, 0 → 0).
    Since ΔW is linear in (b, a), the multiplier folds exactly into ``b2`` and ``a2``.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    bm: torch.Tensor | None = None
    alpha: float | None = None

    algo: ClassVar[str] = "glora"

    def _new_geometry(self) -> tuple[int, int, tuple[int, ...], int] | None:
        """(out, in channels, kernel, rank) when the LyCORIS >= 3.0 layout is shape-valid."""
        a1, a2, b1, b2, bm = self.a1, self.a2, self.b1, self.b2, self.bm
        if min(a1.ndim, a2.ndim, b1.ndim, b2.ndim) < 2:
            return None
        if not (_ones(a1.shape[2:]) and _ones(a2.shape[2:]) and _ones(b1.shape[2:])):
            return None
        in_ch, r = int(a1.shape[0]), int(a1.shape[1])
        if tuple(a2.shape[:2]) != (r, in_ch) or int(b2.shape[1]) != in_ch:
            return None
        if bm is None:
            if b1.shape[1] != b2.shape[0]:
                return None
            kernel = tuple(int(k) for k in b2.shape[2:])
        else:
            if bm.ndim < 3 or bm.shape[0] != b1.shape[1] or bm.shape[1] != b2.shape[0] or not _ones(b2.shape[2:]):
                return None
            kernel = tuple(int(k) for k in bm.shape[2:])
        return int(b1.shape[0]), in_ch, kernel, r

    def _old_geometry(self) -> tuple[int, int, int] | None:
        """(out, flattened in, rank) when the old (A1111) layout is shape-valid."""
        if self.bm is not None or min(t.ndim for t in (self.a1, self.a2, self.b1, self.b2)) < 2:
            return None
        a1, a2, b1, b2 = (_mat(t) for t in (self.a1, self.a2, self.b1, self.b2))
        r = int(a1.shape[0])
        inf = int(a1.shape[1])
        if tuple(a2.shape) != (inf, r) or tuple(b1.shape) != (r, inf) or int(b2.shape[1]) != r:
            return None
        return int(b2.shape[0]), inf, r

    def __post_init__(self) -> None:
        if self._new_geometry() is None and self._old_geometry() is None:
            raise self._bad(
                f"GLoRA shapes a1 {_shape_str(self.a1)}, a2 {_shape_str(self.a2)}, b1 {_shape_str(self.b1)}, "
                f"b2 {_shape_str(self.b2)}{', bm ' + _shape_str(self.bm) if self.bm is not None else ''} fit "
                f"neither layout (new: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in); old: a1 (r, in), "
                f"a2 (in, r), b1 (r, in), b2 (out, r))",
                ["a1.weight", "a2.weight", "b1.weight", "b2.weight"] + (["bm.weight"] if self.bm is not None else []),
            )

    @property
    def layouts(self) -> tuple[str, ...]:
        """Shape-valid layouts, preferred first (``"new"``, ``"old"``)."""
        out = []
        if self._new_geometry() is not None:
            out.append("new")
        if self._old_geometry() is not None:
            out.append("old")
        return tuple(out)

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def rank(self) -> int:
        g = self._new_geometry()
        if g is not None:
            return g[3]
        o = self._old_geometry()
        assert o is not None
        return o[2]

    @property
    def out_features(self) -> int:
        g = self._new_geometry()
        if g is not None:
            return g[0]
        o = self._old_geometry()
        assert o is not None
        return o[0]

    @property
    def in_features(self) -> int:
        g = self._new_geometry()
        if g is not None:
            return g[1] * _prod(g[2])
        o = self._old_geometry()
        assert o is not None
        return o[1]

    @property
    def kernel(self) -> tuple[int, ...] | None:
        g = self._new_geometry()
        return g[2] if g is not None else None

    @property
    def scale(self) -> float:
        """alpha / rank of the preferred layout (the layout used for a given weight decides in apply)."""
        return _scale_value(None, self.alpha, self.rank)

    def _fits_new(self, shape: Shape) -> bool:
        g = self._new_geometry()
        if g is None or len(shape) < 2:
            return False
        out, in_ch, kernel, _ = g
        # kernel compatibility lets a 4-D 1x1 delta fit a Linear target and vice versa
        return shape[0] == out and shape[1] == in_ch and _kernel_compatible(kernel, shape[2:])

    def _fits_old(self, shape: Shape) -> bool:
        o = self._old_geometry()
        return o is not None and len(shape) >= 2 and shape[0] == o[0] and _prod(shape[1:]) == o[1]

    def _check_shape(self, shape: Shape) -> None:
        if not (self._fits_new(shape) or self._fits_old(shape)):
            super()._check_shape(shape)
            raise PlanError(f"{self._label()} (glora) does not fit a target weight of shape {tuple(shape)}.", _where(self.source))

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(weight.shape)
        self._check_shape(shape)
        dev = weight.device
        if self._fits_new(shape):
            s = _scale_value(None, self.alpha, self.rank)
            a1, a2, b1 = (_f32(_mat(t), dev) for t in (self.a1, self.a2, self.b1))
            w = weight.reshape(shape[0], shape[1], -1)
            wa = torch.einsum("oik,ij,jl->olk", w, a1, a2)
            if self.bm is None:
                bmat = b1 @ _f32(_mat(self.b2), dev)
            else:
                b2 = _f32(self.b2, dev).reshape(self.b2.shape[0], self.b2.shape[1])
                bmat = torch.einsum("mn...,om,ni->oi...", _f32(self.bm, dev), b1, b2).reshape(shape[0], -1)
            delta = bmat.reshape(shape) + wa.reshape(shape)
        else:
            old = self._old_geometry()
            assert old is not None
            s = _scale_value(None, self.alpha, old[2])  # the rank of the layout actually used
            a1, a2, b1, b2 = (_f32(_mat(t), dev) for t in (self.a1, self.a2, self.b1, self.b2))
            wf = weight.reshape(shape[0], -1)
            delta = (b2 @ b1 + (wf @ a2) @ a1).reshape(shape)
        return weight + s * delta

    def tensors(self) -> dict[str, torch.Tensor]:
        """``a1.weight`` … ``b2.weight`` (``a2`` and ``b2`` × multiplier: one factor in each of the two
        summands, exact), optional ``bm.weight``, ``alpha`` (float32 0-dim)."""
        m = float(self.multiplier)
        out = {
            "a1.weight": self.a1,
            "a2.weight": _fold(self.a2, m),
            "b1.weight": self.b1,
            "b2.weight": _fold(self.b2, m),
        }
        if self.bm is not None:
            out["bm.weight"] = self.bm
        if self.alpha is not None:
            out["alpha"] = _alpha_tensor(self.alpha)
        return out


# --------------------------------------------------------------------------------------------------
# OFT, BOFT
# --------------------------------------------------------------------------------------------------


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Float32 rotations R = (I + Q)(I − Q)⁻¹ with Q = X − Xᵀ per block (last two axes).

    Source: LyCORIS ``functional/diag_oft.py`` / ``modules/diag_oft.py`` ``get_r``. When ``constraint > 0``
    and ‖Q‖_F (over **all** blocks together) + 1e-8 exceeds it, Q is scaled by constraint / (‖Q‖_F + 1e-8).
    Computed in float64 (small blocks) and returned as float32.
    """
    x = blocks.to(torch.float64)
    q = x - x.transpose(-1, -2)
    if constraint > 0:
        qn = float(torch.linalg.norm(q).item()) + OFT_NORM_EPS
        if qn > constraint:
            q = q * (constraint / qn)
    eye = torch.eye(q.shape[-1], dtype=torch.float64, device=q.device).expand_as(q)
    r = torch.linalg.solve(eye - q, eye + q, left=False)  # X (I − Q) = I + Q
    return r.to(_F32)


def _check_rescale(delta: Delta, rescale: torch.Tensor | None, out: int) -> None:
    if rescale is not None and (rescale.numel() != out or rescale.ndim < 1 or rescale.shape[0] != out):
        raise delta._bad(f"rescale has shape {_shape_str(rescale)}; expected ({out}, 1[, 1, 1])", ["rescale"])


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class _Orthogonal(Delta):
    """What Diag-OFT and BOFT share: ``oft_blocks``, the ``alpha`` norm constraint, the row ``rescale``."""

    blocks: torch.Tensor
    alpha: float | None = None
    rescale: torch.Tensor | None = None

    @property
    def needs_base(self) -> bool:
        return True

    @property
    def constraint(self) -> float:
        """Norm limit for Q: ``alpha · out`` (0 = unconstrained)."""
        return float(self.alpha) * self.out_features if self.alpha else 0.0

    def _rescaled(self, w: torch.Tensor) -> torch.Tensor:
        """W'' ← ``rescale`` ⊙ W'' row-wise (unchanged without ``rescale``)."""
        if self.rescale is None:
            return w
        return w * _f32(self.rescale, w.device).reshape([w.shape[0]] + [1] * (w.dim() - 1))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``oft_blocks``, ``alpha`` (float32 0-dim), ``rescale``; multiplier ≠ 1 raises :class:`PlanError`."""
        if self.multiplier != 1.0:
            raise self._refuse_fold()
        out = {"oft_blocks": self.blocks}
        if self.alpha is not None:
            out["alpha"] = _alpha_tensor(self.alpha)
        if self.rescale is not None:
            out["rescale"] = self.rescale
        return out


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class OFT(_Orthogonal):
    """Diag-OFT (LyCORIS ``modules/diag_oft.py`` ``make_weight``; ComfyUI ``weight_adapter/oft.py``).

    ``oft_blocks`` X ``(n, bs, bs)``; rows of W are grouped into n blocks of bs rows. With R_k from
    :func:`cayley` (constraint = ``alpha · out``, LyCORIS stores the per-dimension constraint in ``alpha``
    and multiplies by ``out_dim``; alpha ≤ 0 or absent: no clamp):

        W''[k·bs + m, ...] = Σ_n R_k[n, m] · W[k·bs + n, ...]     (einsum ``"k n m, k n ... -> k m ..."``)

    i.e. each row block is multiplied by R_kᵀ (``math.md`` writes blockdiag(R)·W; the LyCORIS einsum
    contracts R's first index). Then W'' ← ``rescale`` ⊙ W'' row-wise when ``rescale`` ``(out, 1[, 1, 1])``
    is present. (ComfyUI clamps with the raw alpha and ignores ``rescale``; lorasurgery follows LyCORIS.)
    """

    algo: ClassVar[str] = "oft"

    def __post_init__(self) -> None:
        b = self.blocks
        if b.ndim != 3 or b.shape[1] != b.shape[2]:
            raise self._bad(f"oft_blocks has shape {_shape_str(b)}; expected (n_blocks, bs, bs)", ["oft_blocks"])
        _check_rescale(self, self.rescale, self.out_features)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(weight.shape)
        self._check_shape(shape)
        n, bs = int(self.blocks.shape[0]), int(self.blocks.shape[1])
        r = cayley(self.blocks.to(weight.device), self.constraint)
        wb = weight.reshape(n, bs, -1)
        out = torch.einsum("knm,knx->kmx", r, wb).reshape(shape)
        return self._rescaled(out)



@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class BOFT(_Orthogonal):
    """Butterfly OFT (LyCORIS ``functional/boft.py`` ``diff_weight`` / ``modules/boft.py`` ``make_weight``;
    ComfyUI ``weight_adapter/boft.py``).

    ``oft_blocks`` ``(m, n, b, b)``, out = n·b, b even. R = :func:`cayley` of all blocks (constraint
    ``alpha · out``, norm over all m·n blocks). Stage i = 0..m−1 acts on the output rows with k = 2^i · b/2:
    rows are viewed as ``(out/2k, 2, k)``, permuted to ``(out/2k, k, 2)`` and regrouped into n blocks of b
    rows; each block is multiplied by R[i, j] (einsum ``"b i j, b j ... -> b i ..."``, i.e. R·x, not Rᵀ);
    the permutation is undone. After all stages, W'' ← ``rescale`` ⊙ W'' row-wise.
    """

    algo: ClassVar[str] = "boft"

    def __post_init__(self) -> None:
        bl = self.blocks
        if bl.ndim != 4 or bl.shape[2] != bl.shape[3]:
            raise self._bad(f"oft_blocks has shape {_shape_str(bl)}; expected (m, n_blocks, b, b)", ["oft_blocks"])
        m, n, b = int(bl.shape[0]), int(bl.shape[1]), int(bl.shape[2])
        if b % 2 != 0 or m < 1 or n % (2 ** (m - 1)) != 0:
            raise self._bad(
                f"oft_blocks {_shape_str(bl)} is not a butterfly factorisation: the block size must be even "
                f"and the block count divisible by 2^(m-1)",
                ["oft_blocks"],
            )
        _check_rescale(self, self.rescale, self.out_features)

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[1] * self.blocks.shape[2])

    def _transform(self, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(weight.shape)
        self._check_shape(shape)
        m, n, b = (int(s) for s in self.blocks.shape[:3])
        out = shape[0]
        r = cayley(self.blocks.to(weight.device), self.constraint)
        x = weight.reshape(out, -1)
        cols = x.shape[1]
        for i in range(m):
            k = (2**i) * (b // 2)
            x = x.reshape(out // (2 * k), 2, k, cols).transpose(1, 2).reshape(n, b, cols)
            x = torch.einsum("nij,njc->nic", r[i], x)
            x = x.reshape(out // (2 * k), k, 2, cols).transpose(1, 2).reshape(out, cols)
        return self._rescaled(x.reshape(shape))



# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------


def _input_error(source: str, name: str, message: str, suffixes: Sequence[str] = ()) -> InputError:
    label = f"module '{name}'" if name else "module"
    extra = f" (tensors: {', '.join(sorted(suffixes))})" if suffixes else ""
    return InputError(f"{label}: {message}{extra}.", _where(source))


def _scalar(t: torch.Tensor | None, suffix: str, source: str, name: str) -> float | None:
    """The single value of a scalar tensor (None for absent or meta tensors)."""
    if t is None:
        return None
    if t.numel() != 1:
        raise _input_error(source, name, f"'{suffix}' must hold one value, has shape {_shape_str(t)}", [suffix])
    if t.is_meta:
        return None
    v = float(t.detach().to(torch.float64).reshape(-1)[0].item())
    if not math.isfinite(v):
        raise _input_error(source, name, f"'{suffix}' is not finite ({v})", [suffix])
    return v


def _detect(keys: set[str], source: str, name: str, oft_ndim: int | None) -> str:
    unknown = sorted(keys - MODULE_SUFFIXES)
    if unknown:
        raise _input_error(
            source, name,
            "unknown tensor suffixes; lorasurgery reads LoRA/LoCon, LoHa, LoKr, (IA)^3, full, norm, "
            "OFT, BOFT and GLoRA modules",
            unknown,
        )
    for algo, det in _DETECTION:
        if keys & det:
            if algo == "oft" and oft_ndim == 4:
                return "boft"
            if algo == "oft" and oft_ndim != 3:
                raise _input_error(source, name, "oft_blocks must be 3-D (Diag-OFT) or 4-D (BOFT)", ["oft_blocks"])
            return algo
    raise _input_error(source, name, "no weight tensors: these tensors alone describe no change", sorted(keys))


def _need(tensors: Mapping[str, torch.Tensor], suffix: str, source: str, name: str, algo: str) -> torch.Tensor:
    t = tensors.get(suffix)
    if t is None:
        raise _input_error(
            source, name, f"incomplete {algo} module: '{suffix}' is missing", sorted(tensors.keys())
        )
    return t


def parse_module(name: str, tensors: Mapping[str, torch.Tensor], *, source: str = "") -> Delta:
    """Build the :class:`Delta` of one module from its suffix → tensor mapping.

    The algorithm is detected per module in LyCORIS order (``formats.md`` §3.8: LoRA, LoHa, (IA)^3, LoKr,
    Full, Norm, OFT/BOFT, GLoRA). Every tensor must belong to that algorithm: an unknown suffix, a tensor of
    another algorithm, a missing half of a pair or inconsistent shapes raise :class:`InputError` naming
    ``source``, the module and the offending suffixes. Nothing is dropped silently. Tensors are kept as
    loaded (meta tensors are accepted: values such as alpha then read as absent).
    """
    keys = set(tensors.keys())
    if not keys:
        raise _input_error(source, name, "no tensors")
    oft = tensors.get("oft_blocks")
    algo = _detect(keys, source, name, oft.ndim if oft is not None else None)
    leftover = sorted(keys - _ALLOWED[algo])
    if leftover:
        raise _input_error(
            source, name,
            f"detected as {algo}, but these tensors belong to no {algo} module; the module mixes "
            f"algorithms or is damaged",
            leftover,
        )
    g = tensors.get
    common: dict[str, Any] = {"name": name, "source": source}
    alpha = _scalar(g("alpha"), "alpha", source, name)
    try:
        if algo == "lora":
            up = g("lora_up.weight")
            down = g("lora_down.weight")
            if up is None or down is None:
                missing = "lora_up.weight" if up is None else "lora_down.weight"
                raise _input_error(source, name, f"half of a LoRA pair: '{missing}' is missing", sorted(keys))
            return LowRank(up=up, down=down, mid=g("lora_mid.weight"), alpha=alpha, scale_tensor=g("scale"),
                           dora_scale=g("dora_scale"), **common)
        if algo == "loha":
            return LoHa(
                w1a=_need(tensors, "hada_w1_a", source, name, algo),
                w1b=_need(tensors, "hada_w1_b", source, name, algo),
                w2a=_need(tensors, "hada_w2_a", source, name, algo),
                w2b=_need(tensors, "hada_w2_b", source, name, algo),
                t1=g("hada_t1"), t2=g("hada_t2"), alpha=alpha, scale_tensor=g("scale"),
                dora_scale=g("dora_scale"), **common,
            )
        if algo == "ia3":
            return IA3(weight=_need(tensors, "weight", source, name, algo), on_input=tensors["on_input"], **common)
        if algo == "lokr":
            return LoKr(
                w1=g("lokr_w1"), w1a=g("lokr_w1_a"), w1b=g("lokr_w1_b"), w2=g("lokr_w2"), w2a=g("lokr_w2_a"),
                w2b=g("lokr_w2_b"), t2=g("lokr_t2"), alpha=alpha, scale_tensor=g("scale"),
                dora_scale=g("dora_scale"), **common,
            )
        if algo == "full":
            return Full(diff=g("diff"), diff_b=g("diff_b"), **common)
        if algo == "norm":
            return Norm(w_norm=_need(tensors, "w_norm", source, name, algo), b_norm=g("b_norm"), **common)
        if algo == "oft":
            return OFT(blocks=tensors["oft_blocks"], alpha=alpha, rescale=g("rescale"), **common)
        if algo == "boft":
            return BOFT(blocks=tensors["oft_blocks"], alpha=alpha, rescale=g("rescale"), **common)
        assert algo == "glora"
        return GLoRA(
            a1=_need(tensors, "a1.weight", source, name, algo),
            a2=_need(tensors, "a2.weight", source, name, algo),
            b1=_need(tensors, "b1.weight", source, name, algo),
            b2=_need(tensors, "b2.weight", source, name, algo),
            bm=g("bm.weight"), alpha=alpha, **common,
        )
    except IndexError as exc:  # a 0-dim tensor where a matrix is expected
        raise _input_error(source, name, f"a tensor has too few dimensions for a {algo} module ({exc})", sorted(keys)) from None


def classify_shapes(suffix_shapes: Mapping[str, Sequence[int]]) -> tuple[str, int | None]:
    """(algo, rank) of one module from tensor shapes alone (header-only inspect).

    Uses exactly the detection and validation of :func:`parse_module` (on meta tensors), so the two
    always agree; raises the same :class:`InputError` for malformed modules.
    """
    metas = {k: torch.empty(tuple(int(s) for s in v), device="meta") for k, v in suffix_shapes.items()}
    d = parse_module("", metas)
    return d.algo, d.rank


# --------------------------------------------------------------------------------------------------
# exact rank concatenation
# --------------------------------------------------------------------------------------------------


def concat_lowrank(deltas: Sequence[LowRank]) -> LowRank:
    """Exact sum of low-rank deltas of one module by rank concatenation (``math.md`` §3).

    With c_i = multiplier_i · scale_i: B̃_i = √|c_i|·B_i, Ã_i = sign(c_i)·√|c_i|·A_i, B = [B̃_1 | … ],
    A = [Ã_1; …], alpha = R = Σ r_i (scale 1), so ``result.dense(shape) == Σ_i deltas[i].dense(shape)``.
    Tucker mids are folded into the downs first (plain LoCon of the same rank). Inputs with c_i = 0 are
    left out. The result is float32 with multiplier 1; it is 4-D (up ``(out, R, 1, 1)``, down
    ``(R, in, kh, kw)``) when the first kept input is 4-D, else 2-D.

    Raises :class:`PlanError` for DoRA inputs, inputs that do not describe the same weight shape, an empty
    list, or when every input has c_i = 0.
    """
    if not deltas:
        raise PlanError("Nothing to concatenate: no low-rank deltas were given for this module.")
    for d in deltas:
        if not isinstance(d, LowRank):
            raise PlanError(
                f"{d._label()} is a {d.algo} delta; only LoRA/LoCon deltas can be concatenated exactly. "
                f"Densify and re-factor LoHa/LoKr/full deltas instead.",
                _where(d.source),
            )
        if d.needs_base:
            raise d._refuse_base("an exact LoRA+LoRA merge")
    first = deltas[0]
    for d in deltas[1:]:
        if d.out_features != first.out_features or d.in_features != first.in_features or not _kernel_compatible(d.kernel, first.kernel):
            raise PlanError(
                f"{d._label()}: cannot concatenate deltas of different shapes "
                f"(out {d.out_features}, in {d.in_features}, kernel {d.kernel}) and "
                f"(out {first.out_features}, in {first.in_features}, kernel {first.kernel}).",
                _where(d.source),
            )
    kept = [(d, float(d.multiplier) * d.scale) for d in deltas]
    kept = [(d, c) for d, c in kept if c != 0.0]
    if not kept:
        raise PlanError(
            f"{first._label()}: every input has weight 0 (multiplier × alpha/rank), so the merged module is "
            f"empty; leave it out.",
            _where(first.source),
        )
    device = kept[0][0].up.device
    ups, downs = [], []
    for d, c in kept:
        b, a = d._raw_factors(device)
        root = math.sqrt(abs(c))
        ups.append(b * root)
        downs.append(a * (math.copysign(root, c)))
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    ref = kept[0][0]
    rank = int(down.shape[0])
    if ref.up.ndim > 2 or ref.down.ndim > 2:
        k = ref.kernel if ref.kernel else (1, 1)
        in_ch = ref.in_features // _prod(k)
        up = up.reshape(up.shape[0], rank, *([1] * len(k)))
        down = down.reshape(rank, in_ch, *k)
    return LowRank(up=up, down=down, alpha=float(rank), name=first.name, source=first.source)
