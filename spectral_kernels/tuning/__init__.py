"""The adaptation layer: spectral fine-tuning of any model in a few lines, in peft's shape.

    model = sk.adapt(model, sk.SpectralConfig(target_modules=["query", "value"], rank=16, mode="scale"))
    ...train (only the spectral coefficients require grad)...
    sk.save_pretrained(model, "run/adapter");  model = sk.from_pretrained(base_model, "run/adapter")
    model.merge_and_unload()   # peft's method names work on the adapted model (``peft_names``)

Modules, bottom to top: ``config`` (SpectralConfig), ``safe_io`` (atomic writes, checksums),
``fingerprints`` (base-weight fingerprints),
``inject`` (adapt), ``banks`` (named adapters, mixed-task batches), ``adapter_io`` (single-file
adapters), ``merge``, ``optimizer`` (parameter groups), ``folder`` (adapter folders, transformers' save_pretrained and Trainer),
``export`` (peft LoRA folders for peft / vLLM / SGLang), ``merged_checkpoint`` (full merged checkpoints).
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
from spectral_kernels.tuning.export import VLLM_LORA_RANKS, PureFormExportError, export_peft
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
from spectral_kernels.tuning.merged_checkpoint import save_merged
from spectral_kernels.tuning.optimizer import param_groups
from spectral_kernels.tuning.peft_names import get_nb_trainable_parameters, merge_and_unload

__all__ = [
    "AdaptReport",
    "AdapterFileError",
    "AdapterInfo",
    "AdapterMismatchError",
    "PureFormExportError",
    "SpectralConfig",
    "VLLM_LORA_RANKS",
    "active_adapter",
    "adapt",
    "adapter_batch",
    "adapter_parameters",
    "adapter_state_dict",
    "add_adapter",
    "count_parameters",
    "delete_adapter",
    "export_peft",
    "find_targets",
    "fingerprint",
    "from_pretrained",
    "list_adapters",
    "load_adapter",
    "get_nb_trainable_parameters",
    "merge_adapter",
    "merge_and_unload",
    "param_groups",
    "print_trainable_parameters",
    "read_adapter",
    "read_folder",
    "save_adapter",
    "save_merged",
    "save_pretrained",
    "set_adapter",
    "spectral_layers",
    "unload",
    "unmerge",
]
