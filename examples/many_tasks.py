"""Many tasks on one base: adapters trained separately, served together in one mixed batch.

1. One pretrained base (here a random MLP standing in for it).
2. Each task is trained alone: a fresh copy of the base, ``sk.adapt``, a few hundred Adam steps on
   that task's data, ``sk.save_adapter`` -> ``task_i.safetensors`` (k coefficients per layer).
3. One serving model: the base adapted once, every task file loaded into a named slot
   (``sk.load_adapter(model, path, adapter="task_i")``), then one batch whose samples belong to
   different tasks runs in a single forward under ``sk.adapter_batch(model, names)``.

Tiny synthetic tasks, seconds on a CPU: task i's target is the base with its own random change of
spectrum (so a spectral adapter can fit it exactly).

    python examples/many_tasks.py [--tasks 4] [--steps 300]
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from torch import nn

import spectral_kernels as sk

D_IN, HIDDEN, D_OUT, RANK = 16, 32, 4, 4
CONFIG = sk.SpectralConfig(target_modules=["fc1", "fc2", "fc3"], rank=RANK, mode="scale", backend="torch")


class Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, D_OUT)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_task(base: nn.Module, seed: int) -> nn.Module:
    """The task's teacher: the base with a random change of its top-k spectrum."""
    teacher = sk.adapt(copy.deepcopy(base), CONFIG, verbose=False)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in sk.adapter_parameters(teacher):
            p.mul_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return teacher.eval()


def train_alone(base: nn.Module, teacher: nn.Module, steps: int, seed: int) -> tuple[nn.Module, float]:
    """Adapt a fresh copy of the base and fit the teacher; returns (model, final loss)."""
    torch.manual_seed(seed)
    model = sk.adapt(copy.deepcopy(base), CONFIG, verbose=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x = torch.randn(64, D_IN)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    base = Base().eval()
    names = [f"task{i}" for i in range(args.tasks)]
    teachers = {n: make_task(base, i) for i, n in enumerate(names)}

    with tempfile.TemporaryDirectory() as tmp:
        # 1. each task trained and saved alone
        alone = {}
        for i, n in enumerate(names):
            alone[n], loss = train_alone(base, teachers[n], args.steps, seed=i)
            info = sk.save_adapter(alone[n], os.path.join(tmp, f"{n}.safetensors"))
            print(f"{n}: trained alone, final mse {loss:.2e}, adapter {info.num_bytes / 1024:.1f} KiB "
                  f"({info.num_parameters} parameters)")

        # 2. one serving model: the base adapted once, every task in a named slot
        server = sk.adapt(copy.deepcopy(base), CONFIG, verbose=False).eval()
        for n in names:
            sk.load_adapter(server, os.path.join(tmp, f"{n}.safetensors"), adapter=n)
    print(f"serving model adapters: {sk.list_adapters(server)}")

    # 3. one mixed batch: sample i belongs to task i % tasks
    x = torch.randn(4 * args.tasks, D_IN)
    batch_names = [names[i % args.tasks] for i in range(x.shape[0])]
    with torch.no_grad(), sk.adapter_batch(server, batch_names):
        y = server(x)
    worst_diff = 0.0
    mse_task, mse_base = {}, {}
    with torch.no_grad():
        for n in names:
            rows = [i for i, m in enumerate(batch_names) if m == n]
            worst_diff = max(worst_diff, (y[rows] - alone[n](x[rows])).abs().max().item())
            mse_task[n] = nn.functional.mse_loss(y[rows], teachers[n](x[rows])).item()
            mse_base[n] = nn.functional.mse_loss(base(x[rows]), teachers[n](x[rows])).item()
    print(f"one mixed batch of {x.shape[0]} samples over {args.tasks} tasks: largest difference from each "
          f"task's own model {worst_diff:.1e}")
    for n in names:
        print(f"  {n}: mse to its task {mse_task[n]:.2e} (the base alone: {mse_base[n]:.2e})")
    return {"max_abs_diff": worst_diff, "mse_task": mse_task, "mse_base": mse_base}


if __name__ == "__main__":
    main()
