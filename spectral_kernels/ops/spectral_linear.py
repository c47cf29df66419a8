"""The spectral linear op: y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias, forward and backward.

Layers, in reading order:

1. per-backend implementations, all with one signature (flattened tokens, T = prod(x.shape[:-1])):
   ``fwd(x2d [T, in], U, d, V, bias, weight, idx) -> (y [T, out], z [T, k])`` and
   ``bwd(dy2d [T, out], z [T, k], U, d, V, weight, idx) -> (dx [T, in], dd [k], g [T, k])``;
   ``idx`` is None, or with a bank d [n, k] the flat int64 adapter index [T] (dd is then [n, k]);
   torch in ``reference.py``, Triton in ``spectral_linear_triton.py``, CUDA in
   ``spectral_linear_cuda.py``;
2. the custom ops ``spectral_kernels::spectral_linear`` (returns y and z = x·V) and
   ``spectral_kernels::spectral_linear_backward``, each with a fake for torch.compile;
3. the autograd registration (saves z, not x, when U and V are frozen; a backward under
   ``create_graph=True`` runs as differentiable torch ops, so second derivatives are exact),
   shared by the custom op and by :class:`_SpectralLinearFunction`, the same op as a plain
   autograd.Function that eager calls take (the custom-op dispatcher costs tens of µs a call, as
   much as a whole decode step);
4. the public function :func:`spectral_linear`, which checks arguments and picks the backend of
   each direction (``auto`` may run the forward and the backward on different backends).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from spectral_kernels.backends import resolve_backend
from spectral_kernels.ops._checks import (
    check_adapter_index_values,
    check_not_meta,
    check_spectral_linear_args,
    check_triton_interpreter_dtype,
)
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
def _flat_index(adapter_index: Optional[Tensor], lead) -> Optional[Tensor]:
    """adapter_index broadcast to the leading dims and flattened: int64 [T] (or None)."""
    if adapter_index is None:
        return None
    return adapter_index.expand(lead).reshape(-1).to(torch.int64)


def _forward(x, U, d, V, bias, weight, adapter_index, backend):
    fwd, _ = _implementations(backend)
    idx = _flat_index(adapter_index, x.shape[:-1])
    x2d = _flat(x)
    y, z = fwd(x2d, U, d, V, bias, weight, idx) if idx is not None else fwd(x2d, U, d, V, bias, weight)
    if x.device.type == "cpu":
        y = _dense_rows_where_not_finite(x2d, U, d, V, bias, weight, idx, y, z)
    lead = x.shape[:-1]
    return y.reshape(*lead, U.shape[0]), z.reshape(*lead, V.shape[1])


def _dense_rows_where_not_finite(x2d, U, d, V, bias, weight, idx, y, z):
    """y with the rows whose z = x·V is not finite recomputed as F.linear on the merged weight
    W' = weight + (U ⊙ d)·Vᵀ (U·diag(d)·Vᵀ in pure form), so an Inf in x gives the ±Inf that
    F.linear on W' gives. The low-rank chain would multiply the Inf through z, d and Uᵀ and mix
    signs into NaN. CPU only: on a GPU the test would cost a device sync per call. A row whose Inf
    sits where V is zero keeps a finite z; there W' equals weight, so the chain agrees anyway."""
    if z.numel() == 0 or math.isfinite(float(z.sum())):  # one cheap reduction on the common path
        return y
    rows = (~torch.isfinite(z).all(-1)).nonzero().squeeze(1)
    if not rows.numel():  # the sum overflowed, every z finite
        return y
    y = y.clone()
    for row_d, sel in _rows_by_coefficients(d, idx, rows):
        Ud = U * row_d
        merged = Ud @ V.t() if weight is None else torch.addmm(weight, Ud, V.t())
        y[sel] = torch.nn.functional.linear(x2d[sel], merged, bias).to(y.dtype)
    return y


def _rows_by_coefficients(d, idx, rows):
    """(d [k], the rows that use it): d itself, or each bank row picked by ``rows``."""
    if idx is None:
        return [(d, rows)]
    picked = idx[rows]
    return [(d[i], rows[picked == i]) for i in picked.unique().tolist()]


def _backward_dx(dy, z, U, d, V, weight, adapter_index, backend):
    _, bwd = _implementations(backend)
    idx = _flat_index(adapter_index, dy.shape[:-1])
    args = (_flat(dy), _flat(z), U, d, V, weight)
    dx, dd, g = bwd(*args, idx) if idx is not None else bwd(*args)
    return dx.reshape(*dy.shape[:-1], V.shape[0]), dd, g


