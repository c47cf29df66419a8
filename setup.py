"""Build script. Metadata lives in pyproject.toml; this file drives the optional CUDA build.

The compiled backend ``spectral_kernels._C`` (csrc/, CMakeLists.txt) is built by CMake + Ninja
through pybind11. It links no torch, so the build environment needs none and one wheel serves every
torch version. Environment variables:

    SPECTRAL_KERNELS_CUDA=auto|1|0   auto (default): build when nvcc is found AND an NVIDIA GPU is
                                     present (nvidia-smi), for the GPUs present only; otherwise
                                     install the pure-Python package with a one-line notice;
                                     1: build or fail (no GPU needed: cross-compiles); 0: never build.
    SPECTRAL_KERNELS_CUDA_ARCHS      GPU architectures, e.g. "90" or "80;90" (SASS for each and PTX
                                     for the newest) or CMake syntax "80-real;90-real;90-virtual".
                                     Default: the compute capabilities nvidia-smi reports; with
                                     SPECTRAL_KERNELS_CUDA=1 and no GPU, 80, 86, 89, 90 + PTX for 90.
    CUDACXX / CUDA_HOME              where nvcc is, when it is not on PATH.
    CMAKE_BUILD_PARALLEL_LEVEL       parallel compile jobs (Ninja's default otherwise).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
ENV_CUDA = "SPECTRAL_KERNELS_CUDA"
ENV_ARCHS = "SPECTRAL_KERNELS_CUDA_ARCHS"
#: architectures built when the build is forced on a machine whose GPUs cannot be read
DEFAULT_ARCHS = "80;86;89;90"
#: the oldest architecture the kernels compile for (bf16 WMMA, cp.async)
MIN_ARCH = 80
#: setup.py commands that build; pip also runs setup.py for metadata (egg_info), which must stay quiet
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _notice(message: str) -> None:
    """One line on stderr. pip captures a build backend's output (shown with -v only), so the line
    also goes to the terminal when there is one: skipping the CUDA build must never be silent."""
    line = f"spectral-kernels: {message}"
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(line + "\n")
    except OSError:  # no controlling terminal (CI): stderr is all there is
        pass


def _building() -> bool:
    return any(arg in BUILD_COMMANDS for arg in sys.argv[1:])


def cuda_mode() -> str:
    raw = os.environ.get(ENV_CUDA, "auto").strip().lower()
    modes = {"auto": "auto", "": "auto", "1": "1", "on": "1", "true": "1", "yes": "1",
             "0": "0", "off": "0", "false": "0", "no": "0"}
    if raw not in modes:
        raise SystemExit(f"spectral-kernels: {ENV_CUDA}={raw!r} is not one of auto, 1, 0")
    return modes[raw]


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def cmake_archs(spec: str) -> str:
    """SPECTRAL_KERNELS_CUDA_ARCHS → CMake CUDA_ARCHITECTURES. Plain numbers ("80;90", "8.0 9.0",
    "80,90") get SASS each plus PTX for the newest; entries with -real/-virtual pass through."""
    items = [s.strip() for s in spec.replace(",", ";").replace(" ", ";").split(";") if s.strip()]
    if not items:
        raise SystemExit(f"spectral-kernels: {ENV_ARCHS} is empty")
    if any("-" in s for s in items):
        return ";".join(items)
    numbers = []
    for s in items:
        n = s.replace(".", "").removeprefix("sm_").removeprefix("compute_")
        if not n.isdigit():
            raise SystemExit(f"spectral-kernels: {ENV_ARCHS}: cannot read architecture {s!r}")
        numbers.append(int(n))
    numbers = sorted(set(numbers))
    return ";".join([f"{n}-real" for n in numbers] + [f"{numbers[-1]}-virtual"])


def gpu_archs() -> str | None:
    """The compute capabilities of the NVIDIA GPUs present ("90" or "80;90"), from
    ``nvidia-smi --query-gpu=compute_cap``; None when there is no GPU, no driver or no nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    caps = sorted({line.strip().replace(".", "") for line in out.stdout.splitlines() if line.strip()})
    caps = [c for c in caps if c.isdigit()]
    return ";".join(caps) or None


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt in ``source_dir`` rather than by setuptools."""

    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Configure and build with CMake + Ninja, then copy the module where setuptools expects it
    (the package directory for in-place and editable builds, build/lib for wheels)."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_cmake(ext)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
            if cuda_mode() == "1":
                raise RuntimeError(f"spectral-kernels: building {ext.name} failed ({exc}); "
                                   f"{ENV_CUDA}=1 makes this an error") from exc
            _notice(f"building {ext.name} failed ({exc}); installing without the CUDA backend "
                    f"(set {ENV_CUDA}=1 to make this an error)")

    def _build_cmake(self, ext: CMakeExtension) -> None:
        import pybind11  # a build requirement (pyproject.toml), imported only when building

        cmake = shutil.which("cmake")
        ninja = shutil.which("ninja")
        nvcc = find_nvcc()
        if cmake is None or ninja is None or nvcc is None:
            missing = [n for n, p in (("cmake", cmake), ("ninja", ninja), ("nvcc", nvcc)) if p is None]
            raise RuntimeError(f"not found on PATH: {', '.join(missing)}")
        present = [c for c in (gpu_archs() or "").split(";") if c and int(c) >= MIN_ARCH]
        archs = cmake_archs(os.environ.get(ENV_ARCHS) or ";".join(present) or DEFAULT_ARCHS)
        # One CMake build directory per Python version and architecture list, outside setuptools'
        # per-command temp dirs: the in-place build, the editable install and the wheel share the
        # compiled kernels (their compile lines name neither Python nor pybind11).
        tag = hashlib.sha1(archs.encode()).hexdigest()[:8]
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{tag}"
        out_dir = build_dir / "lib"
        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DSPECTRAL_KERNELS_CUDA_ARCHS={archs}",
        ]
        # A cache written by another build environment (isolated builds live in temp dirs that are
        # gone now) names tools that may not exist any more: start the configuration afresh.
        signature = "\n".join([cmake, *args])
        stamp = build_dir / "configure-args.txt"
        if stamp.exists() and stamp.read_text() != signature:
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        build_dir.mkdir(parents=True, exist_ok=True)
        _notice(f"building {ext.name} for CUDA architectures {archs} with {nvcc}")
        subprocess.run([cmake, "-S", str(ext.source_dir), "-B", str(build_dir), "-G", "Ninja", *args], check=True)
        stamp.write_text(signature)
        subprocess.run([cmake, "--build", str(build_dir)], check=True)
        built = sorted(out_dir.glob("_C.*"))
        if not built:
            raise RuntimeError(f"CMake produced no _C module in {out_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)


def ext_modules() -> list[Extension]:
    """[the CMake extension] when it is to be built (see the module docstring), else [] with a notice."""
    mode = cuda_mode()
    quiet = not _building()
    skip = (f"skipping the CUDA extension spectral_kernels._C (the torch and triton backends work "
            f"without it); to build it anyway: {ENV_CUDA}=1 {ENV_ARCHS}=90 pip install -e .")
    if mode == "0":
        quiet or _notice(f"{ENV_CUDA}=0: installing without the CUDA extension spectral_kernels._C")
        return []
    if find_nvcc() is None:
        if mode == "1":
            raise SystemExit(f"spectral-kernels: {ENV_CUDA}=1 but nvcc was not found "
                             "(put it on PATH or set CUDA_HOME / CUDACXX)")
        quiet or _notice(f"nvcc not found: {skip}")
        return []
    if mode == "auto":
        present = gpu_archs()
        if present is None:
            quiet or _notice(f"no NVIDIA GPU found (nvidia-smi): {skip}")
            return []
        if os.environ.get(ENV_ARCHS) is None and all(int(c) < MIN_ARCH for c in present.split(";")):
            quiet or _notice(f"the GPUs present (sm_{present.replace(';', ', sm_')}) are older than "
                             f"sm_{MIN_ARCH}, the oldest the kernels support: {skip}")
            return []
    return [CMakeExtension("spectral_kernels._C", ROOT)]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": CMakeBuild})
