"""merge_adapter / unmerge / unload: dense layers from spectral ones and back.

``merge_adapter`` replaces every spectral layer by the dense layer it computes now, of the type it
replaced: an nn.Linear with weight W' = W + U·diag(d)·Vᵀ (+ (α/r)·B·A in "speclora" mode), or a
transformers Conv1D holding W'ᵀ [in, out]. The spectral layers are kept aside on the model, so
``unmerge`` puts them back (coefficients and all) to continue training. ``unload`` returns the
pretrained base instead: W itself (delta form) or U·diag(s)·Vᵀ (pure form).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.inject import SOURCE_ATTR, _set_submodule, conv1d_type, spectral_layers, unwrap
from spectral_kernels.nn.spectral_linear import SpectralLinear

#: attribute of a merged model: {name: the SpectralLinear that merge_adapter replaced}
MERGED_ATTR = "_spectral_merged"


@torch.no_grad()
def dense_layer(layer: SpectralLinear, weight: Tensor) -> nn.Module:
    """An nn.Linear (weight [out, in]) or, for a layer adapted from a Conv1D, a Conv1D (weight
    stored [in, out]) with ``weight`` and the layer's bias; frozen weight, bias as trainable as it was."""
    bias = layer.bias
    if getattr(layer, SOURCE_ATTR, "linear") == "conv1d":
        Conv1D = conv1d_type()
        if Conv1D is None:
            raise ImportError("merging a layer adapted from a Conv1D needs transformers installed")
        dense = Conv1D(layer.out_features, layer.in_features).to(device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight.t())
        if bias is not None:
            dense.bias.copy_(bias)
        else:  # Conv1D always has a bias; a bias-free source cannot occur, but keep the math right
            dense.bias.zero_()
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.weight.requires_grad_(False)
    if dense.bias is not None:
        dense.bias.requires_grad_(bias is not None and bias.requires_grad)
    dense.train(layer.training)
    return dense


def merge_adapter(model: nn.Module, *, adapter: str | None = None) -> nn.Module:
    """Replace every spectral layer by its merged dense layer (see the module docstring); returns model.
    ``adapter``: the named coefficient set to merge (None: the active one); unmerge restores the
    layers with every adapter.

    Raises:
        ValueError: the model has no spectral layer.
    """
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        raise ValueError("merge_adapter: the model has no spectral layer to merge")
    stash = getattr(m, MERGED_ATTR, None) or {}
    for name, layer in layers.items():
        _set_submodule(m, name, dense_layer(layer, layer.merged_weight(adapter)))
        stash[name] = layer
    setattr(m, MERGED_ATTR, stash)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter`: put the spectral layers back (moved to the merged layers' device).

    Raises:
        ValueError: the model was not merged by merge_adapter.
    """
    m = unwrap(model)
    stash = getattr(m, MERGED_ATTR, None)
    if not stash:
        raise ValueError("unmerge: the model holds no merged adapter (merge_adapter was not called on it)")
    for name, layer in stash.items():
        dense = m.get_submodule(name)
        _set_submodule(m, name, layer.to(device=dense.weight.device))
    setattr(m, MERGED_ATTR, {})
    return model


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Replace every spectral layer by the pretrained dense layer it was built from, dropping the
    adapter: W (delta form; bit-exact) or U·diag(s)·Vᵀ (pure form; exact up to the SVD's rounding).
    The bias is the layer's current one: with ``train_bias=True`` that is the trained bias."""
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        raise ValueError("unload: the model has no spectral layer")
    for name, layer in layers.items():
        if layer.weight is not None:
            W = layer.weight
        else:
            acc = torch.promote_types(layer.U.dtype, torch.float32)
            W = ((layer.U.to(acc) * layer.s.to(acc)) @ layer.V.to(acc).t()).to(layer.U.dtype)
        _set_submodule(m, name, dense_layer(layer, W))
    return model
