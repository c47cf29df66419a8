"""Batched truncated SVD: the top-k singular triplets of a stack of matrices, fast and to a stated accuracy.

    A: [..., m, n]  →  U: [..., m, k],  S: [..., k] (descending, ≥ 0),  V: [..., n, k],   A ≈ U·diag(S)·Vᵀ

Computed in float32 for float16 / bfloat16 / float32 input and in float64 for float64 input; the
factors are returned in that compute dtype. Every method works on the "tall" orientation m ≥ n
(a wide matrix is transposed and U, V swapped back at the end).

Methods (``method=``):

- ``"exact"``: torch.linalg.svd, then truncation.
- ``"gram"``: G = AᵀA formed in float64 (so squaring the fp32 entries loses nothing), eigh(G) gives
  the top-k right singular subspace V₀; a Rayleigh-Ritz step on it, A·V₀ = Û·diag(S)·Wᵀ (a thin
  SVD of an m×k matrix, float64), gives U = Û, V = V₀·W. About 1.6× faster than torch.linalg.svd
  on a 1536×1024 fp32 matrix on CPU (2 cores), accurate to float64 rounding for fp32 input.
- ``"randomized"``: subspace iteration (Halko, Martinsson, Tropp 2011) with l = k + p columns:
  Ω [n, l] Gaussian, Q = orth(A·Ω), then per iteration Vq = orth(Aᵀ·Q), C = A·Vq = Q·R, the l×l SVD
  R = Ur·diag(S)·Wrᵀ, U = Q·Ur, V = Vq·Wr (so A·V = U·diag(S) exactly). orth is CholeskyQR2 with a
  Householder fallback (``_orthonormalize.py``). With ``tol`` it stops when the convergence test
  below passes, else it runs ``n_iter`` iterations.
- ``"auto"`` (default): two checked routes, chosen per shape by a measured cost model
  (``krylov_budget``: how many block Krylov steps cost as much as the Gram-eigen route).

  * Gram-eigen route, taken directly when that budget is below ``MIN_KRYLOV_STEPS`` = 24
    (small n, or k + p not much smaller than n; e.g. all of MiniLM's 384-wide matrices): G = AᵀA
    and eigh(G) in the working precision (float32 for float32 input, about 2× cheaper than
    float64 and 2-3× cheaper than torch.linalg.svd at n = 384), whose top l = k + p eigenvectors
    start the subspace iteration below; from such a start the first Ritz triplets already pass the
    convergence test (MiniLM-L6: error measure ~1e-8 where 1 passes). Up to ``GRAM_REFINE_ITERS``
    = 3 iterations are allowed; items that still fail the test, or whose eigh fails, are redone
    by the float64 ``"gram"`` route.
  * Otherwise randomized block Krylov (Musco & Musco 2015, :func:`_block_krylov`): blocks of
    b = k/2 (16..64; 16..128 on CUDA) columns, Krylov basis [Ω, AᵀA·Ω, (AᵀA)²·Ω, …] kept whole, Rayleigh-Ritz on
    it, the convergence test below after every step (no extra pass over A: Aᵀ·A·V is the next
    block's product) and the stop at the first step that passes it, with a test tolerance of
    0.5·tol (its estimate was within 2-3× of the true error on power-law and flat spectra at
    4096²). At most ``krylov_max_steps`` steps (a basis of 1536 columns or n/2); items that have
    not converged are finished by the Gram-eigen route above. ``n_iter`` caps the steps. On a
    large CPU matrix both products of a step read A once (:mod:`._gram_pass`); a wide one then
    builds its Krylov space on its long side (b ≤ 16), reading its rows as stored (not on bf16
    steps, below, whose products take either layout at the same cost). On a CPU with
    AMX, the steps of a float32 matrix of ≥ 16 MB take their products from a bf16 copy of A
    (:mod:`._low_precision`); the returned triplets and their test then come from fp32 products
    with A (:func:`_certify`); a matrix that fails that test steps on and is certified again,
    one that never passes it is redone on fp32 steps.

Convergence test, per matrix, on the Ritz triplets (uᵢ, σ̃ᵢ, vᵢ), i < k, with rᵢ = Aᵀuᵢ − σ̃ᵢvᵢ
(Aᵀ·Q is the next iteration's first product, so the test costs no extra pass over A); the same
test checks the Ritz triplets of the Gram-eigen route's start, so neither route returns an
unchecked float32 result:

- Ritz values are lower bounds (σ̃ᵢ ≤ σᵢ, interlacing); the gap σᵢ² − σ̃ᵢ² is estimated by
  min(2σ̃ᵢ‖rᵢ‖ + ‖rᵢ‖², σ̃ᵢ²‖rᵢ‖² / (σ̃ᵢ² − σ̃ₗ²)) (first order, and Kato-Temple with the last Ritz
  value σ̃ₗ standing for the spectrum outside the subspace);
- singular values: that estimate over 2σ̃ᵢ² ≤ 0.2·tol;
- residual: ‖A − U·diag(S)·Vᵀ‖²_F = ‖A‖²_F − Σσ̃ᵢ² is known exactly, the optimum is ≥ that minus
  the summed estimate; their ratio must be ≤ (1 + 0.2·tol)². A residual already at the rounding
  floor (≤ 64·ε·‖A‖_F) passes.

Accuracy contract (method="auto", default options; tested in tests/ops/test_truncated_svd.py on
decaying, flat and near-flat synthetic spectra, on the block Krylov route with odd and wide
shapes, and on MiniLM-L6 weights): top-k singular values
within 1e-3 relative, ‖A − U·diag(S)·Vᵀ‖_F ≤ 1.001 × the optimal rank-k error, ‖UᵀU − I‖ and
‖VᵀV − I‖ ≤ 1e-5 (max entry) in float32.

Conventions: singular values below the rounding floor √max(m, n)·ε·σ₁ are returned as exact zeros
(an all-zero matrix gives S = 0 and orthonormal U, V: on "auto" the first k unit vectors, without
iterating). A matrix with ‖A‖_F outside 2^±40 is scaled by a power of two to unit norm first and
S scaled back (exact): the Krylov products square the scale, and fp32 would overflow or
underflow. Signs are fixed: the largest-magnitude entry of each column of U is positive (the first
one on a tie), and the matching column of V is flipped with it. The random sketch comes from ``generator`` (a fresh generator seeded with 0 when
None), drawn once per shape and shared by the matrices of a batch, so a matrix's result does not
depend on the other matrices stacked with it (up to rounding of batched GEMMs) and the same seed
gives bitwise the same output.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from spectral_kernels.ops._checks import FLOAT_DTYPES
from spectral_kernels.ops._gram_pass import fused_worthwhile, gram_products
from spectral_kernels.ops._low_precision import (
    LOW_DTYPE, low_copy, low_precision_worthwhile, low_products, usable_low_source,
)
from spectral_kernels.ops._workspace import compute_copy, release_workspace  # noqa: F401  (public here)
from spectral_kernels.ops._orthonormalize import num_threads, orthonormalize, small_lapack

METHODS = ("auto", "exact", "gram", "randomized")

#: The accuracy target of method="auto" (relative error of the top-k singular values, and the
#: allowed excess of the residual over the optimal rank-k error). The test uses half of it: the
#: Kato-Temple estimate uses the last Ritz value as the gap, which is an estimate, not a bound; at
#: 0.5 the worst measured errors reached 0.7e-3 on near-flat spectra, at 0.2 they stay under 3e-4.
CONTRACT_TOL = 1e-3
_TEST_SAFETY = 0.2
_KRYLOV_SAFETY = 0.5
#: Smallest σₖ/σ₁ for which the block Krylov test uses the squared s·b Gram (see _block_krylov).
_KRYLOV_GRAM_MIN_RATIO = 3e-2
#: Power iterations of method="randomized" without tol (fixed count), and its cap with tol.
DEFAULT_N_ITER = 4
MAX_N_ITER = 64


class SVDResult(NamedTuple):
    """Truncated SVD factors: A ≈ U·diag(S)·Vᵀ. U [..., m, k], S [..., k] descending, V [..., n, k]."""

    U: Tensor
    S: Tensor
    V: Tensor


# --- argument checks ---------------------------------------------------------------------------
def _sq_norms(A: Tensor) -> Tensor:
    """‖A‖²_F per matrix [...] in float64: row norms along A's contiguous dimension, computed in
    float32 (float64 for float64 input; parallel, and accurate: 5e-9 relative at 11008×4096 fp32,
    where one fp32 norm of the whole matrix was off by 7e-3), summed in float64. 6 ms at
    11008×4096 on 2 cores."""
    dim = -1 if A.stride(-1) == 1 or A.stride(-2) != 1 else -2
    half = A.dtype in (torch.bfloat16, torch.float16)
    if half and A.device.type == "cpu" and A.shape[-2] * A.shape[-1] >= _HALF_CHUNKED_MIN:
        return _half_sq_norms(A, dim)
    acc = torch.float64 if A.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(A, dim=dim, dtype=acc).to(torch.float64).square().sum(-1)


#: Entries per matrix from which a bf16 / fp16 CPU input's norms go through an fp32 chunk buffer
#: (:func:`_half_sq_norms`), and that buffer's size.
_HALF_CHUNKED_MIN = 1 << 20
_HALF_CHUNK_BYTES = 1 << 21


def _half_sq_norms(A: Tensor, dim: int) -> Tensor:
    """_sq_norms of a large bf16 / fp16 CPU stack: torch's norm with dtype=float32 converts entry by
    entry (11008×4096 bf16: 48 ms, against 8 ms for an fp32 matrix); copying chunks of rows (along
    the contiguous ``dim``) into a 2 MB fp32 buffer that stays in cache and taking their fp32 norms
    costs 8 ms, with the same fp32 accumulation."""
    return _chunked_sq_norms(A, dim, torch.float32)


def _exact_sq_norms(A: Tensor) -> Tensor:
    """‖A‖²_F per matrix [...] accumulated in float64 (for the test when the residual is a tiny part
    of ‖A‖²). On a large CPU matrix through a float64 chunk buffer: torch's norm with
    dtype=float64 converts entry by entry (11008×4096 fp32: 200 ms, here ~15 ms)."""
    if A.device.type == "cpu" and A.dtype != torch.float64 and A.shape[-2] * A.shape[-1] >= _HALF_CHUNKED_MIN:
        dim = -1 if A.stride(-1) == 1 or A.stride(-2) != 1 else -2
        return _chunked_sq_norms(A, dim, torch.float64)
    return torch.linalg.vector_norm(A, dim=(-2, -1), dtype=torch.float64) ** 2


def _chunked_sq_norms(A: Tensor, dim: int, acc: torch.dtype) -> Tensor:
    """Σ of squared row norms (along ``dim``) per matrix [...] in float64, the rows copied in chunks
    into a 2 MB buffer of dtype ``acc`` (which stays in cache) and their norms taken in it."""
    X = A if dim == -1 else A.transpose(-2, -1)  # the norms run along X's rows
    rows, cols = X.shape[-2:]
    X3 = X.reshape(-1, rows, cols)  # a view, except for leading dims that cannot be merged
    size = torch.finfo(acc).bits // 8
    R = max(1, _HALF_CHUNK_BYTES // (size * cols))
    buf = torch.empty(min(R, rows), cols, dtype=acc)
    norms = torch.empty(X3.shape[0], rows, dtype=acc)
    for b in range(X3.shape[0]):
        for i in range(0, rows, R):
            j = min(i + R, rows)
            chunk = buf[:j - i]
            chunk.copy_(X3[b, i:j])
            torch.linalg.vector_norm(chunk, dim=-1, out=norms[b, i:j])
    return norms.to(torch.float64).square().sum(-1).reshape(X.shape[:-2])


def _check_input(A: object, k: object, name: str = "A") -> Tensor:
    """Check A and k; return ‖A‖²_F per matrix [...] (float64), which the Krylov route's test needs
    (computed once here rather than in another pass over A)."""
    if not isinstance(A, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {A.dtype}"
        )
    if A.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions [..., m, n], got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    kmax = min(m, n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= kmax:
        raise ValueError(f"k must be an integer in 1..min(m, n) = 1..{kmax} for {name} of shape "
                         f"{tuple(A.shape)}, got k={k!r}")
    if not A.numel():
        return torch.zeros(A.shape[:-2], dtype=torch.float64, device=A.device)
    # finite norms mean every entry is finite (NaN and ±Inf propagate into them); the norms are one
    # parallel reduction, 20× cheaper than isfinite(A).all() on an 11008×4096 matrix; only a
    # non-finite norm (or an overflowing one, |entries| near the dtype's max) takes the entry-wise
    # check, and then the norms in float64
    sq = _sq_norms(A.detach())
    overflow = not bool(torch.isfinite(sq).all())
    if overflow and not bool(torch.isfinite(A).all()):
        where = ""
        if A.dim() > 2:
            bad = (~torch.isfinite(A)).flatten(-2).any(-1).nonzero()[0].tolist()
            where = f" (batch index {tuple(bad)})"
        raise ValueError(f"{name} contains NaN or Inf{where}; the SVD of a non-finite matrix is undefined")
    if overflow or bool((sq < _SQ_NORM_UNDERFLOW).any()):
        # the fp32 norms overflowed (finite entries near the dtype's max), or tiny entries' squares
        # underflowed (|aᵢⱼ| < 1e-19; an all-zero matrix takes this pass too): again in float64
        sq = torch.linalg.vector_norm(A.detach(), dim=(-2, -1), dtype=torch.float64) ** 2
    return sq


#: Squared norms below this may have lost entries to fp32 underflow (squares below 1.2e-38).
_SQ_NORM_UNDERFLOW = 1e-30


def _check_options(method: str, oversample: int | None, n_iter: int | None, tol: float | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if oversample is not None and (not isinstance(oversample, int) or oversample < 0):
        raise ValueError(f"oversample must be an integer ≥ 0, got {oversample!r}")
    if n_iter is not None and (not isinstance(n_iter, int) or n_iter < 1):
        raise ValueError(f"n_iter must be an integer ≥ 1, got {n_iter!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")


def default_oversample(k: int, n: int) -> int:
    """p = max(16, k/2), capped at n − k. Measured (2-core CPU, k = 32): on MiniLM-L6's 36 encoder
    matrices p = 16 / 32 / 48 ran the model in 0.63 / 0.61 / 0.59 s (the 384×384 group needs 19 / 11 /
    9 iterations), while on a 1536×1024 power-law matrix p = 16 is about 2× faster than p = 32: the
    narrower sketch is kept."""
    return max(0, min(n - k, max(16, k // 2)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- shared finishing steps ----------------------------------------------------------------------
def _fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip (uᵢ, vᵢ) pairs so that the largest-magnitude entry of each uᵢ is positive."""
    idx = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.gather(U, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, V * sign


def _finish(U: Tensor, S: Tensor, V: Tensor, m: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Zero the singular values under the rounding floor, fix the signs."""
    # what the rounding of the input itself cannot tell from zero: ‖δA‖₂ ≲ √max(m, n)·ε·σ₁
    eps = torch.finfo(S.dtype).eps
    floor = math.sqrt(max(m, n)) * eps * S[..., :1]
    S = torch.where(S > floor, S, torch.zeros_like(S))
    U, V = _fix_signs(U, V)
    return U, S, V


# --- the routes, all on tall stacks A [B, m, n] with m ≥ n, in the compute dtype ----------------
def _exact(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.svd, truncated. On CUDA the QR-based cuSOLVER driver gesvd: torch's default
    there (gesvdj, Jacobi to a tolerance) returned factors orthonormal only to 3.4e-4 on a 700×500
    float32 matrix (H100, torch 2.11), which is not "exact"."""
    driver = "gesvd" if A.is_cuda else None
    U, S, Vh = torch.linalg.svd(A, full_matrices=False, driver=driver)
    return U[..., :k], S[..., :k], Vh[..., :k, :].transpose(-2, -1)


def _gram(A: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """G = AᵀA in float64, V₀ = top-k eigenvectors of G, then Rayleigh-Ritz: A·V₀ = Û·diag(S)·Wᵀ."""
    A64 = A.to(torch.float64)
    G = A64.transpose(-2, -1) @ A64
    _, evecs = torch.linalg.eigh(G)  # ascending eigenvalues
    V0 = evecs[..., -k:].flip(-1)
    # Rayleigh-Ritz rather than S = sqrt(λ): the values come from A·V₀, not from G, so their
    # accuracy does not depend on squaring, and A·V = U·diag(S) holds to rounding.
    Uh, S, Wh = torch.linalg.svd(A64 @ V0, full_matrices=False)
    V = V0 @ Wh.transpose(-2, -1)
    dt = A.dtype
    return Uh.to(dt), S.to(dt), V.to(dt)


def _ritz(Q: Tensor, R: Tensor, Vq: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ritz triplets from A·Vq = Q·R: R = Ur·diag(S)·Wrᵀ (float64), U = Q·Ur, V = Vq·Wr.
    Returns (U [B, m, k], S [B, k], V [B, n, k], Ur [B, l, k], all l Ritz values [B, l] float64)."""
    Ur, S, Wr = _small_svd(R)
    dt = Q.dtype
    Ur = Ur[..., :k].to(dt)
    Wr = Wr[..., :k].to(dt)
    return Q @ Ur, S[..., :k].to(dt), Vq @ Wr, Ur, S


def _small_svd(R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the float64 l×l factors R [B, l, l] = Ur·diag(S)·Wrᵀ, descending.

    Through eigh(R·Rᵀ) and Wr = Rᵀ·Ur·diag(S)⁻¹, 2.1× faster than the batched SVD on CPU
    (24×48×48: 2.7 ms vs 5.8 ms). In float64 the squaring costs ε₆₄·(σ₁/σᵢ)², far below float32
    rounding while σₗ ≥ 1e-4·σ₁; below that (or for zero columns) the batch takes the SVD.
    """
    with small_lapack(R):
        lam, Ur = torch.linalg.eigh(R @ R.transpose(-2, -1))
    lam, Ur = lam.flip(-1), Ur.flip(-1)
    S = lam.clamp_min(0).sqrt()
    if bool((S[..., -1] > 1e-4 * S[..., 0]).all()):
        Wr = (R.transpose(-2, -1) @ Ur) / S[..., None, :]
        return Ur, S, Wr
    with small_lapack(R):
        Ur, S, Wrh = torch.linalg.svd(R, full_matrices=False)
    return Ur, S, Wrh.transpose(-2, -1)


def _convergence_error(AtU: Tensor, S: Tensor, V: Tensor, s_out: Tensor, normA2: Tensor,
                       tol: float) -> Tensor:
    """Error measure e [B] of the Ritz triplets, ≤ 1 when converged (see the module docstring).

    AtU = Aᵀ·U [B, n, k]; rᵢ = Aᵀuᵢ − σ̃ᵢvᵢ; s_out [B, 1] the Ritz value standing for the spectrum
    outside the subspace (the last one of subspace iteration, see :func:`_block_krylov`).
    """
    r = torch.linalg.vector_norm(AtU - V * S[..., None, :], dim=-2).to(torch.float64)
    S64 = S.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    # Bound on σᵢ² − σ̃ᵢ² (≥ 0): first order 2σ̃ᵢ‖rᵢ‖ + ‖rᵢ‖², or Kato-Temple σ̃ᵢ²‖rᵢ‖² / (σ̃ᵢ² − σ̃ₗ²)
    # when σ̃ᵢ is separated from the last Ritz value σ̃ₗ (the estimate of what lies outside the
    # subspace). The second is what makes the test pass as soon as the values are accurate, not
    # only when ‖rᵢ‖ itself is small.
    first = 2 * S64 * r + r * r
    sep = S64 * S64 - s_out.to(torch.float64) ** 2
    kato = torch.where(sep > 0, (S64 * r) ** 2 / sep.clamp_min(tiny), torch.full_like(r, math.inf))
    excess = torch.minimum(first, kato)
    sv_err = (excess / (2 * S64 * S64).clamp_min(tiny)).amax(-1)
    resid2 = (normA2 - (S64 * S64).sum(-1)).clamp_min(0)
    opt2_lower = resid2 - excess.sum(-1)
    ratio_target = (1 + tol) ** 2
    # excess of the residual ratio, in units of the allowed excess
    res_err = torch.where(
        opt2_lower > 0,
        (resid2 / opt2_lower.clamp_min(tiny) - 1) / (ratio_target - 1),
        torch.full_like(resid2, math.inf),
    )
    at_floor = resid2 <= (64 * torch.finfo(S.dtype).eps) ** 2 * normA2
    if V.shape[-2] == V.shape[-1]:
        # k = n (tall orientation): V spans everything, the optimal residual is 0 and the computed
        # one is rounding noise of ‖A‖²; only the singular values are left to test
        at_floor = torch.ones_like(at_floor)
    res_err = torch.where(at_floor, torch.zeros_like(res_err), res_err)
    # a k-th value at the rounding floor (rank-deficient A): only the residual matters
    sv_err = torch.where(S64[..., -1] == 0, torch.zeros_like(sv_err), sv_err / tol)
    return torch.maximum(sv_err, res_err)


def _randomized(
    A: Tensor, k: int, l: int, omega: Tensor, n_iter: int, tol: float | None, budget: int | None
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, int]:
    """Subspace iteration on A [B, m, n] from the Gaussian sketch omega [n, l].

    Without tol: exactly n_iter iterations. With tol: see :func:`_subspace_iteration`.
    Returns ((U, S, V), converged [B] bool, iterations run).
    """
    B = A.shape[0]
    At = A.transpose(-2, -1)
    Q, _ = orthonormalize(A @ omega)
    if tol is None:
        for _ in range(n_iter):
            Vq, _ = orthonormalize(At @ Q)
            Q, R = orthonormalize(A @ Vq)
        U, S, V, _, _ = _ritz(Q, R, Vq, k)
        return (U, S, V), torch.ones(B, dtype=torch.bool, device=A.device), n_iter
    limit = n_iter if budget is None else min(n_iter, budget)
    return _subspace_iteration(A, k, At @ Q, limit, tol, budget)


def _subspace_iteration(
    A: Tensor, k: int, Z: Tensor, limit: int, tol: float, budget: int | None
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, int]:
    """Subspace iteration on A [B, m, n] started from the right block Z [B, n, l], with the test.

    Each iteration: Vq = orth(Z), A·Vq = Q·R, Ritz triplets, Z = Aᵀ·Q, test. Stops each matrix at its
    first iteration that passes the test (at most ``limit``); with ``budget``, gives up on a matrix
    when it is predicted (from the last error reduction) not to pass within the iterations left.
    Returns ((U, S, V), converged [B] bool, iterations run).
    """
    B = A.shape[0]
    At = A.transpose(-2, -1)
    normA2 = torch.linalg.vector_norm(A, dim=(-2, -1), dtype=torch.float64) ** 2
    done = torch.zeros(B, dtype=torch.bool, device=A.device)
    hopeless = torch.zeros_like(done)
    out_U = torch.zeros(B, A.shape[-2], k, dtype=A.dtype, device=A.device)
    out_S = torch.zeros(B, k, dtype=A.dtype, device=A.device)
    out_V = torch.zeros(B, A.shape[-1], k, dtype=A.dtype, device=A.device)
    prev_err = None
    it = 0
    while it < limit:
        it += 1
        Vq, _ = orthonormalize(Z)
        Q, R = orthonormalize(A @ Vq)
        U, S, V, Ur, S_all = _ritz(Q, R, Vq, k)
        Z = At @ Q  # next iteration's product, and Aᵀ·U = Z·Ur for the test
        err = _convergence_error(Z @ Ur, S, V, S_all[..., -1:], normA2, tol * _TEST_SAFETY)
        new = (err <= 1) & ~done & ~hopeless
        if bool(new.any()):
            sel = new[:, None]
            out_U = torch.where(sel[..., None], U, out_U)
            out_S = torch.where(sel, S, out_S)
            out_V = torch.where(sel[..., None], V, out_V)
            done |= new
        if prev_err is not None and budget is not None:
            # geometric extrapolation of the error: iterations still needed vs iterations left
            rate = (err / prev_err.clamp_min(1e-300)).clamp(max=1.0)
            need = torch.where(rate < 1, torch.log(err.clamp_min(1.0)) / -torch.log(rate.clamp_min(1e-300)),
                               torch.full_like(err, math.inf))
            hopeless |= ~done & (need > (limit - it))
        if bool((done | hopeless).all()):
            break
        prev_err = err
    return (out_U, out_S, out_V), done, it


def _mm(M: Tensor, X: Tensor) -> Tensor:
    """M·X for a thin X, through (Xᵀ·Mᵀ)ᵀ when M is a transposed view of a row-major matrix:
    MKL's transposed-A GEMM is up to 3-4× slower for X of 8-16 columns (2-core CPU, 4096², b = 8:
    167 ms vs 48 ms under load)."""
    if M.stride(-2) == 1 and M.stride(-1) != 1:
        return (X.transpose(-2, -1) @ M.transpose(-2, -1)).transpose(-2, -1)
    return M @ X


def _project_out(Vb: Tensor, Y: Tensor) -> Tensor:
    """Y − Vb·(Vbᵀ·Y), twice (classical Gram-Schmidt with reorthogonalisation): Vb [B, n, j]
    orthonormal, Y [B, n, b]."""
    for _ in range(2):
        Y = Y - Vb @ (Vb.transpose(-2, -1) @ Y)
    return Y


def _block_krylov(
    A: Tensor, k: int, b: int, omega: Tensor, max_steps: int, tol: float, s_out_index: int, normA2: Tensor,
    low_source: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, int]:
    """Randomized block Krylov (Musco & Musco 2015) on A [B, m, n] (m ≥ n) from omega [n, b].

    Builds an orthonormal basis V = [V₁ … V_s] [B, n, s·b] of the Krylov space
    span{Ω, AᵀA·Ω, …, (AᵀA)^(s−1)·Ω} one block at a time (V_{j+1} = orth(Aᵀ·A·V_j with V₁ … V_j
    projected out)), keeping C = A·V = [P₁ … P_s] and Z = Aᵀ·C = [Z₁ … Z_s], Z_j = Aᵀ·P_j: two
    thin GEMMs of b columns per step, the two a subspace iteration needs, but no block is thrown
    away, so the singular values converge about as fast in s as subspace iteration does in s²
    (1e-3 on an s_i ∝ i^-0.3 spectrum in 7 steps of 16 columns).

    Test after each step (from the first whose basis holds ``s_out_index`` + 1 vectors), without
    another pass over A: the Ritz pairs of V come from CᵀC = Vᵀ·Z = W·diag(S²)·Wᵀ (an s·b
    eigenproblem), with Aᵀ·U = Z·W·diag(S)⁻¹ and V·W, and the convergence test of the module
    docstring runs with the (``s_out_index`` + 1)-th Ritz value standing for the spectrum outside
    the subspace. (The squared Gram's rounding, relative ε·(σ₁/σᵢ)² in σᵢ² times a GEMM's error
    growth (≤ √n, typically far less), stays below what the test resolves while σₖ ≥ 3e-2·σ₁,
    which the LLM cases (s_i ∝ i^-0.6 at k = 256: σₖ = 0.036·σ₁) meet; below it the test takes W, S
    from the stable Rayleigh-Ritz below, on the Gram's top ``s_out_index`` + 1 eigenvectors. The
    returned values always come from that one.) A matrix stops at
    its first passing step (no early giving up: the error of a flat spectrum stalls for a step or
    two, then falls again). A matrix whose top Ritz values drop by a cliff (rank < k, or nearly:
    the values past it sit at the rounding floor, where the test cannot pass) is tried once with
    the range finish (:func:`_range_finish`), which returns exact triplets when A lies in the span
    of its top Ritz vectors, checked. The returned factors come from a stable Rayleigh-Ritz on the passing
    step's top-k subspace V·Wₖ: C·Wₖ = Q·R (CholeskyQR2 of an m×k block, not of the m×s·b
    basis), R = Ur·diag(S)·Wrᵀ, U = Q·Ur, V·Wₖ·Wr, so A·V = U·diag(S) and UᵀU = I to rounding.
    The basis and its products are stored transposed ([B, s·b, n]), so each prefix is a view the
    GEMMs take without a copy. The two products of a step read A once where A is a large CPU
    matrix (:mod:`._gram_pass`). On a CPU with AMX tiles, a large fp32 A's steps take their
    products from a bf16 copy of A (:mod:`._low_precision`, 2-3× cheaper a step): the basis then
    only locates the subspace, and the returned triplets and their test come from fp32 products
    with A (:func:`_certify`); a matrix whose triplets fail that test steps on and is certified
    again at its next passing step, and one that never passes is redone on fp32 steps.
    ``normA2`` [B] is ‖A‖²_F (float64, from the input check). ``low_source``: the bf16 tensor A
    was converted from, if any (same shape and layout): it then serves as that copy, exactly.
    Returns ((U, S, V), converged [B], steps run).
    """
    nthreads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        low = None
        if low_precision_worthwhile(A):
            low = low_source if usable_low_source(A, low_source) else stack.enter_context(low_copy(A))
        # the step's small work (b- and s·b-wide products, the test's eigenproblem, elementwise
        # ops) runs on one thread, only the passes over A and products above ~5e7 flops on all
        # of them: see small_lapack (on a loaded 2-core machine each small threaded op stalled
        # 10-30 ms)
        with small_lapack(A):
            (U, S, V), done, steps, uncertified = _block_krylov_steps(
                A, k, b, omega, max_steps, tol, s_out_index, normA2, nthreads, low)
    with small_lapack(A):
        if bool(uncertified.any()):
            # the bf16 steps' subspace failed the fp32 test: those matrices again, all in fp32
            idx = uncertified.nonzero().flatten()
            sub = slice(None) if bool(uncertified.all()) else idx
            (Ur, Sr, Vr), done_r, steps_r, _ = _block_krylov_steps(
                A[sub], k, b, omega, max_steps, tol, s_out_index, normA2[sub], nthreads, None)
            U[idx], S[idx], V[idx] = Ur, Sr, Vr
            done = done.index_copy(0, idx, done_r)
            steps = max(steps, steps_r)
    return (U, S, V), done, steps


def _par(A: Tensor, flops: float, nthreads: int):
    """All ``nthreads`` threads for work of ``flops``, one below 5e7 (see :func:`_block_krylov`)."""
    return num_threads(nthreads if flops > 5e7 else 1, A)


def _block_krylov_steps(
    A: Tensor, k: int, b: int, omega: Tensor, max_steps: int, tol: float, s_out_index: int, normA2: Tensor,
    nthreads: int, low: Tensor | None,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, int, Tensor]:
    """The body of :func:`_block_krylov`, entered on one thread; ``low`` is A in bf16 (the steps'
    products then come from it, :mod:`._low_precision`) or None.

    With ``low``, a matrix whose bf16 basis passes the steps' test is certified at once
    (:func:`_certify`); if its fp32 triplets fail, it goes on stepping and is certified again at
    its next passing step. Returns ((U, S, V), done [B], steps run, uncertified [B]): the
    matrices that passed the steps' test at some step but never the fp32 one."""
    Bn, m, n = A.shape
    dt = A.dtype
    At = A.transpose(-2, -1)
    # the norm from fp32 row norms (~1e-8 relative): it matters only when the residual is a tiny
    # part of ‖A‖, then it is redone in float64
    normA2 = normA2.to(A.device, torch.float64)
    exact_norm = False
    fused = fused_worthwhile(A)
    width = max_steps * b
    # the basis and its products stored transposed, one block per row range, so that a block is
    # written contiguously and a prefix Vall[..., :j] = VT[:, :j].mT is a view GEMMs take as is;
    # column slices of [n, width] buffers were copied by every product (14% of the time at 4096²)
    VT = A.new_empty(Bn, width, n)
    # the test's Gram Vᵀ·Z = Cᵀ·C, grown by one block column (and its mirror) per step: 2·n·j·b
    # flops a step instead of 2·n·j² a test (at k = 256, j = 768: 0.4 against 4.8 GFLOP)
    GT = A.new_empty(Bn, width, width)
    CT = A.new_empty(Bn, width, m)
    ZT = A.new_empty(Bn, width, n)
    Vb, _ = orthonormalize(omega.expand(Bn, n, b))
    done = torch.zeros(Bn, dtype=torch.bool, device=A.device)
    stop_V = stop_CW = None
    # the returned triplets of matrices certified (bf16 steps) or finished by the range finish;
    # with bf16 steps, which matrices passed the steps' test at all
    U_out, S_out, V_out = A.new_zeros(Bn, m, k), A.new_zeros(Bn, k), A.new_zeros(Bn, n, k)
    tried = torch.zeros_like(done)
    # matrices sent to the range finish (once each), those it finished, and the step after which
    # the others give up (a matrix it could not finish has values past its cliff that sit just
    # above the rounding floor: the steps resolve them slowly if at all)
    range_tried = torch.zeros_like(done)
    finished = torch.zeros_like(done)
    give_up_after = torch.full((Bn,), max_steps, dtype=torch.long, device=A.device)
    # the last test's top-k Ritz values: estimates the caller's fallback uses for the others
    S_last = A.new_zeros(Bn, k)
    step = 0
    tiny = torch.finfo(torch.float64).tiny
    while step < max_steps:
        j0, j1 = step * b, (step + 1) * b
        step += 1
        VT[:, j0:j1] = Vb.transpose(-2, -1)
        if low is not None:
            with _par(A, 1e9, nthreads):
                CT[:, j0:j1], ZT[:, j0:j1] = low_products(low, Vb)
        elif fused:  # on this thread and nthreads − 1 workers, each GEMM single-threaded
            Cb, ZT[:, j0:j1] = gram_products(A, Vb, nthreads)
            CT[:, j0:j1] = Cb.transpose(-2, -1)
        else:
            with _par(A, 1e9, nthreads):
                Cb = _mm(A, Vb)
                ZT[:, j0:j1] = _mm(At, Cb).transpose(-2, -1)
            CT[:, j0:j1] = Cb.transpose(-2, -1)
        Zb = ZT[:, j0:j1].transpose(-2, -1)
        with _par(A, 2.0 * Bn * n * j1 * b, nthreads):
            GT[:, :j1, j0:j1] = VT[:, :j1] @ Zb
        GT[:, j0:j1, :j0] = GT[:, :j0, j0:j1].transpose(-2, -1)
        # the test from the first basis holding l vectors; once the s·b eigenproblem is no longer
        # small next to the two GEMMs, only every few steps
        if _tested(step, j1, s_out_index) or (j1 > s_out_index and step == max_steps):
            # the Gram in the working precision (its rounding, ~√n·ε·σ₁², is far below what the
            # test resolves), its eigenproblem in float64
            Vj, Zj = VT[:, :j1].transpose(-2, -1), ZT[:, :j1].transpose(-2, -1)
            G = GT[:, :j1, :j1].to(torch.float64)
            with small_lapack(G):
                lam, W = torch.linalg.eigh((G + G.transpose(-2, -1)) / 2)
            lam, W = lam.flip(-1), W.flip(-1)
            S_all = lam.clamp_min(0).sqrt()
            if not bool((S_all[..., k - 1] > _KRYLOV_GRAM_MIN_RATIO * S_all[..., 0]).all()):
                # a steep top-k (σₖ < 3e-2·σ₁): the squared Gram resolves σₖ less well; the stable
                # Rayleigh-Ritz on the Gram's top-l subspace (C·W_l = Q·R, SVD of R = Ur·S·Wrᵀ,
                # W = W_l·Wr) gives its values without the squaring (the squaring only tilts that
                # subspace, a second order effect on them). l columns, not the whole basis: on
                # the basis (m×j and j×j factorisations at every step) a 2048² matrix of rank 8
                # plus noise spent 7.8 s of 12 s here
                l = s_out_index + 1
                with _par(A, 2.0 * Bn * m * j1 * l, nthreads):
                    _, R = orthonormalize(CT[:, :j1].transpose(-2, -1) @ W[..., :l].to(dt))
                _, S_all, Wr = _small_svd(R)
                W = W[..., :l] @ Wr
            Sk, Wk = S_all[..., :k], W[..., :k]
            if not exact_norm and bool(((normA2 - (Sk ** 2).sum(-1)) < 1e-2 * normA2).any()):
                with _par(A, 1e9, nthreads):
                    normA2 = _exact_sq_norms(A)
                exact_norm = True
            with _par(A, 4.0 * Bn * n * j1 * k, nthreads):
                V = Vj @ Wk.to(dt)
                AtU = Zj @ (Wk / Sk.clamp_min(tiny)[..., None, :]).to(dt)
            err = _convergence_error(AtU, Sk.to(dt), V, S_all[..., s_out_index:s_out_index + 1], normA2,
                                     tol * _KRYLOV_SAFETY)
            S_last = Sk.to(dt)
            # a k-th value of zero (rank < k): Aᵀ·U is not known this way, leave it to the fallback
            err = torch.where(Sk[..., -1] > 0, err, torch.full_like(err, math.inf))
            new = (err <= 1) & ~done
            if low is not None and bool(new.any()):
                # bf16 steps: the passing top-k subspace V·Wₖ gets its triplets and their test
                # from fp32 products with A; a matrix that fails goes on stepping (its next
                # passing step is certified again), its triplets are not kept
                idx = new.nonzero().flatten()
                sub = slice(None) if bool(new.all()) else idx
                (Uc, Sc, Vc), ok = _certify(A[sub], V[sub], S_all[sub, s_out_index:s_out_index + 1],
                                            normA2[sub], tol, fused, nthreads)
                tried |= new
                new = new.index_copy(0, idx, ok)
                if bool(ok.any()):
                    U_out = U_out.index_copy(0, idx[ok], Uc[ok])
                    S_out = S_out.index_copy(0, idx[ok], Sc[ok])
                    V_out = V_out.index_copy(0, idx[ok], Vc[ok])
            elif bool(new.any()):
                # keep the passing step's top-k subspace V·Wₖ and A·V·Wₖ = C·Wₖ (one m×s·b×k
                # product): the returned triplets come from it, not from the whole basis again
                sel = new[:, None, None]
                stop_V = V if stop_V is None else torch.where(sel, V, stop_V)
                with _par(A, 2.0 * Bn * m * j1 * k, nthreads):
                    CW = CT[:, :j1].transpose(-2, -1) @ Wk.to(dt)
                stop_CW = CW if stop_CW is None else torch.where(sel, CW, stop_CW)
            done |= new
            # a cliff in the Ritz values (A of rank < k, or nearly): the range finish on the top
            # l Ritz vectors, once (a matrix it does not finish steps on)
            cliff = ~done & ~range_tried & _has_cliff(S_all[..., :k + 1])
            if bool(cliff.any()):
                idx = cliff.nonzero().flatten()
                sub = slice(None) if bool(cliff.all()) else idx
                l = s_out_index + 1
                with _par(A, 2.0 * Bn * n * j1 * l, nthreads):
                    Vl = Vj[sub] @ W[sub, :, :l].to(dt)
                (Uf, Sf, Vf), ok = _range_finish(A[sub], Vl, k, nthreads)
                range_tried |= cliff
                if bool(ok.any()):
                    U_out = U_out.index_copy(0, idx[ok], Uf[ok])
                    S_out = S_out.index_copy(0, idx[ok], Sf[ok])
                    V_out = V_out.index_copy(0, idx[ok], Vf[ok])
                    fin = torch.zeros_like(done).index_fill(0, idx[ok], True)
                    finished |= fin
                    done |= fin
                if not bool(ok.all()):
                    give_up_after = give_up_after.index_fill(
                        0, idx[~ok], min(max_steps, step + max(AFTER_CLIFF_STEPS, step)))
            if bool((done | (give_up_after <= step)).all()):
                break
        if step < max_steps:
            Vj = VT[:, :j1].transpose(-2, -1)
            with _par(A, 8.0 * Bn * n * j1 * b, nthreads):
                # classical Gram-Schmidt twice; the first pass's coefficients Vᵀ·Zb are the Gram's
                # new block column, computed above
                Y = torch.baddbmm(Zb, Vj, GT[:, :j1, j0:j1], alpha=-1)
                Y = Y - Vj @ (VT[:, :j1] @ Y)
                Vb, R = orthonormalize(Y)
            # Y is orthogonal to the basis up to ~ε·‖Zb‖, Vb = Y·R⁻¹ up to that times ‖R⁻¹‖: a
            # block that lost rank (the Krylov space nearly invariant; Householder columns, not
            # orthogonal to the basis, or a large R⁻¹) is checked and projected once more
            eye = torch.eye(b, dtype=R.dtype, device=R.device)
            loss = (64 * torch.finfo(dt).eps * torch.linalg.vector_norm(Zb, dim=(-2, -1)).to(R.dtype)
                    * torch.linalg.vector_norm(torch.linalg.solve_triangular(R, eye, upper=True), dim=(-2, -1)))
            if not bool((loss <= 1e-5).all()) and bool(((VT[:, :j1] @ Vb).abs().amax() > 1e-4)):
                Vb, _ = orthonormalize(_project_out(Vj, Vb))
    # bf16 steps: those that passed the steps' test but never the fp32 one
    uncertified = tried & ~done
    # certified (bf16 steps) and range-finished triplets are final; the others are filled below
    U, S, V = U_out, S_out, V_out
    via_ritz = done & ~finished
    if low is None and stop_CW is not None and bool(via_ritz.any()):
        # each converged matrix: the stable Rayleigh-Ritz on the k-dimensional subspace V·Wₖ of
        # the step it passed with (the Gram's squaring then only tilts that subspace, a second
        # order effect on the values): C·Wₖ = Q·R (CholeskyQR2 of m×k, not of the whole m×s·b
        # basis), R = Ur·diag(S)·Wrᵀ, U = Q·Ur, V = V·Wₖ·Wr, so A·V = U·diag(S) to rounding
        idx = via_ritz.nonzero().flatten()
        sub = slice(None) if bool(via_ritz.all()) else idx
        with _par(A, 1e9, nthreads):
            Q, R = orthonormalize(stop_CW[sub])
            Ur, Sr, Wr = _small_svd(R)
            U[idx] = Q @ Ur.to(dt)
            S[idx] = Sr.to(dt)
            V[idx] = stop_V[sub] @ Wr.to(dt)
    # the others keep zero vectors and their last Ritz values as estimates: the caller redoes them
    # (fp32 steps or the Gram route), and the Ritz triplets of a whole basis cost an m×s·b and an
    # s·b×s·b factorisation (0.9 s at 2048², s·b = 1024)
    if not bool(done.all()):
        S = torch.where(done[:, None], S, S_last)
    return (U, S, V), done, step, uncertified


def _certify(
    A: Tensor, Vk: Tensor, s_out: Tensor, normA2: Tensor, tol: float, fused: bool, nthreads: int,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Rayleigh-Ritz on the subspace Vk [B, n, k] (orthonormal) from fp32 products with A [B, m, n],
    and the convergence test of the module docstring on its triplets (``s_out`` [B, 1] standing
    for the spectrum outside). C = A·Vk = Q·R, R = Ur·diag(S)·Wrᵀ, U = Q·Ur, V = Vk·Wr; the test's
    Aᵀ·U = (Aᵀ·C)·R⁻¹·Ur, with Aᵀ·C from the same read of A as C where the fused pass applies and R
    is well conditioned (σₖ ≥ 0.1·σ₁: R⁻¹ then adds at most 100·ε to it), else Aᵀ·U directly.
    Returns ((U, S, V), passed [B] bool)."""
    dt = A.dtype
    At = A.transpose(-2, -1)
    if fused:  # on this thread and nthreads − 1 workers, each GEMM single-threaded
        C, ZT = gram_products(A, Vk, nthreads)
    else:
        with _par(A, 1e9, nthreads):
            C = _mm(A, Vk)
        ZT = None
    Q, R = orthonormalize(C)
    Ur, Sr, Wr = _small_svd(R)
    U, S, V = Q @ Ur.to(dt), Sr.to(dt), Vk @ Wr.to(dt)
    if ZT is not None and bool((Sr[..., -1] >= 0.1 * Sr[..., 0]).all()):
        AtU = ZT.transpose(-2, -1) @ torch.linalg.solve_triangular(R, Ur, upper=True).to(dt)
    else:
        with _par(A, 1e9, nthreads):
            AtU = _mm(At, U)
    err = _convergence_error(AtU, S, V, s_out.to(dt), normA2, tol * _KRYLOV_SAFETY)
    # a k-th value of zero (rank < k) cannot be tested this way (as in the steps' test)
    return (U, S, V), (err <= 1) & (S[..., -1] > 0)


#: Ritz values with a drop of at least this factor between neighbours among the top k + 1 (a
#: cliff: A of rank < k, or nearly) send a matrix to :func:`_range_finish` once: the test cannot
#: pass on values at the rounding floor, and stepping on to the Gram route took 48 s for a 4096²
#: matrix of rank 8 at k = 16 (2-core Xeon). A smooth steep spectrum never drops this fast.
CLIFF_RATIO = 0.1
#: Gaussian probes of the range finish's residual check: the estimate of ‖(I − QQᵀ)·A‖²_F is a
#: sum of ≥ 16 squared Gaussians, under a ninth of its mean with probability < 1e-6.
RANGE_PROBES = 16
#: The range finish accepts a residual of at most this many rounding floors (√max(m, n)·ε·σ₁):
#: the products of A in the working precision leave about one.
RANGE_FLOORS = 8.0
#: A matrix the range finish could not finish steps on for at most this many steps more (or as
#: many as it has taken, if more) before the Gram route takes it: a 4096² matrix of rank 8 plus
#: a noise bulk at 8e-5·σ₁ spent 6.4 s in 92 steps without converging (2-core Xeon).
AFTER_CLIFF_STEPS = 8


def _has_cliff(S: Tensor) -> Tensor:
    """Whether the descending Ritz values S [B, k + 1] drop by CLIFF_RATIO between neighbours."""
    ratio = S[..., 1:] / S[..., :-1].clamp_min(torch.finfo(S.dtype).tiny)
    return (ratio <= CLIFF_RATIO).any(-1)


def _range_finish(
    A: Tensor, Vl: Tensor, k: int, nthreads: int,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Range finder on the subspace Vl [B, n, l] (l ≥ k) for A [B, m, n] of rank ≤ l (or nearly),
    with the working precision's products: Q = orth(A·Vl), Bᵀ = Aᵀ·Q = Vb·diag(S)·Ubᵀ (SVD in
    float64), U = Q·Ub, V = Vb, top k. When range(Q) holds range(A), A = Q·Qᵀ·A and the triplets
    are exact, the values past the rank at the rounding floor (zeroed by :func:`_finish`), and
    their vectors span null spaces (A·v = 0). That is checked, not assumed: RANGE_PROBES Gaussian
    probes G estimate ‖(I − QQᵀ)·A‖_F from (I − QQᵀ)·A·G, and a matrix passes when three times the
    estimate is at most RANGE_FLOORS rounding floors √max(m, n)·ε·σ₁ (every singular value past
    the ones returned is then below it). Three passes over A of l, l and RANGE_PROBES columns.
    Returns ((U, S, V), passed [B] bool)."""
    Bn, m, n = A.shape
    dt = A.dtype
    # fixed probes: the same input gives the same answer
    gen = torch.Generator(device="cpu").manual_seed(0x5EED)
    G = torch.randn(n, RANGE_PROBES, generator=gen, dtype=dt).to(A.device).expand(Bn, n, RANGE_PROBES)
    with _par(A, 1e9, nthreads):
        Q, _ = orthonormalize(_mm(A, Vl))  # Householder where A·Vl has lost rank: Q stays orthonormal
        BT = _mm(A.transpose(-2, -1), Q)
        AG = _mm(A, G)
    resid = AG - Q @ (Q.transpose(-2, -1) @ AG)
    est2 = torch.linalg.vector_norm(resid, dim=(-2, -1), dtype=torch.float64) ** 2 / RANGE_PROBES
    Vb, S, UbT = torch.linalg.svd(BT.to(torch.float64), full_matrices=False)
    floor = RANGE_FLOORS * math.sqrt(max(m, n)) * torch.finfo(dt).eps * S[..., 0]
    passed = 9 * est2 <= floor * floor
    U = Q @ UbT.transpose(-2, -1)[..., :k].to(dt)
    return (U, S[..., :k].to(dt), Vb[..., :k].to(dt)), passed


def _eigh_start(A: Tensor, l: int) -> Tensor:
    """Top-l eigenvectors [B, n, l] of G = AᵀA, formed and diagonalised in A's (compute) dtype."""
    G = A.transpose(-2, -1) @ A
    _, evecs = torch.linalg.eigh(G)  # ascending eigenvalues
    return evecs[..., -l:].flip(-1)


def _gram_refined(A: Tensor, k: int, l: int, tol: float, s_est: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The Gram-eigen route in the working precision, checked: Z₀ = top-l eigenvectors of AᵀA
    (fp32 for fp32 input), then at most ``GRAM_REFINE_ITERS`` subspace iterations with the
    convergence test; items that do not pass (or whose eigh fails) are redone by :func:`_gram`.
    ``s_est`` [B, k]: estimates of the top-k values (from the block Krylov steps); items whose
    σₖ/σ₁ is below FP32_GRAM_MIN_RATIO go to :func:`_gram` at once."""
    if s_est is not None and A.dtype != torch.float64:
        steep = s_est[..., k - 1] < FP32_GRAM_MIN_RATIO * s_est[..., 0]
        if bool(steep.all()):
            return _gram(A, k)
        if bool(steep.any()):
            U, S, V = (t.clone() for t in _gram_refined(A, k, l, tol))  # (a mixed stack: rare)
            idx = steep.nonzero().flatten()
            U[idx], S[idx], V[idx] = _gram(A[idx], k)
            return U, S, V
    try:
        Z = _eigh_start(A, l)
    except torch.linalg.LinAlgError:
        return _gram(A, k)
    (U, S, V), done, _ = _subspace_iteration(A, k, Z, GRAM_REFINE_ITERS, tol, None)
    if not bool(done.all()):
        bad = (~done).nonzero().flatten()
        Ug, Sg, Vg = _gram(A[bad], k)
        U, S, V = U.index_copy(0, bad, Ug), S.index_copy(0, bad, Sg), V.index_copy(0, bad, Vg)
    return U, S, V


#: σₖ/σ₁ below which the working-precision (fp32) Gram cannot give the top-k values to the
#: contract: its eigenvalues carry an error of ~ε·σ₁², so σₖ² must stand well above it (a 4096²
#: matrix with σₖ = 8e-5·σ₁ spent 3 s in the fp32 eigh and its refinement before the float64 one).
FP32_GRAM_MIN_RATIO = 1e-3


# --- cost model for "auto" -----------------------------------------------------------------------
#: Costs in units of one fp32 GEMM flop (only ratios matter), measured on a 2-core AMD EPYC with
#: torch 2.13 / MKL: fp32 GEMM ≈ 5 ps/flop; batched fp32 eigh(n) ≈ 60-80 ps·n³ (384: 4.4 ms,
#: 1024: 66 ms), i.e. ≈ 15·n³ units; one subspace iteration (two products, two CholeskyQR2 with
#: float64 Grams, the l×l SVD, the test) ≈ 2.5× its GEMM flop count plus ≈ 0.15 ms per matrix
#: (24×384×384, l = 48: 0.6 ms per matrix; 1536×1024: 3.2 ms). On CUDA eigh is latency-bound and
#: relatively slower; 60·n³ is an unmeasured guess.
_EIGH_UNITS = {"cpu": 15.0, "cuda": 60.0}
_ITER_OVERHEAD_UNITS = 3e7
#: "auto" takes the block Krylov route only when the Gram-eigen route costs at least this many of
#: its steps: power-law spectra pass the test in 6-15 steps, flat tops need more (and MiniLM's
#: 384-wide matrices at k = 32, 11-19 steps' worth, converge faster by the eigh route), so below it
#: the eigh route is the better bet.
MIN_KRYLOV_STEPS = 24
#: Subspace iterations (each ending with the test) after the eigh start before the float64 route.
GRAM_REFINE_ITERS = 3


def _iteration_cost(m: int, n: int, l: int) -> float:
    """One subspace iteration: A·Vq, Aᵀ·Q (fp32), two CholeskyQR2 (fp64 Grams), small SVD, test."""
    return 2.5 * (4.0 * m * n * l + 8.0 * (m + n) * l * l) + _ITER_OVERHEAD_UNITS


def _gram_cost(m: int, n: int, k: int, l: int, device: torch.device) -> float:
    """Predicted time of the checked Gram-eigen route (m ≥ n): AᵀA, eigh, one refinement iteration."""
    c = _EIGH_UNITS.get(device.type, 15.0)
    return 2.0 * m * n * n + c * n ** 3 + _iteration_cost(m, n, l)


def krylov_budget(m: int, n: int, k: int, l: int, b: int, device: torch.device) -> int:
    """Block Krylov steps (b columns) that cost as much as the Gram-eigen route (m ≥ n)."""
    return int(_gram_cost(m, n, k, l, device) // _iteration_cost(m, n, b))


def krylov_block(k: int, device: torch.device | None = None) -> int:
    """Block width b of the block Krylov route: k/2 within 16..64 (16..128 on CUDA, where the
    64-column cap has not been measured and more, narrower steps cost launch latency). Below 16 columns a GEMM pass
    over A costs nearly as much as at 16 (2-core CPU, 4096²: b = 8 / 16 / 32 take 10 / 7 / 10 ms for
    A·X and 40 / 10 / 14 ms for Aᵀ·Y); wider blocks than k/2 make the last step overshoot, and
    past 64 the basis grows faster than the error falls (k = 256, 2-core Xeon: 4096² at b = 64 /
    128 0.87 / 1.02 s, 11008×4096 at b = 48 / 64 / 96 1.14 / 1.15 / 1.39 s)."""
    cap = 128 if device is not None and device.type == "cuda" else 64
    return max(16, min(cap, k // 2))


#: Widest Krylov block for which a wide matrix's Krylov space is built on its long side, so that
#: the fused pass of _gram_pass applies: 4096×11008 at b = 16 17.3 ms a step vs 23.8 ms as two
#: GEMMs on the transposed view, at b = 32 30.8 vs 33.0 ms, which does not pay for the longer
#: basis vectors (2-core Xeon). Steps in bf16 (:mod:`._low_precision`) stay on the short side.
FUSED_MAX_BLOCK = 16

#: Krylov basis at most this many columns (and at most n/2): past it the s·b eigenproblems of the
#: test and the basis itself cost more than the Gram-eigen route the rest is left to.
KRYLOV_MAX_WIDTH = 1536


#: The block Krylov test's float64 eigenproblem of its j×j Gram, in units·j³ (one thread, 2-core
#: Xeon: 27 ms at j = 512, 185 ms at 1024, ≈ 170 ps·j³).
_TEST_EIGH_UNITS = 34.0


def _tested(step: int, j: int, s_out_index: int) -> bool:
    """Whether the block Krylov test runs after ``step`` (1-based) with a basis of j columns: from
    the first basis holding s_out_index + 1 vectors; past 512 columns, where its eigenproblem is no
    longer small next to the step's two GEMMs, every few steps."""
    return j > s_out_index and (j <= 512 or step % (j // 512 + 1) == 0)


def krylov_max_steps(m: int, n: int, k: int, l: int, b: int, device: torch.device) -> int:
    """Steps of the block Krylov route before the Gram-eigen route takes over (m ≥ n): as many as
    cost no more than that route, the tests' eigenproblems included (a matrix that does not
    converge pays for every one), within a basis of KRYLOV_MAX_WIDTH and n/2 columns, and at least
    enough to hold l = k + p vectors and one step more."""
    per_step = _iteration_cost(m, n, b)
    budget = _gram_cost(m, n, k, l, device)
    by_width = min(KRYLOV_MAX_WIDTH, n // 2) // b
    steps, spent = 0, 0.0
    while steps < by_width:
        j = (steps + 1) * b
        cost = per_step + (_TEST_EIGH_UNITS * j ** 3 if _tested(steps + 1, j, l - 1) else 0.0)
        if spent + cost > budget:
            break
        spent += cost
        steps += 1
    return max(steps, -(-l // b) + 1)


# --- public single-stack entry --------------------------------------------------------------------
def _make_omega(n: int, l: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        generator = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(n, l, generator=generator, dtype=dtype, device=generator.device)
    return omega.to(device)


def _truncated_svd_tall(
    A: Tensor, k: int, sq_norms: Tensor, oversample: int | None, n_iter: int | None, tol: float | None,
    method: str, generator: torch.Generator | None, low_source: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch on a tall stack A [B, m, n] (m ≥ n) in the compute dtype; sq_norms [B] = ‖A‖²_F;
    ``low_source``: the bf16 input A was converted from, if any (see :func:`_block_krylov`)."""
    m, n = A.shape[-2:]
    if method != "auto":
        A = A.contiguous()
    if method == "exact":
        return _exact(A, k)
    if method == "gram":
        return _gram(A, k)
    p = default_oversample(k, n) if oversample is None else min(oversample, n - k)
    l = k + p
    if method == "randomized":
        iters = n_iter if n_iter is not None else (MAX_N_ITER if tol is not None else DEFAULT_N_ITER)
        omega = _make_omega(n, l, A.dtype, A.device, generator)
        (U, S, V), _, _ = _randomized(A, k, l, omega, iters, tol, None)
        return U, S, V
    # auto
    zero = sq_norms == 0
    if bool(zero.any()):
        # all-zero matrices: S = 0 and the first k unit vectors, without iterating (the Krylov
        # test cannot pass on a zero k-th value, and the fallback's eigh of a 4096² Gram of
        # zeros took 14 s)
        U = torch.eye(m, k, dtype=A.dtype, device=A.device).expand(A.shape[0], m, k).clone()
        S = A.new_zeros(A.shape[0], k)
        V = torch.eye(n, k, dtype=A.dtype, device=A.device).expand(A.shape[0], n, k).clone()
        if bool(zero.all()):
            return U, S, V
        idx = (~zero).nonzero().flatten()
        Ur, Sr, Vr = _truncated_svd_tall(A[idx], k, sq_norms[idx], oversample, n_iter, tol, method, generator,
                                         None if low_source is None else low_source[idx])
        U[idx], S[idx], V[idx] = Ur, Sr, Vr
        return U, S, V
    tol = CONTRACT_TOL if tol is None else tol
    b = krylov_block(k, A.device)
    budget = krylov_budget(m, n, k, l, b, A.device)
    cap = budget if n_iter is None else min(budget, n_iter)
    if budget < MIN_KRYLOV_STEPS or cap < 3:
        return _gram_refined(A.contiguous(), k, l, tol)
    steps = krylov_max_steps(m, n, k, l, b, A.device)
    if n_iter is not None:
        steps = min(steps, n_iter)
    storage = A.transpose(-2, -1)
    if (A.stride(-1) != 1 and b <= FUSED_MAX_BLOCK and fused_worthwhile(storage)
            and not low_precision_worthwhile(A)):
        # a wide matrix (A a transposed view of its row-major storage): the Krylov space of the
        # storage's Gram, on its long side, lets each step read the storage rows once
        # (_gram_pass); its vectors are m long instead of n, which costs little at b ≤ 16. Not
        # on bf16 steps: their products take either layout at the same cost, and the longer
        # vectors only make the step's small work dearer (4096×11008 k = 16, 2-core Xeon with
        # AMX: 135 ms on the short side against 162 ms on the long side)
        omega = _make_omega(m, b, A.dtype, A.device, generator)
        low_storage = None if low_source is None else low_source.transpose(-2, -1)
        (V, S, U), done, _ = _block_krylov(storage, k, b, omega, steps, tol, l - 1, sq_norms, low_storage)
    else:
        omega = _make_omega(n, b, A.dtype, A.device, generator)
        (U, S, V), done, _ = _block_krylov(A, k, b, omega, steps, tol, l - 1, sq_norms, low_source)
    if not bool(done.all()):
        # with the steps' last Ritz values as estimates (a steep top-k skips the fp32 Gram)
        bad = (~done).nonzero().flatten()
        Ug, Sg, Vg = _gram_refined(A[bad].contiguous(), k, l, tol, S[bad])
        U, S, V = U.index_copy(0, bad, Ug), S.index_copy(0, bad, Sg), V.index_copy(0, bad, Vg)
    return U, S, V


def truncated_svd(
    A: Tensor,
    k: int,
    *,
    oversample: int | None = None,
    n_iter: int | None = None,
    tol: float | None = None,
    method: str = "auto",
    generator: torch.Generator | None = None,
) -> SVDResult:
    """Top-k singular triplets of A [..., m, n]: A ≈ U·diag(S)·Vᵀ.

    Args:
        A: [..., m, n] float16 / bfloat16 / float32 / float64, any leading batch dims.
        k: rank, 1 ≤ k ≤ min(m, n).
        oversample: extra sketch columns p of the randomized iteration (default max(16, k/2),
            capped at n − k).
        n_iter: "randomized": number of iterations (default 4; with tol: the cap, default 64);
            "auto": a cap on the block Krylov steps before the Gram route takes over.
        tol: "randomized": run the convergence test at this relative tolerance;
            "auto": the tolerance of its test (default 1e-3, the accuracy contract).
        method: "auto" | "exact" | "gram" | "randomized" (see the module docstring).
        generator: source of the Gaussian sketch; None uses a generator seeded with 0.

    Returns:
        SVDResult(U [..., m, k], S [..., k] descending, V [..., n, k]) in float32 (float64 for
        float64 input), on A's device, signs fixed (largest-|.| entry of each U column positive).
        Not differentiable: A is detached (a Parameter may be passed as it is).

    Raises:
        TypeError: A is not a floating tensor.
        ValueError: A has fewer than 2 dims, contains NaN/Inf, or k is outside 1..min(m, n).
    """
    sq_norms = _check_input(A, k)
    _check_options(method, oversample, n_iter, tol)
    return _truncated_svd_checked(A, k, sq_norms, oversample, n_iter, tol, method, generator)


def _truncated_svd_checked(
    A: Tensor, k: int, sq_norms: Tensor, oversample: int | None, n_iter: int | None, tol: float | None,
    method: str, generator: torch.Generator | None,
) -> SVDResult:
    """truncated_svd after the checks; ``sq_norms`` [...] = ‖A‖²_F per matrix from _check_input."""
    A = A.detach()  # no autograd graph through the iterations (and the fused pass writes with out=)
    lead = A.shape[:-2]
    m, n = A.shape[-2:]
    dt = _compute_dtype(A.dtype)
    src = A.reshape(-1, m, n)
    with contextlib.ExitStack() as stack:
        # a large bf16 / fp16 CPU input's float32 copy goes to the kept buffer (no fresh pages)
        X = stack.enter_context(compute_copy(src, dt))
        # bf16 input: the block Krylov steps' bf16 products can use it as it is (exactly A)
        low_source = src if src.dtype == LOW_DTYPE else None
        wide = n > m
        if wide:
            X = X.transpose(-2, -1)
            low_source = None if low_source is None else low_source.transpose(-2, -1)
        if X.shape[0] == 0:
            U = X.new_zeros(0, X.shape[-2], k)
            S = X.new_zeros(0, k)
            V = X.new_zeros(0, X.shape[-1], k)
        else:
            sq = sq_norms.reshape(-1).to(torch.float64)
            scale = _unit_scale(sq)
            if scale is not None:  # far from unit norm: a scaled copy, exact (a power of two)
                X = X * scale.to(X.device, dt)[:, None, None]
                sq = sq * scale.square()
                low_source = None
            # a wide matrix stays a transposed view: the GEMMs of the Krylov route take it as it
            # is (a copy of a 4096×11008 matrix costs 0.17 s), the other routes copy it themselves
            U, S, V = _truncated_svd_tall(X, k, sq, oversample, n_iter, tol, method, generator, low_source)
            if scale is not None:
                S = (S.to(torch.float64) / scale.to(S.device)[:, None]).to(S.dtype)
    if wide:
        U, V = V, U
    U, S, V = _finish(U, S, V, m, n)
    return SVDResult(U.reshape(*lead, m, k), S.reshape(*lead, k), V.reshape(*lead, n, k))


#: Matrices whose ‖A‖_F lies outside [2⁻⁴⁰, 2⁴⁰] are scaled by a power of two to ‖A‖_F ≈ 1 before
#: the SVD (and S scaled back): the Krylov products Aᵀ·A·X square the scale, so float32 entries
#: of 1e20 overflowed (a LinAlgError on a finite matrix) and tiny ones would lose precision.
UNIT_SCALE_LOG2_RANGE = 40


def _unit_scale(sq_norms: Tensor) -> Tensor | None:
    """Per-matrix powers of two [B] (float64) that bring ‖A‖_F (sq_norms [B] = ‖A‖²_F) near 1
    where it lies outside 2^±UNIT_SCALE_LOG2_RANGE (1 elsewhere, and for zero matrices); None when
    no matrix needs it."""
    e = torch.floor(torch.log2(sq_norms.clamp_min(torch.finfo(torch.float64).tiny)) / 2)
    need = (sq_norms > 0) & (e.abs() > UNIT_SCALE_LOG2_RANGE)
    if not bool(need.any()):
        return None
    return torch.where(need, torch.exp2(-e), torch.ones_like(e))


# --- a model's worth: grouping, cache, CPU fallback ------------------------------------------------
#: progress=None shows the bar only once a run has lasted this long (seconds).
PROGRESS_DELAY_S = 2.0
#: Environment variable naming a default cache directory for batched_truncated_svd.
CACHE_ENV_VAR = "SPECTRAL_KERNELS_SVD_CACHE"


def _is_gpu_failure(exc: BaseException) -> bool:
    """Out of memory, or a cuSOLVER / CUDA error, raised by a CUDA computation."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):  # LinAlgError included
        msg = str(exc).lower()
        return any(s in msg for s in ("cusolver", "cublas", "cuda", "out of memory"))
    return False


def _svd_group(X: Tensor, k: int, sq_norms: Tensor, opts: dict[str, Any], label: str) -> SVDResult:
    """truncated_svd on one checked stacked group (sq_norms [B] its ‖A‖²_F); on a CUDA failure,
    warn and redo it on the CPU."""
    try:
        return _truncated_svd_checked(X, k, sq_norms, **opts)
    except Exception as exc:
        if not _is_gpu_failure(exc):
            raise
        warnings.warn(
            f"batched_truncated_svd: the GPU path failed for {label} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); computing it on the CPU instead",
            RuntimeWarning,
            stacklevel=3,
        )
        gen = opts.get("generator")
        if gen is not None and gen.device.type != "cpu":
            opts = {**opts, "generator": torch.Generator().manual_seed(gen.initial_seed())}
        U, S, V = _truncated_svd_checked(X.cpu(), k, sq_norms.cpu(), **opts)
        return SVDResult(U.to(X.device), S.to(X.device), V.to(X.device))


def _batch_limit(shape: tuple[int, ...], k: int, device: torch.device) -> int:
    """How many matrices of ``shape`` one stacked call may take on ``device``: on CUDA, as many as
    fit half the free memory at a working set of ~4 float64 copies of the smaller Gram side plus
    the float32 stack (a 7B model's 128 square 4096² matrices at once would need ~40 GB); on a
    CPU, no limit for matrices up to _CPU_STACK_MAX_ELEMENTS, one at a time above it."""
    if device.type != "cuda":
        # on a CPU a stacked GEMM is no faster than a loop of them, and a stack of large matrices
        # is a copy of them all that runs until the slowest one converges: stack only small ones
        return 1 << 30 if shape[-2] * shape[-1] <= _CPU_STACK_MAX_ELEMENTS else 1
    m, n = shape[-2:]
    lo = min(m, n)
    per_matrix = 4 * m * n + 4 * 8 * lo * lo + 8 * 8 * (m + n) * (k + max(16, k // 2))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.5 * free // per_matrix))


#: Largest matrix (elements) that batched_truncated_svd stacks with others of its shape on a CPU.
_CPU_STACK_MAX_ELEMENTS = 1 << 20


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def batched_truncated_svd(
    mats: Mapping[Any, Tensor] | Sequence[Tensor],
    k: int,
    *,
    oversample: int | None = None,
    n_iter: int | None = None,
    tol: float | None = None,
    method: str = "auto",
    generator: torch.Generator | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> dict[Any, SVDResult] | list[SVDResult]:
    """Truncated SVDs of many matrices (a model's weights): same-shape matrices run as one batch.

    Args:
        mats: a mapping name → A [..., m, n], or a list of them; any float dtype, any device.
        k: rank for every matrix (1 ≤ k ≤ min(m, n) of each).
        oversample, n_iter, tol, method, generator: as in :func:`truncated_svd`. The sketch is
            drawn once per shape from ``generator``, so results do not depend on the grouping.
        cache_dir: directory of the on-disk cache (default: the SPECTRAL_KERNELS_SVD_CACHE
            environment variable, else no cache). Entries are keyed by a sha256 of the weight and
            of the options; hits are loaded instead of computed, after the checks of
            :func:`spectral_kernels.ops.svd_cache.check_entry` (an entry that fails one is
            recomputed with a RuntimeWarning naming it). A directory that cannot be written is
            skipped with a RuntimeWarning.
        progress: a tqdm bar on stderr over the matrices, with the shape group in progress and
            the estimated time left. True: always; False: never; None (default): when stderr is
            a terminal and the run has taken more than ``PROGRESS_DELAY_S`` seconds (so a small
            model stays quiet and a 7B model's minutes show).

    Returns:
        The same structure as ``mats`` (a dict with the same keys in the same order, or a list)
        of SVDResult(U [..., m, k], S [..., k], V [..., n, k]) on each matrix's device.

    Raises:
        TypeError / ValueError: as truncated_svd, naming the offending key (or list index).

    A CUDA group that fails with out-of-memory or a cuSOLVER error is recomputed on the CPU with a
    RuntimeWarning that names the group; the results are moved back to the matrix's device.
    """
    from tqdm.auto import tqdm

    from spectral_kernels.ops import svd_cache

    is_map = isinstance(mats, Mapping)
    items = list(mats.items()) if is_map else list(enumerate(mats))
    _check_options(method, oversample, n_iter, tol)
    # each matrix checked once, here (its ‖A‖²_F kept for the Krylov route's test)
    sq_norms = {key: _check_input(A, k, name=f"matrix {key!r}" if is_map else f"matrix [{key}]")
                for key, A in items}
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV_VAR) or None
    # every group draws its sketch from the generator's state at entry, so a matrix's result does
    # not depend on which groups were computed before it (or were cache hits)
    state = generator.get_state() if generator is not None else None

    def group_opts() -> dict[str, Any]:
        gen = None
        if state is not None:
            gen = torch.Generator(device=generator.device)
            gen.set_state(state)
        return dict(oversample=oversample, n_iter=n_iter, tol=tol, method=method, generator=gen)

    key_opts = {"k": k, "oversample": oversample, "n_iter": n_iter, "tol": tol, "method": method,
                "generator": svd_cache.generator_fingerprint(generator)}

    results: dict[Any, SVDResult] = {}
    groups: dict[tuple, list[tuple[Any, Tensor, str | None]]] = {}
    bar = tqdm(total=len(items), desc="truncated SVD", unit="matrix", disable=(None if progress is None else not progress),
               delay=PROGRESS_DELAY_S if progress is None else 0.0, file=sys.stderr)
    try:
        for key, A in items:
            ckey = svd_cache.cache_key(A, key_opts) if cache_dir is not None else None
            hit = svd_cache.load(cache_dir, ckey, A, k) if ckey is not None else None
            if hit is not None:
                results[key] = SVDResult(*hit)
                bar.update(1)
                continue
            groups.setdefault((tuple(A.shape), A.dtype, A.device), []).append((key, A, ckey))
        for (shape, dtype, device), group in groups.items():
            for members in _chunks(group, _batch_limit(shape, k, device)):
                label = f"{len(members)} matrices of shape {shape}" if len(members) > 1 else f"matrix {members[0][0]!r}"
                bar.set_postfix_str(f"{len(members)}×{shape}")
                X = members[0][1][None] if len(members) == 1 else torch.stack([A for _, A, _ in members])
                sq = torch.stack([sq_norms[key] for key, _, _ in members])
                U, S, V = _svd_group(X, k, sq, group_opts(), label)
                for i, (key, _, ckey) in enumerate(members):
                    res = SVDResult(U[i], S[i], V[i])
                    results[key] = res
                    if ckey is not None and cache_dir is not None:
                        try:
                            svd_cache.store(cache_dir, ckey, *res)
                        except OSError as exc:  # a cache that cannot be written must not stop the work
                            warnings.warn(f"batched_truncated_svd: cannot write the SVD cache {cache_dir} "
                                          f"({type(exc).__name__}: {exc}); continuing without caching",
                                          RuntimeWarning, stacklevel=2)
                            cache_dir = None
                bar.update(len(members))
                del X, U, S, V
    finally:
        bar.close()
    ordered = [results[key] for key, _ in items]
    return dict(zip((key for key, _ in items), ordered)) if is_map else ordered
