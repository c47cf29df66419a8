"""Adapter folders: ``save_pretrained(model, dir)`` and ``from_pretrained(base_model, dir)``.

A folder holds

- ``spectral_adapter.safetensors``: the adapter file of :func:`save_adapter` for the "default"
  adapter (the trainable tensors — coefficients, LoRA pairs, biases with ``train_bias``,
  ``modules_to_save`` — with the config, the base fingerprints and checksums in its metadata);
- ``spectral_adapter.<name>.safetensors``: the coefficients of every other named adapter
  (:mod:`spectral_kernels.tuning.banks`; ``spectral_adapter.<i>.safetensors`` for a name that is
  not a plain file name);
- ``spectral_config.json``: the description, for people and tools and as the folder's commit
  record: the folder format, the package version, the SpectralConfig, the adapted layers with
  their rank, mode, form and base fingerprint (without its bf16 sample), the ``modules_to_save``
  parameters, the adapters and their files, the active adapter, the base model's class and name,
  and the sha256 of every other file of the save.

For a transformers model (anything with a ``config`` that can ``save_pretrained``) three more files
make the folder a Trainer checkpoint and keep a plain ``from_pretrained`` from loading it silently:

- ``config.json``: the base model's config (transformers reads it before any weights);
- ``pytorch_model.bin``: the adapter tensors of every adapter under the model's parameter names
  (``...coeffs``, ``...coeff_bank.<name>``), which is what Trainer's ``resume_from_checkpoint``
  (and ``load_best_model_at_end``) loads with ``load_state_dict(strict=False)`` into the adapted
  model;
- ``model.safetensors.index.json``: a guard. ``from_pretrained`` looks for a safetensors index
  before ``pytorch_model.bin``; this one names a single shard, whose file name is the instruction
  to load the folder with ``spectral_kernels.from_pretrained`` and which does not exist, so a plain
  ``SomeModel.from_pretrained(dir)`` stops with that name in its error instead of returning the
  untuned base (it would otherwise find only unexpected keys and warn). Loading with
  ``use_safetensors=False`` skips the guard: that is the one way around it.

A save is atomic (:mod:`spectral_kernels.tuning.safe_io`): every file is written aside under a
temporary name carrying the save's token and fsynced; then ``spectral_config.json`` is renamed into
place — the commit — and then the other files. Killed before the commit, the folder holds the
previous save (the temporaries are ignored; a save an hour later removes them); killed after it, the
description names the new files by checksum and :func:`from_pretrained` finishes the renames (or
reads the temporaries when the folder is read-only). A file that matches neither is refused,
naming it, as is a description, adapter file or ``pytorch_model.bin`` that disagrees with another.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import warnings
from typing import Any

import torch
from torch import nn

from spectral_kernels._version import __version__
from spectral_kernels.nn.spectral_linear import DEFAULT_ADAPTER
from spectral_kernels.tuning.adapter_io import (
    META_LAYERS,
    AdapterInfo,
    AdapterMismatchError,
    _adapted_layers,
    _adapter_payload,
    _coefficient_ids,
    load_adapter_file,
    read_adapter_file,
    write_adapter_file,
)
from spectral_kernels.tuning.banks import set_adapter
from spectral_kernels.tuning.inject import ADAPT_HOOKS, CONFIG_ATTR, spectral_layers, unwrap
from spectral_kernels.tuning.safe_io import (
    AdapterFileError,
    file_sha256,
    fsync_dir,
    reading,
    remove_temporaries,
    temp_name,
    write_aside,
    write_text,
)

FOLDER_FORMAT = "2"
#: folder formats this version reads ("1": one adapter, no checksums)
READABLE_FOLDER_FORMATS = ("1", "2")
CONFIG_NAME = "spectral_config.json"
ADAPTER_NAME = "spectral_adapter.safetensors"
HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "pytorch_model.bin"
HF_GUARD_INDEX_NAME = "model.safetensors.index.json"
#: the guard's shard: a file that does not exist, named so that the error a plain from_pretrained
#: raises on it tells what to do
GUARD_SHARD_NAME = ("THIS-FOLDER-IS-A-SPECTRAL-ADAPTER-load-it-with-"
                    "spectral_kernels.from_pretrained(base_model,this_folder)")
#: an adapter name used as is in its file's name
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _hf_config(model: nn.Module):
    """The transformers config of a model, or None for other modules."""
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "save_pretrained") else None


def adapter_file_names(names: list[str]) -> dict[str, str]:
    """{adapter name: file name} of a folder: "default" in spectral_adapter.safetensors, another
    adapter in spectral_adapter.<name>.safetensors (by position for a name unfit for a file name)."""
    out = {DEFAULT_ADAPTER: ADAPTER_NAME}
    for i, name in enumerate(names):
        if name == DEFAULT_ADAPTER:
            continue
        stem = name if _PLAIN_NAME.fullmatch(name) else str(i)
        while f"spectral_adapter.{stem}.safetensors" in out.values():
            stem += "_"
        out[name] = f"spectral_adapter.{stem}.safetensors"
    return out


def _held_names(model: nn.Module) -> set[str]:
    """Parameter names of everything an adapter folder holds: the trainable parameters and every
    adapter's coefficients (a bank's inactive adapters are frozen, but they are trained state)."""
    coeff_ids = _coefficient_ids(spectral_layers(model))
    return {n for n, p in model.named_parameters() if p.requires_grad or id(p) in coeff_ids}


def _strip_samples(layer_meta: dict[str, dict]) -> dict[str, dict]:
    """Layer metadata without the fingerprints' bf16 samples (kept in the adapter file only)."""
    return {n: {**lm, "fingerprint": {k: v for k, v in lm["fingerprint"].items() if k != "bf16"}}
            for n, lm in layer_meta.items()}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, include_basis: bool = False) -> AdapterInfo:
    """Write an adapted model's adapter folder (see the module docstring): every named adapter and
    which one is active; returns the size of the "default" adapter's file.

    The save is atomic: interrupted at any point, the folder still loads, to this save or to the
    previous one (module docstring).

    Args:
        model: a model :func:`adapt` rewrote (DDP / torch.compile wrappers are looked through).
        save_directory: the folder, created if needed; files of an earlier save are replaced, other
            files (a Trainer's optimizer.pt, say) are left alone.
        include_basis: also store every layer's U, s, V (loading then needs no SVD).

    Raises:
        ValueError: the model has no adapter, or is merged.
    """
    m = unwrap(model)
    config, layers = _adapted_layers(m, "save_pretrained")
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)
    remove_temporaries(directory)
    token = secrets.token_hex(6)
    files = adapter_file_names(next(iter(layers.values())).adapter_names())
    staged: dict[str, str] = {}  # final file name -> its temporary path
    try:
        for name, file in files.items():
            tensors, metadata = _adapter_payload(m, config, layers, include_basis=include_basis and name == DEFAULT_ADAPTER,
                                                 adapter=name, coefficients_only=name != DEFAULT_ADAPTER)
            if name == DEFAULT_ADAPTER:
                main_layers, main_tensors = json.loads(metadata[META_LAYERS]), tensors
            staged[file] = write_aside(os.path.join(directory, file),
                                       lambda p, t=tensors, md=metadata: write_adapter_file(p, t, md, atomic=False), token)
        hf_config = _hf_config(m)
        if hf_config is not None:
            held = _held_names(m)
            state = {n: p.detach().cpu().contiguous() for n, p in m.named_parameters() if n in held}
            guard = json.dumps({"metadata": {"spectral_kernels": "adapter folder, not a full checkpoint"},
                                "weight_map": {"spectral_adapter": GUARD_SHARD_NAME}}, indent=2) + "\n"
            for file, write in ((HF_CONFIG_NAME, hf_config.to_json_file), (HF_WEIGHTS_NAME, lambda p: torch.save(state, p)),
                                (HF_GUARD_INDEX_NAME, lambda p: write_text(p, guard))):
                staged[file] = write_aside(os.path.join(directory, file), write, token)
        in_layers = tuple(f"{name}." for name in layers)
        description = {
            "format": FOLDER_FORMAT,
            "package": "spectral-kernels",
            "package_version": __version__,
            "adapter_file": ADAPTER_NAME,
            "adapters": files,
            "active_adapter": next(iter(layers.values())).active_adapter,
            "config": json.loads(config.to_json()),
            "layers": _strip_samples(main_layers),
            "modules_to_save": sorted(n for n in main_tensors if not n.startswith(in_layers)),
            "base_model_class": type(m).__name__,
            "base_model_name_or_path": getattr(hf_config, "_name_or_path", None) or None,
            "save_token": token,
            "files": {file: file_sha256(tmp) for file, tmp in staged.items()},
        }
        text = json.dumps(description, indent=2, sort_keys=True) + "\n"
        staged_description = write_aside(os.path.join(directory, CONFIG_NAME), lambda p: write_text(p, text), token)
        fsync_dir(directory)
    except BaseException:  # nothing committed: the previous save stands; drop this one's files
        for tmp in staged.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    # the commit, outside the try: once it happened the staged files are the save and must stay
    # (an error here leaves them aside, ignored and later removed as stale)
    os.replace(staged_description, os.path.join(directory, CONFIG_NAME))
    fsync_dir(directory)
    for file, tmp in staged.items():
        os.replace(tmp, os.path.join(directory, file))
    fsync_dir(directory)
    for stale in os.listdir(directory):  # adapters of an earlier save that this one no longer has
        if stale.startswith("spectral_adapter.") and stale.endswith(".safetensors") and stale not in files.values():
            os.remove(os.path.join(directory, stale))
    path = os.path.join(directory, ADAPTER_NAME)
    n_basis = sum(t.numel() for n, t in main_tensors.items() if n.rsplit(".", 1)[-1] in ("U", "s", "V")
                  and n.rsplit(".", 1)[0] in layers) if include_basis else 0
    return AdapterInfo(path, len(main_tensors), sum(t.numel() for t in main_tensors.values()) - n_basis,
                       os.path.getsize(path), len(layers))


