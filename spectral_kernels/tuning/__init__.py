"""The adaptation layer: spectral fine-tuning of any model in a few lines, in peft's shape.

    model = sk.adapt(model, sk.SpectralConfig(target_modules=["query", "value"], rank=16, mode="scale"))
    ...train (only the spectral coefficients require grad)...
    sk.save_pretrained(model, "run/adapter");  model = sk.from_pretrained(base_model, "run/adapter")

Modules, bottom to top: ``config`` (SpectralConfig), ``safe_io`` (atomic writes, checksums),
``fingerprints`` (base-weight fingerprints),
``inject`` (adapt), ``banks`` (named adapters, mixed-task batches), ``adapter_io`` (single-file
adapters), ``merge``, ``optimizer`` (parameter groups), ``folder`` (adapter folders, transformers' save_pretrained and Trainer).
"""
from spectral_kernels.tuning.adapter_io import (
    AdapterInfo,
    AdapterMismatchError,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    save_adapter,
)
from spectral_kernels.tuning.banks import (
    active_adapter,
    adapter_batch,
    adapter_parameters,
    add_adapter,
    delete_adapter,
    list_adapters,
    set_adapter,
)
from spectral_kernels.tuning.config import SpectralConfig
from spectral_kernels.tuning.fingerprints import fingerprint
from spectral_kernels.tuning.safe_io import AdapterFileError
from spectral_kernels.tuning.folder import from_pretrained, read_folder, save_pretrained
from spectral_kernels.tuning.inject import (
    AdaptReport,
    adapt,
    count_parameters,
    find_targets,
    print_trainable_parameters,
    spectral_layers,
)
from spectral_kernels.tuning.merge import merge_adapter, unload, unmerge
from spectral_kernels.tuning.optimizer import param_groups

__all__ = [
    "AdaptReport",
    "AdapterFileError",
    "AdapterInfo",
    "AdapterMismatchError",
    "SpectralConfig",
    "active_adapter",
    "adapt",
    "adapter_batch",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "count_parameters",
    "delete_adapter",
    "find_targets",
    "fingerprint",
    "from_pretrained",
    "list_adapters",
    "load_adapter",
    "merge_adapter",
    "param_groups",
    "print_trainable_parameters",
    "read_adapter",
    "read_folder",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "spectral_layers",
    "unload",
    "unmerge",
]
