"""setup.py's choice of whether and for what to build the CUDA extension: with nvcc but no GPU it
builds nothing and says so in one line; with GPUs it builds for the architectures present only;
SPECTRAL_KERNELS_CUDA=1 forces the build and SPECTRAL_KERNELS_CUDA_ARCHS overrides the architectures."""
import runpy
import stat
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]


def _tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def setup_py(tmp_path, monkeypatch):
    """Run setup.py's module code with setuptools.setup captured; returns a function
    (gpu output lines or None for no nvidia-smi, argv) -> (namespace, setup kwargs, notices)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _tool(bin_dir, "nvcc", "exit 0")
    monkeypatch.setenv("PATH", str(bin_dir))
    for var in ("CUDACXX", "CUDA_HOME", "CUDA_PATH", "SPECTRAL_KERNELS_CUDA", "SPECTRAL_KERNELS_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)

    def run(gpus, argv=("setup.py", "build_ext"), capsys=None):
        if gpus is not None:
            _tool(bin_dir, "nvidia-smi", "".join(f"echo {g}\n" for g in gpus))
        captured = {}
        monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
        monkeypatch.setattr("sys.argv", list(argv))
        ns = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
        return ns, captured
    return run


def test_nvcc_without_gpu_builds_nothing_and_says_how_to_force(setup_py, capfd):
    _, kw = setup_py(None)
    assert kw["ext_modules"] == []
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("spectral-kernels:")]
    assert len(lines) == 1, err
    assert "no NVIDIA GPU" in lines[0] and "SPECTRAL_KERNELS_CUDA=1" in lines[0]


def test_metadata_runs_are_quiet(setup_py, capfd):
    _, kw = setup_py(None, argv=("setup.py", "egg_info"))
    assert kw["ext_modules"] == []
    assert "spectral-kernels:" not in capfd.readouterr().err


def test_gpus_present_give_their_architectures(setup_py, monkeypatch):
    ns, kw = setup_py(["9.0", "8.6", "9.0"])
    assert [e.name for e in kw["ext_modules"]] == ["spectral_kernels._C"]
    assert ns["gpu_archs"]() == "86;90"
    assert ns["cmake_archs"](ns["gpu_archs"]()) == "86-real;90-real;90-virtual"


def test_gpus_older_than_sm80_only_are_skipped(setup_py, capfd):
    _, kw = setup_py(["7.5"])
    assert kw["ext_modules"] == []
    assert "older than sm_80" in capfd.readouterr().err


def test_forced_build_needs_no_gpu(setup_py, monkeypatch):
    monkeypatch.setenv("SPECTRAL_KERNELS_CUDA", "1")
    _, kw = setup_py(None)
    assert [e.name for e in kw["ext_modules"]] == ["spectral_kernels._C"]


def test_never_build(setup_py, monkeypatch):
    monkeypatch.setenv("SPECTRAL_KERNELS_CUDA", "0")
    _, kw = setup_py(["9.0"])
    assert kw["ext_modules"] == []


def test_failing_nvidia_smi_counts_as_no_gpu(setup_py, tmp_path):
    ns, _ = setup_py(None)
    _tool(tmp_path / "bin", "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert ns["gpu_archs"]() is None
