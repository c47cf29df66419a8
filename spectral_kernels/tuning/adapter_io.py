"""Adapter files: the trainable tensors of an adapted model, its config, and base-weight fingerprints.

A file is safetensors: its tensors are the model's trainable parameters by qualified name
(``...query.coeffs``, ``...lora_A``, a ``modules_to_save`` head, biases with ``train_bias``), and,
with ``include_basis=True``, every layer's frozen ``U``, ``s``, ``V`` (so that loading skips the SVD
and uses bit-identical directions). Its string metadata holds:

- ``spectral_kernels.format``: the file format version;
- ``spectral_kernels.config``: the SpectralConfig as JSON;
- ``spectral_kernels.layers``: JSON ``{name: {source, in_features, out_features, rank, mode, form,
  lora_rank, lora_alpha, fingerprint}}`` for every adapted layer.

Base fingerprints: :mod:`spectral_kernels.tuning.fingerprints`.

Adapter banks (:mod:`spectral_kernels.tuning.banks`): a file holds one adapter's coefficients,
always under ``{layer}.coeffs``: ``save_adapter(model, path, adapter="topic")`` writes that slot
(default: the active adapter), and ``load_adapter(model, path, adapter="topic")`` reads a file's
coefficients into the slot "topic" (added when missing), so a task trained and saved alone joins
another model's bank. Loading into a slot other than "default" takes coefficients only: a file
that also holds tensors every adapter shares (``modules_to_save`` heads, biases with
``train_bias``) is refused there.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.config import SpectralConfig
from spectral_kernels.tuning.fingerprints import compare_fingerprints, layer_fingerprint
from spectral_kernels.tuning.inject import (
    CONFIG_ATTR,
    SOURCE_ATTR,
    adapt,
    base_fingerprint,
    base_weight,
    find_targets,
    spectral_layers,
    unwrap,
)
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import DEFAULT_ADAPTER, SpectralLinear

FORMAT_VERSION = "1"
META_FORMAT = "spectral_kernels.format"
META_CONFIG = "spectral_kernels.config"
META_LAYERS = "spectral_kernels.layers"


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model: another base, rank, mode or set of layers."""


def _layer_meta(layer: SpectralLinear) -> dict[str, Any]:
    meta = {
        "source": getattr(layer, SOURCE_ATTR, "linear"),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "rank": layer.rank,
        "mode": layer.mode,
        "form": layer.form,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, SpecLoRALinear):
        meta.update(lora_rank=layer.lora_rank, lora_alpha=layer.lora_alpha)
    return meta


# --- save -----------------------------------------------------------------------------------------
@dataclass
class AdapterInfo:
    """What an adapter file holds: tensor and parameter counts and its size on disk."""

    path: str
    num_tensors: int
    num_parameters: int
    num_bytes: int
    num_layers: int

    def __str__(self) -> str:
        return (f"adapter {self.path}: {self.num_layers} layers, {self.num_tensors} tensors, "
                f"{self.num_parameters:,} parameters, {self.num_bytes / 1024:.1f} KiB")


def _coefficient_ids(layers: dict[str, SpectralLinear]) -> set[int]:
    return {id(layer.coefficients(n)) for layer in layers.values() for n in layer.adapter_names()}


