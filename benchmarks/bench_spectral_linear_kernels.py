"""Kernel-level benchmark of spectral_linear with FLOPs, bytes and the roofline floor.

    python benchmarks/bench_spectral_linear_kernels.py                      # GPU: T=8192, in=out=4096, k∈{16,64,256}, bf16
    python benchmarks/bench_spectral_linear_kernels.py --device cpu --tokens 256 --features 256 --ranks 8 --dtype float32

Providers per shape: the spectral op on each available backend, the eager chain of torch ops,
and frozen nn.Linear (F.linear), forward and forward+backward (gradients to x and d). Times come
from triton.testing.do_bench on CUDA (median and 20/80 % quantiles) and from wall-clock medians
on CPU. Ceilings are measured in the same run: a large square GEMM for the compute peak and a
device-to-device copy for bandwidth; the roofline floor of a call is max(FLOPs / peak,
bytes / bandwidth).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import spectral_kernels as sk
from spectral_kernels.backends import backend_status
from spectral_kernels.benchmarking import environment, time_ms


def spectral_linear_cost(tokens: int, n_in: int, n_out: int, rank: int, itemsize: int, backward: bool) -> tuple[float, float]:
    """(FLOPs, bytes) of the fused plan: forward reads x, W, U, V and writes y and z; the backward
    adds g = dy·U, dx = dy·W + (g ⊙ d)·Vᵀ, reading dy, W, U, V, z and writing dx and g."""
    flops = 2.0 * tokens * (n_in * n_out + n_in * rank + rank * n_out)
    moved = itemsize * (tokens * n_in + n_out * n_in + (n_in + n_out) * rank + tokens * n_out + tokens * rank)
    if backward:
        flops *= 2
        moved *= 2
    return flops, float(moved)


def _timer(device: str):
    if device.startswith("cuda"):
        import triton.testing

        def timed(fn):
            med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80
    else:
        def timed(fn):
            t = time_ms(fn, device, warmup=2, reps=7)
            return statistics.median(t), min(t), max(t)
    return timed


def measure_ceilings(device: str, dtype: torch.dtype, timed) -> dict:
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_ms = timed(lambda: a @ b)[0]
    src = torch.empty(256 * 2**20 if device.startswith("cuda") else 64 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))[0]
    return {"peak_flops": 2.0 * n**3 / (gemm_ms * 1e-3), "bandwidth": 2.0 * src.numel() / (copy_ms * 1e-3),
            "gemm_n": n, "copy_bytes": src.numel()}


def bench_shape(device, dtype, tokens, n_in, n_out, rank, backends, timed, ceilings) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
    W = torch.randn(n_out, n_in, device=device, dtype=dtype) / n_in**0.5
    b = torch.randn(n_out, device=device, dtype=dtype)
    U = torch.randn(n_out, rank, device=device, dtype=dtype) / rank**0.5
    V = torch.randn(n_in, rank, device=device, dtype=dtype) / n_in**0.5
    d = torch.randn(rank, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n_out, device=device, dtype=dtype)
    providers = {f"spectral[{name}]": (lambda name=name: sk.spectral_linear(x, U, d, V, b, W, backend=name)) for name in backends}
    providers["eager"] = lambda: x @ W.t() + b + ((x @ V) * d) @ U.t()
    providers["linear"] = lambda: torch.nn.functional.linear(x, W, b)
    rows = []
    for name, fwd in providers.items():
        for phase in ("forward", "forward+backward"):
            if phase == "forward":
                def run(fwd=fwd):
                    with torch.no_grad():
                        fwd()
            else:
                def run(fwd=fwd):
                    x.grad = d.grad = None
                    fwd().backward(dy)
            med, p20, p80 = timed(run)
            # nn.Linear is costed as the dense part alone (k = 0); the others do the full work.
            k_cost = 0 if name == "linear" else rank
            flops, moved = spectral_linear_cost(tokens, n_in, n_out, k_cost, x.element_size(), phase != "forward")
            floor_ms = 1e3 * max(flops / ceilings["peak_flops"], moved / ceilings["bandwidth"])
            rows.append({"provider": name, "phase": phase, "tokens": tokens, "in": n_in, "out": n_out, "k": rank,
                         "median_ms": med, "p20_ms": p20, "p80_ms": p80, "tflops": flops / (med * 1e-3) / 1e12,
                         "gbps": moved / (med * 1e-3) / 1e9, "roofline_floor_ms": floor_ms,
                         "fraction_of_roofline": floor_ms / med})
    for row in rows:
        base = next(r for r in rows if r["provider"] == "linear" and r["phase"] == row["phase"])
        row["ratio_vs_linear"] = row["median_ms"] / base["median_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=4096, help="in = out")
    parser.add_argument("--ranks", default="16,64,256")
    parser.add_argument("--json", default=None, help="output JSON (default: results/spectral_linear_kernels_<device>.json)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device is visible; use --device cpu for a CPU run", file=sys.stderr)
        return 2
    device, dtype = args.device, getattr(torch, args.dtype)
    backends = [n for n in ("torch", "triton", "cuda") if backend_status(n, torch.device(device)).available]
    timed = _timer(device)
    ceilings = measure_ceilings(device, dtype, timed)
    rows = []
    for rank in map(int, args.ranks.split(",")):
        rows += bench_shape(device, dtype, args.tokens, args.features, args.features, rank, backends, timed, ceilings)
    for r in rows:
        print(f"k={r['k']:<4} {r['provider']:<16} {r['phase']:<17} {r['median_ms']:9.3f} ms  "
              f"{r['tflops']:7.2f} TFLOP/s  {r['fraction_of_roofline']:.2f} of roofline  {r['ratio_vs_linear']:.3f}× linear")
    out = Path(args.json or Path(__file__).resolve().parent / "results" / f"spectral_linear_kernels_{device.split(':')[0]}.json")
    out.write_text(json.dumps({"environment": environment(device), "dtype": args.dtype, "ceilings": ceilings,
                               "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
