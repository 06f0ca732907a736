"""SVD back-ends, rank rules and device choice (``math.md`` sections 5, 6, 7, 8 and 10).

Every function here is a pure function of its tensor arguments: nothing is cached, no global random state
is read or written, and inputs are never modified in place.

Precision
---------
Inputs of any floating dtype are upcast before any arithmetic: float16 / bfloat16 / float32 inputs are
computed in float32, float64 inputs stay float64 (used by reference tests). Results are returned in that
compute dtype on the input's device; casting to an output dtype is the caller's last step. The small
``R x R`` core of the factored SVD is decomposed in float64 by default (``math.md`` §10 allows this); its
cost is negligible.

Sign convention
---------------
Singular vectors are defined up to a joint sign flip ``(u_i, v_i) -> (-u_i, -v_i)``. Every SVD returned by
this module is canonicalised (:func:`canonicalize_signs`): the entry of largest magnitude of each ``u_i``
is positive (the first such entry on exact ties). Different drivers and devices then agree up to rounding,
except inside groups of repeated singular values where only the subspace is defined.

Drivers
-------
* CPU: ``torch.linalg.svd`` runs LAPACK ``gesdd`` (divide and conquer). If it fails to converge, the
  matrix is decomposed again in float64 and the result cast back.
* CUDA: the driver is chosen explicitly, ``gesvd`` by default (:data:`CUDA_SVD_DRIVER`). PyTorch's default
  (``gesvdj``, Jacobi) silently falls back to ``gesvd`` with "failed to converge" warnings on
  ill-conditioned inputs and is less precise: on an H100 (torch 2.11, cu13.0) its top-32 singular values of
  3072 x 3072 and 3072 x 12288 matrices were off by up to 1.3e-4 * sigma_1 against 1e-6 for ``gesvd``,
  for only a 1.2-1.35x speed-up. ``gesvda`` was 11x faster and accurate for the leading values of those
  matrices, but cuSOLVER documents it only for tall matrices and only the leading part of the spectrum, so
  it is not used for exact SVDs (rank rules need every value). ``gesvd`` (QR iteration) is the
  reference-quality choice (``math.md`` §6.2). Small matrices (larger side <= :data:`SMALL_SVD_ON_CPU`,
  e.g. the core of the factored SVD) are decomposed on the CPU when no driver is named. If the CUDA call
  raises or returns non-finite values, the matrix is decomposed on the CPU and the result moved back;
  :attr:`SVD.driver` records what actually ran.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor

from lorasurgery.errors import InputError, PlanError

__all__ = [
    "CUDA_SVD_DRIVER",
    "RANK_METHODS",
    "SMALL_SVD_ON_CPU",
    "SVD",
    "canonicalize_signs",
    "choose_svd",
    "clamp_quantile",
    "default_sketch_size",
    "derive_seed",
    "lowrank_svd_of_sum",
    "order_statistic_quantile",
    "resolve_device",
    "retained_fraction",
    "select_rank",
    "svd_batched",
    "svd_exact",
    "svd_factored",
    "svd_for_rank",
    "svd_randomized",
    "truncate",
]

#: cuSOLVER driver used for dense SVDs on CUDA (see the module docstring).
CUDA_SVD_DRIVER: str = "gesvd"

#: On CUDA, matrices whose larger side is at most this are decomposed on the CPU (LAPACK) and the result
#: moved back, unless a driver is named explicitly: cuSOLVER is slower there. Measured on an H100 with a
#: 16-core host, float64 R x R (the factored core): R = 64: 1.0 ms via the CPU vs 3.8 ms gesvd; R = 256:
#: 9.5 vs 22 ms; R = 1024: 194 vs 131 ms (pytorch/pytorch#41306).
SMALL_SVD_ON_CPU: int = 256

#: Rank-selection methods understood by :func:`select_rank` (``math.md`` §7).
RANK_METHODS: tuple[str, ...] = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

RankMethod = Literal["fixed", "sv_ratio", "sv_fro", "sv_cumulative"]
SvdMethod = Literal["auto", "exact", "randomized"]
Split = Literal["sqrt", "up"]

# Relative slack used when a rank rule compares a float64 partial sum or a singular value with its
# threshold, so that exact ties (e.g. 0.8**2 * 25 == 16 in exact arithmetic) resolve as they would in exact
# arithmetic. It is far below float32 resolution, so it never changes a decision on computed spectra.
_TIE_RTOL = 1e-12

# A singular value at or below this (the smallest normal float32) counts as numerically zero.
_SIGMA_ZERO = float(torch.finfo(torch.float32).tiny)

# When S is given with a total energy but without an explicit ``complete`` flag, S is taken to be the
# whole spectrum if sum(S**2) reaches the total within this relative tolerance (float32 rounding).
_COMPLETE_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# Devices and seeds
# ----------------------------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device) -> torch.device:
    """Turn a ``--device`` option into a :class:`torch.device`.

    Accepted: ``"auto"`` (the current CUDA device if CUDA is available, else the CPU), ``"cpu"``,
    ``"cuda"`` (the current CUDA device) and ``"cuda:N"``. Case and surrounding spaces are ignored.

    Raises:
        PlanError: for any other spelling, when CUDA is requested but ``torch.cuda.is_available()`` is
            false, or when ``N`` is not below ``torch.cuda.device_count()``.
    """
    if isinstance(spec, torch.device):
        text = str(spec)
    elif isinstance(spec, str):
        text = spec.strip().lower()
    else:
        raise PlanError(f"device must be a string such as 'auto', 'cpu', 'cuda' or 'cuda:0', not {spec!r}")
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    match = _DEVICE_RE.match(text)
    if match is None:
        raise PlanError(
            f"unknown device {spec!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N' (N = GPU index, 0-based)"
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise PlanError(f"unknown device {spec!r}: the CPU has no index; use 'cpu'")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PlanError(
            f"device {spec!r} requested but CUDA is not available (PyTorch {torch.__version__}"
            f"{', a CPU-only build' if torch.version.cuda is None else ''}); use --device cpu or auto"
        )
    count = torch.cuda.device_count()
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    n = int(index)
    if n >= count:
        raise PlanError(
            f"device {spec!r} requested but only {count} CUDA device(s) are visible (indices 0..{count - 1})"
        )
    return torch.device("cuda", n)


def derive_seed(seed: int, index: int, key: str) -> int:
    """Per-tensor seed from the global seed, the input index and the canonical module key (``math.md`` §11).

    The first 8 bytes of SHA-256 of the UTF-8 string ``f"{seed}\\0{index}\\0{key}"``, read little-endian and
    masked to 63 bits, so the value is a valid non-negative ``torch.Generator`` seed. Independent of
    device, thread count and processing order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"seed must be an integer, not {seed!r}")
    if isinstance(index, bool) or not isinstance(index, int):
        raise PlanError(f"input index must be an integer, not {index!r}")
    digest = hashlib.sha256(f"{seed}\0{index}\0{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------------------------
# Result type
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SVD:
    """A thin SVD ``M ~= U @ diag(S) @ Vh`` plus what the rank rules need.

    Unpacks like the tuple of :func:`torch.linalg.svd`: ``U, S, Vh = svd_exact(M)``.

    Attributes:
        U: ``(m, p)`` left singular vectors (columns), sign-canonicalised.
        S: ``(p,)`` singular values, non-increasing.
        Vh: ``(p, n)`` right singular vectors (rows).
        complete: True when ``S`` holds the whole spectrum of ``M`` (exact and factored SVDs), False for
            a randomized top-k SVD.
        total_energy: ``||M||_F**2`` (the true total, also for a randomized SVD), as a Python float.
        total_nuclear: ``sum(sigma_i)`` over the whole spectrum when ``complete``, else None.
        method: ``"exact"``, ``"randomized"`` or ``"factored"``.
        driver: the back-end that produced the decomposition, e.g. ``"lapack-gesdd"``,
            ``"cusolver-gesvd"``, ``"cpu-fallback"``.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    complete: bool
    total_energy: float
    total_nuclear: float | None
    method: str
    driver: str

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.U, self.S, self.Vh))

    def select_rank(self, method: RankMethod, param: float, *, max_rank: int | None) -> int:
        """:func:`select_rank` on this spectrum with its true totals and completeness."""
        return select_rank(
            self.S,
            method,
            param,
            max_rank=max_rank,
            total_energy=self.total_energy,
            total_nuclear=self.total_nuclear,
            complete=self.complete,
        )

    def truncate(self, r: int, *, split: Split = "sqrt") -> tuple[Tensor, Tensor]:
        """:func:`truncate` of this SVD to rank ``r``."""
        return truncate(self.U, self.S, self.Vh, r, split=split)

    def retained_fraction(self, r: int) -> float:
        """:func:`retained_fraction` of the top ``r`` triplets against the true total energy."""
        return retained_fraction(self.S, r, self.total_energy)


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise PlanError(f"SVD needs a floating-point matrix, got dtype {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_matrix(M: Tensor, what: str = "matrix") -> Tensor:
    if not isinstance(M, Tensor):
        raise PlanError(f"{what} must be a torch.Tensor, not {type(M).__name__}")
    if M.dim() != 2:
        raise PlanError(f"{what} must be 2-D (flatten conv kernels first), got shape {tuple(M.shape)}")
    M = M.to(_compute_dtype(M.dtype))
    if not bool(torch.isfinite(M).all()):
        raise InputError(f"{what} of shape {tuple(M.shape)} contains NaN or Inf values; cannot decompose it")
    return M


def canonicalize_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so the largest-magnitude entry of ``u_i`` is positive (``math.md`` §10).

    Works on single ``(m, p)`` / ``(p, n)`` factors and on batches ``(..., m, p)`` / ``(..., p, n)``.
    ``U @ diag(S) @ Vh`` is unchanged. On exact magnitude ties the first (lowest row index) entry decides.
    Returns new tensors.
    """
    if U.shape[-1] == 0 or U.shape[-2] == 0:
        return U.clone(), Vh.clone()
    # the largest magnitude is the largest value or minus the smallest: two plain reductions, about 10×
    # faster than an argmax of |U| across rows; only a tie between +x and -x needs the argmax (first wins)
    hi, lo = U.amax(dim=-2, keepdim=True), U.amin(dim=-2, keepdim=True)  # (..., 1, p)
    if bool(((hi == -lo) & (hi != 0)).any()):
        pivot = torch.gather(U, -2, U.abs().argmax(dim=-2, keepdim=True))
        signs = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
    else:
        signs = torch.where(-lo > hi, -1.0, 1.0).to(U.dtype)
    return U * signs, Vh * signs.transpose(-2, -1)


def _energy(M: Tensor) -> float:
    """||M||_F**2 accumulated in float64, in row chunks of about 2**22 elements (bounded extra memory)."""
    rows = max(1, (1 << 22) // max(1, M.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=M.device)
    for start in range(0, M.shape[0], rows):
        chunk = M[start : start + rows].double()
        total += (chunk * chunk).sum()
    return float(total)


def _dense_svd(M: Tensor, driver: str | None) -> tuple[Tensor, Tensor, Tensor, str]:
    """Thin SVD of a finite float32/float64 matrix (or batch) with the driver policy; no sign fix."""
    if M.device.type == "cuda":
        if driver is None and max(M.shape[-2:]) <= SMALL_SVD_ON_CPU:
            U, S, Vh, used = _dense_svd(M.cpu(), None)
            return U.to(M.device), S.to(M.device), Vh.to(M.device), f"{used}-small-on-cpu"
        drv = CUDA_SVD_DRIVER if driver is None else driver
        try:
            U, S, Vh = torch.linalg.svd(M, full_matrices=False, driver=drv)
            if bool(torch.isfinite(S).all()):
                return U, S, Vh, f"cusolver-{drv}"
        except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
            pass
        U, S, Vh, _ = _dense_svd(M.cpu(), None)
        return U.to(M.device), S.to(M.device), Vh.to(M.device), "cpu-fallback"
    if M.device.type != "cpu":
        raise PlanError(f"unsupported device {M.device}: lorasurgery computes on 'cpu' or 'cuda'")
    if driver is not None:
        raise PlanError(f"SVD driver {driver!r} only applies on CUDA; the CPU always uses LAPACK gesdd")
    try:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return U, S, Vh, "lapack-gesdd"
    except RuntimeError:
        if M.dtype == torch.float64:
            raise
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        return U.to(M.dtype), S.to(M.dtype), Vh.to(M.dtype), "lapack-gesdd-float64"


def _check_driver(driver: str | None) -> None:
    if driver not in (None, "gesvd", "gesvdj", "gesvda"):
        raise PlanError(f"unknown CUDA SVD driver {driver!r}: use 'gesvd', 'gesvdj' or 'gesvda'")


# ----------------------------------------------------------------------------------------------------
# SVD back-ends
# ----------------------------------------------------------------------------------------------------


def svd_exact(M: Tensor, *, driver: str | None = None) -> SVD:
    """Exact thin SVD (``full_matrices=False``) of a 2-D matrix, sign-canonicalised.

    Args:
        M: ``(m, n)`` matrix of any floating dtype on the CPU or a CUDA device.
        driver: CUDA only: ``"gesvd"`` (default, :data:`CUDA_SVD_DRIVER`), ``"gesvdj"`` or ``"gesvda"``.
            Must be None on the CPU.

    Returns:
        :class:`SVD` with ``p = min(m, n)`` triplets, ``complete=True``, ``total_energy = sum(S**2)`` and
        ``total_nuclear = sum(S)`` (float64 sums), on ``M``'s device in float32 (float64 for float64 input).

    Raises:
        InputError: if ``M`` contains NaN or Inf.
        PlanError: for a non-2-D or non-floating input or an unknown driver.
    """
    _check_driver(driver)
    M = _as_matrix(M)
    U, S, Vh, used = _dense_svd(M, driver)
    U, Vh = canonicalize_signs(U, Vh)
    S64 = S.double()
    return SVD(U, S, Vh, True, float((S64 * S64).sum()), float(S64.sum()), "exact", used)


def default_sketch_size(k: int, m: int, n: int, oversample: int | None = None) -> int:
    """Sketch width q of the randomized SVD: ``min(max(2k, k + 10), m, n)``, or ``min(k + oversample, m, n)``."""
    q = max(2 * k, k + 10) if oversample is None else k + oversample
    return min(q, m, n)


def _orth(Y: Tensor) -> Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def svd_randomized(
    M: Tensor,
    k: int,
    *,
    oversample: int | None = None,
    power_iters: int = 4,
    seed: int,
    key: str = "",
    index: int = 0,
    driver: str | None = None,
) -> SVD:
    """Top-k randomized SVD (Halko, Martinsson and Tropp 2009; ``math.md`` §6.1), sign-canonicalised.

    Algorithm, with q = :func:`default_sketch_size` (``min(max(2k, k + 10), m, n)`` unless ``oversample``
    is given, then ``min(k + oversample, m, n)``):

    1. Omega (``n x q``, i.i.d. N(0, 1), float32) from a ``torch.Generator`` on the CPU seeded with
       :func:`derive_seed` ``(seed, index, key)``, then moved to ``M``'s device and dtype — so a CPU and a
       CUDA run use the same Omega and the result depends on nothing but the arguments.
    2. Q = orth(M Omega) (thin QR).
    3. ``power_iters`` times: Z = orth(M^T Q); Q = orth(M Z) — re-orthonormalised at every step.
    4. C = Q^T M (``q x n``); exact thin SVD C = U_c S V^T (same driver policy as :func:`svd_exact`);
       U = Q U_c.
    5. Keep the top ``k`` triplets.

    Args:
        M: ``(m, n)`` floating matrix on the CPU or CUDA.
        k: number of triplets wanted, >= 1; values above ``min(m, n)`` are capped to it.
        oversample: extra sketch columns (>= 0) instead of the default rule.
        power_iters: number of power iterations (>= 0; 4 by default; 0 is inaccurate, see §6.1).
        seed, index, key: global seed, input index and canonical module key for :func:`derive_seed`.
        driver: CUDA driver for the small core SVD (as in :func:`svd_exact`).

    Returns:
        :class:`SVD` with ``min(k, m, n)`` triplets, ``complete=False`` (unless q == min(m, n) == k, when
        the whole spectrum was computed), ``total_energy = ||M||_F**2`` computed from ``M`` itself and
        ``total_nuclear=None`` (unless complete).
    """
    _check_driver(driver)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PlanError(f"randomized SVD rank k must be an integer >= 1, got {k!r}")
    if oversample is not None and (isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0):
        raise PlanError(f"oversample must be an integer >= 0, got {oversample!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise PlanError(f"power_iters must be an integer >= 0, got {power_iters!r}")
    M = _as_matrix(M)
    m, n = M.shape
    k = min(k, m, n)
    if k == 0:
        return svd_exact(M, driver=driver)
    q = default_sketch_size(k, m, n, oversample)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(derive_seed(seed, index, key))
    omega = torch.randn(n, q, generator=gen, dtype=torch.float32).to(device=M.device, dtype=M.dtype)
    Q = _orth(M @ omega)
    for _ in range(power_iters):
        Z = _orth(M.mT @ Q)
        Q = _orth(M @ Z)
    C = Q.mT @ M
    Uc, S, Vh, used = _dense_svd(C, driver)
    U = Q @ Uc
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    U, Vh = canonicalize_signs(U, Vh)
    complete = k == min(m, n)
    nuclear = float(S.double().sum()) if complete else None
    return SVD(
        U.contiguous(), S.contiguous(), Vh.contiguous(), complete, _energy(M), nuclear, "randomized", used
    )


def svd_factored(B: Tensor, A: Tensor, *, core_float64: bool = True, driver: str | None = None) -> SVD:
    """Exact thin SVD of ``B @ A`` without forming it (``math.md`` §5).

    Thin QR of ``B = Q_b R_b`` and ``A^T = Q_a R_a``; SVD of the core ``C = R_b R_a^T = U_c S V_c^T``;
    then ``B A = (Q_b U_c) S (Q_a V_c)^T``. Cost O((m + n) R^2 + R^3), memory O((m + n) R); no ``m x n``
    intermediate.

    Args:
        B: ``(m, R)`` up factor (scales and weights already folded in).
        A: ``(R, n)`` down factor.
        core_float64: decompose the small core in float64 (default) for accurate small singular values.
        driver: CUDA driver for the core SVD.

    Returns:
        :class:`SVD` with ``p = min(m, n, R)`` triplets — the whole nonzero spectrum, so ``complete=True``;
        ``total_energy = ||C||_F**2 = ||B A||_F**2`` and ``total_nuclear = sum(S)`` are exact totals.
    """
    _check_driver(driver)
    B = _as_matrix(B, "up factor B")
    A = _as_matrix(A, "down factor A")
    if B.shape[1] != A.shape[0]:
        raise PlanError(f"factored SVD needs B (m, R) and A (R, n); got {tuple(B.shape)} and {tuple(A.shape)}")
    if B.device != A.device:
        raise PlanError(f"factors are on different devices ({B.device} and {A.device})")
    dtype = torch.promote_types(B.dtype, A.dtype)
    B, A = B.to(dtype), A.to(dtype)
    Qb, Rb = torch.linalg.qr(B, mode="reduced")  # (m, p1), (p1, R)
    Qa, Ra = torch.linalg.qr(A.mT, mode="reduced")  # (n, p2), (p2, R)
    core_dtype = torch.float64 if core_float64 else dtype
    C = Rb.to(core_dtype) @ Ra.to(core_dtype).mT  # (p1, p2)
    energy = float(torch.linalg.vector_norm(C.double())) ** 2
    Uc, S, Vch, used = _dense_svd(C, driver)
    U = Qb @ Uc.to(dtype)
    Vh = Vch.to(dtype) @ Qa.mT
    U, Vh = canonicalize_signs(U, Vh)
    nuclear = float(S.double().sum())
    return SVD(U.contiguous(), S.to(dtype), Vh.contiguous(), True, energy, nuclear, "factored", used)


def lowrank_svd_of_sum(
    factors: Sequence[tuple[Tensor, Tensor]], *, core_float64: bool = True, driver: str | None = None
) -> SVD:
    """Exact SVD of ``sum_i B_i @ A_i`` via rank concatenation and :func:`svd_factored`.

    ``B = [B_1 | B_2 | ...]`` (columns), ``A = [A_1; A_2; ...]`` (rows), so ``B A = sum_i B_i A_i``. The
    ``B_i`` must already carry each term's weight and scale. Ranks may differ between terms.
    """
    if len(factors) == 0:
        raise PlanError("lowrank_svd_of_sum needs at least one (B, A) pair")
    m = factors[0][0].shape[0] if factors[0][0].dim() == 2 else None
    n = factors[0][1].shape[1] if factors[0][1].dim() == 2 else None
    for i, (B, A) in enumerate(factors):
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or B.shape[0] != m or A.shape[1] != n:
            raise PlanError(
                f"term {i}: factors of shape {tuple(B.shape)} and {tuple(A.shape)} do not form an "
                f"({m}, R) @ (R, {n}) product like the first term"
            )
    B = torch.cat([B for B, _ in factors], dim=1)
    A = torch.cat([A for _, A in factors], dim=0)
    return svd_factored(B, A, core_float64=core_float64, driver=driver)


def svd_batched(Ms: Sequence[Tensor], *, driver: str | None = None) -> list[SVD]:
    """Exact thin SVDs of several same-shaped matrices on one device.

    On CUDA the matrices are stacked and decomposed by one batched ``torch.linalg.svd`` call with the
    explicit driver (falling back to one :func:`svd_exact` per matrix if that call fails); on the CPU they
    are decomposed one by one (LAPACK has no batched SVD; a loop is as fast and needs no stacked copy).
    Each result equals :func:`svd_exact` of that matrix up to rounding.

    Batching saves launch overhead, not arithmetic: with ``gesvd``, cuSOLVER still decomposes large
    matrices one after another. Measured on an H100, 4 x (3072 x 3072) took 0.68-0.81 s per matrix
    against 0.79-0.85 s for single calls (x1.05-1.16), 4 x (3072 x 12288) x1.01-1.10. Peak memory holds
    the stacked copy of all inputs and all factors at once.
    """
    _check_driver(driver)
    if len(Ms) == 0:
        return []
    mats = [_as_matrix(M, f"matrix {i}") for i, M in enumerate(Ms)]
    shape, device = mats[0].shape, mats[0].device
    for i, M in enumerate(mats):
        if M.shape != shape or M.device != device:
            raise PlanError(
                f"svd_batched needs same-shaped matrices on one device: matrix {i} is {tuple(M.shape)} on "
                f"{M.device}, matrix 0 is {tuple(shape)} on {device}"
            )
    dtype = mats[0].dtype
    if any(M.dtype != dtype for M in mats):
        dtype = torch.float64
        mats = [M.to(dtype) for M in mats]
    if device.type != "cuda":
        return [svd_exact(M, driver=driver) for M in mats]
    drv = CUDA_SVD_DRIVER if driver is None else driver
    try:
        U, S, Vh = torch.linalg.svd(torch.stack(mats), full_matrices=False, driver=drv)
        if not bool(torch.isfinite(S).all()):
            raise RuntimeError("non-finite singular values")
    except RuntimeError:
        return [svd_exact(M, driver=driver) for M in mats]
    U, Vh = canonicalize_signs(U, Vh)
    out = []
    for i in range(len(mats)):
        s64 = S[i].double()
        out.append(
            SVD(U[i], S[i], Vh[i], True, float((s64 * s64).sum()), float(s64.sum()), "exact", f"cusolver-{drv}-batched")
        )
    return out


def choose_svd(shape: Sequence[int], k: int, method: SvdMethod = "auto", device: str | torch.device = "cpu") -> str:
    """Pick ``"exact"`` or ``"randomized"`` for a dense ``(m, n)`` matrix and target rank ``k``.

    ``"exact"`` and ``"randomized"`` are returned as given. ``"auto"`` returns ``"randomized"`` when the
    sketch width q = ``max(2k, k + 10)`` is below ``min(m, n) / 2`` and ``"exact"`` otherwise: near half of
    min(m, n) the randomized SVD (cost ~ m n q (2t + 2) plus QRs) is no faster than a thin exact SVD
    (``math.md`` §6.2).

    The rule does not depend on the device; ``device`` is only validated (:func:`resolve_device`) so a bad
    option fails at plan time. Measured with ``bench_linalg.py --crossover`` (time randomized / time exact,
    k from 8 to 256, shapes 320^2 ... 3072^2 and 1280 x 11520): on an H100 every shape the rule sends to
    the randomized SVD ran at 0.01-0.51 of the exact time, and those it keeps exact at 0.8-2.3; on a
    16-core x86 CPU the randomized choices ran at 0.02-0.77, except right at the bound for small square
    matrices (q / min(m, n) = 0.4: 320^2 with k = 64 and 640^2 with k = 128 at 1.06 and 1.12, i.e. 2-4 ms
    lost), and the exact choices at 0.86-2.3.
    """
    resolve_device(device)
    if method not in ("auto", "exact", "randomized"):
        raise PlanError(f"unknown SVD method {method!r}: use 'auto', 'exact' or 'randomized'")
    if len(shape) != 2 or any((not isinstance(d, int)) or d < 0 for d in shape):
        raise PlanError(f"choose_svd needs a 2-D shape (m, n), got {tuple(shape)!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise PlanError(f"target rank must be an integer >= 1, got {k!r}")
    if method != "auto":
        return method
    q = max(2 * k, k + 10)
    return "randomized" if 2 * q < min(shape) else "exact"


# ----------------------------------------------------------------------------------------------------
# Rank rules
# ----------------------------------------------------------------------------------------------------


def _check_rank_param(method: str, param: float) -> float:
    if method not in RANK_METHODS:
        raise PlanError(f"unknown rank method {method!r}: use one of {', '.join(RANK_METHODS)}")
    if isinstance(param, bool) or not isinstance(param, (int, float)):
        raise PlanError(f"rank parameter for {method} must be a number, got {param!r}")
    p = float(param)
    if not math.isfinite(p):
        raise PlanError(f"rank parameter for {method} must be finite, got {param!r}")
    if method == "fixed":
        if p < 1 or p != int(p):
            raise PlanError(f"fixed rank must be an integer >= 1, got {param!r}")
    elif method == "sv_ratio":
        if not p > 1:
            raise PlanError(f"sv_ratio must be > 1 (keep sigma_i > sigma_1 / ratio; e.g. 2-20), got {param!r}")
    elif not 0 < p <= 1:
        raise PlanError(f"{method} must be in (0, 1] (fraction of the {'energy' if method == 'sv_fro' else 'nuclear norm'}), got {param!r}")
    return p


def _rank_rule(
    s: Tensor,
    method: str,
    p: float,
    max_rank: int | None,
    total_energy: float | None,
    total_nuclear: float | None,
    complete: bool,
) -> tuple[int, bool]:
    """Rank and whether it is determined by ``s`` (False: the answer may lie beyond a truncated ``s``)."""
    L = s.numel()
    cap = L if max_rank is None else min(max_rank, L)
    # The true cap is reachable inside s when s is complete or the user cap is within it.
    cap_inside = complete or (max_rank is not None and max_rank <= L)
    if method == "fixed":
        k = int(p)
        return min(k, cap), complete or min(k, max_rank if max_rank is not None else k) <= L
    if method == "sv_ratio":
        threshold = float(s[0]) / p
        count = int((s > threshold * (1 + _TIE_RTOL)).sum())
        return min(max(count, 1), cap), count < L or cap_inside
    if method == "sv_fro":
        values = s * s
        total = total_energy if total_energy is not None else float(values.sum())
        target = p * p * total
    else:
        values = s
        total = total_nuclear if total_nuclear is not None else float(values.sum())
        target = p * total
    csum = torch.cumsum(values, 0)
    hit = torch.nonzero(csum >= target * (1 - _TIE_RTOL))
    if hit.numel() > 0:
        return min(int(hit[0, 0]) + 1, cap), True
    return cap, cap_inside


def select_rank(
    S: Tensor | Sequence[float],
    method: RankMethod,
    param: float,
    *,
    max_rank: int | None,
    total_energy: float | None = None,
    total_nuclear: float | None = None,
    complete: bool | None = None,
) -> int:
    """Minimal rank meeting a rank rule (``math.md`` §7), capped by ``max_rank`` and ``len(S)``.

    With sigma_1 >= sigma_2 >= ... (``S``), E the total energy and N the nuclear norm:

    * ``fixed``, k (integer >= 1): r = k.
    * ``sv_ratio``, rho > 1: r = #{i : sigma_i > sigma_1 / rho}.
    * ``sv_fro``, phi in (0, 1]: r = min{j : sum_{i<=j} sigma_i^2 >= phi^2 E}.
    * ``sv_cumulative``, tau in (0, 1]: r = min{j : sum_{i<=j} sigma_i >= tau N}.

    Then r = min(r, max_rank, len(S)) and r >= 1. There is no kohya "+1" and no minimum of 2. Exact ties
    count as in exact arithmetic (``sv_ratio``: a sigma equal to the threshold is dropped; cumulative
    rules: a partial sum equal to the target meets it), via a relative slack of 1e-12.

    Returns 0 when sigma_1 is numerically zero (<= the smallest normal float32) or the total energy is 0:
    the module's delta is empty and the caller drops it.

    Args:
        S: singular values, non-increasing (whole spectrum or the top of it).
        method, param: the rule and its parameter.
        max_rank: user cap (>= 1) or None for no cap besides ``len(S)``.
        total_energy: the true ``||dW||_F**2``. Required for ``sv_fro`` when ``S`` is truncated; when
            given it is used instead of ``sum(S**2)`` (which underestimates E for a truncated ``S``).
        total_nuclear: the true nuclear norm. Required for ``sv_cumulative`` when ``S`` is truncated.
        complete: whether ``S`` is the whole spectrum. None: assumed complete unless ``total_energy`` is
            given and ``sum(S**2)`` falls short of it by more than 1e-4 relative. Pass it explicitly when
            known (:meth:`SVD.select_rank` does).

    Raises:
        PlanError: bad method or parameter; ``sv_cumulative`` on a truncated spectrum without
            ``total_nuclear``; ``sv_fro`` on a truncated spectrum without ``total_energy``; or a truncated
            spectrum too short to decide the rank (every returned value still inside the rule and
            ``max_rank`` beyond it) — use an exact or factored SVD, or a randomized one with k = max_rank.
    """
    p = _check_rank_param(method, param)
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise PlanError(f"max_rank must be an integer >= 1 or None, got {max_rank!r}")
    s = (S.detach().to("cpu", torch.float64) if isinstance(S, Tensor) else torch.tensor(list(S), dtype=torch.float64)).flatten()
    if s.numel() == 0:
        return 0
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise InputError("singular values must be finite and non-negative")
    if bool((s[1:] > s[:-1]).any()):
        raise PlanError("singular values must be sorted in non-increasing order")
    for name, value in (("total_energy", total_energy), ("total_nuclear", total_nuclear)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PlanError(f"{name} must be a finite number >= 0, got {value!r}")
    if float(s[0]) <= _SIGMA_ZERO or total_energy == 0 or total_nuclear == 0:
        return 0
    if complete is None:
        complete = total_energy is None or float((s * s).sum()) >= (1 - _COMPLETE_RTOL) * total_energy
    if not complete:
        if method == "sv_cumulative" and total_nuclear is None:
            raise PlanError(
                "rank rule sv_cumulative needs the nuclear norm of the whole spectrum, but only the top "
                f"{s.numel()} singular values were computed; use an exact or factored SVD (--svd exact)"
            )
        if method == "sv_fro" and total_energy is None:
            raise PlanError(
                "rank rule sv_fro on a truncated spectrum needs the true total energy ||dW||_F^2 "
                "(pass total_energy)"
            )
    r, determined = _rank_rule(s, method, p, max_rank, total_energy, total_nuclear, complete)
    if not determined:
        raise PlanError(
            f"rank rule {method}={param} is not decided by the {s.numel()} singular values computed "
            f"(the chosen rank may exceed them, max_rank={max_rank}); compute at least max_rank values or use "
            "an exact SVD"
        )
    return max(r, 1)


def truncate(U: Tensor, S: Tensor, Vh: Tensor, r: int, *, split: Split = "sqrt") -> tuple[Tensor, Tensor]:
    """Rank-``r`` LoRA factors from an SVD: ``up @ down = U_r diag(S_r) Vh_r``.

    ``split="sqrt"`` (default; mergekit / sd-mecha): up = U_r S_r^(1/2), down = S_r^(1/2) Vh_r.
    ``split="up"`` (kohya): up = U_r S_r, down = Vh_r. Loaders use only the product (``math.md`` §5).
    Returns contiguous ``(m, r)`` and ``(r, n)`` tensors (alpha = r keeps the scale at 1).
    """
    if split not in ("sqrt", "up"):
        raise PlanError(f"unknown factor split {split!r}: use 'sqrt' or 'up'")
    p = S.shape[-1]
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= p:
        raise PlanError(f"truncation rank must be an integer in [1, {p}], got {r!r}")
    Ur, Sr, Vr = U[:, :r], S[:r], Vh[:r]
    if split == "up":
        return (Ur * Sr).contiguous(), Vr.contiguous()
    root = Sr.clamp_min(0).sqrt()
    return (Ur * root).contiguous(), (root[:, None] * Vr).contiguous()


def retained_fraction(S: Tensor | Sequence[float], r: int, total_energy: float) -> float:
    """Retained Frobenius fraction ``sqrt(sum_{i<=r} sigma_i^2 / E)`` (per-layer report, ``math.md`` §7).

    ``E`` must be the true ``||dW||_F**2``. Returns 1.0 when ``E`` is 0 (nothing to lose); the result is
    capped at 1.0 against rounding.
    """
    if not (math.isfinite(total_energy) and total_energy >= 0):
        raise PlanError(f"total_energy must be a finite number >= 0, got {total_energy!r}")
    if total_energy == 0:
        return 1.0
    s = S.detach().to("cpu", torch.float64) if isinstance(S, Tensor) else torch.tensor(list(S), dtype=torch.float64)
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= s.numel():
        raise PlanError(f"rank must be an integer in [0, {s.numel()}], got {r!r}")
    kept = float((s[:r] * s[:r]).sum())
    return min(1.0, math.sqrt(kept / total_energy))


def svd_for_rank(
    M: Tensor,
    method: RankMethod,
    param: float,
    *,
    max_rank: int | None,
    svd: SvdMethod = "auto",
    seed: int = 0,
    key: str = "",
    index: int = 0,
    power_iters: int = 4,
    oversample: int | None = None,
    driver: str | None = None,
) -> tuple[SVD, int]:
    """Decompose a dense ``dW`` with just enough of its spectrum for a rank rule; return (SVD, rank).

    The randomized SVD computes k = min(cap, m, n) triplets, with cap = ``param`` for ``fixed`` and
    ``max_rank`` for the dynamic rules, so the rule is always decided inside them (``math.md`` §6.2);
    ``sv_cumulative`` always uses the exact SVD (it needs the nuclear norm); otherwise
    :func:`choose_svd` decides. A rank of 0 means the delta is empty (drop the module).
    """
    p = _check_rank_param(method, param)
    M = _as_matrix(M)
    m, n = M.shape
    if min(m, n) == 0:
        raise PlanError(f"cannot decompose an empty matrix of shape {(m, n)}")
    if method == "fixed":
        want = int(p) if max_rank is None else min(int(p), max_rank)
    else:
        want = max_rank if max_rank is not None else min(m, n)
    k = min(want, m, n)
    chosen = "exact" if method == "sv_cumulative" and svd != "randomized" else choose_svd((m, n), k, svd, M.device)
    if method == "sv_cumulative" and chosen == "randomized":
        raise PlanError("rank rule sv_cumulative needs the whole spectrum: use --svd exact or auto, not randomized")
    if chosen == "randomized":
        res = svd_randomized(
            M, k, oversample=oversample, power_iters=power_iters, seed=seed, key=key, index=index, driver=driver
        )
    else:
        res = svd_exact(M, driver=driver)
    return res, res.select_rank(method, param, max_rank=max_rank)


# ----------------------------------------------------------------------------------------------------
# Clamp-quantile
# ----------------------------------------------------------------------------------------------------


def order_statistic_quantile(x: Tensor, q: float) -> Tensor:
    """The q-quantile of all values of ``x`` with linear interpolation, without ``torch.quantile``.

    For L values, p = q (L - 1) (in float64), j = floor(p): value = x_(j) + (p - j)(x_(j+1) - x_(j)),
    x_(j) being the (j+1)-th smallest (``torch.kthvalue``); the same definition as ``torch.quantile``'s
    ``interpolation="linear"``, but with no 2**24 element limit (pytorch/pytorch#64947). Returns a 0-dim
    tensor on ``x``'s device.
    """
    if not 0 <= q <= 1:
        raise PlanError(f"quantile must be in [0, 1], got {q!r}")
    flat = x.reshape(-1)
    L = flat.numel()
    if L == 0:
        raise PlanError("quantile of an empty tensor")
    pos = q * (L - 1)
    j = min(int(math.floor(pos)), L - 1)
    frac = pos - j
    lo = torch.kthvalue(flat, j + 1).values
    if frac == 0 or j + 1 >= L:
        return lo
    hi = torch.kthvalue(flat, j + 2).values
    return torch.lerp(lo, hi, torch.tensor(frac, dtype=flat.dtype, device=flat.device))


def clamp_quantile(up: Tensor, down: Tensor, q: float = 0.99, *, split: Split = "sqrt") -> tuple[Tensor, Tensor]:
    """kohya-style clamp of LoRA factors at the q-quantile of their values (``math.md`` §8).

    The clamp is defined on the kohya distribution, independent of how the input stores Sigma:

    1. SVD of the product without forming it (:func:`svd_factored`): up @ down = U S Vh (canonical signs).
    2. kohya factors: up_k = U S, down_k = Vh; h = :func:`order_statistic_quantile` of the **signed**
       values of concat(flatten(up_k), flatten(down_k)) (for a symmetric distribution about 2 (1 - q) of
       the entries are clamped, not 1 - q).
    3. Both clamped to [-h, h].
    4. Re-balanced to ``split``: for ``"sqrt"`` column i of up_k is divided by sqrt(sigma_i) and row i of
       down_k multiplied by it (zero sigma: left as is); ``"up"`` returns the kohya factors. The product
       equals kohya's clamped product up_k @ down_k in both cases.

    Works for any element count (order statistics instead of ``torch.quantile``). If the input rank R
    exceeds min(m, n), the extra components are zero and the output is zero-padded back to rank R, so
    shapes are preserved. ``q`` must be in (0.5, 1]; q = 1 leaves the product unchanged.

    Args:
        up: ``(m, R)``; down: ``(R, n)`` (flatten conv downs first).

    Returns:
        ``(up, down)`` in float32 (float64 for float64 inputs) on the input device.
    """
    if split not in ("sqrt", "up"):
        raise PlanError(f"unknown factor split {split!r}: use 'sqrt' or 'up'")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.5 < q <= 1:
        raise PlanError(
            f"clamp quantile must be in (0.5, 1] (it is a quantile of signed values; kohya uses 0.99), got {q!r}"
        )
    res = svd_factored(up, down)
    U, S, Vh = res.U, res.S, res.Vh
    R = up.shape[1]
    p = S.shape[0]
    if p < R:  # zero components beyond min(m, n): pad so the output keeps rank R
        U = torch.cat([U, U.new_zeros(U.shape[0], R - p)], dim=1)
        Vh = torch.cat([Vh, Vh.new_zeros(R - p, Vh.shape[1])], dim=0)
        S = torch.cat([S, S.new_zeros(R - p)])
    up_k = U * S
    down_k = Vh
    h = order_statistic_quantile(torch.cat([up_k.reshape(-1), down_k.reshape(-1)]), float(q))
    if float(h) < 0:
        raise PlanError(
            f"clamp quantile {q} of the factor values is negative ({float(h):.3g}); use a q closer to 1"
        )
    up_k = up_k.clamp(-h, h)
    down_k = down_k.clamp(-h, h)
    if split == "up":
        return up_k.contiguous(), down_k.contiguous()
    root = torch.where(S > 0, S.sqrt(), torch.ones_like(S))
    return (up_k / root).contiguous(), (down_k * root[:, None]).contiguous()
