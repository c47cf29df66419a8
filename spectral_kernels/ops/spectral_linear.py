"""The spectral linear op: y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias, forward and backward.

Layers, in reading order:

1. per-backend implementations, all with one signature (flattened tokens, T = prod(x.shape[:-1])):
   ``fwd(x2d [T, in], U, d, V, bias, weight) -> (y [T, out], z [T, k])`` and
   ``bwd(dy2d [T, out], z [T, k], U, d, V, weight) -> (dx [T, in], dd [k], g [T, k])``;
   torch in ``reference.py``, Triton in ``spectral_linear_triton.py``, CUDA in
   ``spectral_linear_cuda.py``;
2. the custom ops ``spectral_kernels::spectral_linear`` (returns y and z = x·V) and
   ``spectral_kernels::spectral_linear_backward``, each with a fake for torch.compile;
3. the autograd registration (saves z, not x, when U and V are frozen), shared by the custom op
   and by :class:`_SpectralLinearFunction`, the same op as a plain autograd.Function that eager
   calls take (the custom-op dispatcher costs tens of µs a call, as much as a whole decode step);
4. the public function :func:`spectral_linear`, which checks arguments and picks the backend of
   each direction (``auto`` may run the forward and the backward on different backends).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from spectral_kernels.backends import resolve_backend
from spectral_kernels.ops._checks import check_spectral_linear_args
from spectral_kernels.ops.reference import (
    lowrank_coeff_grad_ref,
    spectral_linear_bwd_ref,
    spectral_linear_fwd_ref,
)

FwdImpl = Callable[..., "tuple[Tensor, Tensor]"]
BwdImpl = Callable[..., "tuple[Tensor, Tensor, Tensor]"]


# --- 1. backend implementations ---------------------------------------------------------------
def _implementations(backend: str) -> tuple[FwdImpl, BwdImpl]:
    """(forward, backward) of a concrete backend. Imported lazily: Triton and the CUDA extension
    load only when a call needs them."""
    if backend == "torch":
        return spectral_linear_fwd_ref, spectral_linear_bwd_ref
    if backend == "triton":
        from spectral_kernels.ops import spectral_linear_triton as impl

        return impl.spectral_linear_fwd_triton, impl.spectral_linear_bwd_triton
    if backend == "cuda":
        from spectral_kernels.ops import spectral_linear_cuda as impl

        return impl.spectral_linear_fwd_cuda, impl.spectral_linear_bwd_cuda
    raise ValueError(f"unknown concrete backend {backend!r}")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


# --- 2. custom ops ------------------------------------------------------------------------------
def _forward(x, U, d, V, bias, weight, backend):
    fwd, _ = _implementations(backend)
    y, z = fwd(_flat(x), U, d, V, bias, weight)
    lead = x.shape[:-1]
    return y.reshape(*lead, U.shape[0]), z.reshape(*lead, V.shape[1])


def _backward_dx(dy, z, U, d, V, weight, backend):
    _, bwd = _implementations(backend)
    dx, dd, g = bwd(_flat(dy), _flat(z), U, d, V, weight)
    return dx.reshape(*dy.shape[:-1], V.shape[0]), dd, g


@torch.library.custom_op("spectral_kernels::spectral_linear", mutates_args=())
def _spectral_linear_op(
    x: Tensor,
    U: Tensor,
    d: Tensor,
    V: Tensor,
    bias: Optional[Tensor],
    weight: Optional[Tensor],
    backend: str,
    backward_backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (y [..., out], z = x·V [..., k]); z is what the backward saves. ``backward_backend``
    runs the backward (autograd reads it from the inputs)."""
    return _forward(x, U, d, V, bias, weight, backend)


@_spectral_linear_op.register_fake
def _(x, U, d, V, bias, weight, backend, backward_backend):
    lead = x.shape[:-1]
    return x.new_empty(*lead, U.shape[0]), x.new_empty(*lead, V.shape[1])


