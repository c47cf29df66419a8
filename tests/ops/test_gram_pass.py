"""The fused Krylov pass (spectral_kernels/ops/_gram_pass.py): C = A·X and Zᵀ = (Aᵀ·A·X)ᵀ in one
read of A, against float64 products, and the truncated SVD taking it (forced on small matrices)."""
from __future__ import annotations

import pytest
import torch

from spectral_kernels.ops import _gram_pass as gp
from spectral_kernels.ops import truncated_svd as tsvd
from spectral_kernels.ops.truncated_svd import truncated_svd
from tests.helpers import assert_contract, with_spectrum


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("B,m,n,b", [(1, 203, 77, 5), (2, 131, 190, 16), (1, 17, 40, 3)])
def test_products_match_float64(monkeypatch, workers, B, m, n, b):
    monkeypatch.setattr(gp, "CHUNK_BYTES", 7 * n * 4)  # 16-row chunks (MIN_CHUNK_ROWS), a ragged last one
    g = torch.Generator().manual_seed(m + n + b)
    A = torch.randn(B, m, n, generator=g)
    X = torch.randn(B, n, b, generator=g)
    C, ZT = gp.gram_products(A, X, workers)
    C64 = A.double() @ X.double()
    Z64 = A.double().mT @ C64
    assert C.shape == (B, m, b) and ZT.shape == (B, b, n)
    assert C.dtype == A.dtype and ZT.dtype == A.dtype
    # as accurate as plain fp32 GEMMs: error relative to the products' scale
    assert (C.double() - C64).abs().max() <= 1e-5 * C64.abs().max()
    assert (ZT.double().mT - Z64).abs().max() <= 1e-5 * Z64.abs().max()


def test_products_deterministic_and_thread_count_consistent():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(1, 300, 64, generator=g)
    X = torch.randn(1, 64, 8, generator=g)
    a = gp.gram_products(A, X, 2)
    b = gp.gram_products(A, X, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    one = gp.gram_products(A, X, 1)
    torch.testing.assert_close(a[1], one[1], rtol=1e-5, atol=1e-4)


def test_products_accept_a_strided_x_and_float64():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(1, 90, 50, generator=g, dtype=torch.float64)
    X = torch.randn(1, 8, 50, generator=g, dtype=torch.float64).mT  # a transposed view
    C, ZT = gp.gram_products(A, X, 2)
    torch.testing.assert_close(C, A @ X)
    torch.testing.assert_close(ZT.mT, A.mT @ (A @ X))


def test_worthwhile_only_for_large_cpu_row_major():
    big = torch.empty(1, 8192, 4096)  # 128 MB
    assert gp.fused_worthwhile(big)
    assert not gp.fused_worthwhile(torch.empty(1, 4096, 4096))  # 64 MB: stays in cache
    assert not gp.fused_worthwhile(big.mT)  # columns contiguous: rows are not


@pytest.mark.parametrize("m,n,k", [(1300, 700, 12), (700, 1300, 12), (900, 1250, 24)])
def test_truncated_svd_through_the_fused_pass_meets_the_contract(monkeypatch, m, n, k):
    # forced onto the fused pass (and, wide, onto the Krylov space of the storage's long side)
    monkeypatch.setattr(gp, "MIN_FUSED_BYTES", 0)
    calls = []
    real = gp.gram_products

    def spy(A, X, workers):
        calls.append((tuple(A.shape), X.shape[-1]))
        return real(A, X, workers)

    monkeypatch.setattr(tsvd, "gram_products", spy)
    r = min(m, n)
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.4
    A = with_spectrum(m, n, s, seed=m + k)
    res = truncated_svd(A, k)
    # every step read A in its stored [m, n] layout (a wide one too: its Krylov space on the long side)
    assert calls and all(shape == (1, m, n) for shape, _ in calls), calls
    assert res.U.shape == (m, k) and res.V.shape == (n, k)
    assert_contract(A, k, res, f"fused {m}x{n} k={k}")
    A64 = A.double()
    U, S, V = (t.double() for t in res)
    # A·V = U·diag(S): the factors belong together, whichever side the Krylov space was on
    torch.testing.assert_close(A64 @ V, U * S, atol=1e-4 * float(S[0]), rtol=0)


def test_stack_through_the_fused_pass_equals_items_alone(monkeypatch):
    # a [2, m, n] stack on the fused pass: each item as accurate as alone (the chunks never mix items)
    monkeypatch.setattr(gp, "MIN_FUSED_BYTES", 0)
    r = 600
    A = torch.stack([with_spectrum(900, r, torch.arange(1, r + 1, dtype=torch.float64) ** -a, seed=i)
                     for i, a in enumerate((0.3, 0.6))])
    res = truncated_svd(A, 10)
    for i in range(2):
        alone = truncated_svd(A[i], 10)
        torch.testing.assert_close(res.S[i], alone.S, rtol=1e-5, atol=0)
        s_true = torch.linalg.svdvals(A[i].double())[:10]
        assert ((res.S[i].double() - s_true).abs() / s_true).max() <= 1e-3


def test_parameter_input_on_the_fused_pass(monkeypatch):
    # a Parameter (requires_grad) is detached: no autograd graph, and the fused pass's out= GEMMs work
    monkeypatch.setattr(gp, "MIN_FUSED_BYTES", 0)
    W = torch.nn.Parameter(with_spectrum(900, 500, torch.arange(1, 501, dtype=torch.float64) ** -0.5, seed=3))
    for X in (W, W.T):
        U, S, V = truncated_svd(X, 8)
        assert not (U.requires_grad or S.requires_grad or V.requires_grad)
        s_true = torch.linalg.svdvals(W.detach().double())[:8]
        assert ((S.double() - s_true).abs() / s_true).max() <= 1e-3
    out = tsvd.batched_truncated_svd({"w": W}, 8, progress=False)
    assert not out["w"].S.requires_grad
