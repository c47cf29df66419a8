"""The benchmark scripts' arithmetic and a smoke run on CPU (timings themselves are not asserted)."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spectral_linear_cost_counts_flops_and_bytes():
    cost = _load("bench_spectral_linear_kernels").spectral_linear_cost
    flops, moved = cost(tokens=10, n_in=6, n_out=4, rank=2, itemsize=2, backward=False)
    assert flops == 2 * 10 * (6 * 4 + 6 * 2 + 2 * 4)
    assert moved == 2 * (10 * 6 + 4 * 6 + (6 + 4) * 2 + 10 * 4 + 10 * 2)
    assert cost(10, 6, 4, 2, 2, backward=True) == (2 * flops, 2 * moved)


def test_kernel_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "k.json"
    mod = _load("bench_spectral_linear_kernels")
    assert mod.main(["--device", "cpu", "--tokens", "16", "--features", "24", "--ranks", "4", "--dtype", "float32",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    providers = {r["provider"] for r in report["rows"]}
    assert {"spectral[torch]", "eager", "linear"} <= providers
    assert all(r["median_ms"] > 0 and r["roofline_floor_ms"] > 0 for r in report["rows"])
    assert report["ceilings"]["peak_flops"] > 0 and report["environment"]["torch"]


def test_step_goal_script_reports_goals(monkeypatch, tmp_path):
    mod = _load("bench_spectral_linear")
    small = mod.BenchConfig(tokens=32, in_features=24, out_features=20, rank=4, reps=3, warmup=1)
    monkeypatch.setattr(mod, "CONFIG", small)
    out = tmp_path / "goals.json"
    assert mod.main(["--json", str(out), "--reps", "3"]) == 0
    goals = json.loads(out.read_text())["goals"]
    assert goals["saved_over_Tk"]["met"] is True
    assert {"step_vs_linear", "saved_over_Tk"} <= set(goals)


def test_kernel_benchmark_refuses_cuda_without_a_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert _load("bench_spectral_linear_kernels").main(["--device", "cuda"]) == 2


def test_adapter_bank_timer_interleaves_and_takes_medians():
    mod = _load("bench_adapter_banks")
    calls = []
    t = mod._time({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3)
    assert calls == ["a", "b"] * 5  # two warm-up rounds, then three timed ones, in turn
    assert set(t) == {"a", "b"} and all(0 <= fast <= med for fast, med in t.values())


def test_adapter_bank_bench_rows():
    pytest.importorskip("peft")
    mod = _load("bench_adapter_banks")
    rows = mod.bench(16, 2, 4, 2, [1, 3], reps=1)
    assert [(r["adapters"], r["distinct_in_batch"]) for r in rows] == [(1, 1), (3, 3)]
    for r in rows:
        for key in ("spectral_single_ms", "spectral_mixed_ms", "spectral_loop_ms", "train_single_ms",
                    "train_mixed_ms", "peft_single_ms", "peft_mixed_ms"):
            assert r[key] > 0, key
        assert r["mixed_over_single"] == r["spectral_mixed_ms"] / r["spectral_single_ms"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path of run.sh")
@pytest.mark.parametrize("stage", ["verify", "tests", "sanitize", "bench", "tune", "all"])
def test_gpu_run_script_skips_every_stage_without_a_gpu(stage, tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), stage, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"stage '{stage}' skipped: no CUDA device" in (tmp_path / f"summary_{stage}.md").read_text()


def test_gpu_run_script_rejects_an_unknown_stage(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "benchmark", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown stage 'benchmark'" in done.stderr


@pytest.mark.parametrize("elapsed,asked,want", [(0, 120, 120), (400, 200, 120), (530, 60, 10), (0, 600, 520)])
def test_gpu_run_script_cuts_each_step_to_the_stage_budget(elapsed, asked, want):
    """run.sh's cap(): a step gets what it asks for, or what is left of SK_STAGE_SECONDS (540)
    less 20 s for the summary, and never under 10 s."""
    line = next(l for l in (ROOT / "benchmarks/gpu/run.sh").read_text().splitlines() if l.startswith("cap()"))
    script = f"budget=540; SECONDS={elapsed}; {line}; cap {asked}"
    assert subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.strip() == str(want)