@torch.library.custom_op("spectral_kernels::spectral_linear_backward", mutates_args=())
def _spectral_linear_backward_op(
    dy: Tensor,
    z: Tensor,
    U: Tensor,
    d: Tensor,
    V: Tensor,
    weight: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [..., in], dd [k], g = dy·U [T, k]) with T the flattened leading dims."""
    return _backward_dx(dy, z, U, d, V, weight, backend)


@_spectral_linear_backward_op.register_fake
def _(dy, z, U, d, V, weight, backend):
    tokens = dy.numel() // dy.shape[-1]
    return dy.new_empty(*dy.shape[:-1], V.shape[0]), d.new_empty(d.shape), dy.new_empty(tokens, V.shape[1])


# --- 3. autograd ---------------------------------------------------------------------------------
def _save(ctx, x, U, d, V, weight, z, backward_backend, needs_input_grad):
    ctx.mark_non_differentiable(z)
    if needs_input_grad[5]:
        raise RuntimeError("spectral_linear: weight is frozen; call weight.requires_grad_(False)")
    # x itself is kept only for dV; otherwise z (T×k) is the only activation saved.
    ctx.save_for_backward(x if needs_input_grad[3] else None, z, U, d, V, weight)
    ctx.backend = backward_backend


def _setup_context(ctx, inputs, output):
    x, U, d, V, bias, weight, backend, backward_backend = inputs
    _save(ctx, x, U, d, V, weight, output[1], backward_backend, ctx.needs_input_grad)


def _gradients(ctx, dy, backward_op):
    """(dx, dU, dd, dV, dbias) from the saved tensors; backward_op computes (dx, dd, g)."""
    x, z, U, d, V, weight = ctx.saved_tensors
    needs_x, needs_U, needs_d, needs_V, needs_bias = ctx.needs_input_grad[:5]
    dx = dd = g = None
    if needs_x:
        dx, dd, g = backward_op(dy, z, U, d, V, weight, ctx.backend)
    elif needs_d or needs_V:
        g = _flat(dy) @ U
        dd = lowrank_coeff_grad_ref(_flat(z), g).to(d.dtype) if needs_d else None
    db = _flat(dy).sum(0) if needs_bias else None
    dU = _flat(dy).t() @ (_flat(z) * d) if needs_U else None
    dV = _flat(x).t() @ (g * d) if needs_V else None
    return dx, dU, dd if needs_d else None, dV, db


def _backward(ctx, dy, _dz):
    return (*_gradients(ctx, dy, _spectral_linear_backward_op), None, None, None)


_spectral_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _SpectralLinearFunction(torch.autograd.Function):
    """The custom op's forward and autograd without the dispatcher, for eager calls. Same
    implementations, same saved tensors, same gradients (tests compare both paths)."""

    @staticmethod
    def forward(ctx, x, U, d, V, bias, weight, backend, backward_backend):
        y, z = _forward(x, U, d, V, bias, weight, backend)
        _save(ctx, x, U, d, V, weight, z, backward_backend, ctx.needs_input_grad)
        return y, z

    @staticmethod
    def backward(ctx, dy, _dz):
        return (*_gradients(ctx, dy, _backward_dx), None, None, None)


# --- 4. public function ---------------------------------------------------------------------------
def spectral_linear(
    x: Tensor,
    U: Tensor,
    d: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Spectral linear layer: ``y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias``.

    Args:
        x: input ``[..., in]``; any number of leading dims, any strides.
        U: left factor ``[out, k]`` (frozen unless it requires grad).
        d: spectral coefficients ``[k]``; in delta form the change of the top-k spectrum.
        V: right factor ``[in, k]`` (frozen unless it requires grad).
        bias: ``[out]`` or None.
        weight: frozen dense weight ``[out, in]`` (delta form) or None (pure form).
        backend: "auto" | "torch" | "triton" | "cuda"; "auto" defers to
            :func:`spectral_kernels.use_backend`, then ``SPECTRAL_KERNELS_BACKEND``, then picks
            per direction from the measured rules of ``plans.py`` (on CUDA: triton's fold
            plan for the delta form at T ≥ 8192 and k ≤ 64, torch's cuBLAS chain otherwise).

    Returns:
        y ``[..., out]`` in x's dtype.

    All tensors share x's floating dtype and device; under torch.autocast they are cast to the
    autocast dtype first, as F.linear's operands are. With z = x·V ``[T, k]`` and
    g = dy·U ``[T, k]`` over the T flattened tokens, the backward is::

        dx    = dy·weight + (g ⊙ d)·Vᵀ
        dd    = Σ_T z ⊙ g
        dbias = Σ_T dy
        dU    = dyᵀ·(z ⊙ d)          (only when U requires grad)
        dV    = xᵀ·(g ⊙ d)           (only when V requires grad; x is then saved too)

    With U and V frozen the only activation saved is z (T×k values), and no dense dW is formed;
    weight must not require grad.
    """
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: every operand in the autocast dtype. The op then runs with
        # autocast off so its inner GEMMs do not re-cast what it was handed.
        dtype = torch.get_autocast_dtype(device_type)
        x, U, d, V, bias, weight = (_autocast(t, dtype) for t in (x, U, d, V, bias, weight))
        with torch.autocast(device_type, enabled=False):
            return spectral_linear(x, U, d, V, bias, weight, backend=backend)
    in_features, out_features, k = check_spectral_linear_args(x, U, d, V, bias, weight)
    tokens = x.numel() // in_features if in_features else 0
    shape = (tokens, in_features, out_features, k)
    delta = weight is not None
    forward_backend = resolve_backend(backend, x.device, x.dtype, shape, "forward", delta)
    backward_backend = resolve_backend(backend, x.device, x.dtype, shape, "backward", delta)
    if torch.compiler.is_compiling():
        y, _ = _spectral_linear_op(x, U, d, V, bias, weight, forward_backend, backward_backend)
    else:
        y, _ = _SpectralLinearFunction.apply(x, U, d, V, bias, weight, forward_backend, backward_backend)
    return y


def _autocast(t, dtype: torch.dtype):
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t
