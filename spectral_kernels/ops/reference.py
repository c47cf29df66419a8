"""Pure-PyTorch references: the test oracle and the ``torch`` backend (the CPU path).

Shapes (T = number of tokens, the product of x's leading dims):

    x: [..., in]   U: [out, k]   d: [k]   V: [in, k]   bias: [out]   weight: [out, in]
    y: [..., out]  z = x·V: [..., k]   g = dy·U: [..., k]

Forward:  y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias
Backward: dx = dy·weight + (g ⊙ d)·Vᵀ,   dd = Σ_T z ⊙ g,   dbias = Σ_T dy,
          dU = dyᵀ·(z ⊙ d),   dV = xᵀ·(g ⊙ d)

Adapter banks: d is a bank [n, k] and ``idx`` [T] (int64) picks each token's row; every ``d``
above then reads d[idx_t] for token t, and dd [n, k] is the scatter-add of z ⊙ g over tokens by
index (rows no token picked are exactly zero). The torch backend gathers d[idx] ([T, k]) and
scatters with index_add_ (deterministic on CPU; atomic, so run-to-run nondeterministic in the last
bits, on CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor


def spectral_linear_ref(
    x: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None = None, weight: Tensor | None = None,
    *, adapter_index: Tensor | None = None,
) -> Tensor:
    """y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias, written as a chain of differentiable torch ops.

    This is the oracle: tests run it in float64 and compare every backend against it, and
    ``torch.autograd.gradcheck`` checks its gradients. With a bank d [n, k], ``adapter_index``
    (broadcastable to x.shape[:-1]) picks each token's row: d[adapter_index] [..., k].
    """
    if adapter_index is not None:
        d = d[adapter_index.expand(x.shape[:-1]).long()]
    y = ((x @ V) * d) @ U.transpose(0, 1)
    if weight is not None:
        y = y + x @ weight.transpose(0, 1)
    if bias is not None:
        y = y + bias
    return y


def spectral_linear_fwd_ref(
    x2d: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None,
    idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward of the torch backend on flattened tokens x2d [T, in]: returns (y [T, out], z [T, k]).

    Delta form picks the cheaper of two plans by FLOPs (the dense product and z = x·V are common
    to both): folding the update into the weight, W' = weight + (U ⊙ d)·Vᵀ (out·in·k), when
    T > in; else adding (z ⊙ d)·Uᵀ (T·k·out) into y in place. Neither keeps W' past the call.
    With a bank (``idx`` [T] given) the update is always added in place, with d[idx] [T, k].
    """
    z = x2d @ V
    if idx is not None:
        d = d[idx]
    elif weight is not None and x2d.shape[0] > x2d.shape[1]:
        return _addmm(bias, x2d, _merge_update(weight, U * d, V).t()), z
    zd = z * d
    if weight is None:
        return _addmm(bias, zd, U.t()), z
    y = _addmm(bias, x2d, weight.t())
    return y.addmm_(zd, U.t()), z


def spectral_linear_bwd_ref(
    dy2d: Tensor, z: Tensor, U: Tensor, d: Tensor, V: Tensor, weight: Tensor | None,
    idx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of the torch backend on flattened tokens: returns (dx [T, in], dd [k], g [T, k]).

    dd is accumulated in float32 (float64 for float64 inputs) and returned in d's dtype. dx uses
    the same plan choice as the forward, with T compared to out: dy·W' with W' recomputed
    (out·in·k) when T > out, else dy·weight plus (g ⊙ d)·Vᵀ in place (T·k·in). With a bank
    (``idx`` [T]): dd [n, k] is the scatter-add of z ⊙ g by index, and dx adds (g ⊙ d[idx])·Vᵀ.
    """
    g = dy2d @ U
    dd = lowrank_coeff_grad_ref(z, g, idx, d.shape[0] if idx is not None else None).to(d.dtype)
    if idx is not None:
        d = d[idx]
    elif weight is not None and dy2d.shape[0] > dy2d.shape[1]:
        return dy2d @ _merge_update(weight, U * d, V), dd, g
    gd = g * d
    if weight is None:
        return gd @ V.t(), dd, g
    return (dy2d @ weight).addmm_(gd, V.t()), dd, g


def _merge_update(weight: Tensor, Ud: Tensor, V: Tensor) -> Tensor:
    """weight + (U ⊙ d)·Vᵀ  [out, in], in weight's dtype."""
    return torch.addmm(weight, Ud, V.t())


def _addmm(bias: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    return torch.addmm(bias, a, b) if bias is not None else a @ b


def lowrank_coeff_grad_ref(z: Tensor, g: Tensor, idx: Tensor | None = None, n: int | None = None) -> Tensor:
    """dd = Σ_T z ⊙ g [k], or with ``idx`` [T] the bank gradient [n, k]: row i sums z ⊙ g over
    the tokens with idx_t = i (zero where none); accumulated in at least float32."""
    acc = torch.promote_types(z.dtype, torch.float32)
    zg = z.to(acc) * g.to(acc)
    if idx is None:
        return zg.sum(0)
    return zg.new_zeros(n, zg.shape[1]).index_add_(0, idx, zg)