def read_folder(directory: str | os.PathLike) -> dict[str, Any]:
    """The description (``spectral_config.json``) of an adapter folder.

    Raises:
        FileNotFoundError: ``directory`` is not a folder or holds no ``spectral_config.json``.
        AdapterFileError: ``spectral_config.json`` is damaged (empty, not JSON).
        ValueError: the folder's format is not one this version reads.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_pretrained: {directory!r} is not a spectral adapter folder: it has no "
                                f"{CONFIG_NAME} (save one with spectral_kernels.save_pretrained(model, folder))")
    with reading(path, "adapter folder description"):
        with open(path, encoding="utf-8") as f:
            description = json.load(f)
        if not isinstance(description, dict):
            raise ValueError("not a JSON object")
    if description.get("format") not in READABLE_FOLDER_FORMATS:
        raise ValueError(f"from_pretrained: {path} has folder format {description.get('format')!r}; this "
                         f"version of spectral-kernels ({__version__}) reads formats {list(READABLE_FOLDER_FORMATS)}")
    return description


def folder_files(directory: str | os.PathLike, description: dict[str, Any]) -> dict[str, str]:
    """{file name: path to read} of a folder's save, each checked against the description's sha256.

    A file renamed into place by the save matches; one that a save killed after its commit left
    under its temporary name is renamed now (or read where it lies, in a read-only folder).

    Raises:
        AdapterFileError: a file is missing or matches no checksum the description records.
    """
    directory = os.fspath(directory)
    recorded = description.get("files")
    if recorded is None:  # format 1: no checksums
        return {f: os.path.join(directory, f) for f in (description.get("adapter_file", ADAPTER_NAME), HF_WEIGHTS_NAME)
                if os.path.exists(os.path.join(directory, f))}
    token = description.get("save_token", "")
    out = {}
    for file, sha in recorded.items():
        path = os.path.join(directory, file)
        tmp = temp_name(path, token)
        if token and os.path.isfile(tmp) and file_sha256(tmp) == sha:  # committed, not yet renamed
            try:
                os.replace(tmp, path)
                out[file] = path
            except OSError:
                out[file] = tmp
            continue
        if os.path.isfile(path) and file_sha256(path) == sha:
            out[file] = path
            continue
        state = "is missing" if not os.path.exists(path) else f"does not match the sha256 that {CONFIG_NAME} records"
        raise AdapterFileError(f"{path} {state}: the folder's files come from different saves or the file was "
                               "changed since; save the folder again")
    return out


def from_pretrained(base_model: nn.Module, directory: str | os.PathLike, *,
                    cache_dir: str | os.PathLike | None = None, distributed: bool | None = None) -> nn.Module:
    """Rebuild an adapted model from its base and an adapter folder; returns ``base_model`` adapted,
    with every adapter of the folder, and the folder's active adapter active.

    The folder is checked first (every file against the description's checksums, the adapter
    files against the description and ``pytorch_model.bin``; docs/checks-on-load.md), the base
    against the folder's fingerprints before any SVD; then the base is adapted with the folder's
    config (the SVD comes from the cache when ``cache_dir`` — else the config's ``svd_cache_dir``,
    else ``SPECTRAL_KERNELS_SVD_CACHE`` — holds it, or from the stored basis), and the trained
    tensors are loaded. An already adapted base must have been adapted with the same config.
    ``distributed`` goes to :func:`adapt`: False computes every SVD on this rank whatever
    ``SPECTRAL_KERNELS_SVD_DISTRIBUTED`` says, so one rank of a distributed job can load alone.

    Raises:
        FileNotFoundError: not an adapter folder.
        AdapterFileError: a damaged file, or files that do not belong together; the message names
            the file.
        AdapterMismatchError: another base, or a model adapted differently; the message names the
            layer or parameter and what differs.
    """
    directory = os.fspath(directory)
    description = read_folder(directory)
    if description["format"] == "1":
        warnings.warn(f"{directory}: adapter folder of format 1 (written by an earlier spectral-kernels): its files "
                      "carry no checksums; save it again to add them", UserWarning, stacklevel=2)
    paths = folder_files(directory, description)
    files = description.get("adapters") or {DEFAULT_ADAPTER: description.get("adapter_file", ADAPTER_NAME)}
    if DEFAULT_ADAPTER not in files:
        raise AdapterFileError(f"{os.path.join(directory, CONFIG_NAME)}: names no file for the 'default' adapter")
    read = {name: read_adapter_file(paths.get(file, os.path.join(directory, file))) for name, file in files.items()}
    _check_description(directory, description, read)
    for name, af in read.items():
        if af.adapter is not None and af.adapter != name:
            raise AdapterFileError(f"{af.path} holds adapter {af.adapter!r} but {CONFIG_NAME} names it as the file of "
                                   f"adapter {name!r}: the description was edited; save the folder again")
    if HF_WEIGHTS_NAME in paths:
        _check_hf_weights(paths[HF_WEIGHTS_NAME], read)
    m = unwrap(base_model)
    existing = getattr(m, CONFIG_ATTR, None)
    if existing is not None and spectral_layers(m):
        diff = _config_difference(existing, read[DEFAULT_ADAPTER].config)
        if diff:
            raise AdapterMismatchError(f"from_pretrained: the model is adapted with another config than the "
                                       f"folder's ({diff}); pass the unadapted base model")
    load_adapter_file(base_model, read[DEFAULT_ADAPTER], cache_dir=cache_dir, adapter=DEFAULT_ADAPTER,
                      distributed=distributed)
    checked = read[DEFAULT_ADAPTER]
    for name, af in read.items():
        if name != DEFAULT_ADAPTER:
            # the base was checked against the default file's fingerprints just now: a file of the
            # same save carries the same ones, and only another file's are checked again
            same = af.base == checked.base and all(
                af.layers[n]["fingerprint"] == checked.layers[n]["fingerprint"] for n in af.layers)
            load_adapter_file(base_model, af, adapter=name, check_base=not same)
    active = description.get("active_adapter")
    if active is not None and active != DEFAULT_ADAPTER:
        set_adapter(base_model, active)
    return base_model


def _check_description(directory: str, description: dict[str, Any], read: dict) -> None:
    """The description and the adapter files describe the same adapter (config, layers)."""
    path = os.path.join(directory, CONFIG_NAME)
    for af in read.values():
        if json.loads(af.config.to_json()) != description.get("config"):
            raise AdapterFileError(f"{path}: its config differs from the one in {af.path}: the files come from "
                                   "different saves or one was edited")
        if _strip_samples(af.layers) != description.get("layers"):
            raise AdapterFileError(f"{path}: its layers differ from those in {af.path}: the files come from "
                                   "different saves or one was edited")
    active = description.get("active_adapter")
    if active is not None and active not in read:
        raise AdapterFileError(f"{path}: the active adapter {active!r} is not among its adapters {sorted(read)}")


def _check_hf_weights(path: str, read: dict) -> None:
    """pytorch_model.bin (what Trainer's resume loads) holds the same tensors as the adapter files."""
    with reading(path, "checkpoint weights file"):
        held = torch.load(path, map_location="cpu", weights_only=True)
    want = {}
    for name, af in read.items():
        for n, t in af.tensors.items():
            layer, _, leaf = n.rpartition(".")
            if leaf in ("U", "s", "V") and layer in af.layers:
                continue
            want[n if name == DEFAULT_ADAPTER else f"{layer}.coeff_bank.{name}"] = t
    for n in sorted(set(want) | set(held)):
        if n not in held or n not in want:
            where = "is missing from" if n not in held else "is not in the adapter files but in"
            raise AdapterFileError(f"{path}: tensor {n!r} {where} this file: it comes from another save than the "
                                   "adapter files beside it; save the folder again")
        if held[n].shape != want[n].shape or not torch.equal(held[n].to(want[n].dtype), want[n]):
            raise AdapterFileError(f"{path}: tensor {n!r} differs from the adapter files beside it: the files come "
                                   "from different saves; save the folder again")


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
    """state_dict keys an adapter folder does not hold: all but the trainable parameters and the
    adapters' coefficients."""
    held = _held_names(model)
    return {k for k in model.state_dict() if k not in held}


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
