"""The cuda backend (spectral_kernels._C) with an adapter bank d [n, k] and adapter_index, on a GPU.

Against the float64 reference with the 2x rule of tests/helpers.py: y, dx, the bank gradient dd
[n, k] and dbias, for fp32 / fp16 / bf16, odd shapes, leading batch dims, T in the decode plan's
range (1, 4, 16) and the cuBLAS plan's (300, 1000), n in {1, 3, 64}. Also: rows no token picked get
exactly zero gradient, two runs are bitwise equal, a bank of one with an all-zero index is the
plain path bit for bit (through the op, and at the kernels, where no front end reduces it), and
bad indices are refused naming adapter_index (or, out of range under compile, give NaN for their
token and never fault). Skipped unless a CUDA device is visible and _C is built for it.
"""
import functools

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.ops.reference import lowrank_coeff_grad_ref, spectral_linear_fwd_ref, spectral_linear_ref
from tests.helpers import cuda_backend_ready, assert_bank_matches_reference, make_bank_operands, rel_err


_READY, _WHY = cuda_backend_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda_backend = functools.partial(sk.spectral_linear, backend="cuda")

# (leading dims, in, out, k): decode plan T = 1, 4, 16 (from batch dims), cuBLAS plan T = 300, 1000
SHAPES = [
    ((1,), 37, 53, 5),
    ((4,), 257, 300, 130),      # k over several z tiles
    ((2, 8), 37, 53, 5),
    ((300,), 37, 53, 5),
    ((4, 250), 257, 300, 130),
]


def _fns():
    from spectral_kernels.ops import spectral_linear_cuda as cu

    return cu


def _index(lead, n, device="cuda"):
    """Random per-token indices in 0..n-2 (row n-1 unused) for n >= 2; zeros for n = 1."""
    hi = max(n - 1, 1)
    return torch.randint(0, hi, lead, device=device)


@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("lead,n_in,n_out,k", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_bank_matches_reference(dtype, lead, n_in, n_out, k, n):
    ops = make_bank_operands(lead, n_in, n_out, k, n, device="cuda")
    idx = _index(lead, n)
    ours = assert_bank_matches_reference(cuda_backend, ops, dtype, idx)
    if n > 1:
        assert torch.all(ours["dd"][n - 1] == 0), "a row no token picked must get exactly zero gradient"
        unused = torch.ones(n, dtype=torch.bool, device="cuda")
        unused[idx.reshape(-1)] = False
        assert torch.all(ours["dd"][unused] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 75])  # T = 4 (decode), 300 (cuBLAS)
def test_cuda_bank_index_broadcast_over_sequence(dtype, seq):
    """x [batch, seq, in] with an index [batch, 1]: one adapter per sample."""
    ops = make_bank_operands((4, seq), 41, 27, 9, 3, device="cuda")
    idx = torch.tensor([[2], [0], [2], [1]], device="cuda")
    assert_bank_matches_reference(cuda_backend, ops, dtype, idx)


@pytest.mark.parametrize("seq", [1, 75])
def test_cuda_bank_mixed_batch_equals_each_sample_alone(seq):
    ops = make_bank_operands((4, seq), 41, 27, 9, 3, device="cuda").cast(torch.float32)
    names = [2, 0, 2, 1]
    idx = torch.tensor(names, device="cuda").view(4, 1)
    y = cuda_backend(*ops.as_tuple(), adapter_index=idx)
    for i, a in enumerate(names):
        alone = cuda_backend(ops.x[i], ops.U, ops.d[a], ops.V, ops.bias, ops.weight)
        torch.testing.assert_close(y[i], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [3, 300])
def test_cuda_bank_trainable_factors(dtype, tokens):
    ops = make_bank_operands((tokens,), 23, 19, 6, 4, device="cuda")
    idx = _index((tokens,), 4)
    assert_bank_matches_reference(cuda_backend, ops, dtype, idx, grads=("x", "U", "d", "V", "bias"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 16, 300])
