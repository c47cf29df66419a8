"""Merged weights: a full checkpoint of an adapted model (``save_merged``), and the tuned weights of
a base state_dict plus an adapter file, with no model (``merged_state_dict``).

Every spectral layer is merged into the dense layer it computes now (:func:`merge_adapter`: an
nn.Linear with W + U·diag(d)·Vᵀ, a Conv1D for GPT-2 targets, Q(Ŵ + ΔW) on quantized bases, with
its warning), the model is written by its own ``save_pretrained`` (so tied weights stay tied and
the config and dtype are the model's), and the layers are put back (:func:`unmerge`): the adapted
model is left as it was, coefficients, hooks and all.

:func:`merged_state_dict` needs no model class: it takes the base's state_dict and an adapter file
or folder, checks every adapted layer's base weight against the adapter's fingerprint, rebuilds the
layer as adapt() would (same SVD options and seed, or the stored basis) and returns the base
state_dict with each adapted weight replaced by its merged weight (and the trained biases and
``modules_to_save`` tensors) — what ``spectral-kernels analyze BASE ADAPTER`` compares.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.adapter_io import META_CONFIG, AdapterMismatchError, read_adapter
from spectral_kernels.tuning.fingerprints import check_fingerprint
from spectral_kernels.tuning.folder import _KEYS_ATTR, ADAPTER_NAME, CONFIG_NAME, _hf_config, read_folder
from spectral_kernels.tuning.inject import _batched_svd, _build, spectral_layers, unwrap
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


# --- without a model: a base state_dict and an adapter file ----------------------------------------
def adapter_file(path: str | os.PathLike) -> str | None:
    """The adapter file of ``path`` if it is a spectral adapter (a folder written by
    :func:`spectral_kernels.save_pretrained`, or a file written by :func:`spectral_kernels.save_adapter`),
    else None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
            return None
        return os.path.join(path, read_folder(path).get("adapter_file", ADAPTER_NAME))
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a readable safetensors file: not an adapter either
        return None
    return path if META_CONFIG in meta else None


def _base_key(base: Mapping[str, Tensor], name: str, leaf: str) -> str | None:
    """The key of ``{name}.{leaf}`` in the base state_dict, allowing one side an extra leading
    prefix (a bare ``encoder.…`` checkpoint for a ``bert.encoder.…`` adapter, or the other way)."""
    exact = f"{name}.{leaf}"
    if exact in base:
        return exact
    hits = [k for k in base if k.endswith("." + leaf) and (
        exact.endswith("." + k) or k.endswith("." + exact))]
    return hits[0] if len(hits) == 1 else None


@torch.no_grad()
def merged_state_dict(base: Mapping[str, Tensor], adapter: str | os.PathLike) -> dict[str, Tensor]:
    """The base state_dict with an adapter merged in (module docstring), same keys and dtypes.

    Args:
        base: the base model's state_dict (weights in their stored layout: a GPT-2 Conv1D's [in, out]).
        adapter: an adapter folder or file saved by spectral_kernels.

    Raises:
        ValueError: ``adapter`` is not a spectral adapter.
        AdapterMismatchError: an adapted layer's weight is missing from ``base`` or is not the
            weight the adapter was trained on (the layer is named).
    """
    path = adapter_file(adapter)
    if path is None:
        raise ValueError(f"{os.fspath(adapter)!r} is not a spectral adapter (a folder with {CONFIG_NAME} or a "
                         ".safetensors file saved by spectral_kernels.save_adapter)")
    config, layer_meta, tensors = read_adapter(path)
    out = dict(base)
    weights: dict[str, tuple[str, Tensor]] = {}
    for name, meta in layer_meta.items():
        key = _base_key(base, name, "weight")
        if key is None:
            raise AdapterMismatchError(f"layer {name!r} of adapter {path!r} has no weight '{name}.weight' in the base")
        W = base[key].t() if meta["source"] == "conv1d" else base[key]
        if "quant" in meta["fingerprint"]:
            raise AdapterMismatchError(f"layer {name!r}: the adapter was trained on a quantized base "
                                       f"({meta['fingerprint']['quant'].get('kind')}); merge it with the model itself")
        diff = check_fingerprint(meta["fingerprint"], W)
        if diff is not None:
            raise AdapterMismatchError(f"layer {name!r}: {diff}")
        weights[name] = (key, W)
    factors = {}
    if all(f"{n}.U" in tensors for n in layer_meta):
        factors = {n: (tensors.pop(f"{n}.U"), tensors.pop(f"{n}.s"), tensors.pop(f"{n}.V")) for n in layer_meta}
    else:
        by_k: dict[int, dict[str, Tensor]] = {}
        for n, meta in layer_meta.items():
            by_k.setdefault(meta["rank"], {})[n] = weights[n][1]
        for k, mats in by_k.items():
            factors.update(_batched_svd(mats, k, config))
    for name, meta in layer_meta.items():
        key, W = weights[name]
        bias_key = _base_key(base, name, "bias") if meta.get("bias") else None
        if meta.get("bias") and bias_key is None:
            raise AdapterMismatchError(f"layer {name!r} of adapter {path!r} has a bias but the base has no '{name}.bias'")
        linear = nn.Linear(W.shape[1], W.shape[0], bias=bias_key is not None, dtype=W.dtype)
        linear.weight.copy_(W)
        if bias_key is not None:
            linear.bias.copy_(base[bias_key])
        layer = _build(linear, meta["rank"], factors[name], config)
        layer.coeffs.copy_(tensors.pop(f"{name}.coeffs"))
        for leaf in ("lora_A", "lora_B", "bias"):
            if f"{name}.{leaf}" in tensors:
                getattr(layer, leaf).copy_(tensors.pop(f"{name}.{leaf}"))
                if leaf == "bias":
                    out[bias_key] = layer.bias.detach().clone()
        merged = layer.merged_weight()
        out[key] = (merged.t() if meta["source"] == "conv1d" else merged).contiguous()
    for n, t in tensors.items():  # modules_to_save and anything else trained
        module, _, leaf = n.rpartition(".")
        key = _base_key(base, module, leaf)
        if key is None:
            raise AdapterMismatchError(f"adapter tensor {n!r} has no counterpart in the base")
        out[key] = t
    return out
