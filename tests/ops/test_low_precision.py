"""The bf16 Krylov steps (spectral_kernels/ops/_low_precision.py) and the kept working copy
(spectral_kernels/ops/_workspace.py): the bf16 copy of A and its products against float64, and the
truncated SVD taking them (forced on small matrices and on CPUs without AMX, where the bf16 GEMMs
are slower but compute the same thing): the contract holds, because the returned triplets and their
test come from fp32 products; a failed test steps on, and one never passed is redone in fp32."""
from __future__ import annotations

import threading

import pytest
import torch

from spectral_kernels.ops import _gram_pass as gp
from spectral_kernels.ops import _low_precision as lp
from spectral_kernels.ops import _workspace as ws
from spectral_kernels.ops import truncated_svd as tsvd
from spectral_kernels.ops.truncated_svd import batched_truncated_svd, truncated_svd
from tests.helpers import assert_contract, with_spectrum


@pytest.fixture
def forced(monkeypatch):
    """Every float32 CPU matrix takes the bf16 steps, whatever its size and the CPU."""
    monkeypatch.setattr(lp, "MIN_LOW_BYTES", 0)
    monkeypatch.setattr(lp, "cpu_has_amx", lambda: True)
    ws.release_workspace()
    yield
    ws.release_workspace()


def _spy_steps(monkeypatch):
    """Record whether each _block_krylov_steps call ran on bf16 products (its ``low`` argument)."""
    real, seen = tsvd._block_krylov_steps, []

    def spy(A, *args):
        seen.append(args[-1] is not None)
        return real(A, *args)

    monkeypatch.setattr(tsvd, "_block_krylov_steps", spy)
    return seen


# --- the copy and the products ------------------------------------------------------------------
@pytest.mark.parametrize("by_columns", [False, True])
@pytest.mark.parametrize("B,m,n,b", [(1, 203, 77, 5), (2, 131, 190, 16), (1, 17, 40, 3)])
def test_products_match_float64_of_the_rounded_matrix(B, m, n, b, by_columns):
    g = torch.Generator().manual_seed(m + n + b)
    A = torch.randn(B, n, m, generator=g).mT if by_columns else torch.randn(B, m, n, generator=g)
    X = torch.randn(B, n, b, generator=g)
    with lp.low_copy(A) as low:
        assert low.dtype == torch.bfloat16 and low.shape == A.shape
        assert torch.equal(low, A.to(torch.bfloat16))
        assert (low.stride(-2) == 1) == by_columns  # the layout is kept: GEMMs take it as stored
        CT, ZT = lp.low_products(low, X)
        low64 = low.double()
    assert CT.shape == (B, b, m) and ZT.shape == (B, b, n)
    assert CT.dtype == torch.float32 and ZT.dtype == torch.float32
    # the exact products of the bf16 operands, up to the bf16 rounding of each output (2⁻⁸ relative)
    C64 = low64 @ X.to(torch.bfloat16).double()
    Z64 = low64.mT @ C64
    assert (CT.double().mT - C64).abs().max() <= 2 ** -7 * C64.abs().max()
    assert (ZT.double().mT - Z64).abs().max() <= 2 ** -6 * Z64.abs().max()
    # and far from exact: these are not fp32 products (the test would not see a swap of paths)
    assert (CT.double().mT - C64).abs().max() >= 1e-5 * C64.abs().max()


def test_copy_reuses_its_buffer_and_gives_concurrent_calls_their_own(forced):
    A = torch.randn(1, 60, 40)
    with lp.low_copy(A) as first:
        ptr = first.data_ptr()
        with lp.low_copy(A * 2) as inner:  # the kept buffer is taken: a buffer of its own
            assert inner.data_ptr() != ptr
            assert torch.equal(inner, (A * 2).to(torch.bfloat16))
        assert torch.equal(first, A.to(torch.bfloat16))  # untouched by the inner call
    with lp.low_copy(torch.randn(1, 30, 40)) as again:  # smaller: the same buffer
        assert again.data_ptr() == ptr


def test_copy_above_the_kept_size_is_not_kept(monkeypatch, forced):
    monkeypatch.setattr(ws, "MAX_KEPT_BYTES", 1000)
    with lp.low_copy(torch.randn(1, 30, 40)):
        pass
    assert ws._kept is None
    with lp.low_copy(torch.randn(1, 10, 40)):  # 800 bytes: kept
        pass
    assert ws._kept is not None


