"""What moves when SpecLoRA trains: per-step update sizes of its two parts, against LoRA and "scale".

For each adapted encoder linear (36 on MiniLM-L6) and every optimizer step t, with U, V orthonormal:

    spectral part   ΔW_spec(t) = U·diag(s ⊙ (c_t − c_{t−1}))·Vᵀ     ‖ΔW_spec(t)‖_F = ‖s ⊙ Δc‖₂
    LoRA part       ΔW_lora(t) = (α/r)·(B_t·A_t − B_{t−1}·A_{t−1})   (SpecLoRA's pair, or peft's)

and the distance travelled from the base, ‖U·diag(s⊙(c_t − 1))·Vᵀ‖_F and ‖(α/r)·B_t·A_t‖_F.
Reported per step as the model-wide norm (√ of the sum of squares over the layers), relative to the
model-wide ‖W‖_F, and the largest single-direction move s_i·|Δc_i|.

Variants (one process each; seed and task by flag): the candidate causes of SpecLoRA's poor training
(docs/FINDINGS.md, first sweep): the shared learning rate (speclora and lora at 1e-3 and 2e-3),
the s-scaled coefficient step (scale alone, for the spectral part's size), α/r (speclora with α = 8,
α/r = 1), and the fix (speclora_pg: LoRA pair and head at lr, coefficients at lr × ratio).

    python benchmarks/adaptation/diagnose_speclora.py                   # movies, seed 0, 300 steps
    python benchmarks/adaptation/diagnose_speclora.py --task tweets --seeds 0,1
    python benchmarks/adaptation/diagnose_speclora.py --report          # table + PNG of the JSON again
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RunConfig, add_child_args, build_model, environment, run_children, serve_child, train  # noqa: E402

HERE = Path(__file__).resolve().parent
# name: (method, lr, extra RunConfig fields)
VARIANTS = {
    "speclora_lr2e-3": ("speclora", 2e-3, {}),
    "speclora_lr1e-3": ("speclora", 1e-3, {}),
    "lora_lr2e-3": ("lora", 2e-3, {}),
    "lora_lr1e-3": ("lora", 1e-3, {}),
    "scale_lr2e-3": ("scale", 2e-3, {}),
    "speclora_alpha8_lr2e-3": ("speclora", 2e-3, {"lora_alpha": 8.0}),
    "speclora_pg_lr1e-3_x5": ("speclora_pg", 1e-3, {"coeff_lr_ratio": 5.0}),
}


class UpdateMeter:
    """Records the per-step update sizes of the spectral coefficients and of the LoRA pairs."""

    def __init__(self, model, identity: float, every_after: int = 50, stride: int = 5):
        from spectral_kernels.nn.speclora import SpecLoRALinear
        from spectral_kernels.tuning import spectral_layers

        self.identity = identity  # c₀: 1 for "scale" (and SpecLoRA), 0 for "shift"
        self.every_after, self.stride = every_after, stride
        self.spec, self.lora = [], []  # (s, coeffs param) ; (A param, B param, scaling)
        w2 = 0.0
        for layer in spectral_layers(model).values():
            self.spec.append((layer.s.detach().double(), layer.coeffs))
            w2 += float(layer.weight.detach().double().pow(2).sum())
            if isinstance(layer, SpecLoRALinear):
                self.lora.append((layer.lora_A, layer.lora_B, layer.scaling))
        for name, mod in model.named_modules():  # peft LoRA layers
            if hasattr(mod, "lora_A") and hasattr(mod, "base_layer") and "default" in getattr(mod, "lora_A", {}):
                self.lora.append((mod.lora_A["default"].weight, mod.lora_B["default"].weight, mod.scaling["default"]))
                w2 += float(mod.base_layer.weight.detach().double().pow(2).sum())
        self.w_norm = w2 ** 0.5
        self.prev_c = [c.detach().double().clone() for _, c in self.spec]
        self.prev_ba = [self._ba(A, B, sc) for A, B, sc in self.lora]
        self.rows = []

    @staticmethod
    def _ba(A, B, scaling):
        return scaling * (B.detach().double() @ A.detach().double())

    def __call__(self, step, model, loss):
        spec_step2 = spec_tot2 = lora_step2 = lora_tot2 = 0.0
        top_move = 0.0
        for i, (s, c) in enumerate(self.spec):
            cd = c.detach().double()
            move = s * (cd - self.prev_c[i])
            spec_step2 += float(move.pow(2).sum())
            top_move = max(top_move, float(move.abs().max()))
            spec_tot2 += float((s * (cd - self.identity)).pow(2).sum())
            self.prev_c[i] = cd.clone()
        for i, (A, B, sc) in enumerate(self.lora):
            ba = self._ba(A, B, sc)
            lora_step2 += float((ba - self.prev_ba[i]).pow(2).sum())
            lora_tot2 += float(ba.pow(2).sum())
            self.prev_ba[i] = ba
        if step <= self.every_after or step % self.stride == 0:
            self.rows.append({"step": step, "loss": loss,
                              "spec_step": spec_step2 ** 0.5, "lora_step": lora_step2 ** 0.5,
                              "spec_total": spec_tot2 ** 0.5, "lora_total": lora_tot2 ** 0.5,
                              "top_direction_step": top_move, "w_norm": self.w_norm})


def child(spec: dict) -> dict:
    name = spec.pop("variant")
    method, lr, extra = VARIANTS[name]
    cfg = RunConfig(method=method, lr=lr, eval_every=10**9, **extra, **spec)
    model = build_model(method, cfg.rank, seed=cfg.seed, lora_alpha=cfg.lora_alpha, svd_cache_dir=cfg.svd_cache_dir)
    meter = UpdateMeter(model, identity=0.0 if method.startswith("shift") else 1.0)
    row = train(cfg, on_step=meter, model=model)
    row.pop("_model")
    row.update({"variant": name, "updates": meter.rows})
    return row


def _mean(rows, key, lo, hi):
    xs = [r[key] for r in rows if lo <= r["step"] <= hi]
    return sum(xs) / len(xs) if xs else float("nan")


def report(path: Path) -> str:
    """A markdown table and a PNG (beside the JSON) of the per-step update sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    md = [f"Per-step update sizes, model-wide over the 36 encoder linears, relative to ‖W‖_F = "
          f"{rows[0]['updates'][0]['w_norm']:.1f} (task {rows[0]['task']}; `{data['command']}`; {data['device']}, "
          f"torch {data['torch']}, commit {data.get('commit', '?')}). Per-step columns: mean of ‖ΔW(t)‖_F / ‖W‖_F "
          "over the steps given (warm-up: steps 1-30); 'moved by 300': ‖W_300 − W_0‖_F / ‖W‖_F of each part; "
          "'top direction': the largest s_i·|Δc_i| of one step after warm-up.", "",
          "| variant | seed | val / test acc | train loss first→last 10 | spectral per step, 1-30 | LoRA per step, 1-30 "
          "| spectral per step, 31-300 | LoRA per step, 31-300 | spectral moved by 300 | LoRA moved by 300 | top direction |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        u, w = r["updates"], r["updates"][0]["w_norm"]
        pct = lambda x: f"{100 * x / w:.4f}%"  # noqa: E731
        md.append(f"| {r['variant']} | {r['seed']} | {r['val_acc']:.3f} / {r['test_acc']:.3f} | "
                  f"{r['train_loss_first10']:.3f} → {r['train_loss_last10']:.3f} | "
                  f"{pct(_mean(u, 'spec_step', 1, 30))} | {pct(_mean(u, 'lora_step', 1, 30))} | "
                  f"{pct(_mean(u, 'spec_step', 31, 10**9))} | {pct(_mean(u, 'lora_step', 31, 10**9))} | "
                  f"{100 * u[-1]['spec_total'] / w:.2f}% | {100 * u[-1]['lora_total'] / w:.2f}% | "
                  f"{max(x['top_direction_step'] for x in u if x['step'] > 30):.4f} |")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in rows:
        if r["seed"] != rows[0]["seed"]:
            continue
        u = r["updates"]
        steps = [x["step"] for x in u]
        for key, ls in (("spec", "-"), ("lora", "--")):
            if any(x[f"{key}_total"] for x in u):
                line, = axes[0].plot(steps, [x[f"{key}_step"] for x in u], ls, lw=1, label=f"{r['variant']} {key}")
                axes[1].plot(steps, [x[f"{key}_total"] for x in u], ls, lw=1, color=line.get_color())
    axes[0].set_yscale("log")
    axes[0].set_title("‖ΔW‖_F of one step (solid: spectral part, dashed: LoRA part)")
    axes[1].set_title("‖W_t − W_0‖_F of each part")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    text = "\n".join(md) + "\n"
    path.with_suffix(".md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="movies")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", default=str(HERE / "results" / "speclora_diagnosis.json"))
    ap.add_argument("--report", action="store_true", help="only write the table and plot of --json")
    add_child_args(ap)
    args = ap.parse_args(argv)
    if serve_child(args, child):
        return 0
    if args.report:
        print(report(Path(args.json)))
        return 0
    jobs = [{"variant": v, "task": args.task, "seed": int(s), "steps": args.steps, "svd_cache_dir": args.svd_cache_dir}
            for s in args.seeds.split(",") for v in args.variants.split(",")]

    def done(i, row):
        if "error" in row:
            print(f"{jobs[i]} FAILED\n{row['error']}", file=sys.stderr)
            return
        u = row["updates"]
        at = {r["step"]: r for r in u}
        print(f"{row['variant']:24s} seed {row['seed']} val {row['val_acc']:.3f} test {row['test_acc']:.3f} "
              f"loss {row['train_loss_first10']:.3f}->{row['train_loss_last10']:.3f} | step-10 spec {at[10]['spec_step']:.2e} "
              f"lora {at[10]['lora_step']:.2e} | step-300 total spec {u[-1]['spec_total']:.3f} lora {u[-1]['lora_total']:.3f}",
              flush=True)

    rows = run_children(__file__, jobs, args.workers, done)
    out = {"command": "python benchmarks/adaptation/diagnose_speclora.py " + " ".join(argv or sys.argv[1:]),
           **environment(), "variants": {k: [v[0], v[1], v[2]] for k, v in VARIANTS.items()}, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(report(Path(args.json)))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
