"""save_merged: a full checkpoint of an adapted model that plain transformers loads.

Every spectral layer is merged into the dense layer it computes now (:func:`merge_adapter`: an
nn.Linear with W + U·diag(d)·Vᵀ, a Conv1D for GPT-2 targets, Q(Ŵ + ΔW) on quantized bases, with
its warning), the model is written by its own ``save_pretrained`` (so tied weights stay tied and
the config and dtype are the model's), and the layers are put back (:func:`unmerge`): the adapted
model is left as it was, coefficients, hooks and all.
"""
from __future__ import annotations

import os

from torch import nn

from spectral_kernels.tuning.folder import _KEYS_ATTR, _hf_config
from spectral_kernels.tuning.inject import spectral_layers, unwrap
from spectral_kernels.tuning.merge import MERGED_ATTR, merge_adapter, unmerge

#: files whose presence means a folder already holds a model checkpoint
CHECKPOINT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def save_merged(model: nn.Module, directory: str | os.PathLike, *, adapter: str | None = None,
                overwrite: bool = False, **save_kwargs) -> str:
    """Write ``model`` with its adapter merged as a transformers checkpoint that
    ``AutoModel.from_pretrained(directory)`` (or the model's own class) loads; returns the folder.

    Args:
        model: an adapted transformers model (a ``PreTrainedModel``; wrappers are looked through).
        directory: the folder to write (created).
        adapter: the named adapter to merge (None: the active one).
        overwrite: replace a checkpoint already in ``directory`` (else it is refused, untouched).
        save_kwargs: passed to the model's ``save_pretrained`` (e.g. ``max_shard_size``).

    Raises:
        ValueError: the model has no adapter, or an unknown adapter name.
        TypeError: the model is not a transformers model (for a plain nn.Module use
            :func:`merge_adapter` on a copy and ``torch.save`` its state_dict).
        FileExistsError: ``directory`` holds a checkpoint and ``overwrite`` is False.
    """
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        raise ValueError("save_merged: the model has no adapter (no spectral layer); call adapt(model, config) first")
    if _hf_config(m) is None or not hasattr(type(m), "save_pretrained"):
        raise TypeError(f"save_merged: {type(m).__name__} is not a transformers model (no config / save_pretrained); "
                        "use spectral_kernels.merge_adapter on a copy and save its state_dict")
    if adapter is not None:
        known = next(iter(layers.values())).adapter_names()
        if adapter not in known:
            raise ValueError(f"save_merged: no adapter {adapter!r}; the model's adapters are {known}")
    directory = os.fspath(directory)
    held = [f for f in CHECKPOINT_FILES if os.path.exists(os.path.join(directory, f))]
    if held and not overwrite:
        raise FileExistsError(f"save_merged: {directory!r} already holds a checkpoint ({', '.join(held)}); nothing was "
                              "written. Pass overwrite=True to replace it, or choose another directory")
    if getattr(m, MERGED_ATTR, None):
        raise ValueError("save_merged: the model holds layers merged by merge_adapter; unmerge(model) first")
    # the adapted model lists its frozen keys as _keys_to_ignore_on_save (an adapter folder skips
    # them); a full checkpoint needs them all: the model's own value while saving
    saved_keys = m.__dict__.get("_keys_to_ignore_on_save")
    merge_adapter(m, adapter=adapter)
    try:
        if hasattr(m, _KEYS_ATTR):
            m._keys_to_ignore_on_save = getattr(m, _KEYS_ATTR)
        type(m).save_pretrained(m, directory, **save_kwargs)
    finally:
        unmerge(m)
        if hasattr(m, _KEYS_ATTR):
            m._keys_to_ignore_on_save = saved_keys
    return directory
