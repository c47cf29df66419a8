"""Export for serving: peft LoRA folders (peft, vLLM, SGLang, LoRAX) and merged checkpoints.

A spectral update is an exact low-rank LoRA update. With a layer's frozen factors U [out, k],
V [in, k] and its coefficient delta d [k] (delta form: ΔW = U·diag(d)·Vᵀ)

    lora_B = U·diag(√|d|)            [out, k]
    lora_A = diag(sign(d)·√|d|)·Vᵀ   [k, in]        lora_B·lora_A = U·diag(d)·Vᵀ = ΔW

and ``r = lora_alpha`` so that peft's (and vLLM's) scaling ``lora_alpha / r`` is exactly 1 (rsLoRA
off). The √|d| split puts the same magnitude in both factors, which keeps bf16/fp16 exports as
accurate as the dtype allows. The base the folder names is the unadapted base (W itself is never
changed), so the export is exact at rank k — no rank doubling as for methods that rewrite W.

- ``"speclora"`` layers stack their LoRA pair on the spectral part: one LoRA of rank k + r with
  lora_B = [U·diag(√|d|) | √(α/r)·B] and lora_A = [diag(sign(d)√|d|)·Vᵀ ; √(α/r)·A].
- Pure-form layers keep no W: their update over the pretrained weight is U·diag(φ)·Vᵀ − W. At
  k = min(in, out) the factors span W, W = U·diag(s)·Vᵀ up to the SVD's rounding, and the update is
  U·diag(φ − s)·Vᵀ, exported at rank k (exact up to that rounding). At k < min(in, out) the layer
  dropped the rest of W's spectrum: the update has full rank, so the export is refused (naming the
  layer); :func:`save_merged` writes that model exactly.
- GPT-2 Conv1D targets: the factors above are in nn.Linear orientation, which is what peft's LoRA
  wrappers store for Conv1D too; the config sets ``fan_in_fan_out`` so peft merges them right.
- Quantized bases: the update is the delta on top of the *quantized* base the adapter was trained
  on; the adapter file's metadata says so (``base_quantization``), and applying it to a base of
  another precision gives a model that differs from the trained one by the quantization error.

Rank. Serving engines allocate LoRA slots of a few fixed ranks (vLLM: ``--max-lora-rank`` one of
:data:`VLLM_LORA_RANKS`). By default every layer is padded with zero rows/columns up to the next of
those ranks — still exact — so one ``r`` fits every layer and no ``rank_pattern`` is needed.
``rank="max"`` pads to the largest layer rank only; ``rank=None`` keeps each layer's own rank and
writes peft's ``rank_pattern`` / ``alpha_pattern`` where layers differ (peft reads them; engines
that ignore them still scale by ``lora_alpha / r = 1``, which is right for every layer).

Bias changes (``train_bias=True``) travel as peft writes them: ``bias="lora_only"`` and the trained
bias of each adapted layer under ``base_model.model.{layer}.base_layer.bias``; ``modules_to_save``
as ``modules_to_save`` in the config and their tensors under ``base_model.model.{module}.{param}``
(with every module tied to one of them, e.g. the input embedding of a tied ``lm_head``: training
changed the shared tensor, and peft's copy of a module to save would untie it).
peft loads both; vLLM and SGLang refuse adapters with a bias or with ``modules_to_save``, so the
export warns, naming them. peft allows one adapter with a bias per model: in a bank, the bias goes
with the first exported adapter ("default" when exported) only — the biases are shared by every
adapter of the bank, as in peft once that adapter is loaded.

Layout (peft's ``save_pretrained``): the adapter "default" at ``directory`` itself, every other
named adapter in ``directory/<name>``. So ``PeftModel.from_pretrained(base, directory)`` loads
"default" and ``peft_model.load_adapter(directory/<name>, adapter_name=<name>)`` the others.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from spectral_kernels._version import __version__
from spectral_kernels.tuning.adapter_io import _full
from spectral_kernels.tuning.inject import CONFIG_ATTR, SOURCE_ATTR, spectral_layers, unwrap
from spectral_kernels.nn.quantized import QuantizedSpectralLinear
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import DEFAULT_ADAPTER, SpectralLinear

#: the ranks vLLM accepts as ``--max-lora-rank`` (its LoRA slots are allocated at one of them)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: key of the adapter file's safetensors metadata describing where the export came from
META_EXPORT = "spectral_kernels.export"
#: peft's prefix for the wrapped model's modules
PEFT_PREFIX = "base_model.model."


class PureFormExportError(ValueError):
    """A pure-form layer at k < min(in, out): its update over the base is not low rank."""


# --- the factors ------------------------------------------------------------------------------------
@torch.no_grad()
def lora_factors(layer: SpectralLinear, adapter: str | None = None, *, name: str = "layer") -> tuple[Tensor, Tensor]:
    """(lora_A [R, in], lora_B [out, R]) with lora_B·lora_A = the layer's update ΔW (module docstring),
    in float64, R = k (k + r for SpecLoRA), for the coefficients of ``adapter`` (None: the active one).

    Raises:
        PureFormExportError: a pure-form layer at k < min(in, out) (``name`` names it).
    """
    acc = torch.float64
    if isinstance(layer, SpecLoRALinear):
        layer.coefficients(adapter)  # SpecLoRA has only "default"; raises for another name
        U, d, V = (t.detach().to(acc) for t in layer.chain())
    else:
        U, V = layer.U.to(acc), layer.V.to(acc)
        d = layer.coefficient_delta(adapter).detach().to(acc)
        if layer.form == "pure":
            if layer.rank < min(layer.in_features, layer.out_features):
                raise PureFormExportError(
                    f"layer {name!r} is in pure form at rank {layer.rank} < min(in, out) = "
                    f"{min(layer.in_features, layer.out_features)}: it dropped the rest of the base weight's spectrum, so "
                    "its update over the base is not low rank and no LoRA reproduces it; write the model with "
                    "spectral_kernels.save_merged(model, directory) instead (adapt with form='delta' to export as LoRA)")
            d = d - layer.s.to(acc)  # φ − s: the base is U·diag(s)·Vᵀ up to the SVD's rounding
    root = d.abs().sqrt()
    lora_B = U * root
    lora_A = (torch.sign(d) * root)[:, None] * V.t()
    return lora_A, lora_B


def _pad(lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero rows of A / columns of B up to ``rank`` (the product is unchanged, exactly)."""
    extra = rank - lora_A.shape[0]
    if extra <= 0:
        return lora_A, lora_B
    return (torch.cat([lora_A, lora_A.new_zeros(extra, lora_A.shape[1])]),
            torch.cat([lora_B, lora_B.new_zeros(lora_B.shape[0], extra)], dim=1))


