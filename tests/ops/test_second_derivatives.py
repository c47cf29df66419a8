"""Double backward through spectral_linear: second derivatives equal those of the float64
reference (gradgradcheck), on the eager autograd.Function and on the custom op, with a bank too."""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.ops.reference import spectral_linear_ref
from spectral_kernels.ops.spectral_linear import _spectral_linear_op
from tests.helpers import make_operands

NAMES = ("x", "U", "d", "V", "bias")


def _eager(weight, index):
    return lambda x, U, d, V, b: sk.spectral_linear(x, U, d, V, b, weight, adapter_index=index, backend="torch")


def _custom_op(weight, index):
    return lambda x, U, d, V, b: _spectral_linear_op(x, U, d, V, b, weight, index, "torch", "torch")[0]


@pytest.mark.parametrize("path", [_eager, _custom_op])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("grads", [NAMES, ("x", "d"), ("x", "d", "V"), ("d", "U")])
def test_gradgradcheck(path, weight, grads):
    ops = make_operands((2, 3), 7, 5, 3, weight=weight).cast(torch.float64, grads)
    fn = path(ops.weight, None)
    inputs = tuple(getattr(ops, n) for n in NAMES)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("path", [_eager, _custom_op])
def test_gradgradcheck_with_a_bank(path):
    ops = make_operands((3, 4), 6, 5, 3).cast(torch.float64, NAMES)
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(4, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    index = torch.tensor([[2], [0], [2]])
    fn = path(ops.weight, index)
    assert torch.autograd.gradgradcheck(fn, (ops.x, ops.U, bank, ops.V, ops.bias))


def _hessian_vector(fn, ops, v):
    """d/dx of <d(sum y²)/d(x, d), v>: a second derivative through the backward."""
    y = fn(ops.x, ops.U, ops.d, ops.V, ops.bias)
    gx, gd = torch.autograd.grad((y ** 2).sum(), (ops.x, ops.d), create_graph=True)
    return torch.autograd.grad((gx * v[0]).sum() + (gd * v[1]).sum(), (ops.x, ops.d))


@pytest.mark.skipif(not (triton_interpret_enabled() or torch.cuda.is_available()),
                    reason="triton kernels need CUDA or TRITON_INTERPRET=1")
def test_second_derivatives_on_the_triton_backend_match_the_reference():
    device = "cuda" if torch.cuda.is_available() and not triton_interpret_enabled() else "cpu"
    base = make_operands((5,), 9, 11, 3, device=device)
    v = (torch.randn(5, 9, dtype=torch.float64, device=device), torch.randn(3, dtype=torch.float64, device=device))
    want = _hessian_vector(lambda *a: spectral_linear_ref(*a, base.weight), base.cast(torch.float64, ("x", "d")), v)
    got = _hessian_vector(lambda *a: sk.spectral_linear(*a, base.weight.float(), backend="triton"),
                          base.cast(torch.float32, ("x", "d")), tuple(t.float() for t in v))
    for w, g in zip(want, got):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_first_derivatives_are_unchanged_by_the_differentiable_path():
    """create_graph=True takes the differentiable formulas; they equal the default backward."""
    ops = make_operands((4, 3), 8, 6, 3).cast(torch.float64, NAMES)
    inputs = tuple(getattr(ops, n) for n in NAMES)
    y = _eager(ops.weight, None)(*inputs)
    plain = torch.autograd.grad(y.sum(), inputs, retain_graph=True)
    graphed = torch.autograd.grad(y.sum(), inputs, create_graph=True)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(b.detach(), a, rtol=1e-12, atol=1e-12)
