"""spectral_linear with an adapter bank d [n, k] and adapter_index: against the float64 reference
(torch and the Triton interpreter), mixed batches against per-sample calls, gradients,
torch.library registration, torch.compile, the plain path for a bank of one, and bad input."""
import functools

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.backends import BackendUnavailableError, resolve_backend, triton_interpret_enabled
from spectral_kernels.ops.reference import spectral_linear_ref
from spectral_kernels.ops.spectral_linear import (
    _SpectralLinearFunction,
    _spectral_linear_backward_op,
    _spectral_linear_op,
)
from tests.helpers import assert_bank_matches_reference, make_bank_operands, make_operands

HAS_TRITON = triton_interpret_enabled() or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret_enabled() else "cpu"
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
# Triton under the interpreter: fp32 and fp16 only (tests/ops/test_spectral_linear_triton.py).
DTYPES = [torch.float32, torch.float16]


_bank_operands = make_bank_operands


def _check_against_reference(backend, ops, dtype, idx, grads=("x", "d", "bias")):
    """The 2x rule of tests/helpers.py with a bank: ours vs float64, within 2x plain torch + floor."""
    return assert_bank_matches_reference(functools.partial(sk.spectral_linear, backend=backend), ops, dtype, idx, grads)


# --- accuracy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n_in,n_out,k,n", [((3, 5), 37, 19, 6, 4), ((40,), 23, 29, 130, 3), ((2, 9), 16, 16, 4, 7)])
def test_bank_matches_reference(backend, dtype, lead, n_in, n_out, k, n):
    ops = _bank_operands(lead, n_in, n_out, k, n, device=DEVICE)
    # per-token indices, interleaved, with row n-1 unused
    idx = torch.randint(0, n - 1, lead, device=DEVICE)
    ours = _check_against_reference(backend, ops, dtype, idx)
    assert torch.all(ours["dd"][n - 1] == 0), "a row no token picked must get exactly zero gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_broadcast_over_sequence(backend):
    """x [batch, seq, in] with an index [batch, 1]: one adapter per sample."""
    ops = _bank_operands((4, 6), 20, 12, 5, 3, device=DEVICE)
    idx = torch.tensor([[2], [0], [2], [1]], device=DEVICE)
    _check_against_reference(backend, ops, torch.float32, idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_equals_each_sample_alone(backend):
    ops = _bank_operands((4, 6), 20, 12, 5, 3, device=DEVICE).cast(torch.float32)
    names = [2, 0, 2, 1]
    idx = torch.tensor(names, device=DEVICE).view(4, 1)
    y = sk.spectral_linear(ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, adapter_index=idx, backend=backend)
    for i, a in enumerate(names):
        alone = sk.spectral_linear(ops.x[i], ops.U, ops.d[a], ops.V, ops.bias, ops.weight, backend=backend)
        torch.testing.assert_close(y[i], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_factors_with_a_bank(backend):
    ops = _bank_operands((3, 4), 12, 10, 3, 3, device=DEVICE)
    idx = torch.tensor([0, 2, 2], device=DEVICE).view(3, 1)
    _check_against_reference(backend, ops, torch.float32, idx, grads=("x", "U", "d", "V", "bias"))
    _check_against_reference(backend, ops, torch.float32, idx, grads=("d", "V"))  # no dx: glue only


def test_gradcheck_reference_and_op_float64():
    ops = _bank_operands((2, 3), 7, 5, 3, 4).cast(torch.float64, ("x", "U", "d", "V", "bias"))
    idx = torch.tensor([[3], [1]])
    for f in (spectral_linear_ref, functools.partial(sk.spectral_linear, backend="torch")):
        fn = lambda x, U, d, V, b: f(x, U, d, V, b, ops.weight, adapter_index=idx)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (ops.x, ops.U, ops.d, ops.V, ops.bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_of_one_is_the_plain_path_bit_for_bit(backend):
    base = _bank_operands((3, 5), 37, 19, 6, 1, device=DEVICE)
    idx = torch.zeros(3, 1, dtype=torch.int64, device=DEVICE)
    a = base.cast(torch.float32, ("x", "d"))
    b = base.cast(torch.float32, ("x",))
    d_plain = b.d[0].detach().clone().requires_grad_(True)
    ya = sk.spectral_linear(*a.as_tuple(), adapter_index=idx, backend=backend)
    yb = sk.spectral_linear(b.x, b.U, d_plain, b.V, b.bias, b.weight, backend=backend)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(a.x.grad, b.x.grad) and torch.equal(a.d.grad[0], d_plain.grad)


@pytest.mark.skipif(not HAS_TRITON, reason="triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_bank_gradient_is_deterministic():
    ops = _bank_operands((50,), 20, 12, 5, 6, device=DEVICE).cast(torch.float32)
    idx = torch.randint(0, 6, (50,), device=DEVICE)
    from spectral_kernels.ops.spectral_linear_triton import spectral_linear_bwd_triton

    dy = torch.randn(50, 12, device=DEVICE)
    z = ops.x @ ops.V
    runs = [spectral_linear_bwd_triton(dy, z, ops.U, ops.d, ops.V, ops.weight, idx) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAS_TRITON, reason="triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bank_gradient_without_dx_comes_from_the_kernel_reduction(dtype, monkeypatch):
    """x needs no gradient (a frozen embedding's output): the glue still takes triton's per-adapter
    reduction for dd, never index_add_ (atomics on CUDA); the result meets the 2x rule."""
    from spectral_kernels.ops import reference, spectral_linear_triton

    calls = []
    project = spectral_linear_triton.lowrank_project
    monkeypatch.setattr(spectral_linear_triton, "lowrank_project",
                        lambda *a, **kw: calls.append(kw.get("idx") is not None) or project(*a, **kw))
    ref_grad = reference.lowrank_coeff_grad_ref

    def no_index_add(z, g, idx=None, n=None):
        assert idx is None, "a triton bank's dd went through index_add_"
        return ref_grad(z, g, idx, n)

    monkeypatch.setattr("spectral_kernels.ops.spectral_linear.lowrank_coeff_grad_ref", no_index_add)
    ops = _bank_operands((3, 11), 21, 13, 5, 4, device=DEVICE)
    idx = torch.tensor([0, 2, 2], device=DEVICE)[:, None]  # row 1 and 3 unused
    ours = _check_against_reference("triton", ops, dtype, idx, grads=("d", "bias"))
    assert True in calls
    assert torch.count_nonzero(ours["dd"][[1, 3]]) == 0


@pytest.mark.skipif(not HAS_TRITON, reason="triton kernels need CUDA or TRITON_INTERPRET=1")
def test_triton_refuses_other_plans_for_banks():
    from spectral_kernels.ops.spectral_linear_triton import spectral_linear_fwd_triton

    ops = _bank_operands((4,), 8, 6, 2, 2, device=DEVICE).cast(torch.float32)
    with pytest.raises(ValueError, match="fused plan only"):
        spectral_linear_fwd_triton(ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight,
                                   torch.zeros(4, dtype=torch.int64, device=DEVICE), plan="fold")


# --- registration and compile --------------------------------------------------------------------
def test_opcheck_with_a_bank():
    ops = _bank_operands((2, 5), 9, 7, 3, 4).cast(torch.float64, ("x", "d", "bias"))
    idx = torch.tensor([[1], [3]])
    torch.library.opcheck(_spectral_linear_op, (*ops.as_tuple(), idx, "torch", "torch"))
    dy = torch.randn(2, 5, 7, dtype=torch.float64)
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.library.opcheck(_spectral_linear_backward_op, (dy, z, ops.U, ops.d.detach(), ops.V, ops.weight, idx, "torch"))


def test_eager_function_and_custom_op_agree_with_a_bank():
    base = _bank_operands((2, 5), 9, 7, 3, 4)
    idx = torch.tensor([[1], [3]])
    grads = ("x", "U", "d", "V", "bias")
    results = []
    for fn in (_SpectralLinearFunction.apply, _spectral_linear_op):
        ops = base.cast(torch.float32, grads)
        y, z = fn(*ops.as_tuple(), idx, "torch", "torch")
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        results.append([y.detach(), z] + [getattr(ops, g).grad for g in grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_a_bank():
    ops = _bank_operands((4, 5), 9, 7, 3, 3).cast(torch.float32, ("x", "d"))
    idx = torch.tensor([[2], [0], [0], [1]])

    def f(x, d, idx):
        return sk.spectral_linear(x, ops.U, d, ops.V, ops.bias, ops.weight, adapter_index=idx, backend="torch")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(ops.x, ops.d, idx)
    y.sum().backward()
    gx, gd = ops.x.grad.clone(), ops.d.grad.clone()
    ops.x.grad = ops.d.grad = None
    y_eager = f(ops.x, ops.d, idx)
    y_eager.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(gx, ops.x.grad)
    torch.testing.assert_close(gd, ops.d.grad)


# --- backend choice -------------------------------------------------------------------------------
def test_auto_sends_banks_to_torch():
    """Banks run on the cuda backend too (tests/ops/test_spectral_linear_cuda_banks.py, on a GPU),
    but "auto" keeps them on torch: no bank plan has been timed on a GPU yet."""
    from spectral_kernels import plans

    cuda = torch.device("cuda")
    for shape in ((plans.FOLD_MIN_TOKENS, 4096, 4096, 16), (4, 4096, 4096, 16)):  # GEMM range, decode range
        for phase in ("forward", "backward"):
            assert resolve_backend("auto", cuda, torch.bfloat16, shape, phase, True, bank=True) == "torch"
    assert plans.triton_plan(plans.FOLD_MIN_TOKENS, 16, True, bank=True) == "fused"
    assert plans.triton_plan(16, plans.FUSED_MAX_RANK + 1, True, bank=True) == "fused"


def test_cuda_backend_checks_bank_operands_before_any_pointer():
    """On CPU: the cuda backend's functions refuse CPU tensors, and its ops' fakes (meta tensors,
    the same checks as on the device) refuse a bad index or bank, naming adapter_index."""
    from spectral_kernels.ops import spectral_linear_cuda as cu

    ops = _bank_operands((4,), 8, 6, 2, 2).cast(torch.float32)
    idx = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        cu.spectral_linear_fwd_cuda(ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, idx)
    with pytest.raises(ValueError, match="dy must be a CUDA tensor"):
        cu.spectral_linear_bwd_cuda(ops.x[:, :6], ops.x[:, :2], ops.U, ops.d, ops.V, ops.weight, idx)
    with pytest.raises(BackendUnavailableError, match="cuda"):  # no CUDA device here, or CPU tensors
        sk.spectral_linear(*ops.as_tuple(), adapter_index=idx, backend="cuda")
    # without dx, the autograd glue sends a cuda bank's dd to the cuda reduction (not index_add_)
    from spectral_kernels.ops.spectral_linear import _coeff_grad

    zg = torch.randn(4, 2)
    with pytest.raises(ValueError, match="cuda_bank_coeff_grads: z must be a CUDA tensor"):
        _coeff_grad("cuda", zg, zg, idx, ops.d)
    torch.testing.assert_close(_coeff_grad("torch", zg, zg, idx, ops.d)[0], (zg * zg).sum(0))

    m = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    ops_ns = torch.ops.spectral_kernels
    x, U, bank, V = m(3, 8), m(5, 2), m(4, 2), m(8, 2)
    good = m(3, dtype=torch.int64)
    assert ops_ns.cuda_decode_forward(x, U, bank, V, None, None, good)[0].shape == (3, 5)
    assert ops_ns.cuda_lowrank_gemm(m(40, 8), m(8, 5), m(40, 2), m(2, 5), bank, None, m(40, dtype=torch.int64)).shape == (40, 5)
    assert ops_ns.cuda_bank_coeff_grads(m(40, 2), m(40, 2), m(40, dtype=torch.int64), 4).shape == (4, 2)
    with pytest.raises(TypeError, match="adapter_index must have dtype torch.int64"):
        ops_ns.cuda_decode_forward(x, U, bank, V, None, None, m(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"adapter_index must have shape \(3,\)"):
        ops_ns.cuda_decode_forward(x, U, bank, V, None, None, m(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"with adapter_index, d must be a bank \(n, 2\)"):
        ops_ns.cuda_decode_forward(x, U, m(2), V, None, None, good)
    with pytest.raises(ValueError, match=r"adapter_index must have shape \(40,\)"):
        ops_ns.cuda_lowrank_gemm(m(40, 8), m(8, 5), m(40, 2), m(2, 5), bank, None, good)
    with pytest.raises(ValueError, match="adapter_index must have shape"):
        ops_ns.cuda_bank_coeff_grads(m(40, 2), m(40, 2), good, 4)
    with pytest.raises(ValueError, match="must be positive"):
        ops_ns.cuda_bank_coeff_grads(m(40, 2), m(40, 2), m(40, dtype=torch.int64), 0)


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "idx,d_shape,err,match",
    [
        (torch.tensor([0, 1, 5, 0]), (3, 2), ValueError, r"adapter_index values must be in 0\.\.2.*got values in 0\.\.5"),
        (torch.tensor([0, -1, 0, 0]), (3, 2), ValueError, r"adapter_index values must be in 0\.\.2"),
        (torch.zeros(4), (3, 2), TypeError, r"adapter_index must have an integer dtype"),
        (torch.zeros(4, dtype=torch.bool), (3, 2), TypeError, r"adapter_index must have an integer dtype"),
        (torch.zeros(3, dtype=torch.int64), (3, 2), ValueError, r"adapter_index of shape \(3,\) does not broadcast to x.shape\[:-1\] = \(4,\)"),
        (torch.zeros(2, 4, dtype=torch.int64), (3, 2), ValueError, r"does not broadcast"),
        (torch.zeros(4, dtype=torch.int64), (2,), ValueError, r"adapter_index is given but d has shape \(2,\)"),
        (None, (3, 2), ValueError, r"d must be 1-D \[k\] without adapter_index.*pass adapter_index="),
        ([0, 1, 0, 0], (3, 2), TypeError, r"adapter_index must be an integer torch.Tensor"),
    ],
)
def test_bad_adapter_index(idx, d_shape, err, match):
    ops = make_operands((4,), 6, 5, 2).cast(torch.float32)
    d = torch.randn(*d_shape)
    with pytest.raises(err, match=match):
        sk.spectral_linear(ops.x, ops.U, d, ops.V, ops.bias, ops.weight, adapter_index=idx)


@pytest.mark.parametrize("shape,target", [
    ((), (4, 3)), ((1,), (4, 3)), ((3,), (4, 3)), ((4, 1), (4, 3)), ((1, 1), (4, 3)), ((4, 3), (4, 3)),
    ((2,), (4, 3)), ((4,), (4, 3)), ((1, 4, 3), (4, 3)), ((4, 2), (4, 3)), ((1,), (0,)), ((0,), (0, 2)),
    ((2, 1, 1), (2, 5, 7)), ((5, 1), (2, 5, 7)),
])
def test_index_broadcast_check_agrees_with_torch(shape, target):
    from spectral_kernels.ops._checks import _broadcasts_to

    try:
        want = torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        want = False
    assert _broadcasts_to(shape, target) == want
