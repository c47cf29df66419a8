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