def _layer_rank(layer: SpectralLinear) -> int:
    return layer.rank + (layer.lora_rank if isinstance(layer, SpecLoRALinear) else 0)


def _export_ranks(layers: dict[str, SpectralLinear], rank: str | int | None) -> dict[str, int]:
    """Each layer's exported rank R (≥ its own rank) under the ``rank`` option (see export_peft)."""
    own = {n: _layer_rank(layer) for n, layer in layers.items()}
    top = max(own.values())
    if rank is None or rank == "none":
        return own
    if rank == "max":
        return dict.fromkeys(own, top)
    if rank == "vllm":
        fit = next((r for r in VLLM_LORA_RANKS if r >= top), top)
        return dict.fromkeys(own, fit)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"export_peft: rank must be 'vllm', 'max', None or an int, got {rank!r}")
    low = [n for n, r in own.items() if r > rank]
    if low:
        raise ValueError(f"export_peft: rank={rank} is below layer {low[0]!r}'s rank {own[low[0]]} "
                         f"({len(low)} such layers); pass rank >= {top}")
    return dict.fromkeys(own, rank)


# --- naming -----------------------------------------------------------------------------------------
def _target_modules(model: nn.Module, layers: dict[str, SpectralLinear]) -> list[str] | str:
    """peft's target_modules selecting exactly the adapted layers among the base's modules: the
    short names (``q_proj``) when they do, else the full names, else (a full name that is also the
    tail of another module's name) a regex of the full names. peft (and vLLM) match a list entry
    as the whole name or a ``.``-separated suffix."""
    import re

    inside = tuple(f"{n}." for n in layers)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(inside)]

    def selects(entries: list[str]) -> bool:
        return {n for n in names if any(n == e or n.endswith("." + e) for e in entries)} == set(layers)

    for entries in (sorted({n.rsplit(".", 1)[-1] for n in layers}), sorted(layers)):
        if selects(entries):
            return entries
    return "^(?:" + "|".join(re.escape(n) for n in sorted(layers)) + ")$"


