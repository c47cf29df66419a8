"""Adapter banks: throughput of one mixed-task batch against a single-adapter batch, a loop over
adapters, and peft LoRA's mixed batch (``model(x, adapter_names=[...])``) at equal rank.

A two-layer MLP (hidden 512, both layers adapted, rank 16) runs inference batches of B samples ×
S tokens; each sample names one of N adapters (round robin, so min(N, B) distinct per batch).
For each N in {1, 8, 64, 512}:

* ``spectral_single``: the batch with one adapter (the baseline a mixed batch is compared with);
* ``spectral_mixed``:  the batch under ``sk.adapter_batch`` (one bank [n, k] per layer);
* ``spectral_loop``:   one call per distinct adapter on its samples (set_adapter between);
* ``peft_mixed``:      peft LoRA (r = rank) with N adapters, ``adapter_names=`` per sample;
* ``peft_single``:     peft LoRA, the same batch with one adapter;
* ``train_single`` / ``train_mixed``: a training step (forward, backward of the output's sum into
  the coefficients) with one adapter / under ``sk.adapter_batch`` (peft refuses
  ``adapter_names=`` in training, so it has no training rows).

Timings are medians of interleaved rounds (each round calls every variant once), so that a
disturbance of a shared CPU lands on all variants alike.

Memory per adapter: the trainable tensors one adapter adds (spectral: k per layer; LoRA:
r·(in + out) per layer), in bytes (float32).

On a GPU (``--device cuda``) the spectral rows repeat for each backend of ``--backends`` (the
layers' ``backend``: torch gathers + cuBLAS, triton's fused bank plan, cuda's decode / mma bank
plans) and every timing synchronises the device; ``--batch 16 --seq 1`` puts each layer's call in
the decode plan's range (T = 16).

    python benchmarks/bench_adapter_banks.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_adapter_banks.py --quick    # smaller, for a smoke run
    python benchmarks/bench_adapter_banks.py --device cuda --dtype bfloat16 \
        --backends torch,triton,cuda --out results/adapter_banks_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

import spectral_kernels as sk

HERE = Path(__file__).resolve().parent


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _time(fns: dict, reps: int, device: torch.device = torch.device("cpu"), grad: bool = False) -> dict:
    """{name: (fastest ms, median ms)} of ``reps`` rounds after two warm-up rounds. Each round
    calls every function once, in turn, so that a disturbance of the shared CPU (or a clock
    change) lands on all of them alike; ratios are taken of medians. On CUDA each call is timed
    from a synchronised device to its end. ``grad``: run with autograd on (training steps)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    with torch.set_grad_enabled(grad):
        for round_ in range(reps + 2):
            for name, fn in fns.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * min(t), 1e3 * statistics.median(t)) for name, t in times.items()}


def _names(n: int, batch: int) -> list[str]:
    return [f"t{i % n}" for i in range(batch)]


