"""Adapter files: the trainable tensors of an adapted model, its config, base fingerprints and checksums.

A file is safetensors: its tensors are the model's trainable parameters by qualified name
(``...query.coeffs``, ``...lora_A``, a ``modules_to_save`` head, biases with ``train_bias``), and,
with ``include_basis=True``, every layer's frozen ``U``, ``s``, ``V`` (so that loading skips the SVD
and uses bit-identical directions). Its string metadata holds:

- ``spectral_kernels.format``: the file format version ("2"; "1" files still load, with a warning);
- ``spectral_kernels.config``: the SpectralConfig as JSON;
- ``spectral_kernels.layers``: JSON ``{name: {source, in_features, out_features, rank, mode, form,
  bias, lora_rank, lora_alpha, fingerprint}}`` for every adapted layer;
- ``spectral_kernels.base``: JSON ``{name: fingerprint}`` of every other base parameter the adapter
  depends on but does not hold: the adapted layers' biases (unless trained) and every dense
  parameter outside the adapted layers that is not trained (embeddings, norms, other layers);
- ``spectral_kernels.tensors``: JSON ``{name: {dtype, shape, sha256}}`` of every tensor in the file;
- ``spectral_kernels.checksum``: sha256 of the five entries above, so an edited entry is refused.

Reading a file (:func:`read_adapter`) checks, before anything is loaded: the checksum of the
metadata, every tensor's dtype, shape and sha256 against ``tensors``, that every tensor is
floating point and finite, and that the config and the per-layer metadata agree (mode, form, rank,
LoRA rank and alpha, the coefficients' shape). Loading then compares the base fingerprints with the
model (:mod:`spectral_kernels.tuning.fingerprints`, which says what a fingerprint can and cannot
see). docs/checks-on-load.md lists every check.

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
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.config import SpectralConfig
from spectral_kernels.tuning.fingerprints import (
    BASE_TENSOR_SAMPLE,
    check_layer_fingerprint,
    compare_tensor_fingerprints,
    frozen_tensors,
    layer_fingerprint,
    saved_fingerprint,
)
from spectral_kernels.tuning.inject import (
    CONFIG_ATTR,
    SOURCE_ATTR,
    adapt,
    base_weight,
    check_base_fingerprint,
    find_targets,
    spectral_layers,
    unwrap,
)
from spectral_kernels.tuning.safe_io import AdapterFileError, atomic_write, reading, tensor_sha256
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import DEFAULT_ADAPTER, SpectralLinear

FORMAT_VERSION = "2"
#: formats this version reads ("1": no checksums, no base fingerprints outside the adapted layers)
READABLE_FORMATS = ("1", "2")
META_FORMAT = "spectral_kernels.format"
META_CONFIG = "spectral_kernels.config"
META_LAYERS = "spectral_kernels.layers"
META_BASE = "spectral_kernels.base"
META_TENSORS = "spectral_kernels.tensors"
META_CHECKSUM = "spectral_kernels.checksum"
#: the name of the adapter whose coefficients the file holds (files written before it was recorded have none)
META_ADAPTER = "spectral_kernels.adapter"
#: attribute of a model merge_adapter merged (spectral_kernels.tuning.merge.MERGED_ATTR; that module
#: sits above this one)
_MERGED_ATTR = "_spectral_merged"


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


def _layer_bias(module: nn.Module) -> Tensor | None:
    """The bias a target (before adapt) or an adapted layer adds: its own, or its quantized base's."""
    bias = getattr(module, "bias", None)
    if bias is None:
        bias = getattr(getattr(module, "base", None), "bias", None)
    return bias


def base_tensors(model: nn.Module, layers: dict[str, nn.Module], held: set[str]) -> dict[str, Tensor]:
    """The base tensors an adapter file fingerprints besides the adapted weights: the biases of
    ``layers`` (targets or adapted layers) as ``{layer}.bias`` and every dense parameter outside
    them, leaving out the ``held`` names (the trained tensors)."""
    out = {f"{name}.bias": b for name, layer in layers.items()
           if (b := _layer_bias(layer)) is not None and f"{name}.bias" not in held}
    out.update(frozen_tensors(model, layers, held))
    return out


