"""The adaptation layer: spectral fine-tuning of any model in three lines.

    model = adapt(model, SpectralConfig(target_modules=["query", "value"], rank=16, mode="scale"))
    ...train (only the spectral coefficients require grad)...
    save_adapter(model, "adapter.safetensors");  merge_adapter(model)
"""
from spectral_kernels.adapt.adapter_io import (
    AdapterInfo,
    AdapterMismatchError,
    adapter_state_dict,
    fingerprint,
    load_adapter,
    read_adapter,
    save_adapter,
)
from spectral_kernels.adapt.config import SpectralConfig
from spectral_kernels.adapt.inject import (
    AdaptReport,
    adapt,
    count_parameters,
    find_targets,
    print_trainable_parameters,
    spectral_layers,
)
from spectral_kernels.adapt.merge import merge_adapter, unload, unmerge

__all__ = [
    "AdaptReport",
    "AdapterInfo",
    "AdapterMismatchError",
    "SpectralConfig",
    "adapt",
    "adapter_state_dict",
    "count_parameters",
    "find_targets",
    "fingerprint",
    "load_adapter",
    "merge_adapter",
    "print_trainable_parameters",
    "read_adapter",
    "save_adapter",
    "spectral_layers",
    "unload",
    "unmerge",
]
