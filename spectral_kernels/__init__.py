"""spectral-kernels: fused kernels for spectral fine-tuning.

The primitive is ``y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b`` (:func:`spectral_linear`) with its backward,
wrapped as a drop-in ``nn.Linear`` replacement (:class:`SpectralLinear`), and the batched
truncated SVD its layers start from (:func:`truncated_svd`, :func:`batched_truncated_svd`), and
the adaptation layer ``spectral_kernels.adapt`` (``adapt(model, SpectralConfig(...))``, adapter
files, merging) that turns a model's linear layers spectral.
"""
from spectral_kernels import adapt
from spectral_kernels.backends import (
    BackendUnavailableError,
    backend_status,
    use_backend,
)
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import SpectralLinear
from spectral_kernels.ops.reference import spectral_linear_ref
from spectral_kernels.ops.spectral_linear import spectral_linear
from spectral_kernels.ops.truncated_svd import SVDResult, batched_truncated_svd, truncated_svd

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "SpecLoRALinear",
    "SVDResult",
    "SpectralLinear",
    "batched_truncated_svd",
    "backend_status",
    "spectral_linear",
    "spectral_linear_ref",
    "truncated_svd",
    "use_backend",
    "__version__",
]
