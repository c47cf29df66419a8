"""Adapter banks: throughput of one mixed-task batch against a single-adapter batch, a loop over
adapters, and peft LoRA's mixed batch (``model(x, adapter_names=[...])``) at equal rank.

A two-layer MLP (hidden 512, both layers adapted, rank 16) runs inference batches of B samples ×
S tokens; each sample names one of N adapters (round robin, so min(N, B) distinct per batch).
For each N in {1, 8, 64, 512}:

* ``spectral_single``: the batch with one adapter (the baseline a mixed batch is compared with);
* ``spectral_mixed``:  the batch under ``sk.adapter_batch`` (one bank [n, k] per layer);
* ``spectral_loop``:   one call per distinct adapter on its samples (set_adapter between);
* ``peft_mixed``:      peft LoRA (r = rank) with N adapters, ``adapter_names=`` per sample;
* ``peft_single``:     peft LoRA, the same batch with one adapter.

Memory per adapter: the trainable tensors one adapter adds (spectral: k per layer; LoRA:
r·(in + out) per layer), in bytes (float32).

    python benchmarks/bench_adapter_banks.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/bench_adapter_banks.py --quick    # smaller, for a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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


def _time(fn, reps: int) -> float:
    """Fastest of ``reps`` calls after two warm-up calls (the CPU is shared: the minimum is the
    least disturbed)."""
    with torch.no_grad():
        fn()
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def _names(n: int, batch: int) -> list[str]:
    return [f"t{i % n}" for i in range(batch)]


def spectral_model(d: int, rank: int, n: int) -> nn.Module:
    torch.manual_seed(0)
    model = MLP(d)
    sk.adapt(model, sk.SpectralConfig(target_modules=["fc1", "fc2"], rank=rank, backend="torch"), verbose=False)
    for i in range(n):
        sk.add_adapter(model, f"t{i}")
        with torch.no_grad():
            for p in sk.adapter_parameters(model, f"t{i}"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def peft_model(d: int, rank: int, n: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(MLP(d), cfg, adapter_name="t0")
    for i in range(1, n):
        model.add_adapter(f"t{i}", cfg)
    return model.eval()


def bench(d: int, rank: int, batch: int, seq: int, ns: list[int], reps: int) -> list[dict]:
    rows = []
    x = torch.randn(batch, seq, d)
    for n in ns:
        names = _names(n, batch)
        distinct = list(dict.fromkeys(names))
        sm = spectral_model(d, rank, n)
        sk.set_adapter(sm, "t0")
        row = {"adapters": n, "distinct_in_batch": len(distinct), "tokens": batch * seq}
        row["spectral_single_ms"] = 1e3 * _time(lambda: sm(x), reps)

        def mixed():
            with sk.adapter_batch(sm, names):
                return sm(x)

        row["spectral_mixed_ms"] = 1e3 * _time(mixed, reps)
        groups = {a: [i for i, m in enumerate(names) if m == a] for a in distinct}
        xs = {a: x[idx] for a, idx in groups.items()}

        def loop():
            for a in distinct:
                sk.set_adapter(sm, a)
                sm(xs[a])

        row["spectral_loop_ms"] = 1e3 * _time(loop, reps)
        sk.set_adapter(sm, "t0")
        try:
            pm = peft_model(d, rank, n)
            row["peft_single_ms"] = 1e3 * _time(lambda: pm(x), reps)
            row["peft_mixed_ms"] = 1e3 * _time(lambda: pm(x, adapter_names=names), reps)
            del pm
        except ImportError as exc:  # peft is in the bench extra
            row["peft_error"] = repr(exc)
        row["mixed_over_single"] = row["spectral_mixed_ms"] / row["spectral_single_ms"]
        if "peft_mixed_ms" in row:
            row["peft_mixed_over_single"] = row["peft_mixed_ms"] / row["peft_single_ms"]
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
    ap.add_argument("--out", default=str(HERE / "results" / "adapter_banks_cpu.json"))
    args = ap.parse_args()
    d, rank, batch, seq, reps = (128, 8, 16, 8, 3) if args.quick else (512, 16, 64, 16, 7)
    ns = [1, 8, 64, 512]
    rows = bench(d, rank, batch, seq, ns, reps)
    layers = 2
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    result = {
        "benchmark": "adapter_banks",
        "device": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "spectral_kernels": sk.__version__, "peft": peft_version,
                     "python": platform.python_version()},
        "commit": _commit(),
        "shape": {"d_in": d, "d_out": d, "layers": layers, "rank": rank, "batch": batch, "seq": seq},
        "bytes_per_adapter": {"spectral": layers * rank * 4, "lora": layers * rank * (d + d) * 4},
        "rows": rows,
        "mixed_within_1.1x_single_for_every_n": all(r["mixed_over_single"] <= 1.1 for r in rows),
    }
    if not args.quick or args.out != ap.get_default("out"):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