def spectral_model(d: int, rank: int, n: int, backend: str = "torch", device="cpu", dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(d)
    sk.adapt(model, sk.SpectralConfig(target_modules=["fc1", "fc2"], rank=rank, backend=backend), verbose=False)
    for i in range(n):
        sk.add_adapter(model, f"t{i}")
        with torch.no_grad():
            for p in sk.adapter_parameters(model, f"t{i}"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(device=device, dtype=dtype).eval()


def peft_model(d: int, rank: int, n: int, device="cpu", dtype=torch.float32) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(MLP(d), cfg, adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", cfg)
    return model.to(device=device, dtype=dtype).eval()


def bench(d: int, rank: int, batch: int, seq: int, ns: list[int], reps: int, *, backends=("torch",),
          device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
          train: bool = True) -> list[dict]:
    """One row per (N, backend); peft is timed once per N and repeated in each of its rows.
    Inference rows: forward only, autograd off. ``train``: also a training step (forward, then
    backward of the output's sum into the coefficients; x needs no gradient)."""
    rows = []
    x = torch.randn(batch, seq, d).to(device=device, dtype=dtype)
    for n in ns:
        names = _names(n, batch)
        distinct = list(dict.fromkeys(names))
        groups = {a: [i for i, m in enumerate(names) if m == a] for a in distinct}
        xs = {a: x[idx] for a, idx in groups.items()}
        peft_row = {}
        try:
            pm = peft_model(d, rank, n, device, dtype)
            t = _time({"single": lambda: pm(x), "mixed": lambda: pm(x, adapter_names=names)}, reps, device)
            peft_row["peft_single_ms"], peft_row["peft_mixed_ms"] = t["single"][1], t["mixed"][1]
            peft_row["peft_mixed_over_single"] = peft_row["peft_mixed_ms"] / peft_row["peft_single_ms"]
            del pm
        except ImportError as exc:  # peft is in the bench extra
            peft_row["peft_error"] = repr(exc)
        for backend in backends:
            sm = spectral_model(d, rank, n, backend, device, dtype)
            sk.set_adapter(sm, "t0")
            row = {"adapters": n, "backend": backend, "distinct_in_batch": len(distinct), "tokens": batch * seq}

            def mixed():
                with sk.adapter_batch(sm, names):
                    return sm(x)

            def loop():
                for a in distinct:
                    sk.set_adapter(sm, a)
                    sm(xs[a])
                sk.set_adapter(sm, "t0")

            t = _time({"single": lambda: sm(x), "mixed": mixed, "loop": loop}, reps, device)
            for key, (fastest, median) in t.items():
                row[f"spectral_{key}_ms"] = median
                row[f"spectral_{key}_fastest_ms"] = fastest
            row["mixed_over_single"] = row["spectral_mixed_ms"] / row["spectral_single_ms"]
            if train:
                def train_single():
                    sm(x).sum().backward()

                def train_mixed():
                    with sk.adapter_batch(sm, names):
                        sm(x).sum().backward()

                t = _time({"single": train_single, "mixed": train_mixed}, reps, device, grad=True)
                row["train_single_ms"], row["train_mixed_ms"] = t["single"][1], t["mixed"][1]
                row["train_mixed_over_single"] = row["train_mixed_ms"] / row["train_single_ms"]
                sm.zero_grad(set_to_none=True)
            row.update(peft_row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
            del sm
    return rows


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backends", default="torch", help="comma-separated spectral backends (torch,triton,cuda)")
    ap.add_argument("--batch", type=int, default=None, help="samples per batch (default 64; 16 with --quick)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default 16; 8 with --quick)")
    ap.add_argument("--no-train", action="store_true", help="inference rows only (no training step)")
    ap.add_argument("--out", default=None, help="JSON path (default results/adapter_banks_<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_adapter_banks: --device cuda but no CUDA device is visible")
    dtype = getattr(torch, args.dtype)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    default_out = str(HERE / "results" / f"adapter_banks_{device.type}.json")
    out = args.out or default_out
    d, rank, batch, seq, reps = (128, 8, 16, 8, 3) if args.quick else (512, 16, 64, 16, 15)
    batch = args.batch or batch
    seq = args.seq or seq
    ns = [1, 8, 64, 512]
    rows = bench(d, rank, batch, seq, ns, reps, backends=backends, device=device, dtype=dtype, train=not args.no_train)
    layers = 2
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    result = {
        "benchmark": "adapter_banks",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "cpu_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "backends": backends,
        "versions": {"torch": torch.__version__, "spectral_kernels": sk.__version__, "peft": peft_version,
                     "python": platform.python_version(), "cuda": torch.version.cuda if device.type == "cuda" else None},
        "commit": _commit(),
        "shape": {"d_in": d, "d_out": d, "layers": layers, "rank": rank, "batch": batch, "seq": seq},
        "bytes_per_adapter": {"spectral": layers * rank * dtype.itemsize, "lora": layers * rank * (d + d) * dtype.itemsize},
        "rows": rows,
        "timing": f"median of {reps} interleaved rounds after 2 warm-up rounds (fastest also kept)",
        "mixed_within_1.1x_single_for_every_n": {
            b: all(r["mixed_over_single"] <= 1.1 for r in rows if r["backend"] == b) for b in backends},
        "train_mixed_within_1.1x_single_for_every_n": {
            b: all(r["train_mixed_over_single"] <= 1.1 for r in rows if r["backend"] == b) for b in backends}
        if not args.no_train else None,
    }
    if not args.quick or args.out is not None:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