def _modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The model's ``modules_to_save`` (by full name) as adapt() matched them."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not config.modules_to_save:
        return {}
    from spectral_kernels.tuning.inject import _match_modules_to_save

    return _match_modules_to_save(model, config)


def _tied_partners(model: nn.Module, save_modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Modules outside ``save_modules`` holding one of their parameters (tied weights: a causal LM's
    input embedding tied to its ``lm_head``). Training a module to save trained the shared tensor,
    so its partner changed too; peft copies each module to save, which unties them, so the
    partners travel as modules to save as well (adapted layers hold their own copy of W)."""
    held = {id(p) for module in save_modules.values() for p in module.parameters()}
    inside = tuple(f"{n}." for n in save_modules)
    return {name: module for name, module in model.named_modules()
            if name and name not in save_modules and not name.startswith(inside)
            and not isinstance(module, SpectralLinear)
            and any(id(p) in held for p in module.parameters(recurse=False))}


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def base_model_name(model: nn.Module) -> str | None:
    """The unadapted base's name or path, from a transformers model's ``config._name_or_path``."""
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _lora_config(*, r: int, target_modules: list[str] | str, fan_in_fan_out: bool, bias: str,
                 modules_to_save: list[str] | None, rank_pattern: dict[str, int], base_model: str | None,
                 task_type: str | None) -> dict[str, Any]:
    """adapter_config.json as peft writes it (through peft's LoraConfig when peft is installed)."""
    fields = dict(r=r, lora_alpha=r, target_modules=target_modules, lora_dropout=0.0, bias=bias,
                  fan_in_fan_out=fan_in_fan_out, modules_to_save=modules_to_save, use_rslora=False,
                  use_dora=False, rank_pattern=dict(rank_pattern), alpha_pattern=dict(rank_pattern),
                  base_model_name_or_path=base_model, task_type=task_type, inference_mode=True)
    try:
        from peft import LoraConfig
    except ImportError:  # peft is optional: the fields every reader (peft, vLLM, SGLang) needs
        return {"peft_type": "LORA", "init_lora_weights": True, **fields}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to True but ..." at config time
        config = LoraConfig(**fields).to_dict()
    config["target_modules"] = target_modules  # LoraConfig turns a list into a set
    config["peft_type"] = "LORA"
    if config.get("task_type") is not None:  # an enum in LoraConfig, its string in the file
        config["task_type"] = str(getattr(config["task_type"], "value", config["task_type"]))
    return config


# --- writing ----------------------------------------------------------------------------------------
def _folders(directory: str, names: Sequence[str]) -> dict[str, str]:
    return {n: directory if n == DEFAULT_ADAPTER else os.path.join(directory, n) for n in names}


def _check_free(folders: dict[str, str], overwrite: bool) -> None:
    """Refuse, before writing anything, a folder that already holds an adapter (unless ``overwrite``)."""
    for name, folder in folders.items():
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise NotADirectoryError(f"export_peft: {folder!r} exists and is not a folder")
        held = [f for f in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME) if os.path.exists(os.path.join(folder, f))]
        if held and not overwrite:
            raise FileExistsError(
                f"export_peft: {folder!r} already holds an adapter ({', '.join(held)}); nothing was written. "
                "Pass overwrite=True to replace it, or choose another directory")


def _write_atomic(path: str, write) -> None:
    """Write through ``write(tmp_path)`` beside ``path``, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _dtype_of(dtype: torch.dtype | str | None, layer: SpectralLinear) -> torch.dtype:
    if dtype is None:
        return layer.U.dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"export_peft: dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        dtype = value
    if not dtype.is_floating_point:
        raise ValueError(f"export_peft: dtype must be a floating dtype, got {dtype}")
    return dtype


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter: str | Sequence[str] | None = None,
    *,
    rank: str | int | None = "vllm",
    dtype: torch.dtype | str | None = None,
    max_lora_rank: int | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, str]:
    """Write an adapted model's adapters as standard peft LoRA folders (module docstring for the math).

    Args:
        model: a model :func:`spectral_kernels.adapt` rewrote (wrappers are looked through).
        directory: the output folder (created); "default" goes there, other adapters to sub-folders.
        adapter: the adapter name(s) to export (None: every adapter of the bank).
        rank: ``"vllm"`` (default): pad every layer with zeros to the next rank vLLM serves
            (:data:`VLLM_LORA_RANKS`); ``"max"``: to the largest layer rank; an int: to that rank;
            None: each layer's own rank, with peft's ``rank_pattern`` where layers differ.
        dtype: dtype of the saved tensors (default: the layers' dtype). Factors are computed in
            float64 and rounded once.
        max_lora_rank: warn, naming the layers, where the exported rank exceeds this engine limit
            (ranks above vLLM's largest, 512, always warn).
        overwrite: replace an adapter already in a target folder (else it is refused, untouched).
        progress: a tqdm bar over the layers (None: when stderr is a terminal).

    Returns:
        ``{adapter name: folder}`` of the folders written.

    Raises:
        ValueError: the model has no adapter, an unknown adapter name, a bad ``rank``/``dtype``,
            or a pure-form layer at k < min(in, out) (:class:`PureFormExportError`).
        FileExistsError: a target folder holds an adapter and ``overwrite`` is False.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    m = unwrap(model)
    layers = spectral_layers(m)
    if not layers:
        raise ValueError("export_peft: the model has no adapter (no spectral layer); call adapt(model, config) first")
    known = next(iter(layers.values())).adapter_names()
    names = known if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    if not names:
        raise ValueError("export_peft: adapter must name at least one adapter")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"export_peft: no adapter {unknown[0]!r}; the model's adapters are {known}")
    names = list(dict.fromkeys(names))
    # each name becomes a sub-folder: adapter names hold no path separator (check_adapter_name)
    ranks = _export_ranks(layers, rank)
    directory = os.fspath(directory)
    folders = _folders(directory, names)
    _check_free(folders, overwrite)

    # everything that can fail is computed before the first file is written
    save_modules = _modules_to_save(m)
    save_modules.update(_tied_partners(m, save_modules))
    # trained biases: train_bias in the config (a model frozen for inference since) or a trainable bias
    train_bias = getattr(getattr(m, CONFIG_ATTR, None), "train_bias", False)
    biased = {n: layer for n, layer in layers.items()
              if layer.bias is not None and (train_bias or layer.bias.requires_grad)}
    quantized = {n: layer.quant_kind for n, layer in layers.items() if isinstance(layer, QuantizedSpectralLinear)}
    conv = [n for n, layer in layers.items() if getattr(layer, SOURCE_ATTR, "linear") == "conv1d"]
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {n: r for n, r in ranks.items() if r != common}
    _warn_serving(ranks, max_lora_rank, biased, save_modules, quantized)

    tensors: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    bar = tqdm(total=len(layers) * len(names), desc="export to peft", unit="layer",
               disable=None if progress is None else not progress)
    for name, layer in layers.items():
        out_dtype = _dtype_of(dtype, layer)
        for a in names:
            A, B = _pad(*lora_factors(layer, a, name=name), ranks[name])
            tensors[a][f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.to(out_dtype).cpu().contiguous()
            tensors[a][f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.to(out_dtype).cpu().contiguous()
            bar.update()
    bar.close()
    shared: dict[str, Tensor] = {}
    for name, module in save_modules.items():
        for key, t in module.state_dict().items():
            # a copy each: tied modules share a tensor, which safetensors refuses to write twice
            shared[f"{PEFT_PREFIX}{name}.{key}"] = _full(t).detach().cpu().clone()
    bias_tensors = {f"{PEFT_PREFIX}{n}.base_layer.bias": _full(layer.bias).cpu().contiguous()
                    for n, layer in biased.items()}

    meta = {"package": "spectral-kernels", "package_version": __version__,
            "mode": sorted({layer.mode for layer in layers.values()}),
            "exact": "lora_B @ lora_A * (lora_alpha / r) is the trained update of each layer; scaling is 1",
            "base": "the unadapted base model" if not quantized else
            "the quantized base the adapter was trained on: the update is the delta on top of that base's "
            "dequantized weights; applied to (or merged into) a base of another precision it differs from the "
            "trained model by the quantization error",
            "base_quantization": quantized or None}
    written = {}
    for i, a in enumerate(names):
        carries_bias = bool(bias_tensors) and i == 0
        config = _lora_config(
            r=common, target_modules=_target_modules(m, layers), fan_in_fan_out=bool(conv),
            bias="lora_only" if carries_bias else "none",
            modules_to_save=sorted(save_modules) or None, rank_pattern=pattern, base_model=base_model_name(m),
            task_type=_task_type(m))
        state = {**tensors[a], **shared, **(bias_tensors if carries_bias else {})}
        folder = folders[a]
        os.makedirs(folder, exist_ok=True)
        metadata = {"format": "pt", META_EXPORT: json.dumps({**meta, "adapter": a}, sort_keys=True)}
        _write_atomic(os.path.join(folder, PEFT_WEIGHTS_NAME), lambda p: save_file(state, p, metadata=metadata))
        _write_atomic(os.path.join(folder, PEFT_CONFIG_NAME), lambda p: _write_json(p, config))
        written[a] = folder
    if bias_tensors and len(names) > 1:
        warnings.warn(
            f"export_peft: the trained biases (train_bias) are shared by every adapter; they travel with adapter "
            f"{names[0]!r} only ({folders[names[0]]}), since peft allows one adapter with a bias per model. Load "
            "that adapter first; another adapter loaded alone runs with the base's biases", UserWarning, stacklevel=2)
    return written


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _names(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _warn_serving(ranks: dict[str, int], max_lora_rank: int | None, biased: dict, save_modules: dict,
                  quantized: dict) -> None:
    """Warn, naming the layers, about what a serving engine (vLLM, SGLang) would refuse."""
    limit = VLLM_LORA_RANKS[-1] if max_lora_rank is None else max_lora_rank
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"export_peft: max_lora_rank must be a positive int, got {max_lora_rank!r}")
    over = [n for n, r in ranks.items() if r > limit]
    if over:
        what = "vLLM's largest --max-lora-rank" if max_lora_rank is None else "max_lora_rank"
        warnings.warn(f"export_peft: layer {over[0]!r} has rank {ranks[over[0]]} > {limit} ({what}); an engine with "
                      f"that limit refuses the adapter ({len(over)} such layers: {_names(over)}). Adapt with a smaller "
                      "rank, or raise the engine's limit", UserWarning, stacklevel=3)
    if biased:
        warnings.warn(f"export_peft: layers {_names(biased)} have trained biases (train_bias), exported as peft's "
                      "bias='lora_only': peft loads them, vLLM and SGLang refuse adapters with a bias",
                      UserWarning, stacklevel=3)
    if save_modules:
        warnings.warn(f"export_peft: modules_to_save {_names(save_modules)} are exported whole, as peft writes "
                      "them: peft loads them, vLLM and SGLang refuse adapters with modules_to_save",
                      UserWarning, stacklevel=3)
    if quantized:
        warnings.warn(f"export_peft: layers {_names(quantized)} sit on a quantized base ({', '.join(sorted(set(quantized.values())))}); "
                      "the exported update is the delta on top of that quantized base. Load it on the same quantized "
                      "base for the trained model; on (or merged into) a base of another precision the result differs "
                      "by the quantization error", UserWarning, stacklevel=3)
