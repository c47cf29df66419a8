"""Triton kernels and launchers for spectral_linear (the ``triton`` backend).

Two kernels serve both directions, because the backward has the same shape as the forward with
the roles of the operands swapped (strides do the transposing, nothing is copied):

``_lowrank_project_kernel``   out[M, R] = a[M, K]·B[K, R]          (thin GEMM, R = k)
    forward:  z  = x·V               [T, k]   (+ z ⊙ d in the epilogue for the two-GEMM plan)
    backward: g  = dy·U              [T, k]   (+ per-block partial sums of z ⊙ g → dd)

``_dense_lowrank_kernel``     out[M, N] = a[M, K]·Wᵀ[K, N] + (z[M, R] ⊙ d[R])·Uᵀ[R, N] + bias[N]
    forward:  y  = x·weightᵀ + (z ⊙ d)·Uᵀ + bias
    backward: dx = dy·weight + (g ⊙ d)·Vᵀ           (weight read through swapped strides)

Plans (DESIGN.md §3):
* fused low-rank (k ≤ plans.FUSED_MAX_RANK): after the dense K loop, the z rows of the output tile are
  loaded (k ≤ 64 in one chunk), scaled by d in registers, and their product with Uᵀ is
  accumulated into the same fp32 accumulator as the dense product: y is written once, never
  re-read, and z ⊙ d never touches memory.
* two-GEMM (larger k): z ⊙ d is written by the projection kernel's epilogue and the second kernel
  reads it back as an ordinary extra stretch of the GEMM reduction.

Why z is a separate, first kernel rather than computed inside the output tile: every output
tile of a row block would recompute the same z, costing k / BLOCK_N extra FLOPs of the dense
GEMM (12% at k=16, 50% at k=64 with BLOCK_N=128), while the separate thin GEMM costs ≈ 2k / out.

Adapter banks (d [n, k] with a per-token index idx [T]; DESIGN of the bank path):
* forward and dx: the fused plan, whose dense kernel gathers each row's coefficients d[idx[m], r]
  where it applies d (no [T, k] tensor of coefficients is formed); "fold" and "two_gemm" are never
  taken for banks (plans.triton_plan);
* dd [n, k]: deterministic. The host sorts the tokens by adapter (stable argsort) and lays each
  adapter's tokens out in whole row blocks (padding rows -1); the projection kernel that computes
  g = dy·U walks those blocks, gathering rows of dy and z and scattering rows of g back to token
  order, and its REDUCE_AUX epilogue writes one partial Σ z ⊙ g per block, which belongs to one
  adapter. ``_segment_sum_kernel`` then adds each adapter's consecutive block partials in a fixed
  order (zero for an adapter no token picked). No atomics; one host sync (the block count).
* the bank, the index and the bias are read through their strides: a sliced bank, an index
  broadcast from one value (stride 0, as spectral_linear passes ``adapter_index=torch.tensor([a])``)
  or a sliced one need no copy. An index value outside 0..n-1 (the front end refuses those in
  eager mode, not under torch.compile) reads nothing: its token's y and dx rows are NaN, its g is
  computed, its z ⊙ g adds to no row of dd, as on the cuda backend.

Every element offset is formed in int64 (``_offsets``): strides arrive as int32 when they fit,
and their products with a tile index wrap past 2³¹ (a column-major x [T, in] once T·in >= 2³¹).

Accumulation is fp32. fp32 operands use IEEE fp32 products (input_precision="ieee") unless
torch.backends.cuda.matmul.allow_tf32 is set, so results match PyTorch's default float32 matmul.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.plans import triton_plan

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- kernels -------------------------------------------------------------------------------------
@triton.jit
def _offsets(rows, cols, stride_row, stride_col):
    """Element offsets rows[:, None]·stride_row + cols[None, :]·stride_col in int64.

    Strides arrive as int32 whenever they fit, and a K-loop index such as ``k0 + tl.arange`` is
    int32: their product wraps for a column-major x [T, in] (stride_ak = T) once T·in >= 2³¹.
    Both factors are widened before the products (a sign extension where a stride is the
    specialised constant 1, as on the forward's unit-stride reads).
    """
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def _accumulate_product(
    acc, a_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """acc += a[offs_m, :K]·b[:K, offs_n], walking K in BLOCK_K steps with masked edges.

    IEEE fp32 products are summed in two levels: each BLOCK_K-long dot from zero, then added to
    acc with Kahan compensation. One FMA chain over all of K gave 2-3× cuBLAS's float32 error at
    K ≈ 250..4096 on an H100 (whose SGEMM splits the reduction). A plain ``acc += tl.dot(a, b)``
    is no cure: Triton folds it back into ``tl.dot(a, b, acc)`` (same error, measured); the
    subtraction of the compensation keeps the two levels apart.
    """
    offs_k = tl.arange(0, BLOCK_K)
    comp = tl.zeros_like(acc)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_ptr + _offsets(offs_m, kk, stride_am, stride_ak),
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + _offsets(kk, offs_n, stride_bk, stride_bn),
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if INPUT_PRECISION == "ieee":
            y = tl.dot(a, b, input_precision=INPUT_PRECISION) - comp
            t = acc + y
            comp = (t - acc) - y
            acc = t
        else:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _lowrank_project_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, d_ptr, scaled_ptr, aux_ptr, partial_ptr, rows_ptr,
    # sizes
    M, K, R,
    # strides
    stride_am, stride_ak, stride_bk, stride_br, stride_om, stride_or,
    stride_sm, stride_sr, stride_xm, stride_xr, stride_d,
    # meta-parameters
    STORE_SCALED: tl.constexpr,   # also write scaled = out ⊙ d (two-GEMM plan, forward)
    REDUCE_AUX: tl.constexpr,     # also write partial[pid_m, r] = Σ_m out ⊙ aux (dd, backward)
    HAS_ROWS: tl.constexpr,       # block rows are rows[pid_m * BLOCK_M + i] (-1: none), for banks
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[M, R] = a[M, K]·b[K, R] with optional epilogues; grid (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)),
    or (number of row blocks of ``rows``, ...) with HAS_ROWS."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if HAS_ROWS:
        rows = tl.load(rows_ptr + offs_m)
        mask_m = rows >= 0
        offs_m = tl.where(mask_m, rows, 0)
    else:
        mask_m = offs_m < M
    mask_r = offs_r < R

    if INPUT_PRECISION == "ieee":
        # float32 operands: float64 products and sums. This thin GEMM is memory-bound, and z and g
        # feed dd = Σ z ⊙ g, whose cancellation over tokens magnified fp32 chains to 2.2-2.6×
        # cuBLAS's error (H100, T = 1 and 129); in float64 z and g are rounded once.
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < K
            a = tl.load(a_ptr + _offsets(offs_m, kk, stride_am, stride_ak),
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptr + _offsets(kk, offs_r, stride_bk, stride_br),
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        acc = _accumulate_product(acc, a_ptr, b_ptr, offs_m, offs_r, mask_m, mask_r, K,
                                  stride_am, stride_ak, stride_bk, stride_br, INPUT_PRECISION, BLOCK_K)

    mask = mask_m[:, None] & mask_r[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + _offsets(offs_m, offs_r, stride_om, stride_or), out, mask=mask)
    if STORE_SCALED:
        # Round z first, as the eager chain does, so both plans see the same z.
        d = tl.load(d_ptr + offs_r * stride_d, mask=mask_r, other=0.0).to(tl.float32)
        scaled = (out.to(tl.float32) * d[None, :]).to(scaled_ptr.dtype.element_ty)
        tl.store(scaled_ptr + _offsets(offs_m, offs_r, stride_sm, stride_sr), scaled, mask=mask)
    if REDUCE_AUX:
        # dd partials from the unrounded accumulator (float64 for float32 operands, whose partials
        # are float64 too); rows past M were loaded as 0 and add nothing.
        aux = tl.load(aux_ptr + _offsets(offs_m, offs_r, stride_xm, stride_xr),
                      mask=mask, other=0.0).to(acc.dtype)
        partial = tl.sum(acc * aux, axis=0)
        tl.store(partial_ptr + pid_m * R + offs_r, partial.to(partial_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _dense_lowrank_kernel(
    # pointers
    a_ptr, w_ptr, z_ptr, d_ptr, u_ptr, bias_ptr, out_ptr, idx_ptr,
    # sizes (n_adapters: rows of the bank d with HAS_INDEX)
    M, N, K, R, n_adapters,
    # strides (stride_dn: 0 for one d [R]; stride_idx: 0 for one index broadcast to every row)
    stride_am, stride_ak, stride_wn, stride_wk, stride_zm, stride_zr,
    stride_un, stride_ur, stride_om, stride_on, stride_dn, stride_dr, stride_bias, stride_idx,
    # meta-parameters
    HAS_DENSE: tl.constexpr,      # weight present (delta form)
    APPLY_D: tl.constexpr,        # scale z by d on load (fused plan); else z is already z ⊙ d
    HAS_INDEX: tl.constexpr,      # d is a bank [n_adapters, R]; row m reads d[idx[m]]
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[M, N] = a·Wᵀ + (z ⊙ d)·Uᵀ + bias with one fp32 accumulator; 1-D grid, grouped order."""
    # Grouped launch order: GROUP_M row blocks share each column block of W while it is in L2.
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_DENSE:
        acc = _accumulate_product(acc, a_ptr, w_ptr, offs_m, offs_n, mask_m, mask_n, K,
                                  stride_am, stride_ak, stride_wk, stride_wn, INPUT_PRECISION, BLOCK_K)

    # Low-rank term into the same accumulator, k in BLOCK_R chunks (one chunk for k ≤ 64). Not
    # software-pipelined (num_stages=1): the loop runs once for k ≤ 64, so prefetch stages buy
    # nothing, and at fp32 they would hold 2 extra copies of the z, d and U tiles in shared memory
    # (over the 163 KiB an A100 block may use; tests/ops/aot_compile_triton.py checks every variant).
    offs_rb = tl.arange(0, BLOCK_R)
    if HAS_INDEX:
        adapter = tl.load(idx_ptr + offs_m * stride_idx, mask=mask_m, other=0)
        # An index outside 0..n-1 (unchecked under torch.compile) reads nothing: its row gets NaN
        # coefficients, hence a NaN output row, as in the cuda backend.
        in_bank = (adapter >= 0) & (adapter < n_adapters)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rr = r0 + offs_rb
        mask_r = rr < R
        z = tl.load(z_ptr + _offsets(offs_m, rr, stride_zm, stride_zr),
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if APPLY_D:
            if HAS_INDEX:
                # each row's own coefficients, gathered from the bank: d[idx[m], r]
                d = tl.load(d_ptr + _offsets(adapter, rr, stride_dn, stride_dr),
                            mask=(mask_m & in_bank)[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
                d = tl.where(in_bank[:, None], d, float("nan"))
                z = (z.to(tl.float32) * d).to(z_ptr.dtype.element_ty)
            else:
                d = tl.load(d_ptr + rr * stride_dr, mask=mask_r, other=0.0).to(tl.float32)
                # Round z ⊙ d to the operand dtype, as the eager chain does, then use tensor cores.
                z = (z.to(tl.float32) * d[None, :]).to(z_ptr.dtype.element_ty)
        u = tl.load(u_ptr + _offsets(rr, offs_n, stride_ur, stride_un),
                    mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(z, u, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + _offsets(offs_m, offs_n, stride_om, stride_on),
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _fold_kernel(
    # pointers
    w_ptr, u_ptr, d_ptr, v_ptr, out_ptr,
    # sizes
    N, K, R,
    # strides
    stride_wn, stride_wk, stride_un, stride_ur, stride_d, stride_vk, stride_vr, stride_on, stride_ok,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[N, K] = w[N, K] + (u[N, R] ⊙ d[R])·v[K, R]ᵀ, one fp32 accumulator per tile, rounded once
    (as torch.addmm(w, u * d, vᵀ)); grid (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)). Memory-bound: w is
    read once and out written once; the rank-R product is a few tl.dot per tile."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask = mask_n[:, None] & mask_k[None, :]
    acc = tl.load(w_ptr + _offsets(offs_n, offs_k, stride_wn, stride_wk), mask=mask,
                  other=0.0).to(tl.float32)
    offs_rb = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_rb
        mask_r = rr < R
        u = tl.load(u_ptr + _offsets(offs_n, rr, stride_un, stride_ur),
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        d = tl.load(d_ptr + rr * stride_d, mask=mask_r, other=0.0).to(tl.float32)
        # u ⊙ d rounded to the operand dtype first, as the eager chain's U * d is
        ud = (u.to(tl.float32) * d[None, :]).to(u_ptr.dtype.element_ty)
        vt = tl.load(v_ptr + _offsets(rr, offs_k, stride_vr, stride_vk),
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(ud, vt, input_precision="ieee" if u_ptr.dtype.element_ty == tl.float32 else "tf32")
    tl.store(out_ptr + _offsets(offs_n, offs_k, stride_on, stride_ok),
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(partial_ptr, starts_ptr, out_ptr, R, BLOCK_R: tl.constexpr):
    """out[a, :] = Σ_{b in starts[a]..starts[a+1]-1} partial[b, :], in order (deterministic);
    grid (n,). An adapter with no block gets an exact zero row."""
    a = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + a)
    end = tl.load(starts_ptr + a + 1)
    offs_r = tl.arange(0, BLOCK_R)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + offs_r
        mask_r = rr < R
        acc = tl.zeros((BLOCK_R,), dtype=out_ptr.dtype.element_ty)
        for b in range(start, end):
            acc += tl.load(partial_ptr + b * R + rr, mask=mask_r, other=0.0)
        tl.store(out_ptr + a * R + rr, acc, mask=mask_r)


# --- launch configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Blocks:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _dense_blocks(dtype: torch.dtype) -> _Blocks:
    """Tile sizes for the dense+low-rank kernel.

    The interpreter runs every program in Python, so it gets the smallest tiles tl.dot accepts.
    16-bit operands: 128×256×64, 8 warps, 3 stages, the fastest of ten configurations measured on
    an H100 (benchmarks/gpu/tune_plans.py, T = 8192, in = out = 4096, bf16: forward 0.415 ms at
    k = 16 against 0.490 ms for 128×128×64 and 0.384 ms for cuBLAS's x·Wᵀ alone). fp32 keeps
    128×128×16 (untuned; IEEE FMA products, not tensor cores, summed 16 at a time before the
    compensated outer sum of _accumulate_product).
    """
    if triton_interpret_enabled():
        return _Blocks(16, 32, 16 if dtype == torch.float32 else 32, 1, 1)
    if dtype == torch.float32:
        return _Blocks(128, 128, 16, 8, 3)
    return _Blocks(128, 256, 64, 8, 3)


def _project_blocks(rank: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_K, num_warps) for the thin projection GEMM [T, K]·[K, k]; fp32
    walks K 16 at a time (the inner chains of its two-level sum)."""
    block_r = min(max(triton.next_power_of_2(rank), 16), 64)
    block_k = 16 if dtype == torch.float32 else (32 if triton_interpret_enabled() else 64)
    if triton_interpret_enabled():
        return 16, block_r, block_k, 1
    return 64, block_r, block_k, 4


def _fold_blocks() -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of the fold kernel (memory-bound: wide tiles along K)."""
    if triton_interpret_enabled():
        return 16, 32, 1
    return 64, 128, 4


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_triton_operands(*tensors: Tensor | None) -> None:
    dtype = tensors[0].dtype
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"the triton backend computes in float16, bfloat16 or float32; got {dtype} "
            "(use backend='torch' for float64)"
        )
    device = tensors[0].device
    if device.type != "cuda" and not triton_interpret_enabled():
        raise ValueError(
            f"the triton backend needs CUDA tensors, got device '{device}' "
            "(or set TRITON_INTERPRET=1 before importing spectral_kernels)"
        )


# --- launchers -----------------------------------------------------------------------------------
def lowrank_project(
    a: Tensor, b: Tensor, *, d: Tensor | None = None, aux: Tensor | None = None,
    idx: Tensor | None = None, n: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """out = a·b for a [M, K], b [K, R]; returns (out [M, R], out ⊙ d or None, dd or None).

    With ``d``: also returns out ⊙ d (rounded from the stored out). With ``aux`` [M, R]:
    also returns Σ_M out ⊙ aux in float32, reduced deterministically over row blocks; with
    ``aux``, ``idx`` [M] (int64, values in 0..n-1) and ``n``: the per-adapter sums [n, R] instead
    (module docstring: tokens sorted by adapter into whole row blocks, then a segment sum).
    """
    M, K = a.shape
    R = b.shape[1]
    out = torch.empty((M, R), device=a.device, dtype=a.dtype)
    scaled = torch.empty_like(out) if d is not None else None
    block_m, block_r, block_k, num_warps = _project_blocks(R, a.dtype)
    rows = starts = None
    if idx is not None:
        if aux is None or d is not None or n is None:
            raise ValueError("lowrank_project: idx is for the per-adapter reduction (aux and n given, no d)")
        rows, starts = _adapter_blocks(idx, n, block_m)
        grid_m = rows.numel() // block_m
    else:
        grid_m = triton.cdiv(M, block_m)
    partial_dtype = torch.float64 if a.dtype == torch.float32 else torch.float32
    partial = torch.empty((grid_m, R), device=a.device, dtype=partial_dtype) if aux is not None else None
    scaled_arg = scaled if scaled is not None else out
    aux_arg = aux if aux is not None else out
    if grid_m > 0:
        _lowrank_project_kernel[(grid_m, triton.cdiv(R, block_r))](
            a, b, out, d if d is not None else out, scaled_arg, aux_arg,
            partial if partial is not None else out, rows if rows is not None else out,
            M, K, R,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
            scaled_arg.stride(0), scaled_arg.stride(1), aux_arg.stride(0), aux_arg.stride(1),
            d.stride(0) if d is not None else 0,
            STORE_SCALED=d is not None, REDUCE_AUX=aux is not None, HAS_ROWS=rows is not None,
            INPUT_PRECISION=_input_precision(a.dtype),
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
        )
    if partial is None:
        return out, scaled, None
    if idx is None:
        return out, scaled, partial.sum(0)
    reduced = torch.empty((n, R), device=a.device, dtype=partial_dtype)
    _segment_sum_kernel[(n,)](partial, starts, reduced, R, BLOCK_R=block_r,
                              num_warps=1 if triton_interpret_enabled() else 2)
    return out, scaled, reduced


def _adapter_blocks(idx: Tensor, n: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(rows, starts) laying each adapter's tokens out in whole row blocks, in adapter order.

    rows [num_blocks * block_m] (int64): the token of each block row, -1 for padding; adapter a
    owns blocks starts[a]..starts[a+1]-1 (starts [n + 2], int64). Tokens keep their order within
    an adapter (stable sort), so the layout, and every sum over it, is deterministic. Tokens whose
    index lies outside 0..n-1 (possible only under torch.compile, which skips the value check) get
    blocks of their own after adapter n-1, starts[n]..starts[n+1]-1: their g is computed, their
    z ⊙ g is summed into no row of dd. Reads the block count back to the host (one sync).
    """
    idx = idx.to(torch.int64)
    group = torch.where((idx >= 0) & (idx < n), idx, n)
    counts = torch.bincount(group, minlength=n + 1)
    blocks = (counts + block_m - 1) // block_m
    starts = torch.zeros(n + 2, dtype=torch.int64, device=idx.device)
    torch.cumsum(blocks, 0, out=starts[1:])
    num_blocks = int(starts[-1])
    rows = torch.full((num_blocks * block_m,), -1, dtype=torch.int64, device=idx.device)
    if idx.numel():
        order = torch.argsort(group, stable=True)
        first_token = torch.cumsum(counts, 0) - counts
        adapter = group[order]
        slot = starts[adapter] * block_m + (torch.arange(idx.numel(), device=idx.device) - first_token[adapter])
        rows[slot] = order
    return rows, starts


def dense_plus_lowrank(
    a: Tensor,
    w: Tensor | None,
    z: Tensor,
    d: Tensor | None,
    u: Tensor,
    bias: Tensor | None,
    *,
    w_transposed: bool = False,
    blocks: _Blocks | None = None,
    group_m: int = 8,
    idx: Tensor | None = None,
) -> Tensor:
    """out = a·wᵀ + (z ⊙ d)·uᵀ + bias for a [M, K], w [N, K] (or [K, N] when ``w_transposed``),
    z [M, R], d [R] (None: z is already scaled), u [N, R], bias [N]; returns out [M, N].
    With ``idx`` [M] (int64), d is a bank [n, R] and row m is scaled by d[idx[m]] (gathered in
    the kernel). ``blocks`` overrides the tile configuration (tuning and tests)."""
    if idx is not None and (d is None or d.dim() != 2):
        raise ValueError("dense_plus_lowrank: idx needs the bank d [n, R]")
    M = a.shape[0]
    N, R = u.shape
    K = a.shape[1]
    out = torch.empty((M, N), device=a.device, dtype=a.dtype)
    blocks = blocks or _dense_blocks(a.dtype)
    # Fused plan: z is scaled by d in registers; two-GEMM plan: z arrives already scaled.
    # Both walk k in chunks of at most 64 so the low-rank tiles never outgrow the dense ones.
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    if w is None:
        stride_wn = stride_wk = 0
    elif w_transposed:
        stride_wk, stride_wn = w.stride(0), w.stride(1)
    else:
        stride_wn, stride_wk = w.stride(0), w.stride(1)
    # d, bias and idx go in through their strides (any slice or broadcast view): a bank [n, R]
    # by (row, column) strides, one d [R] as a bank of one row read with row stride 0.
    if d is None:
        stride_dn = stride_dr = 0
    elif idx is not None:
        stride_dn, stride_dr = d.stride(0), d.stride(1)
    else:
        stride_dn, stride_dr = 0, d.stride(0)
    grid = (triton.cdiv(M, blocks.block_m) * triton.cdiv(N, blocks.block_n),)
    _dense_lowrank_kernel[grid](
        a, w if w is not None else a, z, d if d is not None else z, u,
        bias if bias is not None else out, out, idx if idx is not None else out,
        M, N, K, R, d.shape[0] if idx is not None else 0,
        a.stride(0), a.stride(1), stride_wn, stride_wk, z.stride(0), z.stride(1),
        u.stride(0), u.stride(1), out.stride(0), out.stride(1), stride_dn, stride_dr,
        bias.stride(0) if bias is not None else 0, idx.stride(0) if idx is not None else 0,
        HAS_DENSE=w is not None, APPLY_D=d is not None, HAS_INDEX=idx is not None, HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, BLOCK_R=block_r,
        GROUP_M=group_m, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out


def fold_weight(w: Tensor, u: Tensor, d: Tensor, v: Tensor, *, out: Tensor | None = None) -> Tensor:
    """w + (u ⊙ d)·vᵀ for w [N, K], u [N, R], d [R], v [K, R]; a new [N, K] tensor in w's dtype,
    or written into ``out`` (any strides, e.g. a block of a larger buffer) and returned."""
    N, K = w.shape
    R = u.shape[1]
    if out is None:
        out = torch.empty((N, K), device=w.device, dtype=w.dtype)
    elif tuple(out.shape) != (N, K) or out.dtype != w.dtype:
        raise ValueError(f"fold_weight: out must be {(N, K)} {w.dtype}, got {tuple(out.shape)} {out.dtype}")
    block_n, block_k, warps = _fold_blocks()
    block_r = min(max(triton.next_power_of_2(R), 16), 64)
    _fold_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        w, u, d, v, out, N, K, R,
        w.stride(0), w.stride(1), u.stride(0), u.stride(1), d.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, num_warps=warps,
    )
    return out


def spectral_linear_fwd_triton(
    x2d: Tensor, U: Tensor, d: Tensor, V: Tensor, bias: Tensor | None, weight: Tensor | None,
    idx: Tensor | None = None, *, plan: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Forward on flattened tokens x2d [T, in]: (y [T, out], z = x·V [T, k]).

    ``plan`` (default: ``plans.triton_plan`` by shape) is one of
    "fused" (z, then one kernel for x·Wᵀ + (z ⊙ d)·Uᵀ + bias), "two_gemm" (z ⊙ d from the first
    kernel's epilogue) or "fold" (W' = W + (U ⊙ d)·Vᵀ by the fold kernel, then one cuBLAS GEMM).
    With a bank d [n, k] and ``idx`` [T]: the fused plan only, d[idx[m]] gathered per row.
    """
    _check_triton_operands(x2d, U, d, V, bias, weight)
    plan = plan or triton_plan(x2d.shape[0], V.shape[1], weight is not None, bank=idx is not None)
    if idx is not None:
        _check_bank_plan(plan)
        z, _, _ = lowrank_project(x2d, V)
        return dense_plus_lowrank(x2d, weight, z, d, U, bias, idx=idx), z
    if plan == "fold":
        z, _, _ = lowrank_project(x2d, V)
        w = fold_weight(weight, U, d, V)
        return (torch.addmm(bias, x2d, w.t()) if bias is not None else x2d @ w.t()), z
    if plan == "fused":
        z, _, _ = lowrank_project(x2d, V)
        return dense_plus_lowrank(x2d, weight, z, d, U, bias), z
    z, zd, _ = lowrank_project(x2d, V, d=d)
    return dense_plus_lowrank(x2d, weight, zd, None, U, bias), z


def _check_bank_plan(plan: str) -> None:
    if plan != "fused":
        raise ValueError(f"the triton backend runs adapter banks (adapter_index) on the fused plan only, "
                         f"not {plan!r}: the fold and two-GEMM plans apply one d [k] to every token")


def spectral_linear_bwd_triton(
    dy2d: Tensor, z: Tensor, U: Tensor, d: Tensor, V: Tensor, weight: Tensor | None,
    idx: Tensor | None = None, *, plan: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward on flattened tokens: (dx [T, in], dd [k], g = dy·U [T, k]).

    dd = Σ z ⊙ g is reduced inside the kernel that computes g (no second pass over z and g);
    dx = dy·weight + (g ⊙ d)·Vᵀ shares one accumulator ("fused", "two_gemm"), or is dy·W' with
    W' refolded by the fold kernel ("fold": recomputed, not kept from the forward, so no weight-
    sized tensor lives between the two passes). With a bank d [n, k] and ``idx`` [T]: dd [n, k]
    from the per-adapter block reduction (module docstring), dx on the fused plan.
    """
    _check_triton_operands(dy2d, z, U, d, V, weight)
    plan = plan or triton_plan(dy2d.shape[0], V.shape[1], weight is not None, bank=idx is not None)
    if idx is not None:
        _check_bank_plan(plan)
        g, _, dd = lowrank_project(dy2d, U, aux=z, idx=idx, n=d.shape[0])
        dx = dense_plus_lowrank(dy2d, weight, g, d, V, None, w_transposed=True, idx=idx)
        return dx, dd.to(d.dtype), g
    if plan == "fold":
        g, _, dd = lowrank_project(dy2d, U, aux=z)
        return dy2d @ fold_weight(weight, U, d, V), dd.to(d.dtype), g
    if plan == "fused":
        g, _, dd = lowrank_project(dy2d, U, aux=z)
        dx = dense_plus_lowrank(dy2d, weight, g, d, V, None, w_transposed=True)
    else:
        g, gd, dd = lowrank_project(dy2d, U, d=d, aux=z)
        dx = dense_plus_lowrank(dy2d, weight, gd, None, V, None, w_transposed=True)
    return dx, dd.to(d.dtype), g
