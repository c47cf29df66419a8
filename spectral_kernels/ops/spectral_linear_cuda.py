"""The ``cuda`` backend of spectral_linear: the compiled kernels of ``spectral_kernels._C`` (csrc/).

Layers, in reading order:

1. argument checks: devices, dtypes, shapes and strides, before any pointer crosses over;
2. one ``torch.library.custom_op`` per binding of ``_C``, each with a fake so torch.compile traces
   through it:

   ``spectral_kernels::cuda_decode_forward``   y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias and z = x·V in one
                                               launch, T <= 16 (decode plan, DESIGN.md §3); its
                                               workspace is cached per (device, stream), see
                                               "decode workspace" below;
   ``spectral_kernels::cuda_lowrank_gemm``      out = a1·b1 + (a2 ⊙ scale)·b2 + bias, a tile GEMM on
                                               tensor cores (WMMA, fp32 accumulate) for fp16/bf16 and
                                               fp32 FMA for fp32. No plan calls it: it measured 36-43×
                                               slower than cuBLAS on an H100 (T = 8192, 4096², bf16;
                                               benchmarks/results/gpu_h100_2026-11-24.md), so the
                                               backend runs that regime on cuBLAS (section 3). Kept as
                                               an op for measurement (bench_goals.py parts);
   ``spectral_kernels::cuda_coeff_and_bias_grads``  dd = Σ_T z ⊙ g (fp32) and dbias = Σ_T dy, one
                                               launch, fixed summation order;
   ``spectral_kernels::cuda_bank_coeff_grads``  the bank gradient dd [n, k] (fp32): tokens sorted by
                                               adapter on the device (stable argsort), then one
                                               block per (adapter, column tile) sums its tokens in a
                                               fixed order: bitwise reproducible, no atomics;

3. the backend functions called by ``ops/spectral_linear.py`` (flattened tokens, T rows):
   :func:`spectral_linear_fwd_cuda`, :func:`spectral_linear_bwd_cuda`, and the plan choice
   :func:`prefers_cuda` used by the "auto" backend. Hand-written CUDA runs where no library does
   the job: the decode plan (T <= 16: x·Wᵀ, z = x·V and the rank-k term in one launch, bank rows
   gathered inside) and the deterministic reductions dd = Σ z ⊙ g (per adapter for banks). Past
   the decode plan the dense products are cuBLAS GEMMs through torch (matmul / addmm: x·V, then
   x·Wᵀ + b with (z ⊙ d)·Uᵀ added in place; backward dy·U, dy·W with (g ⊙ d)·Vᵀ added in place).

Adapter banks (d [n, k] with ``idx`` [T], int64, one adapter per token): the decode plan gathers
token t's row d[idx_t] where it applies d; past it the rows are gathered into a [T, k] tensor
(:func:`_bank_rows`) that scales z and g before the cuBLAS GEMMs; the bank gradient is the
per-adapter reduction above. The bank, the index (a device pointer with its stride) and n cross
the C ABI like every other operand, after the checks of :func:`_check_bank`. An index value
outside 0..n-1 (the front end refuses those in eager mode, not under torch.compile) gives NaN
outputs (y and dx) for its token and adds to no row of dd: no read outside the bank, in every
plan, as on the triton backend. Compiled for sm_90 but not yet run on a GPU.

The kernels take device pointers, sizes, element strides, a dtype code and the current stream
(torch.cuda.current_stream().cuda_stream); ``_C`` links no torch. A CUDA error comes back as a
RuntimeError naming the kernel and the CUDA error; set SPECTRAL_KERNELS_CUDA_SYNC=1 to synchronise
after each launch so that faults inside a kernel are reported by the call that caused them.
"""
from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from spectral_kernels import _ext
from spectral_kernels.ops.reference import spectral_linear_bwd_ref, spectral_linear_fwd_ref

#: dtype codes of csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: Largest token count of the decode plan (csrc/spectral_linear.h, kDecodeMaxTokens).
DECODE_MAX_TOKENS = 16