def _metadata_checksum(meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    # the adapter's name is covered where it is recorded (a file written before it was keeps its checksum)
    for key in (META_FORMAT, META_CONFIG, META_LAYERS, META_BASE, META_TENSORS) + ((META_ADAPTER,) if META_ADAPTER in meta else ()):
        value = meta.get(key, "").encode()
        h.update(f"{key}:{len(value)}:".encode())
        h.update(value)
    return h.hexdigest()


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


def _adapted_layers(m: nn.Module, what: str) -> tuple[SpectralConfig, dict[str, SpectralLinear]]:
    config = getattr(m, CONFIG_ATTR, None)
    layers = spectral_layers(m)
    if config is not None and not layers and getattr(m, _MERGED_ATTR, None):
        raise ValueError(f"{what}: the model is merged (merge_adapter): its adapter is inside the dense weights now. "
                         "Call spectral_kernels.unmerge(model) first to save the adapter, or save the merged model "
                         "as a plain model (model.save_pretrained / torch.save)")
    if config is None or not layers:
        raise ValueError(f"{what}: the model has no adapter; call adapt(model, config) first")
    return config, layers


def save_adapter(model: nn.Module, path: str | os.PathLike, *, include_basis: bool = False,
                 adapter: str | None = None, coefficients_only: bool = False, verbose: bool = False) -> AdapterInfo:
    """Write the adapter of an adapted model to ``path`` (safetensors); returns its size (printed
    too with ``verbose=True``). The file is written aside and renamed into place, so an
    interrupted save leaves the previous file (:mod:`spectral_kernels.tuning.safe_io`).

    Args:
        model: a model :func:`adapt` rewrote (DDP / torch.compile wrappers are looked through).
        path: file to write.
        include_basis: also store every layer's U [out, k], s [k], V [in, k] (larger, but loading
            then needs no SVD and reproduces the directions bit for bit).
        adapter: which named adapter's coefficients to write (None: the active one); stored as
            ``{layer}.coeffs`` whatever the name, so the file loads into any slot.
        coefficients_only: write only the coefficients (what a named slot other than "default"
            takes), not the tensors every adapter shares (heads, trained biases, LoRA pairs).

    Raises:
        ValueError: the model has no adapter, or is merged.
    """
    m = unwrap(model)
    config, layers = _adapted_layers(m, "save_adapter")
    path = os.fspath(path)
    tensors, metadata = _adapter_payload(m, config, layers, include_basis=include_basis, adapter=adapter,
                                         coefficients_only=coefficients_only)
    write_adapter_file(path, tensors, metadata)
    n_basis = sum(t.numel() for n, t in tensors.items() if include_basis and n.rsplit(".", 1)[-1] in ("U", "s", "V")
                  and n.rsplit(".", 1)[0] in layers)
    info = AdapterInfo(path, len(tensors), sum(t.numel() for t in tensors.values()) - n_basis,
                       os.path.getsize(path), len(layers))
    if verbose:
        print(info)
    return info


def _adapter_payload(m: nn.Module, config: SpectralConfig, layers: dict[str, SpectralLinear], *,
                     include_basis: bool, adapter: str | None,
                     coefficients_only: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file (module docstring)."""
    layer_meta = {}
    for name, layer in layers.items():
        fp = layer_fingerprint(layer, saving=True)
        if fp is None:
            raise ValueError(f"save_adapter: layer {name!r} has no base weight nor recorded fingerprint")
        layer_meta[name] = {**_layer_meta(layer), "fingerprint": fp}
    state = adapter_state_dict(m, include_basis=include_basis, adapter=adapter)
    # held: every trained tensor, written here or not (a coefficients-only file's heads are trained too)
    held = set(state) | {n for n, p in m.named_parameters() if p.requires_grad}
    base = {n: saved_fingerprint(t, sample=BASE_TENSOR_SAMPLE) for n, t in base_tensors(m, layers, held).items()}
    if coefficients_only:
        state = {n: t for n, t in state.items() if n.rsplit(".", 1)[-1] in ("coeffs", "U", "s", "V")
                 and n.rsplit(".", 1)[0] in layers}
    tensors = {n: t.cpu().contiguous() for n, t in state.items()}
    records = {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": tensor_sha256(t)}
               for n, t in tensors.items()}
    metadata = {META_FORMAT: FORMAT_VERSION, META_CONFIG: config.to_json(),
                META_LAYERS: json.dumps(layer_meta, sort_keys=True), META_BASE: json.dumps(base, sort_keys=True),
                META_TENSORS: json.dumps(records, sort_keys=True),
                META_ADAPTER: adapter if adapter is not None else next(iter(layers.values())).active_adapter}
    metadata[META_CHECKSUM] = _metadata_checksum(metadata)
    return tensors, metadata


def write_adapter_file(path: str, tensors: dict[str, Tensor], metadata: dict[str, str], *, atomic: bool = True) -> None:
    """Write a safetensors adapter file (atomically unless ``atomic=False``: the caller renames it)."""
    from safetensors.torch import save_file

    if atomic:
        atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
    else:
        save_file(tensors, path, metadata=metadata)


# --- load -----------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """An adapter file read and checked by :func:`read_adapter_file`."""

    path: str
    config: SpectralConfig
    layers: dict[str, dict]
    tensors: dict[str, Tensor]
    #: {name: fingerprint} of the other base parameters; None in a format-1 file
    base: dict[str, dict] | None
    format: str
    #: the adapter whose coefficients the file holds, as saved; None in a file that does not record it
    adapter: str | None = None


def read_adapter(path: str | os.PathLike) -> tuple[SpectralConfig, dict[str, dict], dict[str, Tensor]]:
    """(config, per-layer metadata, tensors) of an adapter file, checked as :func:`read_adapter_file` says."""
    f = read_adapter_file(path)
    return f.config, f.layers, f.tensors


def _check_path(path: str) -> None:
    if os.path.isdir(path):
        hint = ""
        if os.path.isfile(os.path.join(path, "spectral_adapter.safetensors")):
            hint = f", or pass its adapter file {os.path.join(path, 'spectral_adapter.safetensors')!r} here"
        raise IsADirectoryError(f"{path!r} is a folder, not an adapter file: load an adapter folder with "
                                f"spectral_kernels.from_pretrained(model, folder){hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read an adapter file and check it (module docstring): its metadata checksum, every tensor's
    dtype, shape and sha256, finite floating-point values, and the config against the per-layer
    metadata. A format-1 file (no checksums) is read with a warning.

    Raises:
        FileNotFoundError, IsADirectoryError: no file at ``path`` (a folder: the message says to
            use from_pretrained).
        AdapterFileError: the file is damaged or was edited; the message names the file and the
            tensor or entry.
        ValueError: not a spectral_kernels adapter, or a format this version does not read.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    _check_path(path)
    with reading(path, "adapter file"):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    if META_CONFIG not in meta or META_LAYERS not in meta:
        raise ValueError(f"{path} is not a spectral_kernels adapter (no {META_CONFIG} metadata)")
    fmt = meta.get(META_FORMAT)
    if fmt not in READABLE_FORMATS:
        raise ValueError(f"{path}: adapter format {fmt!r}; this version reads formats {list(READABLE_FORMATS)} "
                         "(a newer spectral-kernels wrote it?)")
    base = None
    if fmt == "1":
        warnings.warn(f"{path}: adapter file of format 1 (written by an earlier spectral-kernels): it carries no "
                      "checksums, so damage to its tensors cannot be detected, and no fingerprints of the base "
                      "outside the adapted weights; save it again to add them", UserWarning, stacklevel=3)
    else:
        if meta.get(META_CHECKSUM) != _metadata_checksum(meta):
            raise AdapterFileError(f"{path}: the metadata does not match its checksum ({META_CHECKSUM}): the "
                                   "config, layers, base fingerprints or tensor list were edited or damaged")
        with reading(path, "adapter file's metadata"):
            records = json.loads(meta[META_TENSORS])
            base = json.loads(meta[META_BASE])
        _check_records(path, tensors, records)
    _check_values(path, tensors)
    with reading(path, "adapter file's metadata"):
        config = SpectralConfig.from_json(meta[META_CONFIG])
        layers = json.loads(meta[META_LAYERS])
    _check_layers(path, config, layers, tensors)
    return AdapterFile(path, config, layers, tensors, base, fmt, meta.get(META_ADAPTER) if fmt != "1" else None)


def _check_records(path: str, tensors: dict[str, Tensor], records: dict[str, dict]) -> None:
    """Every tensor as the writer recorded it: the same names, dtype, shape and bytes."""
    missing, extra = sorted(set(records) - set(tensors)), sorted(set(tensors) - set(records))
    if missing or extra:
        raise AdapterFileError(f"{path}: tensor {(missing or extra)[0]!r} is "
                               f"{'listed in the metadata but not in the file' if missing else 'in the file but not listed in its metadata'}")
    for name, t in tensors.items():
        rec = records[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != rec["dtype"] or list(t.shape) != list(rec["shape"]):
            raise AdapterFileError(f"{path}: tensor {name!r} is {dtype} {list(t.shape)} in the file but was saved as "
                                   f"{rec['dtype']} {rec['shape']}: refused rather than cast")
        if tensor_sha256(t) != rec["sha256"]:
            raise AdapterFileError(f"{path}: tensor {name!r} does not match its sha256 checksum: the file is "
                                   "damaged (flipped bytes) or was edited")


def _check_values(path: str, tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise AdapterFileError(f"{path}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; adapter "
                                   "tensors are floating point (refused rather than cast)")
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise AdapterFileError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or Inf), e.g. "
                                   f"{t[~finite].reshape(-1)[0].item()}: a diverged training run or a damaged file")


def _check_layers(path: str, config: SpectralConfig, layers: dict[str, dict], tensors: dict[str, Tensor]) -> None:
    """The config and each layer's metadata tell the same story, and the coefficients have its shape."""
    for name, lm in layers.items():
        quantized = lm.get("fingerprint", {}).get("quant") is not None
        want = {
            "mode": config.mode,
            "rank": config.rank_for(lm["in_features"], lm["out_features"]),
            "form": "delta" if quantized else config.form_for(lm["rank"], lm["in_features"], lm["out_features"]),
        }
        if config.mode == "speclora":
            want.update(lora_rank=config.lora_rank, lora_alpha=config.lora_alpha)
        for key, value in want.items():
            if lm.get(key) != value:
                raise AdapterFileError(f"{path}: layer {name!r} was saved with {key}={lm.get(key)!r} but the file's "
                                       f"config gives {key}={value!r}: the config or the layer metadata was edited")
        coeffs = tensors.get(f"{name}.coeffs")
        if coeffs is None:
            raise AdapterFileError(f"{path}: layer {name!r} has no coefficients ({name}.coeffs) in the file")
        if list(coeffs.shape) != [lm["rank"]]:
            raise AdapterFileError(f"{path}: {name}.coeffs has shape {list(coeffs.shape)}, the layer's rank is "
                                   f"{lm['rank']}")
    unknown = sorted(n for n in tensors if n.endswith(".coeffs") and n[:-len(".coeffs")] not in layers)
    if unknown:
        raise AdapterFileError(f"{path}: tensor {unknown[0]!r} belongs to no layer of the file's metadata")


def _check_base(af: AdapterFile, m: nn.Module, layers: dict[str, nn.Module], adapted: bool) -> None:
    """Compare the file's base fingerprints with the model (``layers``: the targets of an
    unadapted model, or the ``adapted`` model's layers). In an ``adapted`` model the parameters
    that train (a bank's shared heads, say) are the model's own, not the base's: they are left out."""
    check = check_layer_fingerprint if adapted else check_base_fingerprint
    for name, module in layers.items():
        diff = check(af.layers[name]["fingerprint"], module)
        if diff is not None:
            raise AdapterMismatchError(f"layer {name!r}: {diff}")
    if af.base is None:
        return
    held = set(af.tensors)
    if adapted:
        held |= {n for n, p in m.named_parameters() if p.requires_grad}
    actual = base_tensors(m, layers, held)
    stored = {n: fp for n, fp in af.base.items() if n not in held}
    diff = compare_tensor_fingerprints(stored, {n: t for n, t in actual.items() if n in stored})
    if diff is not None:
        raise AdapterMismatchError(f"{diff}. The adapter was trained on top of the whole base, not only the adapted "
                                   "layers; a head initialised at random when the base is built differs on every "
                                   "build: train it (modules_to_save) so that the adapter holds it")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                 adapter: str | None = None, verbose: bool = False, distributed: bool | None = None) -> nn.Module:
    """Load an adapter file into ``model`` and return it.

    The file is checked first (:func:`read_adapter_file`). A model that is not adapted yet is then
    checked against the file's base fingerprints (before any SVD): the target weights, the
    targets' biases and every other base parameter the file fingerprinted; then adapted with the
    file's config (with the stored basis when the file has one; ``cache_dir`` replaces the config's
    ``svd_cache_dir`` for the SVD cache). An adapted model must have the same adapted layers with
    the same shape, rank, mode, form and LoRA rank, and the same base. The trainable tensors are
    then copied in (cast to the model's dtype).

    ``adapter`` names the coefficient slot the file's ``{layer}.coeffs`` go to (None: the active
    adapter; a missing name is added to every layer). A slot other than "default" takes
    coefficients only (module docstring).

    ``distributed`` is passed to :func:`adapt` when the model is adapted here: False computes every
    SVD on this rank even under ``SPECTRAL_KERNELS_SVD_DISTRIBUTED=1`` (a load on one rank of a
    distributed job); None follows that variable.

    Raises:
        AdapterMismatchError: another base (weights, biases, other parameters), rank, mode, form,
            LoRA rank or set of layers; the message names the layer or parameter and what differs.
        AdapterFileError: the file is damaged or edited (see :func:`read_adapter_file`).
        IsADirectoryError: ``path`` is an adapter folder (use from_pretrained).
    """
    return load_adapter_file(model, read_adapter_file(path), cache_dir=cache_dir, adapter=adapter, verbose=verbose,
                             distributed=distributed)


def load_adapter_file(model: nn.Module, af: AdapterFile, *, cache_dir: str | os.PathLike | None = None,
                      adapter: str | None = None, verbose: bool = False, distributed: bool | None = None,
                      check_base: bool = True) -> nn.Module:
    """:func:`load_adapter` of a file :func:`read_adapter_file` has read and checked already.
    ``check_base=False`` (into an adapted model only) skips the base check: for the caller that
    has just checked this model against the same fingerprints (from_pretrained's other adapters)."""
    config, layer_meta, tensors = af.config, af.layers, dict(af.tensors)
    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        targets = find_targets(m, config)
        _check_names(set(targets), set(layer_meta))
        _check_base(af, m, targets, adapted=False)
        basis = None
        if all(f"{n}.U" in tensors for n in layer_meta):
            basis = {n: (tensors.pop(f"{n}.U"), tensors.pop(f"{n}.s"), tensors.pop(f"{n}.V")) for n in layer_meta}
            basis = {n: tuple(t.to(base_weight(targets[n]).device) for t in f) for n, f in basis.items()}
        if cache_dir is not None:
            config = dataclasses.replace(config, svd_cache_dir=os.fspath(cache_dir))
        adapt(m, config, factors=basis, verbose=verbose, distributed=distributed)
        layers = spectral_layers(m)
    else:
        _check_names(set(layers), set(layer_meta))
        for name, layer in layers.items():
            want, have = layer_meta[name], _layer_meta(layer)
            for key in ("in_features", "out_features", "rank", "mode", "form", "bias", "lora_rank", "source"):
                if want.get(key) != have.get(key):
                    raise AdapterMismatchError(
                        f"layer {name!r}: the adapter has {key}={want.get(key)!r}, the model's layer has {have.get(key)!r}")
        if check_base:
            _check_base(af, m, layers, adapted=True)
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
