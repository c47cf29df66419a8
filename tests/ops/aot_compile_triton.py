"""Compile the triton backend's kernels for real GPU targets without a GPU (run as a script).

Prints one JSON line per (kernel, dtype, variant, target) with the shared memory the compiled
kernel needs. Every constexpr combination the launchers use is built: both directions of the
dense kernel, with and without weight (delta and pure form), d applied in the kernel or not,
the adapter-bank gather (HAS_INDEX), the projection kernel's epilogues and its per-adapter row
layout (HAS_ROWS), the fold kernel and the segment sum. Run with TRITON_INTERPRET unset: the
interpreter replaces the kernels with Python.
"""
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spectral_kernels.ops import spectral_linear_triton as tri

DTYPES = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def _source(fn, ptr_type, overrides, constexprs, unit_strides):
    """An ASTSource specialised as a launch on contiguous, 16-byte aligned GPU tensors would be:
    pointers, sizes and non-unit strides divisible by 16, unit strides folded to the constant 1
    (without this the loads cannot become async copies and the loops are not pipelined)."""
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, p in enumerate(fn.params):
        if p.is_constexpr or p.name in unit_strides:
            sig[p.name] = "constexpr"
            if p.name in unit_strides:
                consts[p.name] = 1
            continue
        sig[p.name] = overrides.get(p.name, ptr_type) if p.name.endswith("_ptr") else "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _dense_variants(precision, blocks):
    """Forward: y = x·Wᵀ + (z ⊙ d)·Uᵀ + bias reads W [out, in] along its rows; backward: dx reads
    W transposed (unit stride on n), no bias. Bank variants gather d[idx[m]] (d applied in the kernel)."""
    dense_units = {"forward": ("stride_ak", "stride_wk", "stride_zr", "stride_ur", "stride_on"),
                   "backward": ("stride_ak", "stride_wn", "stride_zr", "stride_ur", "stride_on")}
    for direction, units in dense_units.items():
        forward = direction == "forward"
        for has_dense in (True, False):
            for apply_d, has_index in ((True, False), (False, False), (True, True)):
                extra = ("stride_dr",) + (("stride_bias",) if forward else ()) + (("stride_idx",) if has_index else ())
                yield tri._dense_lowrank_kernel, {"idx_ptr": "*i64"}, dict(
                    HAS_DENSE=has_dense, APPLY_D=apply_d, HAS_INDEX=has_index, HAS_BIAS=forward,
                    INPUT_PRECISION=precision, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                    BLOCK_K=blocks.block_k, BLOCK_R=64, GROUP_M=8,
                ), dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages), units + extra


def _variants(dtype):
    """The constexpr sets the launchers use on a GPU, for this dtype."""
    import torch

    t = getattr(torch, dtype)
    precision = "ieee" if dtype == "float32" else "tf32"
    partial = "*fp64" if dtype == "float32" else "*fp32"
    yield from _dense_variants(precision, tri._dense_blocks(t))
    block_m, block_r, block_k, warps = tri._project_blocks(64, t)
    project_units = ("stride_ak", "stride_br", "stride_or", "stride_sr", "stride_xr", "stride_d")
    for scaled, reduce, rows in ((False, False, False), (True, False, False), (False, True, False),
                                 (True, True, False), (False, True, True)):
        yield tri._lowrank_project_kernel, {"partial_ptr": partial, "rows_ptr": "*i64"}, dict(
            STORE_SCALED=scaled, REDUCE_AUX=reduce, HAS_ROWS=rows, INPUT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        ), dict(num_warps=warps), project_units
    block_n, block_k_fold, fold_warps = tri._fold_blocks()
    yield tri._fold_kernel, {}, dict(BLOCK_N=block_n, BLOCK_K=block_k_fold, BLOCK_R=64), dict(num_warps=fold_warps), (
        "stride_wk", "stride_ur", "stride_d", "stride_vr", "stride_ok")
    yield tri._segment_sum_kernel, {"partial_ptr": partial, "starts_ptr": "*i64", "out_ptr": partial}, dict(
        BLOCK_R=block_r), dict(num_warps=2), ()


def main(capabilities):
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for dtype, ptr in DTYPES.items():
            for fn, overrides, constexprs, options, units in _variants(dtype):
                src = _source(fn, ptr, overrides, constexprs, units)
                kernel = triton.compile(src, target=target, options=options)
                print(json.dumps({"kernel": fn.__name__, "dtype": dtype, "capability": cap,
                                  "variant": {k: v for k, v in constexprs.items() if not k.startswith("BLOCK")},
                                  "unit_strides": list(units), "options": options,
                                  "shared": kernel.metadata.shared}), flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [80, 90])
