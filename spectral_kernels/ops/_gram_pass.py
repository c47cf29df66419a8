"""Both products of a block Krylov step in one read of A: C = A·X and Z = Aᵀ·C.

    A [B, m, n] (rows contiguous), X [B, n, b]  →  C [B, m, b],  Zᵀ [B, b, n]   (Z = Aᵀ·A·X)

The two thin GEMMs of a step (b = 8..32 columns) each stream all of A for few flops per byte;
done one after the other they read A twice. Here the rows of A are cut into chunks of ~512 KB
that stay in a core's cache between the two products: Cᵢ = Aᵢ·X, then Zᵀ += Cᵢᵀ·Aᵢ, one worker
thread per core on its own contiguous share of the rows, each with its own Zᵀ accumulator (summed
in a fixed order at the end, so the result is deterministic for a given thread count). Measured
on a 2-core Xeon (torch 2.13 / MKL), 11008×4096 fp32, the two products at b = 16: 24.3 ms as two
GEMMs, 18.2 ms here; at 4096² the matrix mostly stays in the last-level cache and the chunking
does not pay (MIN_FUSED_BYTES).

Only CPU tensors large enough to leave the cache take this path (:func:`fused_worthwhile`); the
caller runs it with torch's intra-op threads set to one (each worker's GEMMs then run on the
worker's own thread), see ``_block_krylov`` in truncated_svd.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from spectral_kernels._threads import shared_pool

#: Bytes of A per chunk, with at least MIN_CHUNK_ROWS rows: the chunk and the worker's Zᵀ stay in
#: a core's L2 cache (1-2 MB on current server CPUs). Measured (2-core Xeon, b = 16, ms for both
#: products): 11008×4096 at 16/24/32/48/64 rows 26.5/19.8/18.2/20.0/22.1 (two GEMMs 24.3);
#: 4096×11008 18.7/17.3/19.6/24.2/25.5 (23.8); 14336×4096 33.6/25.7/23.7/26.0/29.4 (31.5).
CHUNK_BYTES = 1 << 19
#: Fewer rows make the chunk's GEMMs too thin to run at speed.
MIN_CHUNK_ROWS = 16
#: Smallest A (bytes) that takes the fused pass; below it A largely stays in the last-level cache
#: between the two GEMMs and the chunking only adds overhead. Measured (2-core Xeon, whole
#: truncated_svd, fused vs two GEMMs): 4096² fp32 (64 MB) k = 16 68 vs 64 ms, k = 64 212 vs
#: 199 ms; 8192×4096 (128 MB) k = 16 122 vs 146 ms; 11008×4096 k = 16 152 vs 184 ms.
MIN_FUSED_BYTES = 96 << 20


def fused_worthwhile(A: Tensor) -> bool:
    """Whether A [B, m, n] takes the fused pass: a CPU tensor with contiguous rows of at least
    MIN_FUSED_BYTES per matrix."""
    return (A.device.type == "cpu" and A.stride(-1) == 1 and A.shape[-2] > 1
            and A.shape[-2] * A.shape[-1] * A.element_size() >= MIN_FUSED_BYTES)


def _rows(A: Tensor, X: Tensor, C: Tensor, lo: int, hi: int, rows: int) -> Tensor:
    """Rows lo:hi of one matrix: C[lo:hi] = A[lo:hi]·X (written in place), returns Σ Cᵢᵀ·Aᵢ [b, n]."""
    ZT = A.new_zeros(X.shape[-1], A.shape[-1])
    for i in range(lo, hi, rows):
        j = min(i + rows, hi)
        Ai = A[i:j]
        Ci = torch.mm(Ai, X, out=C[i:j])
        ZT.addmm_(Ci.transpose(0, 1), Ai)
    return ZT


def gram_products(A: Tensor, X: Tensor, workers: int) -> tuple[Tensor, Tensor]:
    """C = A·X [B, m, b] and Zᵀ = (Aᵀ·C)ᵀ [B, b, n] for A [B, m, n] with contiguous rows (see
    :func:`fused_worthwhile`), X [B, n, b]; ``workers`` threads (call with torch's intra-op
    threads set to 1)."""
    Bn, m, n = A.shape
    b = X.shape[-1]
    X = X.contiguous()
    C = A.new_empty(Bn, m, b)
    ZT = A.new_empty(Bn, b, n)
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // (n * A.element_size()))
    workers = max(1, min(workers, m // rows))
    bounds = [m * w // workers for w in range(workers + 1)]
    for i in range(Bn):
        if workers == 1:
            ZT[i] = _rows(A[i], X[i], C[i], 0, m, rows)
            continue
        pool = shared_pool("gram", workers - 1)
        # the calling thread takes the first share, the pool the others
        futures = [pool.submit(_rows, A[i], X[i], C[i], bounds[w], bounds[w + 1], rows)
                   for w in range(1, workers)]
        acc = _rows(A[i], X[i], C[i], bounds[0], bounds[1], rows)
        for f in futures:
            acc += f.result()
        ZT[i] = acc
    return C, ZT
