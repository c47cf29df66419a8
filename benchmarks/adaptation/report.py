"""Tables and plots of the mode-and-learning-rate study (sweep.py's runs.jsonl).

    python benchmarks/adaptation/report.py     # -> results/sweep/summary.md, summary.json, PNGs

- the learning-rate sweep (seed 0): validation / test accuracy at 300 steps per learning rate,
  the chosen one (highest validation accuracy) marked;
- equal steps: test accuracy at 300 steps at the chosen learning rate, mean ± std over the seeds
  (sample std, n - 1), with the training loss and the median step time;
- the long runs: test accuracy and training loss at 300, 600, ... steps;
- equal wall time: each method's test accuracy at its last evaluation within a training-time budget
  (two budgets: the fastest method's 300 steps, and full fine-tuning's 300 steps).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import LR_GRID, RESULTS, best_lr, load_runs  # noqa: E402

ORDER = ("full", "lora", "scale", "shift", "scale_full", "shift_full", "speclora", "speclora_pg")


def ms(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f} (n=1)"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def eval_at(run: dict, step: int) -> dict | None:
    at = [e for e in run["evals"] if e["step"] == step]
    return at[0] if at else None


def loss_window(run: dict, step: int, width: int = 50) -> float:
    xs = run["losses"][max(0, step - width):step]
    return sum(xs) / len(xs)


def chosen_runs(runs: list[dict], task: str, method: str) -> tuple[float | None, list[dict]]:
    """(chosen lr, the runs at it with >= 300 steps: one per seed, the longest kept)."""
    lr = best_lr(runs, task, method)
    by_seed: dict[int, dict] = {}
    for r in runs:
        if r.get("task") == task and r.get("method") == method and r.get("lr") == lr and "evals" in r \
                and not r.get("save_weights") and eval_at(r, 300):
            if r["seed"] not in by_seed or r["steps"] > by_seed[r["seed"]]["steps"]:
                by_seed[r["seed"]] = r
    return lr, [by_seed[s] for s in sorted(by_seed)]


def lr_phase_step_time(runs: list[dict], task: str, method: str, lr: float) -> float | None:
    """Median step time (s) of the seed-0, 300-step run at ``lr``: every such run ran in the sweep's
    first phase under the same load (two runs at a time), unlike later runs that may have shared the
    machine with a third process; the equal-wall-time comparison uses these."""
    for r in runs:
        if r["task"] == task and r["method"] == method and r["lr"] == lr and r["seed"] == 0 and r["steps"] == 300 \
                and not r.get("save_weights"):
            return r["step_time_s"]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(RESULTS / "runs.jsonl"))
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    runs = [r for r in load_runs(Path(args.runs)) if "error" not in r]
    out = Path(args.out)
    env = json.loads((Path(args.runs).parent / "environment.json").read_text()) if (Path(args.runs).parent / "environment.json").exists() else {}
    tasks = [t for t in ("movies", "tweets") if any(r["task"] == t for r in runs)]
    methods = [m for m in ORDER if any(r["method"] == m for r in runs)]
    md = [f"# Mode and learning-rate study ({env.get('device', '?')}; torch {env.get('torch', '?')}, "
          f"transformers {env.get('transformers', '?')}, peft {env.get('peft', '?')}; commit {env.get('commit', '?')})", "",
          "Made by `python benchmarks/adaptation/report.py` from `runs.jsonl` (`benchmarks/adaptation/sweep.py`). "
          "One thread per run, two runs at a time on the machine's 2 cores.", ""]
    summary: dict = {"environment": env, "tasks": {}}

    md += ["## Learning-rate sweep (seed 0, 300 steps): validation / test accuracy", ""]
    for task in tasks:
        md += [f"**{task}**", "", "| method | lr₁ | lr₂ | lr₃ | chosen lr |", "|---|---|---|---|---|"]
        for m in methods:
            cells = []
            for lr in LR_GRID[m]:
                rs = [r for r in runs if r["task"] == task and r["method"] == m and r["lr"] == lr and r["seed"] == 0
                      and not r.get("save_weights") and eval_at(r, 300)]
                if rs:
                    e = eval_at(rs[0], 300)
                    flag = " (diverged)" if rs[0].get("diverged") else ""
                    cells.append(f"{lr:g}: {e['val_acc']:.3f} / {e['test_acc']:.3f}{flag}")
                else:
                    cells.append(f"{lr:g}: –")
            b = best_lr(runs, task, m)
            edge = " (grid edge)" if b in (LR_GRID[m][0], LR_GRID[m][-1]) else ""
            md.append(f"| {m} | " + " | ".join(cells) + f" | {b:g}{edge} |" if b else f"| {m} | " + " | ".join(cells) + " | – |")
        md.append("")

    md += ["## Equal steps (300) at the chosen learning rate, seeds 0-2", "",
           "| task | method | lr | test acc | val acc | train loss (steps 251-300) | step time (ms, median, seed 0) | trainable | seeds |",
           "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        summary["tasks"][task] = {}
        for m in methods:
            lr, rs = chosen_runs(runs, task, m)
            if not rs:
                continue
            test = [eval_at(r, 300)["test_acc"] for r in rs]
            val = [eval_at(r, 300)["val_acc"] for r in rs]
            loss = [loss_window(r, 300) for r in rs]
            t0 = lr_phase_step_time(runs, task, m, lr)
            step_ms = 1e3 * (t0 if t0 else statistics.median(r["step_time_s"] for r in rs))
            summary["tasks"][task][m] = {"lr": lr, "test_acc_300": test, "val_acc_300": val, "train_loss_300": loss,
                                         "step_time_ms": step_ms, "trainable": rs[0]["trainable"],
                                         "seeds": [r["seed"] for r in rs]}
            md.append(f"| {task} | {m} | {lr:g} | {ms(test)} | {ms(val)} | {ms(loss)} | {step_ms:.1f} | "
                      f"{rs[0]['trainable']:,} | {len(rs)} |")
    md.append("")

    long = [r for r in runs if r["steps"] > 300 and not r.get("save_weights")]
    if long:
        md += ["## Long runs (chosen learning rate, seeds 0-2): test accuracy / training loss (mean of the 50 steps before)", ""]
        for task in tasks:
            for m in methods:
                rs = [r for r in long if r["task"] == task and r["method"] == m]
                if not rs:
                    continue
                steps = sorted({e["step"] for r in rs for e in r["evals"] if e["step"] % 300 == 0})
                if not md[-1].startswith("|"):
                    md += ["| task | method | lr | " + " | ".join(f"step {s}" for s in steps) + " |",
                           "|---|---|---|" + "---|" * len(steps)]
                cells = []
                for s in steps:
                    acc = [eval_at(r, s)["test_acc"] for r in rs if eval_at(r, s)]
                    lo = [loss_window(r, s) for r in rs if len(r["losses"]) >= s]
                    cells.append(f"{ms(acc)} / {statistics.mean(lo):.3f}")
                summary["tasks"][task].setdefault(m, {})["long"] = {
                    str(s): [eval_at(r, s)["test_acc"] for r in rs if eval_at(r, s)] for s in steps}
                md.append(f"| {task} | {m} | {rs[0]['lr']:g} | " + " | ".join(cells) + " |")
        md.append("")

    md += ["## Equal wall time: test accuracy at the last evaluation within a training-time budget", "",
           "Training time of step s = s × the method's median step time (forward, backward, optimizer; no "
           "tokenisation or evaluation) in its seed-0 run of the learning-rate phase, where every run shared "
           "the machine with exactly one other; budgets per task.", ""]
    for task in tasks:
        times, per_step = {}, {}
        for m in methods:
            lr, rs = chosen_runs(runs, task, m)
            t = lr_phase_step_time(runs, task, m, lr) if rs else None
            if t:
                per_step[m] = t
                times[m] = 300 * t
        if not times:
            continue
        budgets = {"fastest method's 300 steps": min(times.values())}
        if "full" in times:
            budgets["full fine-tuning's 300 steps"] = times["full"]
        for bname, b in budgets.items():
            md += [f"**{task}, budget = {bname} ({b:.1f} s)**", "", "| method | test acc | steps reached |", "|---|---|---|"]
            for m in methods:
                _, rs = chosen_runs(runs, task, m)
                accs, steps = [], []
                if m not in per_step:
                    continue
                for r in rs:
                    ok = [e for e in r["evals"] if e["step"] * per_step[m] <= b * 1.02]
                    if ok:
                        accs.append(ok[-1]["test_acc"])
                        steps.append(ok[-1]["step"])
                if accs:
                    capped = " (all its steps)" if all(s == r["steps"] for s, r in zip(steps, rs)) and b > 1.05 * times[m] else ""
                    md.append(f"| {m} | {ms(accs)} | {'/'.join(map(str, steps))}{capped} |")
            md.append("")

    large = [r for r in runs if r.get("save_weights")]
    if large:
        md += ["## Large-update full fine-tuning (for the stability analysis)", "",
               "| task | lr | steps | test acc | train loss (last 50) | weights |", "|---|---|---|---|---|---|"]
        for r in large:
            md.append(f"| {r['task']} | {r['lr']:g} | {r['steps']} | {r['test_acc']:.3f} | {loss_window(r, r['steps']):.3f} | "
                      f"{Path(r['save_weights']).name} |")
        md.append("")

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(runs, tasks, methods, out)
    print("\n".join(md))
    return 0


def plot(runs, tasks, methods, out: Path) -> None:
    """Test accuracy against training time (mean over seeds at the chosen lr), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for m in methods:
            _, rs = chosen_runs(runs, task, m)
            if not rs:
                continue
            t = lr_phase_step_time(runs, task, m, rs[0]["lr"])
            if not t:
                continue
            steps = sorted({e["step"] for r in rs for e in r["evals"]})
            pts = []
            for s in steps:
                es = [eval_at(r, s) for r in rs if eval_at(r, s)]
                if len(es) == len(rs):
                    pts.append((s * t, statistics.mean(e["test_acc"] for e in es)))
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=m)
        ax.set_title(f"{task}: test accuracy vs training time (mean of seeds)")
        ax.set_xlabel("training time (s, 1 CPU thread)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