@torch.library.custom_op("spectral_kernels::spectral_linear", mutates_args=())
def _spectral_linear_op(
    x: Tensor,
    U: Tensor,
    d: Tensor,
    V: Tensor,
    bias: Optional[Tensor],
    weight: Optional[Tensor],
    adapter_index: Optional[Tensor],
    backend: str,
    backward_backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (y [..., out], z = x·V [..., k]); z is what the backward saves. ``backward_backend``
    runs the backward (autograd reads it from the inputs). ``adapter_index`` (with a bank d [n, k])
    is an integer tensor broadcastable to x.shape[:-1]."""
    return _forward(x, U, d, V, bias, weight, adapter_index, backend)


@_spectral_linear_op.register_fake
def _(x, U, d, V, bias, weight, adapter_index, backend, backward_backend):
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
    adapter_index: Optional[Tensor],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dx [..., in], dd [k] (or [n, k] for a bank), g = dy·U [T, k]) with T the flattened
    leading dims."""
    return _backward_dx(dy, z, U, d, V, weight, adapter_index, backend)


@_spectral_linear_backward_op.register_fake
def _(dy, z, U, d, V, weight, adapter_index, backend):
    tokens = dy.numel() // dy.shape[-1]
    return dy.new_empty(*dy.shape[:-1], V.shape[0]), d.new_empty(d.shape), dy.new_empty(tokens, V.shape[1])


# --- 3. autograd ---------------------------------------------------------------------------------
def _save(ctx, x, U, d, V, weight, adapter_index, z, backward_backend, needs_input_grad):
    # z stays differentiable (its gradient is dz·Vᵀ into dx, xᵀ·dz into dV): a double backward
    # differentiates dd = Σ z ⊙ g through the saved z back to x. Unused, its gradient is None.
    ctx.set_materialize_grads(False)
    if needs_input_grad[5]:
        raise RuntimeError("spectral_linear: weight is frozen; call weight.requires_grad_(False)")
    # x itself is kept only for dV; otherwise z (T×k) is the only activation saved.
    ctx.save_for_backward(x if needs_input_grad[3] else None, z, U, d, V, weight, adapter_index)
    ctx.backend = backward_backend


def _setup_context(ctx, inputs, output):
    x, U, d, V, bias, weight, adapter_index, backend, backward_backend = inputs
    _save(ctx, x, U, d, V, weight, adapter_index, output[1], backward_backend, ctx.needs_input_grad)


def _gradients(ctx, dy, dz, backward_op):
    """(dx, dU, dd, dV, dbias) from the saved tensors; backward_op computes (dx, dd, g).

    When a graph is built through the backward (``create_graph=True``: grad mode is on inside it)
    or z's gradient is given (the second pass of a double backward), the gradients are written
    with differentiable torch ops instead (:func:`_differentiable_gradients`), on every backend."""
    if dz is not None or dy is None or torch.is_grad_enabled():
        return _differentiable_gradients(ctx, dy, dz)
    x, z, U, d, V, weight, adapter_index = ctx.saved_tensors
    needs_x, needs_U, needs_d, needs_V, needs_bias = ctx.needs_input_grad[:5]
    dx = dd = g = None
    idx = _flat_index(adapter_index, dy.shape[:-1])
    if needs_x:
        dx, dd, g = backward_op(dy, z, U, d, V, weight, adapter_index, ctx.backend)
    elif needs_d and idx is not None and ctx.backend == "triton":
        # the triton kernel that computes g reduces a bank's dd per adapter as it goes (sorted
        # row blocks, no atomics): deterministic, where index_add_ on CUDA is not
        from spectral_kernels.ops.spectral_linear_triton import lowrank_project

        g, _, dd = lowrank_project(_flat(dy), U, aux=_flat(z), idx=idx, n=d.shape[0])
        dd = dd.to(d.dtype)
    elif needs_d or needs_V:
        g = _flat(dy) @ U
        if needs_d:
            dd = _coeff_grad(ctx.backend, _flat(z), g, idx, d).to(d.dtype)
    db = _flat(dy).sum(0) if needs_bias else None
    if needs_U or needs_V:
        dt = d[idx] if idx is not None else d  # per-token rows of a bank: [T, k] (torch glue only)
        dU = _flat(dy).t() @ (_flat(z) * dt) if needs_U else None
        dV = _flat(x).t() @ (g * dt) if needs_V else None
    else:
        dU = dV = None
    return dx, dU, dd if needs_d else None, dV, db


def _differentiable_gradients(ctx, dy, dz):
    """The backward of the docstring of :func:`spectral_linear` as a chain of differentiable torch
    ops, plus z's gradient dz (z = x·V: dx += dz·Vᵀ, dV += xᵀ·dz). Second derivatives flow
    through dy, U, d, V, weight and, through the saved z (an output of this op), back to x."""
    if dy is None and dz is None:
        return None, None, None, None, None
    x, z, U, d, V, weight, adapter_index = ctx.saved_tensors
    needs_x, needs_U, needs_d, needs_V, needs_bias = ctx.needs_input_grad[:5]
    lead = (dy if dy is not None else dz).shape[:-1]
    idx = _flat_index(adapter_index, lead)
    dt = d[idx] if idx is not None else d
    dx = dU = dd = dV = db = None
    if dy is not None:
        dy2, z2 = _flat(dy), _flat(z)
        g = dy2 @ U
        if needs_x:
            dx = (g * dt) @ V.t()
            if weight is not None:
                dx = dx + dy2 @ weight
        if needs_d:
            dd = lowrank_coeff_grad_ref(z2, g, idx, d.shape[0] if idx is not None else None).to(d.dtype)
        if needs_U:
            dU = dy2.t() @ (z2 * dt)
        if needs_V:
            dV = _flat(x).t() @ (g * dt)
        if needs_bias:
            db = dy2.sum(0)
    if dz is not None:
        dz2 = _flat(dz)
        if needs_x:
            dx = dz2 @ V.t() if dx is None else dx + dz2 @ V.t()
        if needs_V:
            dV = _flat(x).t() @ dz2 if dV is None else dV + _flat(x).t() @ dz2
    if dx is not None:
        dx = dx.reshape(*lead, V.shape[0])
    return dx, dU, dd, dV, db


def _coeff_grad(backend: str, z: Tensor, g: Tensor, idx: Optional[Tensor], d: Tensor) -> Tensor:
    """dd alone (x needs no gradient). A bank on the cuda backend takes its deterministic
    per-adapter reduction: torch's index_add_ uses atomics on CUDA."""
    if idx is not None and backend == "cuda":
        from spectral_kernels.ops.spectral_linear_cuda import bank_coeff_grads

        return bank_coeff_grads(z, g, idx, d.shape[0])
    return lowrank_coeff_grad_ref(z, g, idx, d.shape[0] if idx is not None else None)


def _backward(ctx, dy, dz):
    return (*_gradients(ctx, dy, dz, _spectral_linear_backward_op), None, None, None, None)


_spectral_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _SpectralLinearFunction(torch.autograd.Function):
    """The custom op's forward and autograd without the dispatcher, for eager calls. Same
    implementations, same saved tensors, same gradients (tests compare both paths)."""

    @staticmethod
    def forward(ctx, x, U, d, V, bias, weight, adapter_index, backend, backward_backend):
        y, z = _forward(x, U, d, V, bias, weight, adapter_index, backend)
        _save(ctx, x, U, d, V, weight, adapter_index, z, backward_backend, ctx.needs_input_grad)
        return y, z

    @staticmethod
    def backward(ctx, dy, dz):
        return (*_gradients(ctx, dy, dz, _backward_dx), None, None, None, None)


# --- 4. public function ---------------------------------------------------------------------------
def spectral_linear(
    x: Tensor,
    U: Tensor,
    d: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    adapter_index: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    r"""Spectral linear layer: ``y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias``.

    Args:
        x: input ``[..., in]``; any number of leading dims, any strides.
        U: left factor ``[out, k]`` (frozen unless it requires grad).
        d: spectral coefficients ``[k]``; in delta form the change of the top-k spectrum. Or a
            bank ``[n, k]`` of n adapters' coefficients, with ``adapter_index``.
        V: right factor ``[in, k]`` (frozen unless it requires grad).
        bias: ``[out]`` or None.
        weight: frozen dense weight ``[out, in]`` (delta form) or None (pure form).
        adapter_index: with a bank d ``[n, k]``: an integer tensor broadcastable to
            ``x.shape[:-1]`` (e.g. ``[batch, 1]`` for ``[batch, seq, in]``) picking each token's
            row, so that token t computes with d[adapter_index_t]. Values are checked to lie in
            0..n-1 in eager mode (one device sync), not under torch.compile: there a value
            outside gives that token NaN y and dx rows and no share of dd on the triton and
            cuda backends, and an index error (a device-side assert on CUDA) on torch.
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
    weight must not require grad. Second derivatives (``create_graph=True``, gradgradcheck) are
    exact on every backend: a backward that builds a graph runs these formulas as differentiable
    torch ops, and z's own gradient (dx += dz·Vᵀ, dV += xᵀ·dz) carries them back to x.

    Non-finite inputs (CPU tensors, every backend): a token whose z = x·V is not finite (an Inf or
    NaN in x) is computed as ``F.linear(x, weight + U·diag(d)·Vᵀ, bias)``, so it gets the ±Inf
    F.linear gives on the merged weight where the low-rank chain would mix signs into NaN (on a
    GPU that test would cost a device sync per call and is not made). Refused: a meta x, x with
    0 features, and bfloat16 on the triton backend under the Triton interpreter (it computes
    bfloat16 wrongly there).

    With a bank, every d above reads the token's row d[idx_t], and the bank's gradient is the
    scatter-add ``dd[i] = Σ_{t: idx_t = i} z_t ⊙ g_t`` ([n, k]; rows no token picked are exactly
    zero). Banks run on torch (gather + index_add_), triton and cuda (row gathers in the kernels,
    a deterministic per-adapter reduction); "auto" sends them to torch, the only bank backend
    measured so far. A bank of one row is the plain path with d[0], bit for bit.
    """
    return _spectral_linear(x, U, d, V, bias, weight, adapter_index, backend, check_index_values=True)


def spectral_linear_with_valid_index(
    x: Tensor, U: Tensor, bank: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None,
    adapter_index: Tensor, backend: str = "auto",
) -> Tensor:
    """:func:`spectral_linear` with a bank, for a caller that built ``adapter_index`` itself with
    every value in 0..n-1 (SpectralLinear under ``adapter_batch``): the values are not read back.
    That check costs a device sync per call, per layer of a model. Shapes and dtypes are still
    checked; an out-of-range value is then the caller's bug, not reported (torch raises an
    IndexError, cuda gives NaN rows, triton's result is undefined)."""
    return _spectral_linear(x, U, bank, V, bias, weight, adapter_index, backend, check_index_values=False)


def _spectral_linear(x, U, d, V, bias, weight, adapter_index, backend, *, check_index_values: bool) -> Tensor:
    check_not_meta(x=x)  # the other operands then fail the one-device check, which names them
    device_type = x.device.type if isinstance(x, Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        # As F.linear under autocast: every operand in the autocast dtype. The op then runs with
        # autocast off so its inner GEMMs do not re-cast what it was handed.
        dtype = torch.get_autocast_dtype(device_type)
        x, U, d, V, bias, weight = (_autocast(t, dtype) for t in (x, U, d, V, bias, weight))
        with torch.autocast(device_type, enabled=False):
            return _spectral_linear(x, U, d, V, bias, weight, adapter_index, backend,
                                    check_index_values=check_index_values)
    in_features, out_features, k = check_spectral_linear_args(x, U, d, V, bias, weight, adapter_index)
    compiling = torch.compiler.is_compiling()
    if adapter_index is not None:
        if check_index_values and not compiling:
            check_adapter_index_values(adapter_index, d.shape[0])
        if d.shape[0] == 1:  # every valid index is 0: the plain path with the one row
            d, adapter_index = d[0], None
    tokens = x.numel() // in_features if in_features else 0
    shape = (tokens, in_features, out_features, k)
    delta = weight is not None
    bank = adapter_index is not None
    extra = {"bank": True} if bank else {}
    forward_backend = resolve_backend(backend, x.device, x.dtype, shape, "forward", delta, **extra)
    backward_backend = resolve_backend(backend, x.device, x.dtype, shape, "backward", delta, **extra)
    check_triton_interpreter_dtype(x, (forward_backend, backward_backend))
    args = (x, U, d, V, bias, weight, adapter_index, forward_backend, backward_backend)
    if compiling:
        y, _ = _spectral_linear_op(*args)
    else:
        y, _ = _SpectralLinearFunction.apply(*args)
    return y


def _autocast(t, dtype: torch.dtype):
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t
