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


# --- README's two commands and the extras' pins ------------------------------------------------------
def _meta():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(requirements):
    """{package: specifier} of requirement strings (markers dropped)."""
    import re

    out = {}
    for req in requirements:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*([^;]*)", req)
        out[m.group(1).lower()] = m.group(2).strip()
    return out


def _readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    main = next(line for line in lines if "spectral-kernels bench" in line and "pip install" in line)
    test_install = next(line for line in lines if 'pip install -e ".[test' in line)
    test_run = next(line for line in lines if line.startswith("TRITON_INTERPRET=1 python -m pytest"))
    return main, test_install, test_run


def test_extras_that_run_triton_pin_numpy_and_triton_alike():
    extras = _meta()["optional-dependencies"]
    bench, test = _pins(extras["bench"]), _pins(extras["test"])
    for name in ("numpy", "triton", "peft"):
        assert bench.get(name) and bench.get(name) == test.get(name), (name, bench.get(name), test.get(name))
    assert test["numpy"] == "<2.4"
    # every extra that names a package pins it the same way
    seen = {}
    for extra, reqs in extras.items():
        for name, spec in _pins(reqs).items():
            if spec:
                assert seen.setdefault(name, (spec, extra))[0] == spec, (name, extra, seen[name])


def test_readme_commands_pin_what_the_extras_pin_and_report_skips():
    import re

    main, test_install, test_run = _readme_commands()
    triton = _pins(_meta()["optional-dependencies"]["test"])["triton"]
    for line in (main, test_install):
        assert f"triton{triton}" in line, line
        assert re.search(r"torch==\d", line), line
    extras = re.search(r'pip install -e "\.\[([a-z,]+)\]"', test_install).group(1).split(",")
    # the extras the optional-dependency tests need (the quantized bases, the analysis, the reproduction)
    assert {"test", "bnb", "torchao", "repro"} <= set(extras)
    assert ".ci/test-data.txt" in test_install
    assert " -rs" in test_run


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "grep -m1 -E '^TRITON_INTERPRET=1 python -m pytest' README.md" in ci
    assert "torch==2.13.0" in ci and "triton==3.6.0" in ci
    assert 'pip install -q -e ".[test,bnb,torchao,repro]"' in ci
