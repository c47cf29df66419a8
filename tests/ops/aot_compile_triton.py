"""Compile the triton backend's kernels for real GPU targets without a GPU (run as a script).

Prints one JSON line per (kernel, dtype, variant, target) with the shared memory the compiled
kernel needs. Run with TRITON_INTERPRET unset: the interpreter replaces the kernels with Python.
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


def _variants(dtype):
    """The constexpr sets the launchers use on a GPU, for this dtype."""
    import torch

    t = getattr(torch, dtype)
    precision = "ieee" if dtype == "float32" else "tf32"
    blocks = tri._dense_blocks(t)
    block_m, block_r, block_k, warps = tri._project_blocks(64, t)
    # forward reads weight [out, in] along its rows; backward reads it transposed (unit stride on n)
    dense_units = {"forward": ("stride_ak", "stride_wk", "stride_zr", "stride_ur", "stride_on"),
                   "backward": ("stride_ak", "stride_wn", "stride_zr", "stride_ur", "stride_on")}
    for direction, units in dense_units.items():
        for apply_d in (True, False):
            yield tri._dense_lowrank_kernel, {}, dict(
                HAS_DENSE=True, APPLY_D=apply_d, HAS_BIAS=direction == "forward", INPUT_PRECISION=precision,
                BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, BLOCK_R=64, GROUP_M=8,
            ), dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages), units
    project_units = ("stride_ak", "stride_br", "stride_or", "stride_sr", "stride_xr")
    for scaled, reduce in ((False, False), (True, False), (False, True), (True, True)):
        yield tri._lowrank_project_kernel, {"partial_ptr": "*fp64" if dtype == "float32" else "*fp32"}, dict(
            STORE_SCALED=scaled, REDUCE_AUX=reduce, INPUT_PRECISION=precision,
            BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        ), dict(num_warps=warps), project_units


def main(capabilities):
    for cap in capabilities:
        target = GPUTarget("cuda", cap, 32)
        for dtype, ptr in DTYPES.items():
            for fn, overrides, constexprs, options, units in _variants(dtype):
                src = _source(fn, ptr, overrides, constexprs, units)
                kernel = triton.compile(src, target=target, options=options)
                print(json.dumps({"kernel": fn.__name__, "dtype": dtype, "capability": cap,
                                  "variant": {k: v for k, v in constexprs.items() if not k.startswith("BLOCK")},
                                  "unit_strides": list(units),
                                  "shared": kernel.metadata.shared}), flush=True)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [80, 90])
