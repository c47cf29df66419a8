"""Guarded import of the compiled extension ``spectral_kernels._C`` (CUDA kernels from csrc/).

The package works without it: the import failure is kept and turned into a clear error only
when the ``cuda`` backend is asked for.
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
    "rebuild with CUDA: SPECTRAL_KERNELS_CUDA=1 pip install -e . --no-build-isolation "
    "(needs nvcc on PATH)"
)


def cuda_backend_status(device: torch.device | None):
    """BackendStatus of the compiled CUDA backend for ``device``."""
    from spectral_kernels.backends import BackendStatus

    if _C is None:
        return BackendStatus(
            "cuda", False, f"the extension spectral_kernels._C is not built ({IMPORT_ERROR}); {REBUILD_HINT}"
        )
    if device is not None and device.type != "cuda":
        return BackendStatus("cuda", False, f"the cuda backend needs CUDA tensors, got device '{device.type}'")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "spectral_kernels._C is built but no CUDA device is visible")
    return BackendStatus("cuda", True, "compiled CUDA kernels (spectral_kernels._C)")
