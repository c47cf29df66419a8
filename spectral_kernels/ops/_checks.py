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


def check_spectral_linear_args(
    x: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None
) -> tuple[int, int, int]:
    """Validate the operands of spectral_linear; return (in_features, out_features, k).

    Expected: x [..., in], U [out, k], d [k], V [in, k], bias [out] or None, weight [out, in] or
    None; one floating dtype and one device for all of them.
    """
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., in], got a 0-D tensor")
    check_tensor("U", U, 2)
    check_tensor("d", d, 1)
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
    if d.shape[0] != k:
        raise ValueError(f"d must have shape ({k},) to match V of shape {tuple(V.shape)}; got {tuple(d.shape)}")
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
