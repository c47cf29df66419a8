"""peft's names for the calls whose meaning is the same here.

A peft user calls ``model.print_trainable_parameters()`` and ``model.merge_and_unload()`` on the
model ``get_peft_model`` returned. :func:`adapt` (hence :func:`from_pretrained` too) binds the same
calls onto the adapted model's instance — never onto its class, and never over a method of that name
the model's class already has — and :func:`merge_and_unload` is also a module-level function:

=========================================  ====================================================
peft                                       spectral-kernels
=========================================  ====================================================
``model.print_trainable_parameters()``     ``sk.print_trainable_parameters(model)``
``model.get_nb_trainable_parameters()``    ``sk.tuning.count_parameters(model)``
``model.merge_and_unload()``               ``sk.merge_and_unload(model)``
``model.unload()``                         ``sk.unload(model)``
=========================================  ====================================================
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from spectral_kernels.tuning.folder import remove_hf_hooks
from spectral_kernels.tuning.inject import (
    ADAPT_HOOKS,
    CONFIG_ATTR,
    count_parameters,
    print_trainable_parameters,
    spectral_layers,
    unwrap,
)
from spectral_kernels.tuning.merge import MERGED_ATTR, merge_adapter, unload

#: attributes adapt() and merge_adapter() leave on a model, removed by merge_and_unload
_ADAPTER_ATTRS = (CONFIG_ATTR, "spectral_report", MERGED_ATTR)


def merge_and_unload(model: nn.Module, progressbar: bool = False, safe_merge: bool = False,
                     adapter_names: Sequence[str] | None = None) -> nn.Module:
    """peft's ``merge_and_unload``: every spectral layer becomes the dense layer it computes now
    (W' = W + U·diag(d)·Vᵀ, see :func:`merge_adapter`) and nothing of the adapter stays on the model:
    no way back (:func:`unmerge` refuses), no adapter ``save_pretrained`` (transformers' own saves a
    full checkpoint again), no bound peft methods. Returns the model (the same object).

    Args:
        progressbar: accepted for peft's signature; merging is one pass with nothing long to show.
        safe_merge: check that the merged weights are finite before replacing any layer (peft's meaning).
        adapter_names: a list of at most one coefficient-set name to merge (None: the active one).

    Raises:
        ValueError: the model has no adapter, more than one adapter name, or (``safe_merge``) a merged
            weight with NaN/Inf (the layer is named).
    """
    del progressbar
    m = unwrap(model)
    if adapter_names is not None and len(adapter_names) > 1:
        raise ValueError(f"merge_and_unload: adapter_names={list(adapter_names)!r}: a spectral model merges one "
                         "coefficient set; pass one name (or None for the active one)")
    adapter = adapter_names[0] if adapter_names else None
    layers = spectral_layers(m)
    if not layers and not getattr(m, MERGED_ATTR, None):
        raise ValueError("merge_and_unload: the model has no adapter (call sk.adapt or sk.from_pretrained first)")
    if safe_merge:
        for name, layer in layers.items():
            if not bool(torch.isfinite(layer.merged_weight(adapter)).all()):
                raise ValueError(f"merge_and_unload(safe_merge=True): the merged weight of layer {name!r} holds "
                                 "NaN or Inf; the model is left unmerged")
    if layers:
        merge_adapter(m, adapter=adapter)
    for attr in _ADAPTER_ATTRS:
        if hasattr(m, attr):
            delattr(m, attr)
    remove_hf_hooks(m)
    remove_peft_methods(m)
    return model


def get_nb_trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """peft's name for :func:`count_parameters`: (trainable, all) parameter counts."""
    return count_parameters(model)


#: method name on the adapted model → the function it calls with the model first
PEFT_METHODS: dict[str, Callable] = {
    "print_trainable_parameters": print_trainable_parameters,
    "get_nb_trainable_parameters": get_nb_trainable_parameters,
    "merge_and_unload": merge_and_unload,
    "unload": unload,
}


class _BoundToModel:
    """``function`` with the model as first argument. A small class rather than a bound method or a
    functools.partial so that copy.deepcopy(model) binds the copy (the model reference goes through
    deepcopy's memo) and the repr says what it is."""

    def __init__(self, function: Callable, model: nn.Module) -> None:
        self.function = function
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.function(self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<spectral_kernels {self.function.__name__} of the adapted model>"


def install_peft_methods(model: nn.Module) -> None:
    """Bind :data:`PEFT_METHODS` onto ``model``'s instance (run by every adapt())."""
    for name, function in PEFT_METHODS.items():
        if hasattr(type(model), name):  # the model's own method wins
            continue
        model.__dict__[name] = _BoundToModel(function, model)


def remove_peft_methods(model: nn.Module) -> None:
    """Undo :func:`install_peft_methods`."""
    for name in PEFT_METHODS:
        if isinstance(model.__dict__.get(name), _BoundToModel):
            del model.__dict__[name]


ADAPT_HOOKS.append(install_peft_methods)
