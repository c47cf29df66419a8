"""The spectral-kernels command: info and a small bench."""
import json
import subprocess
import sys

import pytest

from spectral_kernels.cli import main


def test_info_lists_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "spectral-kernels 0.1.0" in out
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in out
    assert "compiled extension:" in out


def test_bench_small_writes_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["bench", "--tokens", "32", "--in-features", "24", "--out-features", "20", "--rank", "4",
            "--reps", "3", "--warmup", "1", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "spectral" in out and "linear" in out
    report = json.loads(path.read_text())
    rows = {(r["provider"], r["phase"]) for r in report["rows"] if not r["note"]}
    for provider in ("spectral", "linear", "eager"):
        for phase in ("forward", "backward", "step"):
            assert (provider, phase) in rows
    linear_step = [r for r in report["rows"] if r["provider"] == "linear" and r["phase"] == "step"][0]
    assert linear_step["ratio_vs_linear"] == 1.0
    assert report["saved_activation_numel"]["spectral"] <= 1.1 * 32 * 4
    assert report["environment"]["torch"]


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--rank", "30", "--in-features", "8", "--out-features", "8", "--tokens", "4"]) == 2
    assert "rank must be an integer in 1..min" in capsys.readouterr().err
    assert main(["bench", "--providers", "spectral,cublas"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--tokens", "0"])


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "spectral_kernels.cli", "info"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "backends on this device" in out.stdout


def test_readme_main_command_installs_what_the_bench_compares_against():
    """README's first command installs the extra that holds peft, so `spectral-kernels bench` on a
    fresh machine runs its LoRA comparison; numpy is a dependency (torch warns without it)."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    first = next(line for line in (root / "README.md").read_text().splitlines() if "spectral-kernels bench" in line)
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', first)
    assert extras, f"README's main command installs no extra: {first}"
    meta = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    deps = [d for name in extras.group(1).split(",") for d in meta["optional-dependencies"][name]]
    assert any(d.startswith("peft") for d in deps)
    assert any(d.split(";")[0].strip().startswith("numpy") for d in meta["dependencies"])


# --- a fast, light command line ----------------------------------------------------------------------
def _subcommands() -> list[str]:
    import argparse

    from spectral_kernels.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


SUBCOMMANDS = _subcommands()


def _run_cli(*argv, module=True):
    import os
    import shutil
    import time
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if module:
        cmd = [sys.executable, "-m", "spectral_kernels.cli", *argv]
    else:
        script = Path(sys.executable).parent / "spectral-kernels"
        if not script.exists():
            script = shutil.which("spectral-kernels")
        if script is None:
            pytest.skip("the spectral-kernels console script is not installed")
        cmd = [str(script), *argv]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("argv", [("--help",)] + [(c, "--help") for c in SUBCOMMANDS])
@pytest.mark.parametrize("module", [True, False], ids=["python-m", "console-script"])
def test_help_answers_within_a_second(argv, module):
    _run_cli("--help", module=module)  # first run warms the file cache
    out, seconds = _run_cli(*argv, module=module)
    assert out.returncode == 0, out.stderr
    assert "usage: spectral-kernels" in out.stdout
    assert seconds < 1.0, f"{' '.join(argv)} took {seconds:.2f} s"


def test_building_the_parser_imports_no_torch():
    code = ("import sys\nfrom spectral_kernels.cli import build_parser\nimport spectral_kernels\n"
            "for argv in (['bench', '--tokens', '8'], ['analyze', 'a', 'b', '--out', 'o'], ['info']):\n"
            "    build_parser().parse_args(argv)\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'spectral_kernels.')))\n"
            "assert 'torch' not in sys.modules, heavy\n"
            "assert set(heavy) <= {'spectral_kernels._version', 'spectral_kernels.cli'}, heavy\n"
            "print('light')")
    import os
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "light"


def test_lazy_package_gives_every_public_name():
    import spectral_kernels as sk

    for name in sk.__all__:
        assert getattr(sk, name) is not None, name
    assert sk.tuning.spectral_layers is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sk.not_a_name  # noqa: B018


def test_bench_reports_progress_on_stderr(capsys):
    argv = ["bench", "--tokens", "16", "--in-features", "12", "--out-features", "10", "--rank", "2",
            "--reps", "3", "--warmup", "1", "--providers", "spectral,linear"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert any("building the layers" in line for line in lines), err
    for phase in ("forward", "backward", "step"):
        assert any(f"{phase}: round 3/3" in line for line in lines), err
    assert main(argv + ["--quiet"]) == 0
    assert "round" not in capsys.readouterr().err


def test_info_says_plainly_when_there_is_no_gpu_or_driver(monkeypatch, capsys):
    from spectral_kernels import _ext

    monkeypatch.setattr(_ext, "_driver_loads", lambda: False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU: no GPU / no NVIDIA driver found" in out
    assert "cudaError" not in out
    assert _ext.no_gpu_reason("cudaErrorInsufficientDriver (CUDA driver version is insufficient)") == \
        "no GPU / no NVIDIA driver found"
    monkeypatch.setattr(_ext, "_driver_loads", lambda: True)
    assert "older than the CUDA runtime" in _ext.no_gpu_reason("cudaErrorInsufficientDriver (...)")
    assert "sees no device" in _ext.no_gpu_reason("cudaErrorNoDevice (no CUDA-capable device is detected)")