# --- 1. argument checks ------------------------------------------------------------------------------
def _check_operands(op: str, tensors: dict[str, Optional[Tensor]], *, on_device: bool = True) -> torch.dtype:
    """Every given operand a 2-D or 1-D tensor of one kernel dtype on one CUDA device, with
    non-negative strides. Returns the dtype. ``on_device=False`` (fakes) skips the device checks."""
    dtype = device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if on_device and t.device.type != "cuda":
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got a tensor on device '{t.device}'")
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; the cuda backend computes in "
                            f"{', '.join(map(str, DTYPE_CODES))}")
        if dtype is None:
            dtype, device, first = t.dtype, t.device, name
        elif t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {first} has {dtype}")
        elif on_device and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}")
        if any(s < 0 for s in t.stride()):
            raise ValueError(f"{op}: {name} has a negative stride {t.stride()}")
    if dtype is None:
        raise ValueError(f"{op}: no operand given")
    return dtype


def _check_shape(op: str, name: str, t: Optional[Tensor], shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _check_bank(op: str, d: Tensor, idx: Optional[Tensor], rows: int, rows_name: str,
                cols: int, device: Optional[torch.device]) -> Optional[int]:
    """With ``idx`` None: nothing (d is checked as one vector elsewhere). Else d must be a bank
    [n, cols] with n >= 1 and idx as :func:`_check_index` wants. Returns n."""
    if idx is None:
        return None
    _check_index(op, idx, rows, rows_name, device)
    if d.dim() != 2 or d.shape[0] < 1 or d.shape[1] != cols:
        raise ValueError(f"{op}: with adapter_index, d must be a bank (n, {cols}) with n >= 1, "
                         f"got shape {tuple(d.shape)}")
    return d.shape[0]


def _check_index(op: str, idx: Tensor, rows: int, rows_name: str, device: Optional[torch.device]) -> None:
    """idx: an int64 vector of ``rows`` values (one per row of ``rows_name``) with a non-negative
    stride, on ``device`` (None: not checked, for the fakes)."""
    if not isinstance(idx, Tensor):
        raise TypeError(f"{op}: adapter_index must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{op}: adapter_index must have dtype torch.int64 (the kernels read int64), "
                        f"got {idx.dtype}")
    if idx.dim() != 1 or idx.shape[0] != rows:
        raise ValueError(f"{op}: adapter_index must have shape ({rows},), one index per row of "
                         f"{rows_name}, got {tuple(idx.shape)}")
    if idx.stride(0) < 0:
        raise ValueError(f"{op}: adapter_index has a negative stride {idx.stride()}")
    if device is not None and idx.device != device:
        raise ValueError(f"{op}: adapter_index is on {idx.device} but the operands are on {device}")


def _mat(t: Optional[Tensor]):
    return None if t is None else (t.data_ptr(), t.stride(0), t.stride(1))


def _vec(t: Optional[Tensor]):
    return None if t is None else (t.data_ptr(), t.stride(0))


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# --- decode workspace ----------------------------------------------------------------------------------
# The decode plan needs an fp32 workspace (the split partial sums of z, splits·T·k values, then
# z ⊙ d, T·k values) and int32 counters (3 + ceil(k / 32)) that are zero at launch; sizes from
# _C.decode_workspace_sizes, which depend on the device's multiprocessor count. The kernel's last
# block zeroes the counters before the kernel ends, hence the invariant:
#
#     the counters of a stream's workspace are zero between launches on that stream.
#
# Launches on one stream are serialised (stream order), so every call on the same stream can share
# one workspace; calls on different streams may overlap and get different workspaces.
# _DECODE_WORKSPACES keeps one per (device index, stream handle): allocated zeroed on the first call
# on that stream, replaced by a bigger, freshly zeroed one when a call needs more. A replaced buffer
# is freed on its own stream, where the caching allocator hands it out again only to work ordered
# after the launches that used it. Each holds splits·T·k + T·k fp32 values and a few int32: a few KiB
# to a few MiB, one per stream that ran the decode plan.
#
# CUDA graphs. A graph keeps the addresses it captured and may be replayed on any stream, also
# alongside eager calls on the stream it was captured on; a captured call that used that stream's
# cached workspace would race with them, and replacing the cached buffer would free memory the
# graph still uses. So a call under capture allocates its own workspace from the graph's private
# pool (torch.cuda.graph routes allocations there) and its counters' zero fill is captured with it:
# each replay zeroes them before the kernel, which leaves them zero. The graph owns that memory.
# Warm-up runs of torch.compile's CUDA graph trees are not captures, but their allocations go to
# the graph pool too, whose state the trees rewind between recordings: a workspace allocated
# outside the default pool serves its call and is not cached (_in_default_pool).


@dataclass
class _DecodeWorkspace:
    """One stream's decode workspace; ``counters`` is all zero between launches (the invariant)."""

    partials: Tensor  # float32: split partial sums [splits][T][k], then z ⊙ d [T][k]
    counters: Tensor  # int32: tickets, tiles done, blocks done, splits done per z tile


#: (device index, stream handle) -> that stream's decode workspace (see above).
_DECODE_WORKSPACES: dict[tuple[int, int], _DecodeWorkspace] = {}


def _in_default_pool(*tensors: Tensor) -> bool:
    """Whether every tensor lies in the caching allocator's default pool (not a CUDA graph pool).

    False when the allocator cannot tell (another allocator backend, a snapshot format this code
    does not know): the caller then does not cache, which is always correct.
    """
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "0") not in ("", "0"):
        return True  # every tensor is its own cudaMalloc: there are no pools to tell apart
    try:
        segments = torch.cuda.memory_snapshot()

        def pool_of(t: Tensor):
            ptr, dev = t.data_ptr(), t.device.index
            for seg in segments:
                if seg["device"] == dev and seg["address"] <= ptr < seg["address"] + seg["total_size"]:
                    return tuple(seg["segment_pool_id"])
            return None

        return all(pool_of(t) == (0, 0) for t in tensors)
    except (RuntimeError, KeyError, TypeError, ValueError):
        return False


