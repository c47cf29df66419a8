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
(their flags are restored on exit); a loss computed inside the block trains them wherever
``backward()`` is called, inside or after the block; each adapter's gradient is the sum over its
own samples only. Adapters named by no sample get no gradient (grad None): an
optimizer step (AdamW, any weight decay) leaves them unchanged, as long as gradients are cleared
with ``zero_grad()``'s default ``set_to_none=True``. Build the optimizer over
:func:`adapter_parameters` (every set) to train several.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import (
    DEFAULT_ADAPTER,
    GRAD_HOLDS,
    SpectralLinear,
    _BatchAdapters,
    check_adapter_name,
    close_batch,
    open_batch,
)
from spectral_kernels.tuning.inject import no_adapter_hint, spectral_layers, unwrap

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
    layers = _present_layers(model, what)
    for name, layer in layers.items():
        if isinstance(layer, SpecLoRALinear):
            raise NotImplementedError(
                f"{what}: adapter banks are not implemented for mode 'speclora' (layer {name!r}); "
                "use mode 'scale' or 'shift'")
        if outside_batch and layer._open_batches:
            raise RuntimeError(f"{what}: not allowed inside an adapter_batch block (one is open on this model, in "
                               "this or another thread); leave the block first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """The adapter names of the model ("default" first)."""
    return _adapter_names(_present_layers(model, "list_adapters"))


def _present_layers(model: nn.Module, what: str) -> dict[str, SpectralLinear]:
    layers = spectral_layers(unwrap(model))
    if not layers:
        raise ValueError(f"{what}: the model has no spectral layer; {no_adapter_hint(model)}")
    return layers


def _adapter_names(layers: dict[str, SpectralLinear]) -> list[str]:
    return next(iter(layers.values())).adapter_names()  # every layer holds the same names


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter that runs outside :func:`adapter_batch`."""
    return next(iter(_present_layers(model, "active_adapter").values())).active_adapter


def add_adapter(model: nn.Module, name: str) -> nn.Module:
    """Add an identity-initialised coefficient set ``name`` (c₀: the base model) to every spectral
    layer; it is frozen until :func:`set_adapter` or an :func:`adapter_batch`. All or nothing: a
    failure on any layer removes the set from the layers that took it. Returns model.

    Raises:
        ValueError: a name that is not letters, digits, '_' and '-' (see
            :func:`~spectral_kernels.nn.spectral_linear.check_adapter_name`), one reserved by torch
            modules ("to", "keys", "update", "forward", "training", ...), or one that exists."""
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise ValueError(f"add_adapter: {exc}") from None
    layers = _layers(model, "add_adapter", outside_batch=True)
    if name in list_adapters(model):
        raise ValueError(f"add_adapter: adapter {name!r} already exists; adapters: {list_adapters(model)}")
    added = []
    try:
        for layer in layers.values():
            layer.add_adapter(name)
            added.append(layer)
    except BaseException:
        for layer in added:
            del layer.coeff_bank[name]
        raise
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
def adapter_batch(model: nn.Module, names: Sequence[str], *, batch_dim: int | None = None) -> Iterator[nn.Module]:
    """Run each sample of a batch with its own adapter: ``names[i]`` for sample i of every spectral
    layer's input (the index broadcasts over the input's other leading dims).

    Args:
        model: an adapted model holding the named adapters.
        names: one adapter name per sample.
        batch_dim: which leading dim of each layer's input is the batch. None (default): the
            first (batch-first models), and an input whose other leading dims also have
            ``len(names)`` entries is refused as ambiguous when the names are not all the same
            (a [seq, batch, in] input with seq == batch would otherwise be indexed by position).
            1 for sequence-first models ([seq, batch, in]); any non-negative dim of the input's
            leading dims.

    The block holds for the calling thread (or asyncio task) only: forwards in other threads run
    with their own state (the active adapter, or their own block). Inside the block the named
    adapters' coefficients require grad (restored on exit); a loss computed inside the block
    trains them wherever backward() is called, inside the block or after it; each adapter gets
    only its own samples' gradient, adapters not named get none. A forward recomputed in the
    backward by activation checkpointing (torch.utils.checkpoint, reentrant or not) runs with the
    block its original forward ran in, also after the block closed and when a loss accumulated
    over several blocks is backpropagated once. Not reentrant in one thread;
    add/set/delete_adapter are refused while a block is open on the model in any thread.

    Raises:
        ValueError: an unknown name, an empty list, a bad batch_dim, or (at the forward) an input
            whose batch dim is not len(names), or an ambiguous layout (see batch_dim).
        RuntimeError: already inside a block of this model in this thread.
    """
    layers = _layers(model, "adapter_batch")
    if isinstance(names, str) or not len(names):
        raise ValueError(f"adapter_batch: names must be a non-empty list of adapter names, one per sample; got {names!r}")
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0):
        raise ValueError(f"adapter_batch: batch_dim must be None or a non-negative int (the input's dim that holds "
                         f"the batch), got {batch_dim!r}")
    known = _adapter_names(layers)
    unknown = sorted(set(names) - set(known), key=str)
    if unknown:
        raise ValueError(f"adapter_batch: no adapter {unknown[0]!r}; the model's adapters are {known}")
    if any(layer.current_batch() is not None for layer in layers.values()):
        raise RuntimeError("adapter_batch: already inside an adapter_batch block of this model")
    batch = _BatchAdapters(list(names), batch_dim, {id(layer): n for n, layer in layers.items()})
    # every lookup before any state changes: a failure here leaves every layer and flag as it was
    params = [p for layer in layers.values() for p in batch.coefficients_of(layer)]
    GRAD_HOLDS.hold(params)
    try:
        open_batch(layers.values(), batch)
        try:
            yield model
        finally:
            close_batch(layers.values())
    finally:
        GRAD_HOLDS.release(params)


def _check_known(model: nn.Module, name: str, what: str) -> None:
    names = list_adapters(model)
    if name not in names:
        raise ValueError(f"{what}: no adapter {name!r}; the model's adapters are {names}")
