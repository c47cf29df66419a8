"""Argument checks shared by the ops: each error names the argument and the expected value."""
from __future__ import annotations

import torch
from torch import Tensor

#: dtypes the ops compute in. Triton and CUDA kernels take the first three; float64 runs on torch.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, ndim: int | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


#: dtypes adapter_index may have.
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_spectral_linear_args(
    x: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None,
    adapter_index: Tensor | None = None,
) -> tuple[int, int, int]:
    """Validate the operands of spectral_linear; return (in_features, out_features, k).

    Expected: x [..., in], U [out, k], d [k] (or a bank [n, k] with ``adapter_index``), V [in, k],
    bias [out] or None, weight [out, in] or None; one floating dtype and one device for all of
    them. The index values are checked by :func:`check_adapter_index_values` (it synchronises).
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in], got a 0-D tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dim (in_features) is 0; spectral_linear needs at "
                         "least one input feature")
    check_tensor("U", U, 2)
    check_tensor("d", d)
    _check_bank(x, d, adapter_index)
    check_tensor("V", V, 2)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor ({', '.join(map(str, FLOAT_DTYPES))}), got {x.dtype}")
    in_features, k = V.shape
    out_features = U.shape[0]
    operands = {"U": U, "d": d, "V": V}
    if bias is not None:
        operands["bias"] = check_tensor("bias", bias, 1)
    if weight is not None:
        operands["weight"] = check_tensor("weight", weight, 2)
    for name, t in operands.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all operands must share a device")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dim must equal V.shape[0] = in_features = {in_features}; "
            f"got x of shape {tuple(x.shape)} and V of shape {tuple(V.shape)}"
        )
    if U.shape[1] != k:
        raise ValueError(
            f"U must have k = V.shape[1] = {k} columns; got U of shape {tuple(U.shape)} and V of shape {tuple(V.shape)}"
        )
    if d.shape[-1] != k:
        want = f"({k},)" if d.dim() == 1 else f"(n, {k})"
        raise ValueError(f"d must have shape {want} to match V of shape {tuple(V.shape)}; got {tuple(d.shape)}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(
            f"bias must have shape ({out_features},) = (U.shape[0],); got {tuple(bias.shape)} with U of shape {tuple(U.shape)}"
        )
    if weight is not None and tuple(weight.shape) != (out_features, in_features):
        raise ValueError(
            f"weight must have shape (out, in) = ({out_features}, {in_features}) from U {tuple(U.shape)} and "
            f"V {tuple(V.shape)}; got {tuple(weight.shape)}"
        )
    return in_features, out_features, k


def _check_bank(x: Tensor, d: Tensor, adapter_index: Tensor | None) -> None:
    """d [k] without an index, or a bank d [n, k] with an integer adapter_index broadcastable to
    x.shape[:-1]."""
    lead = tuple(x.shape[:-1])
    if adapter_index is None:
        if d.dim() == 2:
            raise ValueError(
                f"d must be 1-D [k] without adapter_index; d of shape {tuple(d.shape)} is a bank [n, k]: pass "
                f"adapter_index=, an integer tensor broadcastable "
                f"to x.shape[:-1] = {lead} with values in 0..{d.shape[0] - 1}")
        if d.dim() != 1:
            raise ValueError(f"d must be 1-D [k] (or a bank [n, k] with adapter_index), got shape {tuple(d.shape)}")
        return
    if d.dim() != 2:
        raise ValueError(
            f"adapter_index is given but d has shape {tuple(d.shape)}; adapter_index needs a bank d of "
            "shape [n, k] (a 1-D d [k] is one adapter for every token: drop adapter_index)")
    if d.shape[0] < 1:
        raise ValueError(f"the bank d must have at least one row, got shape {tuple(d.shape)}")
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index must be an integer torch.Tensor broadcastable to x.shape[:-1] = {lead}, "
                        f"got {type(adapter_index).__name__}")
    if adapter_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"adapter_index must have an integer dtype ({', '.join(map(str, INDEX_DTYPES))}), "
                        f"got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index is on {adapter_index.device} but x is on {x.device}")
    if not _broadcasts_to(tuple(adapter_index.shape), lead):
        raise ValueError(f"adapter_index of shape {tuple(adapter_index.shape)} does not broadcast to "
                         f"x.shape[:-1] = {lead}")


def check_adapter_index_values(adapter_index: Tensor, n: int) -> None:
    """Every index in 0..n-1 (reads the values: a device sync on CUDA)."""
    if adapter_index.numel() == 0:
        return
    lo, hi = int(adapter_index.min()), int(adapter_index.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"adapter_index values must be in 0..{n - 1} (the bank d has {n} rows); "
                         f"got values in {lo}..{hi}")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` expands to ``target`` (trailing dims aligned, each 1 or
    equal). Written out: torch.broadcast_shapes costs tens of µs a call, a decode step's worth."""
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


def check_not_meta(**operands: object) -> None:
    """Refuse meta tensors (a shape without data), naming the first: the op computes values."""
    for name, t in operands.items():
        if isinstance(t, Tensor) and t.is_meta:
            raise ValueError(
                f"{name} is a meta tensor (a shape without data, e.g. from a model built under device='meta' or "
                "init_empty_weights); spectral_linear needs real tensors: materialise the model first "
                "(model.to_empty(device=...) and load its weights)")


def check_triton_interpreter_dtype(x: Tensor, backends: tuple[str, ...]) -> None:
    """The Triton interpreter (TRITON_INTERPRET=1, CPU tensors) computes bfloat16 wrongly (numpy has
    no bfloat16): refuse it rather than return garbage."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or "triton" not in backends:
        return
    from spectral_kernels.backends import triton_interpret_enabled

    if triton_interpret_enabled():
        raise TypeError("backend 'triton' under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) does not "
                        "compute bfloat16 correctly; use float32 or float16 there, or backend='torch' for bfloat16 "
                        "on the CPU")
