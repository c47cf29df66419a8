"""The mode-and-learning-rate study: every method, both tasks, a learning-rate sweep, three seeds.

Phases (each a list of runs, one process each, ``--workers`` at a time, one thread per run; every
finished run is appended to ``runs.jsonl`` at once and a rerun skips what is there, so the study
resumes where it stopped):

  lr      seed 0, 300 steps, the three learning rates of ``LR_GRID`` per method; evaluations on the
          validation and test sets every 100 steps
  seeds   seeds 1 and 2 at each (task, method)'s best learning rate, chosen by the validation
          accuracy of the ``lr`` phase at step 300 (the test set is never used to choose); not for
          the methods of ``long``, whose long runs hold the step-300 evaluation
  long    the top-k "scale" and "shift" runs (loss still falling at 300 steps in the first sweep)
          continued to ``--long-steps`` at their best learning rate, seeds 0-2, evaluated every 150
          steps; the warm-up is a fixed number of steps, so a long run's first 300 steps are the
          300-step run's
  large   full fine-tuning with a large update (lr ``--large-lr``, ``--large-steps``), seed 0,
          weights saved for analyze_full_ft.py --suffix full_large (full_large<steps> if not 300)

Every run: AdamW (weight decay 0), linear warm-up over 30 steps, then a constant learning rate;
batch 16, max 48 tokens, 2000 training / 500 validation / 1000 test examples (balanced, drawn once).
The tables come from report.py.

    python benchmarks/adaptation/sweep.py                      # every phase (~1.5 h on 2 CPU cores)
    python benchmarks/adaptation/sweep.py --phases lr --tasks movies
    python benchmarks/adaptation/report.py                     # tables and plots
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import METHODS, TASKS, RunConfig, add_child_args, environment, run_children, serve_child, train  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "sweep"
# Three learning rates per method, spaced ~2-2.5x around the first sweep's choice. "shift" moves a
# singular value by ≈ lr per Adam step, "scale" by ≈ s_i·lr, so shift's grid sits higher.
LR_GRID = {
    "full": (2e-5, 5e-5, 1e-4),
    "lora": (5e-4, 1e-3, 2e-3),
    "scale": (2e-3, 5e-3, 1e-2),
    "shift": (5e-3, 1e-2, 2e-2),
    "scale_full": (1e-3, 2e-3, 5e-3),
    "shift_full": (2e-3, 5e-3, 1e-2),
    "speclora": (5e-4, 1e-3, 2e-3),
    "speclora_pg": (5e-4, 1e-3, 2e-3),
}
LONG_METHODS = ("scale", "shift")
SPECLORA_PG_RATIO = 5.0  # coefficient lr / LoRA-pair lr of speclora_pg (from diagnose_speclora.py)


def run_key(spec: dict) -> str:
    """What identifies a run (a job spec or a result row; RunConfig's defaults fill the gaps)."""
    full = {**vars(RunConfig(task="", method="", lr=0.0)), **spec}
    return "|".join(str(full.get(k)) for k in ("task", "method", "lr", "seed", "steps", "coeff_lr_ratio", "save_weights"))


def load_runs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_lr(runs: list[dict], task: str, method: str, steps: int = 300) -> float | None:
    """The learning rate of the seed-0 run with the highest validation accuracy at ``steps`` (among
    the sweep's runs: the large-update runs of phase ``large`` do not count)."""
    best = None
    for r in runs:
        if r.get("task") == task and r.get("method") == method and r.get("seed") == 0 and "evals" in r \
                and not r.get("save_weights"):  # the large-update runs are not candidates
            at = [e for e in r["evals"] if e["step"] == steps]
            if at and (best is None or at[0]["val_acc"] > best[0]):
                best = (at[0]["val_acc"], r["lr"])
    return None if best is None else best[1]


def child(spec: dict) -> dict:
    save = spec.pop("save_weights", None)
    cfg = RunConfig(**spec)
    row = train(cfg)
    model = row.pop("_model")
    if save:
        from safetensors.torch import save_file

        Path(save).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in model.encoder.state_dict().items()}, save)
        row["save_weights"] = save
    return row


