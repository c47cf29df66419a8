"""spectral-kernels: fused kernels for spectral fine-tuning.

The primitive is ``y = x·Wᵀ + ((x·V) ⊙ d)·Uᵀ + b`` (:func:`spectral_linear`) with its backward,
wrapped as a drop-in ``nn.Linear`` replacement (:class:`SpectralLinear`), the batched truncated SVD
its layers start from (:func:`truncated_svd`, :func:`batched_truncated_svd`), and the adaptation API
in peft's shape (``sk.adapt(model, sk.SpectralConfig(...))``, ``sk.save_pretrained`` /
``sk.from_pretrained``, adapter files, merging, export to peft LoRA folders and merged checkpoints),
implemented in ``spectral_kernels.tuning``.

The top-level names are loaded on first use (PEP 562 ``__getattr__``): ``import spectral_kernels``
imports neither torch nor any kernel, so the command line (``spectral_kernels.cli``) answers
``--help`` at once. Add a public name by adding it to ``_EXPORTS`` (never by a module-level import
here, which would bring torch back into every ``import spectral_kernels``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spectral_kernels._version import __version__

#: public name → the module that defines it
_EXPORTS = {
    "BackendUnavailableError": "spectral_kernels.backends",
    "backend_status": "spectral_kernels.backends",
    "use_backend": "spectral_kernels.backends",
    "SpecLoRALinear": "spectral_kernels.nn.speclora",
    "SpectralLinear": "spectral_kernels.nn.spectral_linear",
    "spectral_linear_ref": "spectral_kernels.ops.reference",
    "spectral_linear": "spectral_kernels.ops.spectral_linear",
    "SVDResult": "spectral_kernels.ops.truncated_svd",
    "batched_truncated_svd": "spectral_kernels.ops.truncated_svd",
    "truncated_svd": "spectral_kernels.ops.truncated_svd",
    **{name: "spectral_kernels.tuning" for name in (
        "AdapterFileError", "AdapterMismatchError", "PureFormExportError", "SpectralConfig",
        "active_adapter", "adapt", "adapter_batch", "adapter_parameters", "add_adapter",
        "delete_adapter", "export_peft", "from_pretrained", "list_adapters", "load_adapter",
        "merge_adapter", "merge_and_unload", "param_groups", "print_trainable_parameters",
        "save_adapter", "save_merged", "save_pretrained", "set_adapter", "unload", "unmerge")},
}

#: subpackages and modules reachable as attributes (``sk.tuning.spectral_layers``)
_SUBMODULES = ("analysis", "backends", "benchmarking", "cli", "nn", "ops", "plans", "tuning")

__all__ = sorted(_EXPORTS, key=str.lower) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


if TYPE_CHECKING:  # what type checkers and IDEs see; nothing is imported at run time
    from spectral_kernels.backends import BackendUnavailableError, backend_status, use_backend  # noqa: F401
    from spectral_kernels.nn.speclora import SpecLoRALinear  # noqa: F401
    from spectral_kernels.nn.spectral_linear import SpectralLinear  # noqa: F401
    from spectral_kernels.ops.reference import spectral_linear_ref  # noqa: F401
    from spectral_kernels.ops.spectral_linear import spectral_linear  # noqa: F401
    from spectral_kernels.ops.truncated_svd import SVDResult, batched_truncated_svd, truncated_svd  # noqa: F401
    from spectral_kernels.tuning import (  # noqa: F401
        AdapterFileError, AdapterMismatchError, PureFormExportError, SpectralConfig, active_adapter,
        adapt, adapter_batch, adapter_parameters, add_adapter, delete_adapter, export_peft,
        from_pretrained, list_adapters, load_adapter, merge_adapter, merge_and_unload, param_groups,
        print_trainable_parameters, save_adapter, save_merged, save_pretrained, set_adapter, unload,
        unmerge)