def _full(t: Tensor) -> Tensor:
    """A detached, whole tensor: an FSDP2-sharded parameter (a DTensor) is gathered first, a
    collective every rank must join (save_adapter then writes the same file on every rank)."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state_dict(model: nn.Module, *, include_basis: bool = False,
                       adapter: str | None = None) -> dict[str, Tensor]:
    """The tensors save_adapter writes: every layer's coefficients of ``adapter`` (None: the active
    one) as ``{layer}.coeffs``, the other trainable parameters by name (+ U, s, V with
    include_basis)."""
    m = unwrap(model)
    layers = spectral_layers(m)
    coeff_ids = _coefficient_ids(layers)
    out = {n: _full(p) for n, p in m.named_parameters() if p.requires_grad and id(p) not in coeff_ids}
    for name, layer in layers.items():
        out[f"{name}.coeffs"] = _full(layer.coefficients(adapter))
    if include_basis:
        for name, layer in spectral_layers(m).items():
            for b in ("U", "s", "V"):
                out[f"{name}.{b}"] = getattr(layer, b).detach()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, *, include_basis: bool = False,
                 adapter: str | None = None, verbose: bool = False) -> AdapterInfo:
    """Write the adapter of an adapted model to ``path`` (safetensors); returns its size (printed
    too with ``verbose=True``).

    Args:
        model: a model :func:`adapt` rewrote (DDP / torch.compile wrappers are looked through).
        path: file to write.
        include_basis: also store every layer's U [out, k], s [k], V [in, k] (larger, but loading
            then needs no SVD and reproduces the directions bit for bit).
        adapter: which named adapter's coefficients to write (None: the active one); stored as
            ``{layer}.coeffs`` whatever the name, so the file loads into any slot.
    """
    from safetensors.torch import save_file

    m = unwrap(model)
    config = getattr(m, CONFIG_ATTR, None)
    layers = spectral_layers(m)
    if config is None or not layers:
        raise ValueError("save_adapter: the model has no adapter; call adapt(model, config) first")
    layer_meta = {}
    for name, layer in layers.items():
        fp = layer_fingerprint(layer)
        if fp is None:
            raise ValueError(f"save_adapter: layer {name!r} has no base weight nor recorded fingerprint")
        layer_meta[name] = {**_layer_meta(layer), "fingerprint": fp}
    tensors = {n: t.cpu().contiguous()
               for n, t in adapter_state_dict(m, include_basis=include_basis, adapter=adapter).items()}
    metadata = {META_FORMAT: FORMAT_VERSION, META_CONFIG: config.to_json(),
                META_LAYERS: json.dumps(layer_meta, sort_keys=True)}
    path = os.fspath(path)
    save_file(tensors, path, metadata=metadata)
    n_basis = sum(t.numel() for n, t in tensors.items() if include_basis and n.rsplit(".", 1)[-1] in ("U", "s", "V")
                  and n.rsplit(".", 1)[0] in layers)
    info = AdapterInfo(path, len(tensors), sum(t.numel() for t in tensors.values()) - n_basis,
                       os.path.getsize(path), len(layers))
    if verbose:
        print(info)
    return info


# --- load -----------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[SpectralConfig, dict[str, dict], dict[str, Tensor]]:
    """(config, per-layer metadata, tensors) of an adapter file."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if META_CONFIG not in meta or META_LAYERS not in meta:
        raise ValueError(f"{os.fspath(path)} is not a spectral_kernels adapter (no {META_CONFIG} metadata)")
    if meta.get(META_FORMAT) != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)}: adapter format {meta.get(META_FORMAT)!r}, expected {FORMAT_VERSION!r}")
    return SpectralConfig.from_json(meta[META_CONFIG]), json.loads(meta[META_LAYERS]), tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 adapter: str | None = None, verbose: bool = False) -> nn.Module:
    """Load an adapter file into ``model`` and return it.

    A model that is not adapted yet is first checked against the file's base fingerprints (before
    any SVD), then adapted with the file's config (with the stored basis when the file has one;
    ``cache_dir`` replaces the config's ``svd_cache_dir`` for the SVD cache).
    An adapted model must have the same adapted layers with the same shape, rank, mode, form and
    LoRA rank. The trainable tensors are then copied in.

    ``adapter`` names the coefficient slot the file's ``{layer}.coeffs`` go to (None: the active
    adapter; a missing name is added to every layer). A slot other than "default" takes
    coefficients only (module docstring).

    Raises:
        AdapterMismatchError: another base weight, rank, mode, form, LoRA rank or set of layers;
            the message names the layer and what differs.
    """
    config, layer_meta, tensors = read_adapter(path)
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        targets = find_targets(m, config)
        _check_names(set(targets), set(layer_meta))
        for name, module in targets.items():
            diff = compare_fingerprints(layer_meta[name]["fingerprint"], base_fingerprint(module))
            if diff is not None:
                raise AdapterMismatchError(f"layer {name!r}: {diff}")
        basis = None
        if all(f"{n}.U" in tensors for n in layer_meta):
            basis = {n: (tensors.pop(f"{n}.U"), tensors.pop(f"{n}.s"), tensors.pop(f"{n}.V")) for n in layer_meta}
            basis = {n: tuple(t.to(base_weight(targets[n]).device) for t in f) for n, f in basis.items()}
        if cache_dir is not None:
            config = dataclasses.replace(config, svd_cache_dir=os.fspath(cache_dir))
        adapt(m, config, factors=basis, verbose=verbose)
        layers = spectral_layers(m)
    else:
        _check_names(set(layers), set(layer_meta))
        for name, layer in layers.items():
            want, have = layer_meta[name], _layer_meta(layer)
            for key in ("in_features", "out_features", "rank", "mode", "form", "bias", "lora_rank", "source"):
                if want.get(key) != have.get(key):
                    raise AdapterMismatchError(
                        f"layer {name!r}: the adapter has {key}={want.get(key)!r}, the model's layer has {have.get(key)!r}")
            fp = layer_fingerprint(layer)
            diff = None if fp is None else compare_fingerprints(want["fingerprint"], fp)
            if diff is not None:
                raise AdapterMismatchError(f"layer {name!r}: {diff}")
        for n in layer_meta:  # a stored basis replaces the model's (the model's SVD may differ by rounding)
            if f"{n}.U" in tensors:
                with torch.no_grad():
                    for b in ("U", "s", "V"):
                        getattr(layers[n], b).copy_(tensors.pop(f"{n}.{b}"))
    coeff_ids = _coefficient_ids(layers)
    params = {n: p for n, p in m.named_parameters() if id(p) not in coeff_ids}
    if adapter is not None and adapter not in next(iter(layers.values())).adapter_names():
        for layer in layers.values():
            layer.add_adapter(adapter)
    for name, layer in layers.items():
        params[f"{name}.coeffs"] = layer.coefficients(adapter)
    coeff_keys = {f"{name}.coeffs" for name in layers}
    shared = {n for n, p in params.items() if n not in coeff_keys and p.requires_grad}
    slot = adapter if adapter is not None else next(iter(layers.values())).active_adapter
    if slot != DEFAULT_ADAPTER:
        extra = sorted(set(tensors) - coeff_keys)
        if extra:
            raise AdapterMismatchError(
                f"the adapter holds {extra[:5]}, tensors every adapter of a bank shares; only coefficients "
                f"load into the named adapter {slot!r} (load this file with adapter='default')")
        shared = set()
    trainable = shared | coeff_keys
    missing, unexpected = sorted(trainable - set(tensors)), sorted(set(tensors) - trainable)
    if unexpected:
        raise AdapterMismatchError(f"the adapter holds {unexpected[:5]} which are not trainable parameters of the model")
    if missing:
        raise AdapterMismatchError(f"the model's trainable parameters {missing[:5]} are not in the adapter")
    with torch.no_grad():
        for n, t in tensors.items():
            if params[n].shape != t.shape:
                raise AdapterMismatchError(f"parameter {n!r}: shape {tuple(t.shape)} in the adapter, "
                                           f"{tuple(params[n].shape)} in the model")
            params[n].copy_(t)
    return model


def _check_names(model_layers: set[str], file_layers: set[str]) -> None:
    only_file, only_model = sorted(file_layers - model_layers), sorted(model_layers - file_layers)
    if only_file:
        raise AdapterMismatchError(f"layer {only_file[0]!r} is in the adapter but not adapted in the model "
                                   f"({len(only_file)} such layers)")
    if only_model:
        raise AdapterMismatchError(f"layer {only_model[0]!r} is adapted in the model but not in the adapter "
                                   f"({len(only_model)} such layers)")
