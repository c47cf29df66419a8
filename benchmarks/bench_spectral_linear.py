"""Training-step benchmark of SpectralLinear against its anchors (pytest-benchmark).

    python -m pytest benchmarks/bench_spectral_linear.py --benchmark-json=benchmarks/results/spectral_linear_pytest_cpu.json
    python benchmarks/bench_spectral_linear.py          # the goals, interleaved in one run → results/

Shape of the issue's goals: T=2048, in=out=1024, k=16, float32, forward + backward to x and the
trainable parameters (the coefficients for SpectralLinear, A and B for LoRA). Goals:
delta-form SpectralLinear ≤ 1.06× frozen nn.Linear and ≤ 0.95× peft LoRA (r=16, B ≠ 0), and
activations saved for backward ≤ 1.1·T·k values.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from spectral_kernels.benchmarking import BenchConfig, build_providers, format_table, phase_fn, run

CONFIG = BenchConfig(tokens=2048, in_features=1024, out_features=1024, rank=16, dtype="float32", device="cpu")
GOALS = {"step_vs_linear": 1.06, "step_vs_lora": 0.95, "saved_over_Tk": 1.1}


@pytest.fixture(scope="module")
def providers():
    built, notes = build_providers(CONFIG)
    return built, notes


@pytest.mark.parametrize("phase", ["forward", "backward", "step"])
@pytest.mark.parametrize("provider", ["spectral", "linear", "eager", "lora"])
def test_spectral_linear(benchmark, providers, provider, phase):
    built, notes = providers
    if provider not in built:
        pytest.skip(notes[provider])
    x = torch.randn(CONFIG.tokens, CONFIG.in_features, requires_grad=True)
    dy = torch.randn(CONFIG.tokens, CONFIG.out_features)
    benchmark.extra_info.update(provider=provider, phase=phase, **CONFIG.__dict__)
    benchmark.pedantic(phase_fn(built[provider], x, dy, phase), rounds=20, warmup_rounds=3)


def measure_goals(reps: int) -> dict:
    """Interleaved run of every provider; ratios and goal verdicts from that one run."""
    cfg = BenchConfig(**{**CONFIG.__dict__, "reps": reps})
    report = run(cfg, phases=("step", "forward", "backward"))
    med = {(r.provider, r.phase): r.median_ms for r in report.rows if not r.note}
    result = json.loads(report.to_json())
    measured = {
        "step_vs_linear": med[("spectral", "step")] / med[("linear", "step")],
        "saved_over_Tk": report.saved_activation_numel["spectral"] / (cfg.tokens * cfg.rank),
    }
    if ("lora", "step") in med:
        measured["step_vs_lora"] = med[("spectral", "step")] / med[("lora", "step")]
    result["goals"] = {
        name: {"measured": round(value, 4), "goal": f"<= {GOALS[name]}", "met": value <= GOALS[name]}
        for name, value in measured.items()
    }
    print(format_table(report))
    for name, g in result["goals"].items():
        print(f"goal {name}: {g['measured']} ({g['goal']}) {'met' if g['met'] else 'NOT met'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).resolve().parent / "results" / "spectral_linear_step_cpu.json"
    parser.add_argument("--json", default=str(default), help=f"output (default {default})")
    parser.add_argument("--reps", type=int, default=60, help="timed steps per provider and phase")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = measure_goals(args.reps)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
