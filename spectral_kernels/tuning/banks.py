"""Adapter banks: many tasks' adapters on one adapted base, and mixed-task batches.

Every task adapted on one base shares each layer's U, s, V (and W); tasks differ only in the k
coefficients per layer. So a model keeps named coefficient sets (every spectral layer the same
names), one of them active:

    sk.add_adapter(model, "sentiment")        # identity-initialised (the mode's c₀) in every layer
    sk.set_adapter(model, "sentiment")        # runs, and is the only set that requires grad
    sk.load_adapter(model, "topic.safetensors", adapter="topic")   # a task trained alone, into a slot
    with sk.adapter_batch(model, ["sentiment", "topic", "sentiment"]):   # one name per sample
        logits = model(x)                     # one batch, each sample with its own adapter

The layer stores "default" as its ``coeffs`` parameter (single-adapter state_dicts and adapter
files keep their keys) and every other set as its own Parameter in ``coeff_bank``. Modes "scale"
and "shift"; "speclora" raises NotImplementedError (its LoRA pairs are per task too).

Training a mixed batch: inside ``adapter_batch`` the named adapters' coefficients require grad
(their flags are restored on exit, so run backward inside the block); each adapter's gradient is
the sum over its own samples only. Adapters named by no sample get no gradient (grad None): an
optimizer step (AdamW, any weight decay) leaves them unchanged, as long as gradients are cleared
with ``zero_grad()``'s default ``set_to_none=True``. Build the optimizer over
:func:`adapter_parameters` (every set) to train several.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import DEFAULT_ADAPTER, SpectralLinear, _BatchAdapters
from spectral_kernels.tuning.inject import spectral_layers, unwrap

__all__ = [
    "DEFAULT_ADAPTER",
    "active_adapter",
    "adapter_batch",
    "adapter_parameters",
    "add_adapter",
    "delete_adapter",
    "list_adapters",
    "set_adapter",
]


def _layers(model: nn.Module, what: str, *, outside_batch: bool = False) -> dict[str, SpectralLinear]:
    """The model's spectral layers; raises for none, for SpecLoRA layers, and (``outside_batch``)
    inside an :func:`adapter_batch` block, whose bank and grad flags a change of the adapter set
    or of the active adapter would silently invalidate."""
    layers = spectral_layers(unwrap(model))
    if not layers:
        raise ValueError(f"{what}: the model has no spectral layer; call adapt(model, config) first")
    for name, layer in layers.items():
        if isinstance(layer, SpecLoRALinear):
            raise NotImplementedError(
                f"{what}: adapter banks are not implemented for mode 'speclora' (layer {name!r}); "
                "use mode 'scale' or 'shift'")
        if outside_batch and layer._batch is not None:
            raise RuntimeError(f"{what}: not allowed inside an adapter_batch block; leave the block first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """The adapter names of the model ("default" first)."""
    return _adapter_names(spectral_layers(unwrap(model)))


def _adapter_names(layers: dict[str, SpectralLinear]) -> list[str]:
    return next(iter(layers.values())).adapter_names()  # every layer holds the same names


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter that runs outside :func:`adapter_batch`."""
    return next(iter(spectral_layers(unwrap(model)).values())).active_adapter


def add_adapter(model: nn.Module, name: str) -> nn.Module:
    """Add an identity-initialised coefficient set ``name`` (c₀: the base model) to every spectral
    layer; it is frozen until :func:`set_adapter` or an :func:`adapter_batch`. Returns model."""
    layers = _layers(model, "add_adapter", outside_batch=True)
    if name in list_adapters(model):
        raise ValueError(f"add_adapter: adapter {name!r} already exists; adapters: {list_adapters(model)}")
    for layer in layers.values():
        layer.add_adapter(name)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make ``name`` the adapter that runs and trains (only its coefficients require grad; other
    trainable tensors such as heads keep their flags). Returns model."""
    layers = _layers(model, "set_adapter", outside_batch=True)
    _check_known(model, name, "set_adapter")
    for layer in layers.values():
        layer.set_adapter(name)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer. "default" (the layers' ``coeffs``) and the active
    adapter cannot be deleted (set another one active first). Returns model."""
    layers = _layers(model, "delete_adapter", outside_batch=True)
    _check_known(model, name, "delete_adapter")
    for layer in layers.values():
        layer.delete_adapter(name)
    return model


def adapter_parameters(model: nn.Module, adapter: str | None = None) -> list[nn.Parameter]:
    """The coefficient parameters of every adapter (or of ``adapter``) of every layer, e.g. for an
    optimizer that trains several adapters through mixed batches."""
    layers = spectral_layers(unwrap(model))
    if adapter is not None:
        _check_known(model, adapter, "adapter_parameters")
        return [layer.coefficients(adapter) for layer in layers.values()]
    return [layer.coefficients(n) for layer in layers.values() for n in layer.adapter_names()]


@contextlib.contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run each sample of a batch with its own adapter: ``names[i]`` for sample i of every spectral
    layer's input (its first dim; the index broadcasts over the other leading dims).

    Inside the block the named adapters' coefficients require grad (restored on exit): run
    backward inside it; each adapter gets only its own samples' gradient, adapters not named get
    none. Not reentrant.

    Raises:
        ValueError: an unknown name, an empty list, or (at the forward) an input whose first dim is
            not len(names).
    """
    layers = _layers(model, "adapter_batch")
    if isinstance(names, str) or not len(names):
        raise ValueError(f"adapter_batch: names must be a non-empty list of adapter names, one per sample; got {names!r}")
    known = _adapter_names(layers)
    unknown = sorted(set(names) - set(known), key=str)
    if unknown:
        raise ValueError(f"adapter_batch: no adapter {unknown[0]!r}; the model's adapters are {known}")
    if any(layer._batch is not None for layer in layers.values()):
        raise RuntimeError("adapter_batch: already inside an adapter_batch block of this model")
    batch = _BatchAdapters(list(names))
    flags = []
    try:  # set up inside the try: a failure half-way still restores every layer touched so far
        for layer in layers.values():
            layer._batch = batch
            for p in batch.coefficients_of(layer):
                flags.append((p, p.requires_grad))
                p.requires_grad_(True)
        yield model
    finally:
        for layer in layers.values():
            layer._batch = None
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_known(model: nn.Module, name: str, what: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"{what}: no adapter {name!r}; the model's adapters are {names}")
