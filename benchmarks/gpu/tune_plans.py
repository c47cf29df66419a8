"""Measure the candidate plans and tile configurations of spectral_linear on a GPU (tuning data).

    python benchmarks/gpu/tune_plans.py --out OUTDIR

1. ``dense``: the Triton dense+low-rank kernel over a short list of tile configurations, forward
   (weight rows) and backward (weight transposed), T=8192, in=out=4096, bf16, k ∈ {16, 64},
   against cuBLAS x·Wᵀ in the same run; each configuration's result is checked against torch.
2. ``fold``: W' = W + (U ⊙ d)·Vᵀ by the Triton fold kernel (a few tiles) and by torch.addmm.
3. ``plans``: forward + backward of whole plans, through the backend functions on flattened
   tokens: triton:fused (the fused kernel), triton:fold (cuBLAS dense over the weight folded by
   the Triton kernel), torch (reference: cuBLAS, addmm fold), at k ∈ {16, 64, 256} and T ∈ {512, 2048, 8192}, with frozen
   nn.Linear (x·Wᵀ forward, dy·W backward) as the anchor.

Writes tune.json and summary_tune.md into OUTDIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from spectral_kernels.benchmarking import environment  # noqa: E402
from spectral_kernels.ops import reference as ref  # noqa: E402
from spectral_kernels.ops import spectral_linear_triton as tri  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rand(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(BF16)


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


DENSE_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M)
    (128, 128, 64, 8, 3, 8), (128, 128, 64, 4, 4, 8), (128, 256, 64, 8, 3, 8), (256, 128, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8), (128, 128, 128, 8, 3, 8), (64, 256, 64, 4, 4, 8), (128, 256, 32, 8, 4, 8),
    (128, 128, 64, 8, 4, 16), (256, 128, 64, 8, 4, 8),
]


def tune_dense(T=8192, n=4096) -> list[dict]:
    rows = []
    x, dy, W = rand(T, n), rand(T, n), rand(n, n, scale=n**-0.5)
    rows.append({"part": "dense", "config": "cublas x·Wᵀ", "fwd_ms": bench(lambda: x @ W.t()),
                 "bwd_ms": bench(lambda: dy @ W)})
    for k in (16, 64):
        U, V, d = rand(n, k, scale=k**-0.5), rand(n, k, scale=n**-0.5), rand(k)
        z = x @ V
        want_f = torch.addmm(x @ W.t(), z * d, U.t())
        want_b = torch.addmm(dy @ W, z * d, V.t())
        for cfg in DENSE_CONFIGS:
            bm, bn, bk, w, st, gm = cfg
            blocks = tri._Blocks(bm, bn, bk, w, st)
            row = {"part": "dense", "k": k, "config": list(cfg)}
            try:
                f = lambda: tri.dense_plus_lowrank(x, W, z, d, U, None, blocks=blocks, group_m=gm)  # noqa: E731
                b = lambda: tri.dense_plus_lowrank(dy, W, z, d, V, None, w_transposed=True, blocks=blocks, group_m=gm)  # noqa: E731
                row["err_fwd"], row["err_bwd"] = rel(f(), want_f), rel(b(), want_b)
                row["fwd_ms"], row["bwd_ms"] = bench(f), bench(b)
            except Exception as exc:  # e.g. out of shared memory: reported, not fatal
                row["error"] = repr(exc)[:200]
            rows.append(row)
            print(row, flush=True)
    return rows


def tune_fold(n=4096) -> list[dict]:
    rows = []
    W = rand(n, n, scale=n**-0.5)
    for k in (16, 64, 256):
        U, V, d = rand(n, k), rand(n, k), rand(k)
        want = torch.addmm(W, U * d, V.t())
        rows.append({"part": "fold", "k": k, "config": "torch.addmm", "ms": bench(lambda: torch.addmm(W, U * d, V.t()))})
        rows.append({"part": "fold", "k": k, "config": "triton", "ms": bench(lambda: tri.fold_weight(W, U, d, V)),
                     "err": rel(tri.fold_weight(W, U, d, V), want)})
    for r in rows:
        r["gbps"] = 2 * 2 * n * n / (r["ms"] * 1e-3) / 1e9
    return rows


def _triton(plan):
    return (lambda *a: tri.spectral_linear_fwd_triton(*a, plan=plan),
            lambda *a: tri.spectral_linear_bwd_triton(*a, plan=plan))


PLANS = {
    "triton:fused": _triton("fused"),
    "triton:fold": _triton("fold"),
    "torch": (ref.spectral_linear_fwd_ref, ref.spectral_linear_bwd_ref),
}


def tune_plans(n=4096) -> list[dict]:
    rows = []
    for T in (512, 2048, 8192):
        x, dy, W, b = rand(T, n), rand(T, n), rand(n, n, scale=n**-0.5), rand(n)
        lin = bench(lambda: (torch.addmm(b, x, W.t()), dy @ W))
        rows.append({"part": "plans", "T": T, "plan": "linear", "ms": lin})
        for k in (16, 64, 256):
            U, V, d = rand(n, k, scale=k**-0.5), rand(n, k, scale=n**-0.5), rand(k)
            want_y, want_z = ref.spectral_linear_fwd_ref(x, U, d, V, b, W)
            want = ref.spectral_linear_bwd_ref(dy, want_z, U, d, V, W)
            for name, (fwd, bwd) in PLANS.items():
                def run(fwd=fwd, bwd=bwd):
                    y, z = fwd(x, U, d, V, b, W)
                    return y, bwd(dy, z, U, d, V, W)
                y, (dx, dd, g) = run()
                ms = bench(run)
                rows.append({"part": "plans", "T": T, "k": k, "plan": name, "ms": ms, "ratio_vs_linear": ms / lin,
                             "err_y": rel(y, want_y), "err_dx": rel(dx, want[0]), "err_dd": rel(dd, want[1])})
                print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="plans,fold,dense")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_plans: no CUDA device is visible; nothing measured")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cuda")
    env["commit"] = os.environ.get("SK_COMMIT") or env.get("commit")
    rows = []
    for part in args.parts.split(","):
        t0 = time.time()
        rows += {"dense": tune_dense, "fold": tune_fold, "plans": tune_plans}[part]()
        print(f"{part}: {time.time() - t0:.0f} s", flush=True)
        (out / "tune.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    lines = []
    for r in rows:
        lines.append("| " + " | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()) + " |")
    (out / "summary_tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