def test_release_workspace_now_and_deferred(forced):
    with lp.low_copy(torch.randn(1, 30, 40)):
        pass
    assert ws._kept is not None
    ws.release_workspace()
    assert ws._kept is None
    with lp.low_copy(torch.randn(1, 30, 40)):
        ws.release_workspace()  # in use: freed when the call is done
        assert ws._kept is not None
    assert ws._kept is None


def test_copy_is_thread_safe(forced):
    # two threads converting different matrices at once each get their own, correct copy
    mats = [torch.full((1, 300, 200), float(i + 1)) for i in range(2)]
    barrier, errors = threading.Barrier(2), []

    def work(A):
        for _ in range(20):
            with lp.low_copy(A) as low:
                barrier.wait(timeout=10)
                if not torch.equal(low, A.to(torch.bfloat16)):
                    errors.append("copy overwritten by the other thread")
                barrier.wait(timeout=10)

    threads = [threading.Thread(target=work, args=(A,)) for A in mats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_worthwhile_only_for_large_float32_cpu_on_amx(monkeypatch):
    monkeypatch.setattr(lp, "cpu_has_amx", lambda: True)
    big = torch.empty(1, 2048, 2048)  # 16 MB
    assert lp.low_precision_worthwhile(big)
    assert lp.low_precision_worthwhile(big.mT)  # stored by columns: the products take it as stored
    assert not lp.low_precision_worthwhile(torch.empty(1, 1024, 2048))  # 8 MB
    assert not lp.low_precision_worthwhile(big.double())
    assert not lp.low_precision_worthwhile(big[:, :, ::2])  # neither rows nor columns contiguous
    with monkeypatch.context() as mp:
        mp.setattr(torch.backends.mkldnn, "enabled", False)  # the user's switch for oneDNN
        assert not lp.low_precision_worthwhile(big)
    assert torch.backends.mkldnn.enabled and lp.low_precision_worthwhile(big)
    monkeypatch.setattr(lp, "cpu_has_amx", lambda: False)
    assert not lp.low_precision_worthwhile(big)


def test_cpu_has_amx_is_a_bool():
    assert isinstance(lp.cpu_has_amx(), bool)


# --- the truncated SVD on bf16 steps ---------------------------------------------------------------
@pytest.mark.parametrize("m,n,k,decay", [(1300, 700, 12, 0.3), (700, 1300, 12, 0.5), (900, 1250, 40, 0.4),
                                         (1250, 900, 40, "flat")])
def test_truncated_svd_on_bf16_steps_meets_the_contract(monkeypatch, forced, m, n, k, decay):
    # tall; wide at b = 16 and at b = 20 (both on the short side: the transposed view, by columns)
    seen = _spy_steps(monkeypatch)
    fallback = []
    monkeypatch.setattr(tsvd, "_gram_refined", lambda *a: fallback.append(1) or pytest.fail("fallback"))
    r = min(m, n)
    s = (torch.logspace(0, -2.5, r, dtype=torch.float64) if decay == "flat"
         else torch.arange(1, r + 1, dtype=torch.float64) ** -decay)
    A = with_spectrum(m, n, s, seed=m + k)
    res = truncated_svd(A, k)
    assert seen == [True], seen  # bf16 steps, certified at the first try
    assert res.U.shape == (m, k) and res.V.shape == (n, k)
    assert_contract(A, k, res, f"bf16 steps {m}x{n} k={k}")
    # the Rayleigh-Ritz side holds to fp32 rounding (A·V = U·diag(S) for a tall matrix, Aᵀ·U =
    # V·diag(S) for a wide one): the factors come from fp32 products, not the bf16 ones (the other
    # side's residual is the ~1e-4 the contract allows)
    U, S, V = (t.double() for t in res)
    exact_side = (A.double() @ V - U * S) if m >= n else (A.double().mT @ U - V * S)
    assert exact_side.abs().max() <= 1e-6 * float(S[0])


def test_bf16_steps_with_the_fused_certification(monkeypatch, forced):
    # a large matrix certifies through the fused pass (C and Aᵀ·C in one read): forced here
    monkeypatch.setattr(gp, "MIN_FUSED_BYTES", 0)
    calls = []
    real = gp.gram_products
    monkeypatch.setattr(tsvd, "gram_products", lambda A, X, w: calls.append(X.shape[-1]) or real(A, X, w))
    A = with_spectrum(1100, 600, torch.arange(1, 601, dtype=torch.float64) ** -0.4, seed=4)
    res = truncated_svd(A, 10)
    assert calls == [10], calls  # only the certification: the steps' products are the bf16 ones
    assert_contract(A, 10, res, "fused certification")


def test_failed_certification_is_redone_in_fp32(monkeypatch, forced):
    # the bf16 subspace failing the fp32 test (forced for item 1 of a stack): that item alone is
    # redone on fp32 steps, the other keeps its certified result
    seen = _spy_steps(monkeypatch)
    real = tsvd._certify
    r = 700
    A = torch.stack([with_spectrum(1000, r, torch.arange(1, r + 1, dtype=torch.float64) ** -a, seed=i)
                     for i, a in enumerate((0.3, 0.5, 0.6))])
    norm2_item_1 = (A[1].double() ** 2).sum()

    def failing_item_1(A, Vk, s_out, normA2, *args):
        # the items certified together vary from step to step: item 1 is told by its norm
        trip, ok = real(A, Vk, s_out, normA2, *args)
        return trip, ok & ~torch.isclose(normA2, norm2_item_1, rtol=1e-6)

    monkeypatch.setattr(tsvd, "_certify", failing_item_1)
    res = truncated_svd(A, 8)
    assert seen == [True, False], seen
    for i in range(3):
        assert_contract(A[i], 8, (res.U[i], res.S[i], res.V[i]), f"item {i}")
    monkeypatch.setattr(lp, "cpu_has_amx", lambda: False)
    fp32 = truncated_svd(A[1], 8)
    torch.testing.assert_close(res.S[1], fp32.S, rtol=1e-6, atol=0)


def test_failed_certification_goes_on_stepping(monkeypatch, forced):
    # a first fp32 test that fails (forced) is not the end of the bf16 steps: the matrix steps on
    # and its next passing step is certified, with no fp32 redo
    seen = _spy_steps(monkeypatch)
    real, calls = tsvd._certify, []

    def fail_first(A, *args):
        trip, ok = real(A, *args)
        calls.append(bool(ok.all()))
        return trip, ok & (len(calls) > 1)

    monkeypatch.setattr(tsvd, "_certify", fail_first)
    A = with_spectrum(1000, 700, torch.arange(1, 701, dtype=torch.float64) ** -0.4, seed=5)
    res = truncated_svd(A, 8)
    assert seen == [True] and len(calls) == 2, (seen, calls)
    assert_contract(A, 8, res, "certified at the second passing step")


def test_certify_passes_the_exact_subspace_and_fails_a_random_one():
    r = 500
    A = with_spectrum(800, r, torch.arange(1, r + 1, dtype=torch.float64) ** -0.5, seed=8)[None]
    k = 6
    U64, S64, Vh64 = torch.linalg.svd(A.double())
    normA2 = (A.double() ** 2).sum((-2, -1))
    s_out = S64[:, 3 * k:3 * k + 1].float()
    for fused in (False, True):
        (U, S, V), ok = tsvd._certify(A, Vh64[:, :k].mT.float().contiguous(), s_out, normA2, 1e-3, fused, 2)
        assert bool(ok.all())
        torch.testing.assert_close(S.double(), S64[:, :k], rtol=1e-5, atol=0)
        rand = torch.linalg.qr(torch.randn(1, r, k, generator=torch.Generator().manual_seed(0)))[0]
        _, ok = tsvd._certify(A, rand, s_out, normA2, 1e-3, fused, 2)
        assert not bool(ok.any())


def test_bf16_input_serves_as_the_copy(monkeypatch, forced):
    # a bf16 matrix is its own bf16 copy (exactly A): no conversion, and the contract holds
    def no_copy(A):
        raise AssertionError("a bf16 input was copied to bf16 again")

    monkeypatch.setattr(tsvd, "low_copy", no_copy)
    seen = _spy_steps(monkeypatch)
    for m, n, k in ((1100, 600, 10), (600, 1100, 10), (700, 1000, 40)):
        A = with_spectrum(m, n, torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** -0.4, seed=m).to(torch.bfloat16)
        res = truncated_svd(A, k)
        assert_contract(A.float(), k, res, f"bf16 input {m}x{n}")
    assert seen == [True] * 3, seen


def test_bf16_steps_deterministic_and_batched_equals_single(forced):
    mats = {f"w{i}": with_spectrum(900, 600, torch.arange(1, 601, dtype=torch.float64) ** -(0.3 + 0.2 * i), seed=i)
            for i in range(2)}
    a = truncated_svd(mats["w0"], 9, generator=torch.Generator().manual_seed(3))
    b = truncated_svd(mats["w0"], 9, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    out = batched_truncated_svd(mats, 9, progress=False, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out["w0"].S, a.S, rtol=1e-5, atol=0)
    for name, A in mats.items():
        assert_contract(A, 9, out[name], name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_input_converted_in_the_kept_buffer(monkeypatch, forced, dtype):
    # a large bf16 / fp16 input's float32 copy lives in the kept buffer; the results own their
    # memory (a later call reusing the buffer leaves them as they were) and equal a fresh copy's
    monkeypatch.setattr(ws, "MIN_KEPT_COPY_BYTES", 0)
    A = with_spectrum(900, 500, torch.arange(1, 501, dtype=torch.float64) ** -0.4, seed=6).to(dtype)
    res = truncated_svd(A, 8)
    assert ws._kept is not None and ws._kept.numel() >= A.numel() * 4
    kept = [t.clone() for t in res]
    truncated_svd(torch.randn(900, 500).to(dtype), 8)  # overwrites the buffer
    assert all(torch.equal(x, y) for x, y in zip(res, kept))
    assert_contract(A.float(), 8, res, f"{dtype} input through the kept buffer")
    ws.release_workspace()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ws, "MAX_KEPT_BYTES", 0)  # every copy fresh
        fresh = truncated_svd(A, 8)
    assert ws._kept is None
    assert all(torch.equal(x, y) for x, y in zip(res, fresh))


def test_compute_copy_keeps_the_layout(monkeypatch, forced):
    monkeypatch.setattr(ws, "MIN_KEPT_COPY_BYTES", 0)
    src = torch.randn(1, 300, 200).to(torch.bfloat16)
    for X in (src, src.mT):
        with ws.compute_copy(X, torch.float32) as C:
            assert C.dtype == torch.float32 and C.stride() == X.stride() and torch.equal(C, X.float())
    F = src.float()
    with ws.compute_copy(F, torch.float32) as C:  # nothing to convert: the input itself
        assert C is F


def test_rank_deficient_matrix_on_bf16_steps(monkeypatch, forced):
    # rank < k on bf16 steps: the bf16 basis only locates the row space; the range finish's
    # products are fp32 ones, so the triplets are exact and the trailing values exact zeros
    finish = []
    real = tsvd._range_finish
    monkeypatch.setattr(tsvd, "_range_finish", lambda A, *a: finish.append(A.shape[0]) or real(A, *a))
    seen = _spy_steps(monkeypatch)
    m, n, r, k = 1300, 900, 5, 12
    A = with_spectrum(m, n, torch.linspace(3.0, 1.0, r, dtype=torch.float64), seed=9)
    U, S, V = truncated_svd(A, k)
    assert seen == [True] and finish == [1], (seen, finish)
    assert torch.all(S[r:] == 0), S.tolist()
    torch.testing.assert_close(S[:r].double(), torch.linalg.svdvals(A.double())[:r], rtol=1e-5, atol=0)
    torch.testing.assert_close((U * S) @ V.T, A, rtol=0, atol=1e-5)


def test_wide_matrix_on_bf16_steps_keeps_its_short_side(monkeypatch, forced):
    # a wide matrix large enough for the fused pass: on fp32 steps its Krylov space is built on
    # the long side (the storage's rows, read once a step); on bf16 steps, whose products take
    # either layout at the same cost, on the short side (shorter basis vectors)
    monkeypatch.setattr(gp, "MIN_FUSED_BYTES", 0)
    shapes = []
    real = tsvd._block_krylov_steps

    def spy(A, *args):
        shapes.append((tuple(A.shape), args[-1] is not None))
        return real(A, *args)

    monkeypatch.setattr(tsvd, "_block_krylov_steps", spy)
    m, n, k = 600, 1100, 12
    A = with_spectrum(m, n, torch.arange(1, m + 1, dtype=torch.float64) ** -0.4, seed=2)
    res = truncated_svd(A, k)
    assert shapes == [((1, n, m), True)], shapes  # the transposed view, n ≥ m: the short side
    assert_contract(A, k, res, "wide on bf16 steps")
    shapes.clear()
    monkeypatch.setattr(lp, "cpu_has_amx", lambda: False)
    res = truncated_svd(A, k)
    assert shapes == [((1, m, n), False)], shapes  # fp32 steps: the storage, on its long side
    assert_contract(A, k, res, "wide on fp32 steps")
