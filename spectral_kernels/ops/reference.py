"""Pure-PyTorch references: the test oracle and the ``torch`` backend (the CPU path).

Shapes (T = number of tokens, the product of x's leading dims):

    x: [..., in]   U: [out, k]   d: [k]   V: [in, k]   bias: [out]   weight: [out, in]
    y: [..., out]  z = x·V: [..., k]   g = dy·U: [..., k]

Forward:  y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias
Backward: dx = dy·weight + (g ⊙ d)·Vᵀ,   dd = Σ_T z ⊙ g,   dbias = Σ_T dy,
          dU = dyᵀ·(z ⊙ d),   dV = xᵀ·(g ⊙ d)
"""
from __future__ import annotations

import torch
from torch import Tensor


def spectral_linear_ref(
    x: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias, written as a chain of differentiable torch ops.

    This is the oracle: tests run it in float64 and compare every backend against it, and
    ``torch.autograd.gradcheck`` checks its gradients.
    """
    y = ((x @ V) * d) @ U.transpose(0, 1)
    if weight is not None:
        y = y + x @ weight.transpose(0, 1)
    if bias is not None:
        y = y + bias
    return y


def spectral_linear_fwd_ref(
    x2d: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Forward of the torch backend on flattened tokens x2d [T, in]: returns (y [T, out], z [T, k]).

    Written as in-place GEMM accumulations so the dense product and the low-rank update share
    one output buffer (one pass over y instead of three).
    """
    z = x2d @ V
    zd = z * d
    if weight is not None:
        y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
        y.addmm_(zd, U.t())
    else:
        y = torch.addmm(bias, zd, U.t()) if bias is not None else zd @ U.t()
    return y, z


def spectral_linear_bwd_ref(
    dy2d: Tensor, z: Tensor, U: Tensor, d: Tensor, V: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the torch backend on flattened tokens: returns (dx [T, in], dd [k], g [T, k]).

    dd is accumulated in float32 (float64 for float64 inputs) and returned in d's dtype.
    """
    g = dy2d @ U
    dd = lowrank_coeff_grad_ref(z, g).to(d.dtype)
    gd = g * d
    if weight is not None:
        dx = dy2d @ weight
        dx.addmm_(gd, V.t())
    else:
        dx = gd @ V.t()
    return dx, dd, g


def lowrank_coeff_grad_ref(z: Tensor, g: Tensor) -> Tensor:
    """dd = Σ_T z ⊙ g, accumulated in at least float32."""
    acc = torch.promote_types(z.dtype, torch.float32)
    return (z.to(acc) * g.to(acc)).sum(0)