def _decode_workspace(device: torch.device, n_float: int, n_int: int) -> tuple[Tensor, Tensor]:
    """(fp32 workspace of at least ``n_float`` values, int32 counters of at least ``n_int``, all
    zero) for a decode launch on the current stream of ``device``; call under
    ``torch.cuda.device(device)``."""
    if torch.cuda.is_current_stream_capturing():  # graph-owned, zeroed at each replay (see above)
        return (torch.empty(n_float, dtype=torch.float32, device=device),
                torch.zeros(n_int, dtype=torch.int32, device=device))
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    cached = _DECODE_WORKSPACES.get(key)
    if cached is not None and cached.partials.numel() >= n_float and cached.counters.numel() >= n_int:
        return cached.partials, cached.counters
    partials, counters = (cached.partials, cached.counters) if cached is not None else (None, None)
    if partials is None or partials.numel() < n_float:
        size = max(n_float, 2 * partials.numel()) if partials is not None else n_float
        partials = torch.zeros(size, dtype=torch.float32, device=device)
    if counters is None or counters.numel() < n_int:
        size = max(n_int, 2 * counters.numel()) if counters is not None else n_int
        counters = torch.zeros(size, dtype=torch.int32, device=device)  # zero: the invariant
    if _in_default_pool(partials, counters):
        _DECODE_WORKSPACES[key] = _DecodeWorkspace(partials, counters)
    return partials, counters


# --- 2. custom ops -----------------------------------------------------------------------------------
def _decode_shapes(x, U, d, V, bias, weight, idx, on_device):
    op = "cuda_decode_forward"
    _check_operands(op, {"x": x, "U": U, "d": d, "V": V, "bias": bias, "weight": weight}, on_device=on_device)
    if x.dim() != 2 or U.dim() != 2 or V.dim() != 2:
        raise ValueError(f"{op}: x, U and V must be 2-D, got {tuple(x.shape)}, {tuple(U.shape)}, {tuple(V.shape)}")
    tokens, n_in = x.shape
    n_out, k = U.shape
    _check_shape(op, "V", V, (n_in, k))
    if _check_bank(op, d, idx, tokens, "x", k, x.device if on_device else None) is None:
        _check_shape(op, "d", d, (k,))
    _check_shape(op, "bias", bias, (n_out,))
    _check_shape(op, "weight", weight, (n_out, n_in))
    if not 1 <= tokens <= DECODE_MAX_TOKENS:
        raise ValueError(f"{op}: x must have 1 to {DECODE_MAX_TOKENS} rows (tokens), got {tokens}")
    if n_in == 0 or n_out == 0 or k == 0:
        raise ValueError(f"{op}: in, out and k must be positive, got {n_in}, {n_out}, {k}")
    return tokens, n_in, n_out, k


