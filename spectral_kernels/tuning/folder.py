"""Adapter folders: ``save_pretrained(model, dir)`` and ``from_pretrained(base_model, dir)``.

A folder holds

- ``spectral_adapter.safetensors``: the adapter file of :func:`save_adapter` (the trainable tensors —
  coefficients, LoRA pairs, biases with ``train_bias``, ``modules_to_save`` — with the config and the
  base fingerprints in its metadata);
- ``spectral_config.json``: the same description for people and tools: the folder format, the
  package version, the SpectralConfig, the adapted layers with their rank, mode, form and base
  fingerprint, the ``modules_to_save`` parameters, and the base model's class and name.

For a transformers model (anything with a ``config`` that can ``save_pretrained``) three more files
make the folder a Trainer checkpoint and keep a plain ``from_pretrained`` from loading it silently:

- ``config.json``: the base model's config (transformers reads it before any weights);
- ``pytorch_model.bin``: the same adapter tensors, under the model's parameter names, which is what
  Trainer's ``resume_from_checkpoint`` (and ``load_best_model_at_end``) loads with
  ``load_state_dict(strict=False)`` into the adapted model;
- ``model.safetensors.index.json``: a guard. ``from_pretrained`` looks for a safetensors index
  before ``pytorch_model.bin``; this one names a single shard, whose file name is the instruction
  to load the folder with ``spectral_kernels.from_pretrained`` and which does not exist, so a plain
  ``SomeModel.from_pretrained(dir)`` stops with that name in its error instead of returning the
  untuned base (it would otherwise find only unexpected keys and warn). Loading with
  ``use_safetensors=False`` skips the guard: that is the one way around it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from spectral_kernels._version import __version__
from spectral_kernels.tuning.adapter_io import (
    AdapterInfo,
    AdapterMismatchError,
    adapter_state_dict,
    load_adapter,
    read_adapter,
    save_adapter,
)
from spectral_kernels.tuning.inject import ADAPT_HOOKS, CONFIG_ATTR, spectral_layers, unwrap

FOLDER_FORMAT = "1"
CONFIG_NAME = "spectral_config.json"
ADAPTER_NAME = "spectral_adapter.safetensors"
HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "pytorch_model.bin"
HF_GUARD_INDEX_NAME = "model.safetensors.index.json"
#: the guard's shard: a file that does not exist, named so that the error a plain from_pretrained
#: raises on it tells what to do
GUARD_SHARD_NAME = ("THIS-FOLDER-IS-A-SPECTRAL-ADAPTER-load-it-with-"
                    "spectral_kernels.from_pretrained(base_model,this_folder)")


def _hf_config(model: nn.Module):
    """The transformers config of a model, or None for other modules."""
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "save_pretrained") else None


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, include_basis: bool = False) -> AdapterInfo:
    """Write an adapted model's adapter folder (see the module docstring); returns the adapter's size.

    Args:
        model: a model :func:`adapt` rewrote (DDP / torch.compile wrappers are looked through).
        save_directory: the folder, created if needed; files of an earlier save are overwritten.
        include_basis: also store every layer's U, s, V (loading then needs no SVD).

    Raises:
        ValueError: the model has no adapter.
    """
    m = unwrap(model)
    config = getattr(m, CONFIG_ATTR, None)
    layers = spectral_layers(m)
    if config is None or not layers:
        raise ValueError("save_pretrained: the model has no adapter; call adapt(model, config) first")
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)
    info = save_adapter(m, os.path.join(directory, ADAPTER_NAME), include_basis=include_basis)
    _, layer_meta, tensors = read_adapter(os.path.join(directory, ADAPTER_NAME))
    in_layers = {f"{name}." for name in layers}
    hf_config = _hf_config(m)
    description = {
        "format": FOLDER_FORMAT,
        "package": "spectral-kernels",
        "package_version": __version__,
        "adapter_file": ADAPTER_NAME,
        "config": json.loads(config.to_json()),
        "layers": layer_meta,
        "modules_to_save": sorted(n for n in tensors if not any(n.startswith(p) for p in in_layers)),
        "base_model_class": type(m).__name__,
        "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
    }
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(description, f, indent=2, sort_keys=True)
        f.write("\n")
    if hf_config is not None:
        hf_config.save_pretrained(directory)
        torch.save({n: t.cpu().contiguous() for n, t in adapter_state_dict(m).items()},
                   os.path.join(directory, HF_WEIGHTS_NAME))
        with open(os.path.join(directory, HF_GUARD_INDEX_NAME), "w") as f:
            json.dump({"metadata": {"spectral_kernels": "adapter folder, not a full checkpoint"},
                       "weight_map": {"spectral_adapter": GUARD_SHARD_NAME}}, f, indent=2)
            f.write("\n")
    return info


def read_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """The description (``spectral_config.json``) of an adapter folder.

    Raises:
        FileNotFoundError: ``directory`` is not a folder or holds no ``spectral_config.json``.
        ValueError: the folder's format is not this version's.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a spectral adapter folder: it has no "
                                f"{CONFIG_NAME} (save one with spectral_kernels.save_pretrained(model, folder))")
    with open(path) as f:
        description = json.load(f)
    if description.get("format") != FOLDER_FORMAT:
        raise ValueError(f"from_pretrained: {path} has folder format {description.get('format')!r}; this "
                         f"version of spectral-kernels ({__version__}) reads format {FOLDER_FORMAT!r}")
    return description


