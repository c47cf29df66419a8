"""Guarded import of the compiled extension ``spectral_kernels._C`` (CUDA kernels from csrc/).

The package works without it: the import failure is kept and turned into a clear error only
when the ``cuda`` backend is asked for (:func:`extension`). ``_C`` links the CUDA runtime
statically and no torch, so it imports on machines with no GPU and no driver; device calls then
raise.
"""
from __future__ import annotations

import torch

try:
    from spectral_kernels import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: str | None = None
except ImportError as exc:  # not built, or built for another Python
    _C = None
    IMPORT_ERROR = str(exc)

REBUILD_HINT = (
    "rebuild with CUDA: SPECTRAL_KERNELS_CUDA=1 pip install -e . "
    "(needs nvcc on PATH or CUDA_HOME; SPECTRAL_KERNELS_CUDA_ARCHS picks the GPU architectures)"
)


def extension():
    """The loaded ``spectral_kernels._C`` module.

    Raises:
        RuntimeError: the extension is not built (or failed to import), saying how to rebuild.
    """
    if _C is None:
        raise RuntimeError(
            f"the cuda backend needs the compiled extension spectral_kernels._C, which is not "
            f"available ({IMPORT_ERROR}); {REBUILD_HINT}"
        )
    return _C


def compiled_archs() -> list[str]:
    """CUDA architectures compiled into ``_C`` in CMake syntax ("90-real", "90-virtual"); [] if not built."""
    if _C is None:
        return []
    return [a for a in _C.compiled_archs().split(",") if a]


def _arch_number(arch: str) -> int:
    return int(arch.split("-")[0])


def runs_on(capability: tuple[int, int]) -> bool:
    """Whether ``_C`` holds code for a device of compute capability ``capability``: SASS of the same
    major version and no newer minor, or PTX no newer than the device (JIT-compiled by the driver)."""
    cc = capability[0] * 10 + capability[1]
    for arch in compiled_archs():
        n = _arch_number(arch)
        real = not arch.endswith("-virtual")
        virtual = not arch.endswith("-real")
        if real and n // 10 == cc // 10 and n <= cc:
            return True
        if virtual and n <= cc:
            return True
    return False


# torch.compile traces the backend choice; the device's capability is a constant of the trace.
@torch.compiler.assume_constant_result
def _device_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device ``index`` (-1: the current device)."""
    return torch.cuda.get_device_capability(None if index < 0 else index)


def extension_summary() -> str:
    """One line for ``spectral-kernels info``: built or not, architectures, CUDA runtime, devices."""
    if _C is None:
        return f"not built ({IMPORT_ERROR}); {REBUILD_HINT}"
    version = _C.cuda_runtime_version()
    count, error = _C.device_count()
    devices = f"{count} CUDA device(s) visible" if count else no_gpu_reason(error)
    return (
        f"spectral_kernels._C built for {', '.join(compiled_archs()) or 'unknown architectures'}, "
        f"CUDA runtime {version // 1000}.{version % 1000 // 10} (static); {devices}"
    )


def _driver_loads() -> bool:
    """Whether the NVIDIA driver library (libcuda.so.1) is installed and loads."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def no_gpu_reason(error: str | None = None) -> str:
    """Why no GPU is usable, in plain words; ``error`` is the CUDA runtime's (cudaGetDeviceCount),
    whose "insufficient driver" also means no driver at all."""
    if not _driver_loads():
        return "no GPU / no NVIDIA driver found"
    if error and "InsufficientDriver" in error:
        return f"the NVIDIA driver is older than the CUDA runtime needs ({error})"
    if not error or "NoDevice" in error:
        return "no GPU found (the NVIDIA driver is installed but sees no device)"
    return f"no GPU usable ({error})"


def gpu_summary() -> str:
    """One line for ``spectral-kernels info``: the visible GPUs, or why there are none."""
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} visible: {', '.join(names)}"
    if torch.version.cuda is None and _driver_loads():
        return "none usable: this torch is a CPU-only build (the NVIDIA driver is installed)"
    return no_gpu_reason(_C.device_count()[1] if _C is not None else None)


def cuda_status(device: torch.device | None) -> tuple[bool, str]:
    """(whether the compiled CUDA backend can run on ``device``, the reason in words)."""
    if _C is None:
        return False, f"the extension spectral_kernels._C is not built ({IMPORT_ERROR}); {REBUILD_HINT}"
    if device is not None and device.type != "cuda":
        return False, f"the cuda backend needs CUDA tensors, got device '{device.type}'"
    if not torch.cuda.is_available():
        return False, f"spectral_kernels._C is built but {no_gpu_reason(_C.device_count()[1])}"
    index = device.index if device is not None and device.index is not None else -1
    capability = _device_capability(index)
    if not runs_on(capability):
        return False, (
            f"spectral_kernels._C was built for {', '.join(compiled_archs())}, which cannot run on "
            f"this sm_{capability[0]}{capability[1]} device; rebuild with "
            f"SPECTRAL_KERNELS_CUDA_ARCHS={capability[0]}{capability[1]}"
        )
    return True, f"compiled CUDA kernels (spectral_kernels._C, {', '.join(compiled_archs())})"