@torch.library.custom_op("spectral_kernels::cuda_decode_forward", mutates_args=())
def _cuda_decode_forward(
    x: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Optional[Tensor], weight: Optional[Tensor],
    adapter_index: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Decode plan: (y [T, out], z [T, k]) for T <= 16 in one launch. With ``adapter_index``
    (int64 [T]), d is a bank [n, k] and token t reads d[adapter_index[t]]."""
    tokens, n_in, n_out, k = _decode_shapes(x, U, d, V, bias, weight, adapter_index, on_device=True)
    bank = {} if adapter_index is None else {
        "d_bank": _mat(d), "adapter_index": _vec(adapter_index), "n_adapters": d.shape[0]}
    C = _ext.extension()
    y = x.new_empty(tokens, n_out)
    z = x.new_empty(tokens, k)
    with torch.cuda.device(x.device):
        n_float, n_int = C.decode_workspace_sizes(tokens, n_in, k, x.device.index)
        workspace, counters = _decode_workspace(x.device, n_float, n_int)  # cached per stream
        C.spectral_linear_decode_fwd(
            _mat(x), _mat(U), _vec(d) if adapter_index is None else None, _mat(V), _vec(bias), _mat(weight),
            _mat(y), _mat(z), workspace.data_ptr(), counters.data_ptr(), workspace.numel(), counters.numel(),
            tokens, n_in, n_out, k, DTYPE_CODES[x.dtype], _stream(x.device), **bank,
        )
    return y, z


@_cuda_decode_forward.register_fake
def _(x, U, d, V, bias, weight, adapter_index=None):
    tokens, _, n_out, k = _decode_shapes(x, U, d, V, bias, weight, adapter_index, on_device=False)
    return x.new_empty(tokens, n_out), x.new_empty(tokens, k)


def _gemm_shapes(a1, b1, a2, b2, scale, bias, scale_index, on_device):
    op = "cuda_lowrank_gemm"
    _check_operands(op, {"a1": a1, "b1": b1, "a2": a2, "b2": b2, "scale": scale, "bias": bias},
                    on_device=on_device)
    if (a1 is None) != (b1 is None) or (a2 is None) != (b2 is None):
        raise ValueError(f"{op}: a1 and b1 (and a2 and b2) must be given together")
    if a1 is None and a2 is None:
        raise ValueError(f"{op}: at least one product a1·b1 or a2·b2 is needed")
    if scale is not None and a2 is None:
        raise ValueError(f"{op}: scale applies to a2, which is absent")
    if scale_index is not None and scale is None:
        raise ValueError(f"{op}: adapter_index (scale_index) needs a bank of scales [n, K2]")
    for name, t in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
        if t is not None and t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    M = (a1 if a1 is not None else a2).shape[0]
    N = (b1 if b1 is not None else b2).shape[1]
    K1 = a1.shape[1] if a1 is not None else 0
    K2 = a2.shape[1] if a2 is not None else 0
    _check_shape(op, "a2", a2, (M, K2))
    _check_shape(op, "b1", b1, (K1, N))
    _check_shape(op, "b2", b2, (K2, N))
    device = (a1 if a1 is not None else a2).device if on_device else None
    if _check_bank(op, scale, scale_index, M, "a2", K2, device) is None:
        _check_shape(op, "scale", scale, (K2,))
    _check_shape(op, "bias", bias, (N,))
    return M, N, K1, K2


@torch.library.custom_op("spectral_kernels::cuda_lowrank_gemm", mutates_args=())
def _cuda_lowrank_gemm(
    a1: Optional[Tensor], b1: Optional[Tensor], a2: Optional[Tensor], b2: Optional[Tensor],
    scale: Optional[Tensor], bias: Optional[Tensor], scale_index: Optional[Tensor] = None,
) -> Tensor:
    """out[M, N] = a1[M, K1]·b1[K1, N] + (a2[M, K2] ⊙ scale[K2])·b2[K2, N] + bias[N]. With
    ``scale_index`` (int64 [M]), scale is a bank [n, K2] and row m of a2 is scaled by
    scale[scale_index[m]]."""
    M, N, K1, K2 = _gemm_shapes(a1, b1, a2, b2, scale, bias, scale_index, on_device=True)
    C = _ext.extension()
    ref = a1 if a1 is not None else a2
    if M == 0 or N == 0 or K1 + K2 == 0:  # nothing for a kernel to do
        out = ref.new_zeros(M, N)
        return out + bias if bias is not None else out
    if K1 == 0:
        a1 = b1 = None
    if K2 == 0:
        a2 = b2 = scale = scale_index = None
    bank = {} if scale_index is None else {
        "scale_bank": _mat(scale), "scale_index": _vec(scale_index), "n_adapters": scale.shape[0]}
    out = ref.new_empty(M, N)
    with torch.cuda.device(ref.device):
        C.lowrank_gemm(
            _mat(a1), _mat(b1), _mat(a2), _mat(b2), _vec(scale) if scale_index is None else None,
            _vec(bias), _mat(out), M, N, K1, K2, DTYPE_CODES[ref.dtype], _stream(ref.device), **bank,
        )
    return out


@_cuda_lowrank_gemm.register_fake
def _(a1, b1, a2, b2, scale, bias, scale_index=None):
    M, N, _, _ = _gemm_shapes(a1, b1, a2, b2, scale, bias, scale_index, on_device=False)
    return (a1 if a1 is not None else a2).new_empty(M, N)


def _grads_shapes(z, g, dy, on_device):
    op = "cuda_coeff_and_bias_grads"
    _check_operands(op, {"z": z, "g": g, "dy": dy}, on_device=on_device)
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be 2-D [T, k], got shape {tuple(z.shape)}")
    tokens, k = z.shape
    _check_shape(op, "g", g, (tokens, k))
    if dy is not None and (dy.dim() != 2 or dy.shape[0] != tokens):
        raise ValueError(f"{op}: dy must be 2-D [T={tokens}, out], got shape {tuple(dy.shape)}")
    return tokens, k, (dy.shape[1] if dy is not None else 0)


@torch.library.custom_op("spectral_kernels::cuda_coeff_and_bias_grads", mutates_args=())
def _cuda_coeff_and_bias_grads(z: Tensor, g: Tensor, dy: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dd = Σ_T z ⊙ g [k] in float32, dbias = Σ_T dy [out] in dy's dtype; [0] when dy is None)."""
    tokens, k, n_out = _grads_shapes(z, g, dy, on_device=True)
    C = _ext.extension()
    dd = torch.zeros(k, dtype=torch.float32, device=z.device)
    db = z.new_zeros(n_out)
    if tokens == 0 or k == 0:
        return dd, (dy.sum(0) if dy is not None else db)
    with torch.cuda.device(z.device):
        C.coeff_and_bias_grads(
            _mat(z), _mat(g), _mat(dy), dd.data_ptr(), db.data_ptr() if dy is not None else 0,
            tokens, k, n_out, DTYPE_CODES[z.dtype], _stream(z.device),
        )
    return dd, db


@_cuda_coeff_and_bias_grads.register_fake
def _(z, g, dy):
    _, k, n_out = _grads_shapes(z, g, dy, on_device=False)
    return z.new_empty(k, dtype=torch.float32), z.new_empty(n_out)


def _bank_grads_shapes(z, g, adapter_index, n, on_device):
    op = "cuda_bank_coeff_grads"
    _check_operands(op, {"z": z, "g": g}, on_device=on_device)
    if z.dim() != 2:
        raise ValueError(f"{op}: z must be 2-D [T, k], got shape {tuple(z.shape)}")
    tokens, k = z.shape
    _check_shape(op, "g", g, (tokens, k))
    if n < 1:
        raise ValueError(f"{op}: n (rows of the bank) must be positive, got {n}")
    _check_index(op, adapter_index, tokens, "z", z.device if on_device else None)
    return tokens, k


@torch.library.custom_op("spectral_kernels::cuda_bank_coeff_grads", mutates_args=())
def _cuda_bank_coeff_grads(z: Tensor, g: Tensor, adapter_index: Tensor, n: int) -> Tensor:
    """dd [n, k] float32: row a = Σ over the tokens t with adapter_index[t] = a of z_t ⊙ g_t, zero
    where no token has a. The tokens are sorted by adapter on the device (a stable argsort, so the
    order, and every sum over it, is a function of the index alone), segment starts found by
    searchsorted (no atomics, no host sync); the kernel sums each segment in a fixed order."""
    tokens, k = _bank_grads_shapes(z, g, adapter_index, n, on_device=True)
    dd = torch.zeros(n, k, dtype=torch.float32, device=z.device)
    if tokens == 0 or k == 0:
        return dd
    sorted_idx, order = torch.sort(adapter_index, stable=True)
    bounds = torch.arange(n + 1, dtype=torch.int64, device=z.device)
    starts = torch.searchsorted(sorted_idx, bounds)  # adapter a: order[starts[a]:starts[a + 1]]
    C = _ext.extension()
    with torch.cuda.device(z.device):
        C.bank_coeff_grads(
            _mat(z), _mat(g), order.data_ptr(), starts.data_ptr(), dd.data_ptr(),
            tokens, k, n, DTYPE_CODES[z.dtype], _stream(z.device),
        )
    return dd


@_cuda_bank_coeff_grads.register_fake
def _(z, g, adapter_index, n):
    _, k = _bank_grads_shapes(z, g, adapter_index, n, on_device=False)
    return z.new_empty(n, k, dtype=torch.float32)


# --- 3. backend functions ----------------------------------------------------------------------------
def prefers_cuda(tokens: int, in_features: int, out_features: int, k: int, dtype: torch.dtype) -> bool:
    """Whether "auto" should run this forward on the cuda backend: a kernel dtype and a shape whose
    decode plan measured faster than the torch chain (``plans.py``). Past the decode plan the
    backend runs cuBLAS GEMMs, as the torch chain does, so only the decode plan can win."""
    from spectral_kernels.plans import prefers_cuda as decode_wins

    return dtype in DTYPE_CODES and decode_wins(tokens, in_features, out_features, k)


def spectral_linear_fwd_cuda(
    x2d: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None,
    idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward on flattened tokens: y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias, z = x·V.

    Args:
        x2d: ``[T, in]``, any strides. U: ``[out, k]``. d: ``[k]``, or a bank ``[n, k]`` with idx.
        V: ``[in, k]``. bias: ``[out]`` or None. weight: ``[out, in]`` or None (pure form).
        idx: None, or ``[T]`` int64 on x's device: token t computes with d[idx[t]].

    Returns:
        (y ``[T, out]``, z ``[T, k]``) in x's dtype. T <= 16 runs the decode plan (one launch,
        bank rows gathered inside); larger T runs cuBLAS: z = x·V, then y = x·Wᵀ + b with
        (z ⊙ d)·Uᵀ added in place (the torch backend's plans without a bank; a bank's rows
        gathered by :func:`_bank_rows`).
    """
    op = "spectral_linear_fwd_cuda"
    _check_operands(op, {"x": x2d, "U": U, "d": d, "V": V, "bias": bias, "weight": weight})
    tokens, n_in = x2d.shape
    n_out, k = U.shape
    _check_bank(op, d, idx, tokens, "x", k, x2d.device)
    if 0 in (tokens, n_in, n_out, k):  # empty products: nothing for a kernel to do
        return spectral_linear_fwd_ref(x2d, U, d, V, bias, weight, idx)
    if tokens <= DECODE_MAX_TOKENS:
        return _cuda_decode_forward(x2d, U, d, V, bias, weight, idx)
    if idx is None:
        return spectral_linear_fwd_ref(x2d, U, d, V, bias, weight)  # cuBLAS, the torch backend's plans
    z = x2d @ V
    zd = z * _bank_rows(d, idx)
    if weight is None:
        return (torch.addmm(bias, zd, U.t()) if bias is not None else zd @ U.t()), z
    y = torch.addmm(bias, x2d, weight.t()) if bias is not None else x2d @ weight.t()
    return y.addmm_(zd, U.t()), z


def _bank_rows(d: Tensor, idx: Tensor) -> Tensor:
    """d[idx] [T, k] for a bank d [n, k]: each token's coefficients, NaN for an index outside
    0..n-1 (possible only under torch.compile, which skips the value check). Never reads outside
    the bank, where a plain d[idx] would fault the device (a CUDA device-side assert)."""
    n = d.shape[0]
    inside = (idx >= 0) & (idx < n)
    rows = d[idx.clamp(0, n - 1)]
    return torch.where(inside[:, None], rows, torch.full_like(rows, float("nan")))


def spectral_linear_bwd_cuda(
    dy2d: Tensor, z: Tensor, U: Tensor, d: Tensor, V: Tensor, weight: Tensor | None,
    idx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward on flattened tokens: g = dy·U, dx = dy·weight + (g ⊙ d)·Vᵀ, dd = Σ_T z ⊙ g.

    g and dx are cuBLAS GEMMs (dx = dy·weight with (g ⊙ d)·Vᵀ added in place); dd is the
    hand-written fixed-order reduction. With a bank d ``[n, k]`` and idx ``[T]`` (int64): dx uses
    d[idx[t]] for token t (:func:`_bank_rows`) and dd ``[n, k]`` is the per-adapter sum of z ⊙ g
    (rows no token picked exactly zero), deterministic (:func:`_cuda_bank_coeff_grads`).

    Returns:
        (dx ``[T, in]``, dd ``[k]`` (or ``[n, k]``) in d's dtype, accumulated in fp32, g ``[T, k]``).
    """
    op = "spectral_linear_bwd_cuda"
    _check_operands(op, {"dy": dy2d, "z": z, "U": U, "d": d, "V": V, "weight": weight})
    tokens, n_out = dy2d.shape
    n_in, k = V.shape
    _check_bank(op, d, idx, tokens, "dy", k, dy2d.device)
    if 0 in (tokens, n_in, n_out, k):
        return spectral_linear_bwd_ref(dy2d, z, U, d, V, weight, idx)
    g = dy2d @ U
    gd = g * (d if idx is None else _bank_rows(d, idx))
    dx = gd @ V.t() if weight is None else (dy2d @ weight).addmm_(gd, V.t())
    if idx is None:
        dd, _ = _cuda_coeff_and_bias_grads(z, g, None)
    else:
        dd = _cuda_bank_coeff_grads(z, g, idx, d.shape[0])
    return dx, dd.to(d.dtype), g


def coeff_and_bias_grads(dy2d: Tensor, z: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """The backward reductions in one launch: (dd = Σ_T z ⊙ g ``[k]`` in float32,
    dbias = Σ_T dy ``[out]`` in dy's dtype), both accumulated in fp32 in a fixed order.

    Args:
        dy2d: ``[T, out]``. z: ``[T, k]`` (x·V saved by the forward). g: ``[T, k]`` (dy·U).
    """
    return _cuda_coeff_and_bias_grads(z, g, dy2d)


def bank_coeff_grads(z: Tensor, g: Tensor, idx: Tensor, n: int) -> Tensor:
    """The bank gradient alone: dd ``[n, k]`` float32, row a = Σ_{t: idx[t] = a} z_t ⊙ g_t (zero
    where no token has a), deterministic (:func:`_cuda_bank_coeff_grads`).

    Args:
        z: ``[T, k]``. g: ``[T, k]``. idx: ``[T]`` int64 on their device. n: rows of the bank.
    """
    return _cuda_bank_coeff_grads(z, g, idx, n)
