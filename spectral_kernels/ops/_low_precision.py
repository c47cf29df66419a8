"""The Krylov steps' products in bfloat16, on CPUs with AMX tiles: C = Â·X and Zᵀ = Cᵀ·Â, Â = bf16(A).

    A [B, m, n] float32 (by rows or columns)  →  Â [B, m, n] bfloat16, same layout  (low_copy, once)
    Â, X [B, n, b]  →  Cᵀ [B, b, m],  Zᵀ = (Âᵀ·C)ᵀ [B, b, n]   float32       (low_products, per step)

On a CPU with AMX tiles oneDNN runs a thin bf16 GEMM several times faster than MKL runs the fp32
one, and reads half the bytes (2-core Xeon with AMX, torch 2.13, b = 16: 4096² Â·X 0.67 ms and
Cᵀ·Â 1.5 ms against 2.5 and 3.7 ms in fp32; 11008×4096 1.8 and 4.4 ms against 10.0 and 12.3 ms).
Without AMX (oneDNN capped at AVX512_CORE_BF16, or AVX2) a bf16 GEMM is no faster than fp32, so
only AMX CPUs take this path (:func:`low_precision_worthwhile`).

What it costs in accuracy: Â differs from A by a relative 2⁻⁹ per entry and each product is rounded
to bf16 on output (torch has no bf16 GEMM with an fp32 output on CPU). The Krylov basis built from
these products spans nearly the same leading subspace (on the LLM test spectra the block Krylov
test passed at the same step as in fp32), but none of its numbers is final: the caller
(``_block_krylov_steps`` in truncated_svd.py) takes the subspace the bf16 steps found and computes
the returned triplets and the convergence test from fp32 products with A itself; a matrix that fails
that test steps on and is tested again, and one that never passes it is redone on fp32 steps. So the
accuracy contract is checked exactly as on the fp32 path.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from spectral_kernels.ops._workspace import kept_copy, stored_by_rows_or_columns

LOW_DTYPE = torch.bfloat16

#: Smallest A (bytes, fp32) that takes the bf16 steps: the copy of A to bf16 and the fp32 pass
#: that certifies the result cost about two fp32 steps, which the cheaper steps repay only on
#: large matrices. Whole truncated_svd, k = 16, fp32 vs bf16 steps (2-core Xeon with AMX):
#: 1024² 10 vs 10 ms, 2048² 25 vs 23 ms, 4096×2048 37 vs 31 ms, 4096² 76 vs 59 ms.
MIN_LOW_BYTES = 16 << 20


@functools.lru_cache(maxsize=None)
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles and torch's oneDNN can use them for bf16 GEMMs."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe is not None and probe() and torch.backends.mkldnn.is_available())
    except RuntimeError:  # a build without the CPU capability query
        return False


def low_precision_worthwhile(A: Tensor) -> bool:
    """Whether the Krylov steps on A [B, m, n] run in bf16: a float32 CPU tensor of at least
    MIN_LOW_BYTES per matrix, stored by rows or by columns (a transposed view), on a CPU with AMX,
    with torch's oneDNN enabled (``torch.backends.mkldnn.enabled = False`` turns them off)."""
    return (A.device.type == "cpu" and A.dtype == torch.float32 and stored_by_rows_or_columns(A)
            and A.shape[-2] * A.shape[-1] * A.element_size() >= MIN_LOW_BYTES
            and bool(torch.backends.mkldnn.enabled) and cpu_has_amx())


def usable_low_source(A: Tensor, source: Tensor | None) -> bool:
    """Whether ``source`` (the caller's bf16 input that A [B, m, n] was converted from) can serve
    as Â as it is: same shape and layout as A."""
    return (source is not None and source.dtype == LOW_DTYPE and source.shape == A.shape
            and source.stride() == A.stride() and source.device == A.device)


def low_copy(A: Tensor) -> contextlib.AbstractContextManager[Tensor]:
    """The bf16 copy Â [B, m, n] of A [B, m, n] (stored by rows or by columns), in the kept buffer
    where it is free (:func:`._workspace.kept_copy`)."""
    return kept_copy(A, LOW_DTYPE)


def low_products(low: Tensor, X: Tensor) -> tuple[Tensor, Tensor]:
    """Cᵀ = (Â·X)ᵀ [B, b, m] and Zᵀ = (Âᵀ·C)ᵀ [B, b, n], both float32, for Â = ``low`` [B, m, n]
    (bf16, stored by rows or by columns) and X [B, n, b] float32.

    Both GEMMs take the stored matrix as its left or right operand as it is, never through a
    transposed view of it (which oneDNN runs 2-5× slower, 4096² b = 16: 2.5 ms against 0.7 ms);
    the thin operands are made contiguous instead (b×m bf16 copies).
    """
    Xl = X.to(LOW_DTYPE)
    if low.stride(-1) == 1:  # Â by rows: C = Â·X, Zᵀ = Cᵀ·Â
        CT = (low @ Xl).transpose(-2, -1).contiguous()
        ZT = CT @ low
    else:  # Â = Sᵀ with S by rows: Cᵀ = Xᵀ·S, Z = S·C
        S = low.transpose(-2, -1)
        CT = Xl.transpose(-2, -1).contiguous() @ S
        ZT = (S @ CT.transpose(-2, -1).contiguous()).transpose(-2, -1)
    return CT.to(torch.float32), ZT.to(torch.float32)