def plan(phase: str, args, runs: list[dict]) -> list[dict]:
    base = {"svd_cache_dir": args.svd_cache_dir, "threads": 1}
    jobs = []
    for task in args.tasks.split(","):
        for method in args.methods.split(","):
            extra = {"coeff_lr_ratio": SPECLORA_PG_RATIO} if method == "speclora_pg" else {}
            if phase == "lr":
                jobs += [{"task": task, "method": method, "lr": lr, "seed": 0, **extra, **base} for lr in LR_GRID[method]]
            elif phase in ("seeds", "long"):
                lr = best_lr(runs, task, method)
                if lr is None:
                    print(f"{phase}: no lr-phase result for {task}/{method}; run --phases lr first", file=sys.stderr)
                    continue
                if phase == "seeds":
                    if method not in LONG_METHODS:  # their long runs hold the step-300 evaluation
                        jobs += [{"task": task, "method": method, "lr": lr, "seed": s, **extra, **base} for s in (1, 2)]
                elif method in LONG_METHODS:
                    jobs += [{"task": task, "method": method, "lr": lr, "seed": s, "steps": args.long_steps,
                              "eval_every": 150, **extra, **base} for s in (0, 1, 2)]
        if phase == "large":
            name = "full_large" + ("" if args.large_steps == 300 else str(args.large_steps))
            jobs.append({"task": task, "method": "full", "lr": args.large_lr, "seed": 0, "steps": args.large_steps,
                         **base, "save_weights": str(Path(args.weights) / f"{task}_{name}.safetensors")})
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default="lr,seeds,long,large")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--long-steps", type=int, default=600)
    ap.add_argument("--large-lr", type=float, default=5e-4)
    ap.add_argument("--large-steps", type=int, default=300, help="weights: <task>_full_large[<steps>].safetensors")
    ap.add_argument("--weights", default="/tmp/repro/weights", help="where the large-update weights go")
    ap.add_argument("--out", default=str(RESULTS / "runs.jsonl"))
    ap.add_argument("--dry-run", action="store_true", help="list the runs a phase would start")
    add_child_args(ap)
    args = ap.parse_args(argv)
    if serve_child(args, child):
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "environment.json").write_text(json.dumps(
        {**environment(), "command": "python benchmarks/adaptation/sweep.py " + " ".join(argv or sys.argv[1:])}, indent=1))
    for phase in args.phases.split(","):
        runs = load_runs(out)
        done = {run_key(r) for r in runs if "error" not in r}
        jobs = [j for j in plan(phase, args, runs) if run_key(j) not in done]
        # the longest first, so that the workers finish together
        jobs.sort(key=lambda j: -(j.get("steps", 300) * (3 if j["task"] == "tweets" else 1) * (2 if j["method"] == "full" else 1)))
        print(f"phase {phase}: {len(jobs)} runs", flush=True)
        if args.dry_run:
            for j in jobs:
                print("  ", j)
            continue

        def record(i, row, jobs=jobs, phase=phase):
            row["phase"] = phase
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if "error" in row:
                print(f"  FAILED {jobs[i]}\n{row['error'][-1500:]}", file=sys.stderr, flush=True)
            else:
                print(f"  {row['task']:7s} {row['method']:11s} lr {row['lr']:<7g} seed {row['seed']} steps {row['steps']:5d} "
                      f"val {row['val_acc']:.3f} test {row['test_acc']:.3f} loss {row['train_loss_first10']:.3f}->"
                      f"{row['train_loss_last10']:.3f} step {1e3 * row['step_time_s']:.0f} ms wall {row['wall_s']:.0f} s",
                      flush=True)

        run_children(__file__, jobs, args.workers, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
