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


# --- benchmarks/gpu/run.sh and its helpers (lib.sh, summarize_junit.py), on CPU ----------------------
GPU = ROOT / "benchmarks" / "gpu"


def _bash(script: str, **env) -> subprocess.CompletedProcess:
    """Run a bash snippet with lib.sh sourced (py and root set as run.sh sets them)."""
    import os
    import sys

    prelude = f'py={sys.executable}; root={ROOT}; budget=540; source {GPU / "lib.sh"}; '
    return subprocess.run(["bash", "-c", prelude + script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def _run_sh_value(name: str) -> str:
    """The value of a NAME=VALUE line of run.sh (its step budgets and test selections)."""
    import re

    text = (GPU / "run.sh").read_text()
    m = re.search(rf'^{name}=("?)([^"\n#]*)\1', text, re.M)
    assert m, f"run.sh has no {name}= line"
    return m.group(2).strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path of run.sh")
@pytest.mark.parametrize("stage", ["quick", "rest", "verify", "tests", "sanitize", "bench", "tune", "all"])
def test_gpu_run_script_skips_every_stage_without_a_gpu(stage, tmp_path):
    done = subprocess.run(["bash", str(GPU / "run.sh"), stage, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"stage '{stage}' skipped: no CUDA device" in (tmp_path / "summary.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def test_gpu_run_script_rejects_an_unknown_stage(tmp_path):
    done = subprocess.run(["bash", str(GPU / "run.sh"), "benchmark", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown stage 'benchmark'" in done.stderr


def test_gpu_run_script_parses():
    assert subprocess.run(["bash", "-n", str(GPU / "run.sh")]).returncode == 0


@pytest.mark.parametrize("elapsed,asked,want", [(0, 120, 120), (400, 200, 120), (530, 60, 10), (0, 600, 520)])
def test_gpu_run_script_cuts_each_step_to_the_stage_budget(elapsed, asked, want):
    """cap(): a step gets what it asks for, or what is left of the budget (540 s) less 20 s for
    the summary, and never under 10 s."""
    assert _bash(f"SECONDS={elapsed}; cap {asked}").stdout.strip() == str(want)


def test_quick_stage_fits_nine_minutes():
    """quick's steps (build, never-run tests, goal table, decode table, candidates), each at its
    full timeout, plus the summary reserve fit the default budget of 540 s: one device command
    under 9 minutes, build included, in a 15-minute window (machine start ~1-2 min)."""
    steps = ["QUICK_BUILD", "QUICK_TESTS", "QUICK_GOALS", "QUICK_DECODE", "QUICK_CANDIDATES"]
    seconds = [int(_run_sh_value(s)) for s in steps]
    assert all(s >= 30 for s in seconds), dict(zip(steps, seconds))
    reserve = int(_bash("echo $SUMMARY_RESERVE").stdout)
    assert sum(seconds) + reserve <= 540 <= 9 * 60
    assert "budget=${SK_STAGE_SECONDS:-540}" in (GPU / "run.sh").read_text()
    # and every quick step runs under cap(): the last one still gets its time when all before ran full
    script = f"SECONDS={sum(seconds[:-1])}; cap {seconds[-1]}"
    assert _bash(script).stdout.strip() == str(seconds[-1])


def test_run_sh_selects_the_triton_float32_tests():
    """The float32 selection of quick (``-k TRITON_FP32_K`` on the Triton file) collects the
    float32 tests, the gpu-marked ones included, and nothing else; the old ``-k float32`` on ids
    dtype0/1/2 selected none (pytest exit 5)."""
    import os
    import sys

    expr = _run_sh_value("TRITON_FP32_K")
    triton_file = _run_sh_value("TRITON_FILE")
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-k", expr, triton_file], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert done.returncode == 0 and len(ids) >= 20, done.stdout[-2000:]
    assert all("float32" in i for i in ids)
    assert any("test_triton_gpu_large" in i for i in ids) and any("bank" in i for i in ids)
    for f in _run_sh_value("NEVER_RUN_FILES").split():
        assert (ROOT / f).is_file(), f


def _junit(path, cases):
    """A JUnit XML file with (name, outcome, message) test cases."""
    body = []
    for name, outcome, message in cases:
        inner = {"passed": "", "skipped": f'<skipped type="pytest.skip" message="{message}"/>',
                 "failed": f'<failure message="{message}"/>'}[outcome]
        body.append(f'<testcase classname="tests.t" name="{name}" time="0.5">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>')
    return path


def _summarize(tmp_path, *suites):
    done = _bash("summarize " + " ".join(f"'{s}'" for s in [str(tmp_path / "s.md"), str(tmp_path / "s.json"), *suites]))
    return done.returncode, json.loads((tmp_path / "s.json").read_text())


def test_skips_fail_a_stage_unless_the_allow_list_names_their_reason(tmp_path):
    """run.sh's summary (lib.sh's summarize with SKIP_ALLOW): a bitsandbytes skip is allowed and
    listed with its reason, any other skip fails the suite, as do a failure, an empty selection
    (pytest exit 5) and a missing results file."""
    import re

    bnb_reason = re.search(r'reason="(bitsandbytes not installed[^"]*)"',
                           (ROOT / "tests/tuning/test_quantized.py").read_text()).group(1)
    allowed = _junit(tmp_path / "a.xml", [("t1", "passed", ""), ("t2", "skipped", bnb_reason)])
    rc, report = _summarize(tmp_path, f"ok:{allowed}")
    assert rc == 0 and report["ok"]["verdict"] == "ok"
    assert "no bitsandbytes" in report["ok"]["problems"][0]["allowed"]
    assert "allowed skip" in (tmp_path / "s.md").read_text()

    other = _junit(tmp_path / "b.xml", [("t1", "passed", ""), ("t2", "skipped", "spectral_kernels._C is not built")])
    failed = _junit(tmp_path / "c.xml", [("t1", "passed", ""), ("t2", "failed", "assert 1 == 2")])
    empty = _junit(tmp_path / "d.xml", [])
    rc, report = _summarize(tmp_path, f"other:{other}", f"failed:{failed}", f"empty:{empty}",
                            f"missing:{tmp_path / 'nope.xml'}", f"ok:{allowed}")
    assert rc == 1
    assert {k: v["verdict"] for k, v in report.items()} == {
        "other": "FAILED", "failed": "FAILED", "empty": "FAILED: no test ran", "missing": "FAILED", "ok": "ok"}


def test_every_allowed_skip_says_why(tmp_path):
    out = _bash("for e in \"${SKIP_ALLOW[@]}\"; do printf '%s\\n' \"$e\"; done").stdout.splitlines()
    assert out and all(len(line.split("\t")) == 2 and len(line.split("\t")[1]) > 20 for line in out), out
    import sys

    done = subprocess.run([sys.executable, str(GPU / "summarize_junit.py"), str(tmp_path / "s.md"),
                           str(tmp_path / "s.json"), "--allow-skip", "bitsandbytes", f"x:{tmp_path / 'x.xml'}"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "REGEX<TAB>WHY" in done.stderr


def test_outdir_keeps_at_most_eight_files(tmp_path):
    """fit_outdir: whatever a stage wrote, OUTDIR ends with at most 8 files (what a device command
    returns); the rest, folders too, is in logs.tar.gz."""
    import tarfile

    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (work / "build.log").write_text("log")
    for name in ["summary.md", *[f"r{i:02d}.json" for i in range(10)]]:
        (out / name).write_text(name)
    (out / "sub").mkdir()
    (out / "sub" / "deep.txt").write_text("x")
    assert _bash(f"pack_logs {work} {out} && fit_outdir {work} {out}").returncode == 0
    left = sorted(p.name for p in out.iterdir())
    assert len(left) <= 8 and {"summary.md", "logs.tar.gz"} <= set(left) and all(p.is_file() for p in out.iterdir())
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("build.log") for n in names) and any(n.endswith("deep.txt") for n in names)
    moved = {f"r{i:02d}.json" for i in range(10)} - set(left)
    assert moved and all(any(n.endswith(m) for n in names) for m in moved)


# --- fused-plan candidates (benchmarks/gpu/candidates.py) ------------------------------------------
def _candidates_module():
    import sys

    sys.path.insert(0, str(GPU))
    import candidates

    return candidates


@pytest.mark.parametrize("name", ["fold_reuse", "fold_columns", "extra_columns"])
def test_candidate_plans_match_the_reference(name):
    """Each candidate's y, z, dx and dd against the float64 reference (float32 operands, odd sizes)."""
    from spectral_kernels.ops.reference import spectral_linear_ref

    T, n_in, n_out, k = 13, 37, 29, 5
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, n_in, generator=g)
    W, b = torch.randn(n_out, n_in, generator=g) / n_in**0.5, torch.randn(n_out, generator=g)
    U, V = torch.randn(n_out, k, generator=g), torch.randn(n_in, k, generator=g) / n_in**0.5
    d, dy = torch.randn(k, generator=g), torch.randn(T, n_out, generator=g)
    fn = _candidates_module().candidates(W, U, V)[name]
    xs, ds = x.clone().requires_grad_(True), d.clone().requires_grad_(True)
    y, z = fn(xs, W, U, ds, V, b)
    y.backward(dy)
    x64, d64 = x.double().requires_grad_(True), d.double().requires_grad_(True)
    y64 = spectral_linear_ref(x64, U.double(), d64, V.double(), b.double(), W.double())
    y64.backward(dy.double())
    for got, ref in ((y, y64), (z, x.double() @ V.double()), (xs.grad, x64.grad), (ds.grad, d64.grad)):
        assert got.shape == ref.shape
        assert float((got.detach().double() - ref.detach()).norm() / ref.detach().norm()) < 1e-5


def test_goal_candidates_section_runs_on_cpu(monkeypatch):
    """bench_goals' candidates section end to end with a stand-in timer: every candidate is
    checked against the float32 chain and timed in both phases beside nn.Linear and the op."""
    mod = _load_gpu("bench_goals")
    monkeypatch.setattr(mod, "DEV", "cpu")
    monkeypatch.setattr(mod, "spectral_backends", lambda: [])
    monkeypatch.setattr(mod, "bench", lambda fn, rep=100: (fn(), {"median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0})[1])
    real = mod.operands
    monkeypatch.setattr(mod, "operands", lambda *a, **kw: real(*a, **{**kw, "dtype": torch.float32}))
    rows = mod.section_candidates({}, T=9, n=24, ranks=(3,))
    checks = [r for r in rows if r["phase"] == "check"]
    assert {r["provider"] for r in checks} == {"fold_reuse", "fold_columns", "extra_columns"}
    assert all(r[f"rel_err_{key}"] < 1e-4 for r in checks for key in ("y", "dx", "dd")), checks
    timed = {(r["phase"], r["provider"]) for r in rows if r["phase"] != "check"}
    assert ("forward+backward", "fold_columns") in timed and ("forward", "linear") in timed
    assert "| candidates k |" in mod.summarize(rows, {"bf16_gemm_tflops": 1.0, "copy_gbps": 1.0})


def _load_gpu(name):
    spec = importlib.util.spec_from_file_location(name, GPU / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_goal_script_refuses_unknown_sections_and_skips_without_a_gpu(tmp_path, capsys):
    mod = _load_gpu("bench_goals")
    with pytest.raises(SystemExit):
        mod.main(["--out", str(tmp_path), "--sections", "main,candidate"])
    assert "unknown section(s) candidate" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert mod.main(["--out", str(tmp_path), "--sections", "candidates", "--ranks", "16", "--tag", "c"]) == 0
        assert "no CUDA device" in capsys.readouterr().out and not list(tmp_path.iterdir())
