"""The reference itself: gradients pass gradcheck, and the torch backend's hand-written
forward/backward (fwd_ref / bwd_ref) agree with autograd through the reference chain."""
import pytest
import torch

from spectral_kernels.ops.reference import (
    spectral_linear_bwd_ref,
    spectral_linear_fwd_ref,
    spectral_linear_ref,
)
from tests.helpers import make_operands, rel_err


@pytest.mark.parametrize("bias,weight", [(True, True), (False, True), (True, False), (False, False)])
def test_reference_gradcheck(bias, weight):
    ops = make_operands((2, 3), 7, 5, 3, bias=bias, weight=weight)
    grads = ("x", "U", "d", "V", "bias")
    ops = ops.cast(torch.float64, grads)
    inputs = [t for t in (ops.x, ops.U, ops.d, ops.V, ops.bias) if t is not None]
    fn = lambda x, U, d, V, *b: spectral_linear_ref(x, U, d, V, b[0] if b else None, ops.weight)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_matches_dense_formula():
    ops = make_operands((11,), 9, 6, 4)
    dense = ops.weight + ops.U @ torch.diag(ops.d) @ ops.V.t()
    expected = ops.x @ dense.t() + ops.bias
    assert rel_err(spectral_linear_ref(*ops.as_tuple()), expected) < 1e-14


@pytest.mark.parametrize("weight", [True, False])
def test_fwd_bwd_ref_match_autograd(weight):
    ops = make_operands((13,), 10, 8, 4, weight=weight).cast(torch.float64, ("x", "d"))
    y = spectral_linear_ref(*ops.as_tuple())
    dy = torch.randn_like(y)
    y.backward(dy)
    y2, z = spectral_linear_fwd_ref(ops.x.detach(), ops.U, ops.d.detach(), ops.V, ops.bias, ops.weight)
    dx, dd, g = spectral_linear_bwd_ref(dy, z, ops.U, ops.d.detach(), ops.V, ops.weight)
    assert rel_err(y2, y) < 1e-14
    assert rel_err(z, ops.x.detach() @ ops.V) < 1e-14
    assert rel_err(g, dy @ ops.U) < 1e-14
    assert rel_err(dx, ops.x.grad) < 1e-14
    assert rel_err(dd, ops.d.grad) < 1e-14
