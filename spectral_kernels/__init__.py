"""spectral-kernels: fused kernels for spectral fine-tuning.

The primitive is ``y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b`` (:func:`spectral_linear`) with its backward,
wrapped as a drop-in ``nn.Linear`` replacement (:class:`SpectralLinear`), the batched truncated SVD
its layers start from (:func:`truncated_svd`, :func:`batched_truncated_svd`), and the adaptation API
in peft's shape (``sk.adapt(model, sk.SpectralConfig(...))``, ``sk.save_pretrained`` /
``sk.from_pretrained``, adapter files, merging), implemented in ``spectral_kernels.tuning``.
"""
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
from spectral_kernels.tuning import (
    AdapterFileError,
    AdapterMismatchError,
    SpectralConfig,
    active_adapter,
    adapt,
    adapter_batch,
    adapter_parameters,
    add_adapter,
    delete_adapter,
    from_pretrained,
    list_adapters,
    load_adapter,
    merge_adapter,
    param_groups,
    print_trainable_parameters,
    save_adapter,
    save_pretrained,
    set_adapter,
    unload,
    unmerge,
)

from spectral_kernels._version import __version__  # noqa: E402

__all__ = [
    "AdapterFileError",
    "AdapterMismatchError",
    "BackendUnavailableError",
    "SpecLoRALinear",
    "SVDResult",
    "SpectralConfig",
    "SpectralLinear",
    "active_adapter",
    "adapt",
    "adapter_batch",
    "adapter_parameters",
    "add_adapter",
    "backend_status",
    "batched_truncated_svd",
    "delete_adapter",
    "from_pretrained",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "param_groups",
    "print_trainable_parameters",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "spectral_linear",
    "spectral_linear_ref",
    "truncated_svd",
    "unload",
    "unmerge",
    "use_backend",
    "__version__",
]