def from_pretrained(base_model: nn.Module, directory: str | os.PathLike, *,
                    cache_dir: str | os.PathLike | None = None) -> nn.Module:
    """Rebuild an adapted model from its base and an adapter folder; returns ``base_model`` adapted.

    The base is checked against the folder's fingerprints before any SVD, adapted with the folder's
    config (the SVD comes from the cache when ``cache_dir`` — else the config's ``svd_cache_dir``,
    else ``SPECTRAL_KERNELS_SVD_CACHE`` — holds it, or from the stored basis), then the trained
    tensors are loaded. An already adapted base must have been adapted with the same config.

    Raises:
        FileNotFoundError: not an adapter folder.
        AdapterMismatchError: another base weight, or a model adapted differently; the message
            names the layer and what differs.
    """
    description = read_folder(directory)
    path = os.path.join(os.fspath(directory), description.get("adapter_file", ADAPTER_NAME))
    m = unwrap(base_model)
    existing = getattr(m, CONFIG_ATTR, None)
    if existing is not None and spectral_layers(m):
        file_config, _, _ = read_adapter(path)
        diff = _config_difference(existing, file_config)
        if diff:
            raise AdapterMismatchError(f"from_pretrained: the model is adapted with another config than the "
                                       f"folder's ({diff}); pass the unadapted base model")
    return load_adapter(base_model, path, cache_dir=cache_dir)


def _config_difference(have, want) -> str:
    """The fields of two SpectralConfigs that change the model (not the SVD's run options)."""
    skip = {"progress", "svd_cache_dir", "backend"}
    diffs = [f"{f.name}={getattr(want, f.name)!r} in the folder, {getattr(have, f.name)!r} in the model"
             for f in dataclasses.fields(want) if f.name not in skip and getattr(want, f.name) != getattr(have, f.name)]
    return "; ".join(diffs)


# --- transformers: save_pretrained and Trainer --------------------------------------------------
#: instance attribute holding the model's own _keys_to_ignore_on_save while the hook replaces it
_KEYS_ATTR = "_spectral_original_keys_to_ignore_on_save"


def _frozen_keys(model: nn.Module) -> set[str]:
    """state_dict keys an adapter folder does not hold: all but the trainable parameters."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict() if k not in trainable}


def _save_pretrained_hook(model: nn.Module, save_directory, *args, **kwargs):
    """``model.save_pretrained`` of an adapted transformers model: the adapter folder (Trainer calls
    this for its checkpoints and save_model). Once the model holds no spectral layer any more
    (merged or unloaded) the model's own save_pretrained is back, and runs."""
    if spectral_layers(model):
        if kwargs.get("is_main_process", True):
            save_pretrained(model, save_directory)
            model._keys_to_ignore_on_save = _frozen_keys(model)
        return None
    remove_hf_hooks(model)
    return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def install_hf_hooks(model: nn.Module) -> None:
    """Make an adapted transformers model save (and resume in Trainer) as an adapter folder:
    ``model.save_pretrained`` writes the folder, and ``model._keys_to_ignore_on_save`` lists the
    frozen keys so that Trainer's resume, which loads only the adapter tensors, reports no missing
    keys. Instance attributes, so the class and other instances are untouched; a no-op for models
    without a transformers config."""
    if _hf_config(model) is None or not hasattr(type(model), "save_pretrained"):
        return
    if not hasattr(model, _KEYS_ATTR):
        setattr(model, _KEYS_ATTR, getattr(model, "_keys_to_ignore_on_save", None))
    model.save_pretrained = _BoundHook(model)
    model._keys_to_ignore_on_save = _frozen_keys(model)


def remove_hf_hooks(model: nn.Module) -> None:
    """Undo :func:`install_hf_hooks` (nothing to do if they are not installed)."""
    if "save_pretrained" in model.__dict__:
        del model.__dict__["save_pretrained"]
    if hasattr(model, _KEYS_ATTR):
        model._keys_to_ignore_on_save = getattr(model, _KEYS_ATTR)
        delattr(model, _KEYS_ATTR)


class _BoundHook:
    """``_save_pretrained_hook`` bound to one model. A small class rather than functools.partial so
    that copy.deepcopy(model) binds the copy (deepcopy maps the model reference through its memo)
    and the repr says what it is."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        return _save_pretrained_hook(self.model, save_directory, *args, **kwargs)

    def __repr__(self) -> str:
        return "<spectral_kernels adapter save_pretrained>"


ADAPT_HOOKS.append(install_hf_hooks)
