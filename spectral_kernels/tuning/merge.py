"""merge_adapter / unmerge / unload: dense layers from spectral ones and back.

``merge_adapter`` replaces every spectral layer by the dense layer it computes now, of the type it
replaced: an nn.Linear with weight W' = W + U·diag(d)·Vᵀ (+ (α/r)·B·A in "speclora" mode), or a
transformers Conv1D holding W'ᵀ [in, out]. The spectral layers are kept aside on the model, so
``unmerge`` puts them back (coefficients and all) to continue training. ``unload`` returns the
pretrained base instead: W itself (delta form) or U·diag(s)·Vᵀ (pure form). ``unmerge`` keeps a
bias trained while merged (copied back into the spectral layers) and refuses, changing nothing,
when a merged weight was changed (the adapter could not hold that change).

Quantized bases (:class:`QuantizedSpectralLinear`): ``merge_adapter`` dequantizes the base (Ŵ, float32),
adds ΔW = U·diag(d)·Vᵀ and re-quantizes Ŵ + ΔW into a new layer of the base's type and settings
(as peft's QLoRA merge does). That is lossy: it warns with the measured relative error
‖Q(Ŵ + ΔW) − (Ŵ + ΔW)‖ / ‖Ŵ + ΔW‖ (Q = quantize then dequantize), the largest over the layers.
``unload`` returns each quantized base module itself, the very object adapt() wrapped.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.inject import (
    MERGED_ATTR,
    SOURCE_ATTR,
    _set_submodule,
    conv1d_type,
    spectral_layers,
    unwrap,
)
from spectral_kernels.nn.quantized import QuantizedSpectralLinear
from spectral_kernels.nn.spectral_linear import SpectralLinear

#: attribute of a merged model: {name: the adapter merge_adapter merged into that layer}
MERGED_ADAPTER_ATTR = "_spectral_merged_adapter"


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
    merged_adapter = getattr(m, MERGED_ADAPTER_ATTR, None) or {}
    lossy: dict[str, tuple[str, float, float]] = {}
    for name, layer in layers.items():
        if isinstance(layer, QuantizedSpectralLinear):
            merged, err, rel_update = merge_quantized(layer, adapter)
            _set_submodule(m, name, merged)
            lossy[name] = (layer.quant_kind, err, rel_update)
        else:
            _set_submodule(m, name, dense_layer(layer, layer.merged_weight(adapter)))
        stash[name] = layer
        merged_adapter[name] = adapter
    setattr(m, MERGED_ATTR, stash)
    setattr(m, MERGED_ADAPTER_ATTR, merged_adapter)
    if lossy:
        worst = max(lossy, key=lambda n: lossy[n][1])
        kinds = sorted({k for k, _, _ in lossy.values()})
        mean = sum(e for _, e, _ in lossy.values()) / len(lossy)
        upd = max(u for _, _, u in lossy.values())
        warnings.warn(
            f"merge_adapter: merging into {len(lossy)} quantized layers ({', '.join(kinds)}) is lossy: the merged "
            f"weights were re-quantized; relative error ||W_merged_requant - (W_deq + dW)|| / ||W_deq + dW|| = "
            f"{lossy[worst][1]:.3e} at most (layer {worst!r}), {mean:.3e} on average, against an update "
            f"||dW|| / ||W_deq|| of at most {upd:.3e}. Keep the adapter separate (or merge into a "
            "full-precision copy of the base) for an exact model.", UserWarning, stacklevel=2)
    return model


@torch.no_grad()
def merge_quantized(layer: QuantizedSpectralLinear, adapter: str | None = None) -> tuple[nn.Module, float, float]:
    """(merged layer, relative error, relative update) for a layer on a quantized base.

    The merged layer is the base's type and settings holding Q(Ŵ + ΔW) with Ŵ the dequantized base
    weight and ΔW = U·diag(d)·Vᵀ; the relative error is ‖deq(Q(Ŵ + ΔW)) − (Ŵ + ΔW)‖ / ‖Ŵ + ΔW‖ and
    the relative update ‖ΔW‖ / ‖Ŵ‖ (both in float64 norms of float32 matrices)."""
    from spectral_kernels.tuning.quantized import dequantize, requantize

    W = dequantize(layer.base)
    dW = layer.delta_weight(adapter).to(W.device)
    target = W + dW
    merged = requantize(layer.base, target)
    err = torch.linalg.vector_norm((dequantize(merged) - target).double()) / \
        torch.linalg.vector_norm(target.double()).clamp_min(1e-300)
    rel = torch.linalg.vector_norm(dW.double()) / torch.linalg.vector_norm(W.double()).clamp_min(1e-300)
    return merged, err.item(), rel.item()


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter`: put the spectral layers back (moved to the merged layers' device).

    Nothing trained while merged is dropped: each dense layer's bias (trained or edited while
    merged) is copied into the spectral layer it goes back to. A dense weight changed while merged
    cannot be expressed by the adapter, so unmerge refuses (before changing any layer) when a
    merged weight no longer equals W + U·diag(d)·Vᵀ of its layer. A layer on a quantized base
    goes back to that base untouched (its bias is frozen), so a merged quantized layer whose bias
    changed is refused too.

    Raises:
        ValueError: the model was not merged by merge_adapter, a merged weight was changed, or the
            bias of a merged quantized layer was changed.
    """
    m = unwrap(model)
    stash = getattr(m, MERGED_ATTR, None)
    if not stash:
        raise ValueError("unmerge: the model holds no merged adapter (merge_adapter was not called on it)")
    adapters = getattr(m, MERGED_ADAPTER_ATTR, None) or {}
    dense_layers = {name: m.get_submodule(name) for name in stash}
    for name, layer in stash.items():  # every check first: a refusal leaves the model merged, untouched
        if isinstance(layer, QuantizedSpectralLinear):
            _check_quantized_unchanged(name, layer, dense_layers[name])
        else:
            _check_weight_unchanged(name, layer, dense_layers[name], adapters.get(name))
    for name, layer in stash.items():
        dense = dense_layers[name]
        if not isinstance(layer, QuantizedSpectralLinear):
            layer = layer.to(device=dense.weight.device)
            if layer.bias is not None and dense.bias is not None and not torch.equal(
                    dense.bias, layer.bias.to(dense.bias.dtype)):  # changed while merged: keep it
                layer.bias.copy_(dense.bias)
        _set_submodule(m, name, layer)
    setattr(m, MERGED_ATTR, {})
    setattr(m, MERGED_ADAPTER_ATTR, {})
    return model


