"""adapt()'s SVD split across ranks: time of adapt() on one process against 2 gloo ranks (CPU).

    python benchmarks/bench_distributed_svd.py [--layers 16] [--width 768] [--rank 32] [--repeats 3]

A synthetic model of ``--layers`` nn.Linear(width, width) layers, all adapted at ``--rank``. Every
process uses one thread, so 2 ranks use the 2 cores a single 2-thread process would; the single
process is also timed with 2 threads. Times are medians of ``--repeats`` runs of adapt() on a
fresh model (the process group is created once, outside the timing). Results:
benchmarks/results/distributed_svd_cpu.json (device, versions, commit).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectral_kernels.benchmarking import environment  # noqa: E402
from spectral_kernels.tuning import SpectralConfig, adapt  # noqa: E402


def _model(layers: int, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def _time_adapt(args) -> list[float]:
    times = []
    for _ in range(args.repeats):
        model = _model(args.layers, args.width)
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        adapt(model, SpectralConfig(target_modules="all-linear", rank=args.rank, progress=False),
              distributed=dist.is_initialized())
        if dist.is_initialized():
            dist.barrier()
        times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, port: int, out: str, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        times = _time_adapt(args)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "distributed_svd_cpu.json"))
    args = ap.parse_args(argv)
    rows = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rows[f"1 process, {threads} thread(s)"] = _time_adapt(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(port, out, args), nprocs=2, join=True)
        rows["2 gloo ranks, 1 thread each"] = json.loads(Path(out).read_text())
    medians = {k: statistics.median(v) for k, v in rows.items()}
    base = medians["1 process, 1 thread(s)"]
    report = {"environment": environment("cpu"), "layers": args.layers, "width": args.width, "rank": args.rank,
              "seconds": rows, "median_s": medians, "speedup_vs_1_thread": {k: base / v for k, v in medians.items()}}
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    for k, v in medians.items():
        print(f"{k:<30} {v:7.3f} s   speed-up vs 1 process 1 thread: {base / v:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
