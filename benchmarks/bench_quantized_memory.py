"""Peak memory of spectral fine-tuning on a 4-bit base vs peft LoRA (QLoRA), on CPU.

A Llama-style transformers model built from a config (random weights, no download) has every
attention and MLP projection replaced by a bitsandbytes ``Linear4bit`` (nf4, double quantisation,
blocksize 64, compute dtype float32); the embeddings, norms and lm_head stay float32. Each method
runs in its own process so that peaks do not mix; a sampling thread reads the process RSS every
2 ms and reports the peak of each phase:

    base   the quantized model (after the float model is freed)
    adapt  sk.adapt (dequantize + truncated SVD per layer, QUANT_SVD_CHUNK layers at a time) or
           peft get_peft_model
    train  a few AdamW steps (batch × seq tokens, causal LM loss)

Per-parameter overhead of the spectral adapter: every adapted layer [out, in] stores U [out, k] and
V [in, k] in the compute dtype plus s, c [k]: (in + out + 2)·k values, of which only c (k values)
is trained; peft LoRA at the same rank stores A [k, in] and B [out, k], (in + out)·k values, all
trained (with AdamW's two moments each).

    python benchmarks/bench_quantized_memory.py [--rank 16] [--steps 3]

writes benchmarks/results/quantized_memory_cpu.json and prints a table.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 1024 * 1024


class PeakRSS:
    """Samples the process RSS (psutil) every ``interval`` s; ``phase()`` returns the peak since the
    previous call and starts a new phase."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def phase(self) -> tuple[int, int]:
        """(peak RSS of the phase, RSS now), in bytes; the next phase starts at RSS now."""
        now = self.now()
        peak = max(self.peak, now)
        self.peak = now
        return peak, now

    def stop(self):
        self._stop = True
        self._t.join()


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def build_4bit_model(args):
    import torch
    from torch import nn
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    n_float = sum(p.numel() for p in model.parameters())
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Linear and child_name in TARGETS:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)
                q = q.to("cpu")
                setattr(mod, child_name, q)
                del child
    model.train()  # bitsandbytes repacks 4-bit weights for CPU inference in eval mode (inference only)
    return model, n_float


def run_one(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    meter = PeakRSS()
    start = meter.now()
    model, n_float = build_4bit_model(args)
    _trim()
    base_peak, base_now = meter.phase()
    if args.method == "spectral":
        import spectral_kernels as sk

        t0 = time.perf_counter()
        sk.adapt(model, sk.SpectralConfig(target_modules=TARGETS, rank=args.rank, progress=False))
    else:
        from peft import LoraConfig, get_peft_model

        t0 = time.perf_counter()
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                 lora_dropout=0.0))
    adapt_s = time.perf_counter() - t0
    _trim()
    adapt_peak, adapt_now = meter.phase()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    step_s = (time.perf_counter() - t0) / args.steps
    train_peak, _ = meter.phase()
    meter.stop()
    return {
        "method": args.method, "float_params": n_float, "trainable_params": trainable,
        "rss_start_mib": start / MIB, "base_rss_mib": base_now / MIB, "base_peak_mib": base_peak / MIB,
        "adapt_peak_mib": adapt_peak / MIB, "adapted_rss_mib": adapt_now / MIB,
        "train_peak_mib": train_peak / MIB, "adapt_s": adapt_s, "step_s": step_s, "losses": losses,
    }


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__, "commit": commit,
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["spectral", "lora"], help="run one method (internal)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "quantized_memory_cpu.json"))
    args = p.parse_args(argv)
    if args.method:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for method in ("spectral", "lora"):
        cmd = [sys.executable, os.path.abspath(__file__), "--method", method] + \
              [f"--{k}={getattr(args, k)}" for k in ("rank", "hidden", "intermediate", "layers", "vocab", "seq",
                                                      "batch", "steps", "threads")]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shapes = {"attn": (args.hidden, args.hidden), "gate/up": (args.hidden, args.intermediate),
              "down": (args.intermediate, args.hidden)}
    per_layer = {"spectral_stored": args.layers * (4 * (2 * args.hidden + 2) + 2 * (args.hidden + args.intermediate + 2)
                                                   + (args.intermediate + args.hidden + 2)) * args.rank,
                 "lora_stored": args.layers * (4 * 2 * args.hidden + 3 * (args.hidden + args.intermediate)) * args.rank}
    result = {"config": {k: getattr(args, k) for k in ("rank", "hidden", "intermediate", "layers", "vocab", "seq",
                                                       "batch", "steps", "threads")},
              "quantization": "bitsandbytes Linear4bit nf4, double quant, blocksize 64, compute float32; "
                              "targets " + ",".join(TARGETS),
              "shapes": shapes, "adapter_values": per_layer, "versions": versions(), "results": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{rows[0]['float_params'] / 1e6:.1f}M-parameter Llama-style model, 4-bit projections, rank {args.rank}, "
          f"batch {args.batch} x seq {args.seq}, {args.steps} steps")
    print(f"{'method':<10}{'base MiB':>10}{'adapt peak':>12}{'adapted':>10}{'train peak':>12}"
          f"{'trainable':>11}{'adapt s':>9}{'step s':>8}")
    for r in rows:
        print(f"{r['method']:<10}{r['base_rss_mib']:>10.0f}{r['adapt_peak_mib']:>12.0f}{r['adapted_rss_mib']:>10.0f}"
              f"{r['train_peak_mib']:>12.0f}{r['trainable_params']:>11,}{r['adapt_s']:>9.2f}{r['step_s']:>8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