def _check_weight_unchanged(name: str, layer: SpectralLinear, dense: nn.Module, adapter: str | None) -> None:
    weight = dense.weight.t() if getattr(layer, SOURCE_ATTR, "linear") == "conv1d" else dense.weight
    want = layer.merged_weight(adapter).to(device=weight.device, dtype=weight.dtype)
    if not torch.equal(weight, want):
        raise ValueError(
            f"unmerge: the merged weight of layer {name!r} was changed after merge_adapter (it no longer equals "
            "W + U·diag(d)·Vᵀ of the adapter), and the adapter cannot hold that change: unmerge would lose it. "
            "Keep the merged model (save it as a full checkpoint), or put the merged weight back first")


def _check_quantized_unchanged(name: str, layer: QuantizedSpectralLinear, dense: nn.Module) -> None:
    """A quantized base goes back untouched (its bias is frozen: train_bias is refused there), so a
    merged quantized layer whose bias changed while merged would lose that change. (Its weight is
    not compared: re-quantizing is not bit-reproducible for every quantizer.)"""
    base_bias, bias = getattr(layer.base, "bias", None), getattr(dense, "bias", None)
    if (base_bias is None) != (bias is None) or (bias is not None and not torch.equal(
            bias.detach().to(device=base_bias.device, dtype=base_bias.dtype), base_bias)):
        raise ValueError(
            f"unmerge: the bias of layer {name!r} (a quantized base) was changed after merge_adapter; the quantized "
            "base and its bias stay frozen under the adapter, so unmerge would lose that change. Keep the merged "
            "model, or put the bias back first")


@torch.no_grad()
def unload(model: nn.Module) -> nn.Module:
    """Replace every spectral layer by the pretrained dense layer it was built from, dropping the
    adapter: W (delta form; bit-exact) or U·diag(s)·Vᵀ (pure form; exact up to the SVD's rounding).
    A layer on a quantized base gives back that base module itself (the same object).
    The bias is the layer's current one: with ``train_bias=True`` that is the trained bias."""
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        raise ValueError("unload: the model has no spectral layer")
    for name, layer in layers.items():
        if isinstance(layer, QuantizedSpectralLinear):
            _set_submodule(m, name, layer.base)  # the quantized module itself, untouched
            continue
        if layer.weight is not None:
            W = layer.weight
        else:
            acc = torch.promote_types(layer.U.dtype, torch.float32)
            W = ((layer.U.to(acc) * layer.s.to(acc)) @ layer.V.to(acc).t()).to(layer.U.dtype)
        _set_submodule(m, name, dense_layer(layer, W))
    return model
