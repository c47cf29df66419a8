"""Candidate plans for the delta form's forward + backward at training shapes (issue item 5),
written with torch and the package's fold kernel so that they can be timed side by side on a GPU
(``bench_goals.py --sections candidates``) before any of them becomes a plan of the package.

    y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b,   x [T, in], W [out, in], U [out, k], V [in, k], d [k], b [out]
    backward (W, U, V frozen; x and d trainable):
    dx = dy·W + ((dy·U) ⊙ d)·Vᵀ,     dd = Σ_T (x·V) ⊙ (dy·U)   (float32 sum)

Each candidate is a ``torch.autograd.Function`` taking ``(x, W, U, d, V, b)`` and returning
``(y, z)`` with z = x·V, like the op's forward:

``fold_reuse``     (a) W' = W + (U ⊙ d)·Vᵀ once per step (the fold kernel: one read of W, one
                   write of W'), y = x·W'ᵀ + b and z = x·V by cuBLAS; the backward reuses W'
                   (dx = dy·W', one GEMM) and g = dy·U. Keeps one transient weight-sized tensor
                   (W', out × in) alive from the forward to the backward.
``fold_columns``   (a) with z and g as extra output columns of the same cuBLAS GEMMs: one buffer
                   B = [[W', U], [Vᵀ, 0]] ((out + k) × (in + k)); [y | z] = x·B[:, :in]ᵀ and
                   [dx | g] = dy·B[:out, :]. One GEMM per direction, but y, z, dx and g are column
                   slices (row strides out + k and in + k), not contiguous tensors.
``extra_columns``  no fold: [y₀ | z] = x·[W; Vᵀ]ᵀ then y = y₀ + (z ⊙ d)·Uᵀ + b; the backward
                   [dx₀ | g] = dy·[W | U] then dx = dx₀ + (g ⊙ d)·Vᵀ, both operands views of one
                   block [[W, U], [Vᵀ, 0]] built once per layer, outside the step (z and g are slices).

dd is accumulated in float32 from z and g rounded to the operand dtype, as the package's backends
do. None of these is a plan of the package yet; the table says which is worth making one.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _fold(W: Tensor, U: Tensor, d: Tensor, V: Tensor, out: Tensor | None = None) -> Tensor:
    """W + (U ⊙ d)·Vᵀ: the Triton fold kernel on CUDA (or under the interpreter), else addmm."""
    from spectral_kernels.backends import triton_interpret_enabled

    if W.is_cuda or triton_interpret_enabled():
        from spectral_kernels.ops.spectral_linear_triton import fold_weight

        return fold_weight(W, U, d, V, out=out)
    if out is None:
        return torch.addmm(W, U * d, V.t())
    return torch.addmm(W, U * d, V.t(), out=out)


def _dd(z: Tensor, g: Tensor) -> Tensor:
    return (z.float() * g.float()).sum(0)


class FoldReuse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, U, d, V, b):
        w_folded = _fold(W, U, d, V)
        y = torch.addmm(b, x, w_folded.t())
        z = x @ V
        ctx.save_for_backward(w_folded, z, U)
        return y, z

    @staticmethod
    def backward(ctx, dy, dz):
        del dz  # z is a by-product (saved for dd), not differentiated through
        w_folded, z, U = ctx.saved_tensors
        g = dy @ U
        return dy @ w_folded, None, None, _dd(z, g).to(U.dtype), None, None


class FoldColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, U, d, V, b):
        n_out, n_in = W.shape
        k = U.shape[1]
        block = W.new_zeros(n_out + k, n_in + k)
        _fold(W, U, d, V, out=block[:n_out, :n_in])
        block[:n_out, n_in:] = U
        block[n_out:, :n_in] = V.t()
        bias = torch.cat([b, b.new_zeros(k)])
        yz = torch.addmm(bias, x, block[:, :n_in].t())
        ctx.save_for_backward(block, yz)
        ctx.sizes = n_out, n_in
        return yz[:, :n_out], yz[:, n_out:]

    @staticmethod
    def backward(ctx, dy, dz):
        del dz
        block, yz = ctx.saved_tensors
        n_out, n_in = ctx.sizes
        dxg = dy @ block[:n_out]
        return dxg[:, :n_in], None, None, _dd(yz[:, n_out:], dxg[:, n_in:]).to(block.dtype), None, None


class ExtraColumns(torch.autograd.Function):
    """Needs the concatenations W_V = [W; Vᵀ] and W_U = [W | U] (prepare_extra_columns)."""

    @staticmethod
    def forward(ctx, x, W_V, W_U, U, d, V, b):
        n_out = W_U.shape[0]
        yz = x @ W_V.t()
        y, z = yz[:, :n_out], yz[:, n_out:]
        y = torch.addmm(y + b, z * d, U.t())
        ctx.save_for_backward(W_U, z, d, V)
        return y, z

    @staticmethod
    def backward(ctx, dy, dz):
        del dz
        W_U, z, d, V = ctx.saved_tensors
        n_in = V.shape[0]
        dxg = dy @ W_U
        dx, g = dxg[:, :n_in], dxg[:, n_in:]
        dx = torch.addmm(dx, g * d, V.t())
        return dx, None, None, None, _dd(z, g).to(d.dtype), None, None


def prepare_extra_columns(W: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """([W; Vᵀ] [(out + k), in], [W | U] [out, in + k]) as two views of one block
    [[W, U], [Vᵀ, 0]] ((out + k) × (in + k)), built once per layer, not per step: a layer could
    keep its only copy of W inside it."""
    n_out, n_in = W.shape
    k = U.shape[1]
    block = W.new_zeros(n_out + k, n_in + k)
    block[:n_out, :n_in] = W
    block[:n_out, n_in:] = U
    block[n_out:, :n_in] = V.t()
    return block[:, :n_in], block[:n_out]


def candidates(W: Tensor, U: Tensor, V: Tensor) -> dict:
    """name -> f(x, W, U, d, V, b) -> (y, z), the extra-columns weights prepared once."""
    W_V, W_U = prepare_extra_columns(W, U, V)
    return {
        "fold_reuse": FoldReuse.apply,
        "fold_columns": FoldColumns.apply,
        "extra_columns": lambda x, W, U, d, V, b: ExtraColumns.apply(x, W_V, W_U, U, d, V, b),
    }