def test_cuda_bank_of_one_is_the_plain_path_bit_for_bit(dtype, tokens):
    """Through the op (the front end hands the plain path d[0]) and at the backend functions,
    where the bank kernels run with an all-zero index: y, z, dx, dd and g bitwise equal."""
    base = make_bank_operands((tokens,), 37, 53, 5, 1, device="cuda")
    idx = torch.zeros(tokens, dtype=torch.int64, device="cuda")
    a = base.cast(dtype, ("x", "d"))
    b = base.cast(dtype, ("x",))
    d_plain = b.d[0].detach().clone().requires_grad_(True)
    ya = cuda_backend(*a.as_tuple(), adapter_index=idx)
    yb = cuda_backend(b.x, b.U, d_plain, b.V, b.bias, b.weight)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(a.x.grad, b.x.grad) and torch.equal(a.d.grad[0], d_plain.grad)

    cu = _fns()
    ops = base.cast(dtype)
    plain_fwd = cu.spectral_linear_fwd_cuda(ops.x, ops.U, ops.d[0], ops.V, ops.bias, ops.weight)
    bank_fwd = cu.spectral_linear_fwd_cuda(ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, idx)
    for p, q in zip(plain_fwd, bank_fwd):
        assert torch.equal(p, q)
    z = plain_fwd[1]
    plain_bwd = cu.spectral_linear_bwd_cuda(dy, z, ops.U, ops.d[0], ops.V, ops.weight)
    bank_bwd = cu.spectral_linear_bwd_cuda(dy, z, ops.U, ops.d, ops.V, ops.weight, idx)
    assert torch.equal(plain_bwd[0], bank_bwd[0]) and torch.equal(plain_bwd[2], bank_bwd[2])
    assert torch.equal(plain_bwd[1], bank_bwd[1][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [16, 1000])
def test_cuda_bank_is_deterministic(dtype, tokens):
    """Two runs of forward and backward (dd by the sorted per-adapter reduction) bitwise equal."""
    ops = make_bank_operands((tokens,), 257, 300, 130, 64, device="cuda").cast(dtype)
    idx = torch.randint(0, 64, (tokens,), device="cuda")
    dy = torch.randn(tokens, 300, device="cuda", dtype=dtype)
    cu = _fns()
    runs = []
    for _ in range(2):
        y, z = cu.spectral_linear_fwd_cuda(*ops.as_tuple(), idx)
        runs.append((y, z, *cu.spectral_linear_bwd_cuda(dy, z, ops.U, ops.d, ops.V, ops.weight, idx)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tokens", [4, 300])
def test_cuda_bank_gradient_without_dx_is_deterministic(tokens):
    """x needs no gradient (the first adapted layer of a frozen model): dd still comes from the
    cuda backend's sorted reduction, not from index_add_'s atomics."""
    ops = make_bank_operands((tokens,), 257, 300, 130, 64, device="cuda")
    idx = torch.randint(0, 64, (tokens,), device="cuda")
    torch.manual_seed(1)  # the same dy both times
    ours = assert_bank_matches_reference(cuda_backend, ops, torch.float32, idx, grads=("d",))
    torch.manual_seed(1)
    again = assert_bank_matches_reference(cuda_backend, ops, torch.float32, idx, grads=("d",))
    assert torch.equal(ours["dd"], again["dd"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n,skew", [(1, 3, False), (129, 64, False), (1000, 64, False), (1000, 5, True)])
def test_cuda_bank_coeff_grads(dtype, tokens, n, skew):
    """The per-adapter reduction alone, against float64 index_add of the same rounded inputs;
    ``skew``: nearly every token in one adapter (one long segment)."""
    cu = _fns()
    z = torch.randn(tokens, 130, device="cuda", dtype=torch.float64).to(dtype)
    g = torch.randn(tokens, 130, device="cuda", dtype=torch.float64).to(dtype)
    idx = torch.randint(0, n - 1, (tokens,), device="cuda") if n > 1 else torch.zeros(tokens, dtype=torch.int64, device="cuda")
    if skew:
        idx = torch.where(torch.rand(tokens, device="cuda") < 0.95, torch.full_like(idx, 2), idx)
    dd = cu._cuda_bank_coeff_grads(z, g, idx, n)
    assert dd.dtype == torch.float32 and dd.shape == (n, 130)
    ref = lowrank_coeff_grad_ref(z.double(), g.double(), idx, n)
    assert rel_err(dd, ref) < 1e-4
    used = torch.zeros(n, dtype=torch.bool, device="cuda")
    used[idx] = True
    assert torch.all(dd[~used] == 0)
    assert torch.equal(dd, cu._cuda_bank_coeff_grads(z, g, idx, n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [5, 70])  # decode plan, cuBLAS plan
def test_cuda_bank_strided_operands(dtype, tokens):
    """A bank given as a transposed view (d = D.t(), strides (1, n)), an index with stride 2 and a
    column-major x: every stride reaches the kernels."""
    cu = _fns()
    n, k = 4, 6
    ops = make_bank_operands((tokens,), 45, 70, k, n, device="cuda").cast(dtype)
    bank = torch.randn(k, n, device="cuda", dtype=dtype).t()
    assert bank.stride() == (1, n)
    idx = (torch.arange(2 * tokens, device="cuda") % n)[::2]
    assert idx.stride() == (2,)
    x = torch.randn(45, tokens, device="cuda", dtype=dtype).t()
    y, z = cu.spectral_linear_fwd_cuda(x, ops.U, bank, ops.V, ops.bias, ops.weight, idx)
    f64 = lambda t: t.double()  # noqa: E731
    y_ref, _ = spectral_linear_fwd_ref(f64(x), f64(ops.U), f64(bank), f64(ops.V), f64(ops.bias), f64(ops.weight), idx)
    y_plain, _ = spectral_linear_fwd_ref(x, ops.U, bank, ops.V, ops.bias, ops.weight, idx)
    floor = torch.finfo(dtype).eps / 8
    assert rel_err(y, y_ref) <= 2 * rel_err(y_plain, y_ref) + floor
    dy = torch.randn(70, tokens, device="cuda", dtype=dtype).t()
    dx, dd, _ = cu.spectral_linear_bwd_cuda(dy, z, ops.U, bank, ops.V, ops.weight, idx)
    gd = (f64(dy) @ f64(ops.U)) * f64(bank)[idx]
    dx_ref = f64(dy) @ f64(ops.weight) + gd @ f64(ops.V).t()
    assert rel_err(dx, dx_ref) < (1e-4 if dtype == torch.float32 else 2e-2)
    dd_ref = lowrank_coeff_grad_ref(z.double(), (dy @ ops.U).double(), idx, n)
    assert rel_err(dd, dd_ref) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_cuda_bank_edges():
    """Small and quick (benchmarks/gpu/run.sh runs it under compute-sanitizer): both plans with an
    out-of-range index (as under torch.compile, where values are not checked): that token's y and
    dx are NaN, it adds to no row of dd, every other token is unaffected, and nothing reads
    outside the bank."""
    cu = _fns()
    n = 4
    for tokens in (5, 70):
        ops = make_bank_operands((tokens,), 37, 53, 5, n, device="cuda").cast(torch.float16)
        idx = torch.randint(0, n, (tokens,), device="cuda")
        bad = idx.clone()
        bad[1], bad[3] = n, -1
        y, z = cu.spectral_linear_fwd_cuda(*ops.as_tuple(), bad)
        y_ok, _ = cu.spectral_linear_fwd_cuda(*ops.as_tuple(), idx)
        keep = torch.ones(tokens, dtype=torch.bool, device="cuda")
        keep[[1, 3]] = False
        assert torch.isnan(y[~keep]).all() and torch.equal(y[keep], y_ok[keep])
        dy = torch.randn(tokens, 53, device="cuda", dtype=torch.float16)
        dx, dd, g = cu.spectral_linear_bwd_cuda(dy, z, ops.U, ops.d, ops.V, ops.weight, bad)
        assert torch.isnan(dx[~keep]).all() and torch.isfinite(dx[keep]).all()
        dd_ref = lowrank_coeff_grad_ref(z[keep], g[keep], idx[keep], n)
        assert torch.isfinite(dd).all() and rel_err(dd, dd_ref) < 1e-2


def test_cuda_bank_bad_index_is_refused():
    ops = make_bank_operands((4,), 6, 5, 2, 3, device="cuda").cast(torch.float32)
    x, U, d, V, bias, weight = ops.as_tuple()
    with pytest.raises(ValueError, match=r"adapter_index values must be in 0\.\.2.*got values in 0\.\.5"):
        cuda_backend(x, U, d, V, bias, weight, adapter_index=torch.tensor([0, 1, 5, 0], device="cuda"))
    with pytest.raises(ValueError, match=r"adapter_index is on cpu"):
        cuda_backend(x, U, d, V, bias, weight, adapter_index=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="adapter_index must have an integer dtype"):
        cuda_backend(x, U, d, V, bias, weight, adapter_index=torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="adapter_index of shape"):
        cuda_backend(x, U, d, V, bias, weight, adapter_index=torch.zeros(3, dtype=torch.int64, device="cuda"))
    # the backend functions check what crosses into _C
    cu = _fns()
    good = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(TypeError, match="adapter_index must have dtype torch.int64"):
        cu.spectral_linear_fwd_cuda(x, U, d, V, bias, weight, good.int())
    with pytest.raises(ValueError, match=r"adapter_index must have shape \(4,\)"):
        cu.spectral_linear_fwd_cuda(x, U, d, V, bias, weight, good[:3])
    with pytest.raises(ValueError, match="adapter_index is on cpu"):
        cu.spectral_linear_fwd_cuda(x, U, d, V, bias, weight, good.cpu())
    with pytest.raises(ValueError, match="with adapter_index, d must be a bank"):
        cu.spectral_linear_fwd_cuda(x, U, d[0], V, bias, weight, good)
    big = torch.randn(300, 6, device="cuda")
    dy = torch.randn(300, 5, device="cuda")
    z = big @ V
    with pytest.raises(TypeError, match="adapter_index must have dtype torch.int64"):
        cu.spectral_linear_fwd_cuda(big, U, d, V, bias, weight, torch.zeros(300, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match=r"adapter_index must have shape \(300,\)"):
        cu.spectral_linear_bwd_cuda(dy, z, U, d, V, weight, good)


@pytest.mark.parametrize("tokens", [4, 129])
def test_cuda_bank_opcheck(tokens):
    cu = _fns()
    ops = make_bank_operands((tokens,), 37, 53, 5, 3, device="cuda").cast(torch.float16)
    x, U, d, V, bias, weight = ops.as_tuple()
    idx = torch.randint(0, 3, (tokens,), device="cuda")
    if tokens <= cu.DECODE_MAX_TOKENS:
        torch.library.opcheck(cu._cuda_decode_forward, (x, U, d, V, bias, weight, idx))
    torch.library.opcheck(cu._cuda_lowrank_gemm, (x, weight.t(), x @ V, U.t(), d, bias, idx))
    torch.library.opcheck(cu._cuda_bank_coeff_grads, (x @ V, x @ V, idx, 3))


def test_cuda_bank_under_torch_compile():
    ops = make_bank_operands((4, 5), 37, 53, 5, 3, device="cuda").cast(torch.float16, ("x", "d"))
    idx = torch.tensor([[2], [0], [0], [1]], device="cuda")

    def f(x, d, idx):
        return cuda_backend(x, ops.U, d, ops.V, ops.bias, ops.weight, adapter_index=idx)

    compiled = torch.compile(f, fullgraph=True)
    y = compiled(ops.x, ops.d, idx)
    y.float().sum().backward()
    gx, gd = ops.x.grad.clone(), ops.d.grad.clone()
    ops.x.grad = ops.d.grad = None
    y_eager = f(ops.x, ops.d, idx)
    y_eager.float().sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, ops.x.grad)
    torch.testing.assert_close(gd, ops.d.grad)
    ref = spectral_linear_ref(*ops.cast(torch.float64).as_tuple(), adapter_index=idx)
    assert rel_err(y, ref) < 1e-2
