"""adapt(): replace a model's target linear layers by spectral layers and freeze everything else.

For each target (an nn.Linear, or a transformers Conv1D, whose weight is stored transposed as
[in, out] and computes x·W + b) the base weight is taken in the nn.Linear orientation
W [out, in] and replaced by

    mode "scale" / "shift":  SpectralLinear(W, top-k of W)          (spectral_kernels.nn)
    mode "speclora":         SpecLoRALinear(W, top-k of W, A, B)

A quantized target (bitsandbytes Linear4bit / Linear8bitLt, an nn.Linear with a torchao quantized
weight; see :mod:`spectral_kernels.tuning.quantized`) is kept whole, frozen, inside a
QuantizedSpectralLinear computing base(x) + ((x·V) ⊙ d)·Uᵀ, modes "scale" and "shift" only. Its
factors come from the dequantized weight Ŵ (float32), dequantized a few layers at a time
(:data:`QUANT_SVD_CHUNK`) so that a large model never holds more than a few dense matrices.

The top-k factors of all targets come from one :func:`batched_truncated_svd` pass (same-shape
weights stacked, one tqdm bar), one pass per distinct k. Afterwards only the spectral coefficients
(plus LoRA pairs, biases with ``train_bias``, and ``modules_to_save``) require grad.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor, nn

from spectral_kernels.tuning.config import ALL_LINEAR, SpectralConfig, name_matches
from spectral_kernels.tuning.distributed import distributed_svd, split_across_ranks
from spectral_kernels.tuning.fingerprints import FINGERPRINT_ATTR, check_fingerprint, compare_fingerprints, fingerprint
from spectral_kernels.tuning.quantized import quant_kind, quantized_fingerprint
from spectral_kernels.nn.quantized import QuantizedSpectralLinear
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.nn.spectral_linear import SpectralLinear

#: attribute set on every layer adapt() builds: the type it replaced ("linear" or "conv1d").
SOURCE_ATTR = "spectral_source"
#: attribute set on the adapted model: its SpectralConfig.
CONFIG_ATTR = "spectral_config"

Factors = tuple[Tensor, Tensor, Tensor]

logger = logging.getLogger("spectral_kernels")

#: quantized targets are dequantized (float32) and SVD'd this many layers at a time
QUANT_SVD_CHUNK = 4

#: called with the model at the end of every adapt(): layers above this module register here what
#: an adapted model needs from them (tuning/folder.py: transformers' save_pretrained), so that this
#: module imports nothing from above it
ADAPT_HOOKS: list = []


def conv1d_type() -> type | None:
    """transformers' GPT-2 style Conv1D class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional
        return None
    return Conv1D


def _looks_quantized(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "bitsandbytes" and isinstance(module, nn.Linear)


def is_adaptable(module: nn.Module) -> bool:
    """nn.Linear (torchao-quantized ones included), Conv1D, or a bitsandbytes linear layer (whether
    that quantized type is supported is checked by :func:`quant_kind`, which names it if not)."""
    conv = conv1d_type()
    return type(module) is nn.Linear or (conv is not None and isinstance(module, conv)) or _looks_quantized(module)


def base_weight(module: nn.Module) -> Tensor:
    """The weight in nn.Linear orientation [out, in] (a transposed view for a Conv1D). For a
    quantized layer this is its stored (packed) weight; see :func:`base_shape` and
    :func:`spectral_kernels.tuning.quantized.dequantize`."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a target, quantized or not."""
    if quant_kind(module) is not None:
        return module.out_features, module.in_features
    out_f, in_f = base_weight(module).shape
    return out_f, in_f


def base_fingerprint(module: nn.Module) -> dict:
    """The fingerprint of a target's base: of its weight, or of its quantized storage and settings."""
    if quant_kind(module) is not None:
        return quantized_fingerprint(module)
    return fingerprint(base_weight(module))


def check_base_fingerprint(stored: dict, module: nn.Module) -> str | None:
    """``compare_fingerprints(stored, base_fingerprint(module))``, hashing a dense weight only as
    far as the comparison needs (:func:`check_fingerprint`)."""
    if quant_kind(module) is not None:
        return compare_fingerprints(stored, quantized_fingerprint(module))
    return check_fingerprint(stored, base_weight(module))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


#: attribute of a merged model: {name: the SpectralLinear that merge_adapter replaced}
MERGED_ATTR = "_spectral_merged"


def no_adapter_hint(model: nn.Module) -> str:
    """What to do about a model without spectral layers: unmerge it when merge_adapter merged
    them into dense layers, else adapt it."""
    if getattr(unwrap(model), MERGED_ATTR, None):
        return "its adapter is merged into dense layers (merge_adapter); call unmerge(model) first"
    return "call adapt(model, config) first"


def spectral_layers(model: nn.Module) -> dict[str, SpectralLinear]:
    """Every SpectralLinear (SpecLoRALinear included) in the model, by qualified name."""
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, SpectralLinear)}


# --- target selection -----------------------------------------------------------------------------
def find_targets(model: nn.Module, config: SpectralConfig) -> dict[str, nn.Module]:
    """The modules config selects, by qualified name, in model order.

    Raises:
        ValueError: a target_modules entry (or the regex) matches no module; the message names it.
        TypeError: a matched module is not an nn.Linear / Conv1D (named, with its type), or is
            already a spectral layer.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    pattern = config.target_modules
    if pattern == ALL_LINEAR:
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keep = config.modules_to_save or []
        matched = [(n, m) for n, m in named if is_adaptable(m) and m is not out_emb
                   and not any(n == k or n.endswith("." + k) or f".{k}." in f".{n}" for k in keep)]
        if not matched:
            raise ValueError("target_modules='all-linear' matched no nn.Linear or Conv1D in the model")
    else:
        matched = [(n, m) for n, m in named if name_matches(n, pattern)]
        entries = [pattern] if isinstance(pattern, str) else pattern
        for entry in entries:
            if not any(name_matches(n, [entry] if isinstance(pattern, list) else pattern) for n, _ in matched):
                what = "regex" if isinstance(pattern, str) else "target"
                raise ValueError(f"target_modules: {what} {entry!r} matches no module of the model "
                                 f"(some module names: {_sample_names(named)})")
    if config.exclude_modules is not None:
        matched = [(n, m) for n, m in matched if not name_matches(n, config.exclude_modules)]
    for n, m in matched:
        if isinstance(m, SpectralLinear):
            raise TypeError(f"module {n!r} is already a {type(m).__name__}: the model was adapted already "
                            "(merge_adapter / a fresh model first)")
        try:
            quant_kind(m)
        except TypeError as e:
            raise TypeError(f"module {n!r}: {e}") from None
        if not is_adaptable(m):
            raise TypeError(f"module {n!r} is a {type(m).__name__}, which adapt cannot adapt; targets must be "
                            "nn.Linear or transformers Conv1D (narrow target_modules, or add it to exclude_modules)")
    if not matched:
        raise ValueError("no module left to adapt after exclude_modules")
    return dict(matched)


def _sample_names(named, limit: int = 8) -> str:
    leaves = [n for n, m in named if is_adaptable(m)] or [n for n, _ in named]
    more = f", ... ({len(leaves)} in all)" if len(leaves) > limit else ""
    return ", ".join(leaves[:limit]) + more


# --- the rewrite ----------------------------------------------------------------------------------
@dataclass
class AdaptReport:
    """What adapt() did: ``replaced[name] = "Linear(32→96) → SpectralLinear(rank 8, scale, delta)"``."""

    replaced: dict[str, str] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0

    def __str__(self) -> str:
        lines = [f"adapted {len(self.replaced)} layers:"]
        lines += [f"  {n}: {what}" for n, what in self.replaced.items()]
        lines.append(trainable_summary(self.trainable, self.total))
        return "\n".join(lines)


def adapt(
    model: nn.Module,
    config: SpectralConfig,
    *,
    factors: Mapping[str, Factors] | None = None,
    verbose: bool = False,
    distributed: bool | None = None,
) -> nn.Module:
    """Replace ``model``'s target layers in place by spectral layers; freeze everything else.

    Args:
        model: any nn.Module (a transformers model included).
        config: the :class:`SpectralConfig`.
        factors: precomputed ``{name: (U [out, r], s [r], V [in, r])}`` (r ≥ the layer's k) to use
            instead of the SVD (load_adapter passes a stored basis this way).
        verbose: also print the report (what was replaced and the trainable parameter count).
            Quiet by default: the report is on ``model.spectral_report`` and goes to the
            ``spectral_kernels`` logger (one INFO line, a DEBUG line per layer).
        distributed: split the SVDs across the ranks of the initialised process group (each
            matrix decomposed by one rank, the factors broadcast; every rank must then call adapt
            on the same model). False: this rank computes every SVD itself and talks to no other
            rank. None (default): ``SPECTRAL_KERNELS_SVD_DISTRIBUTED=1`` in the environment opts
            in, otherwise False. See docs/distributed.md.

    Returns:
        ``model`` itself, with ``model.spectral_config = config`` and ``model.spectral_report``
        (an :class:`AdaptReport`).

    Raises:
        ValueError: a target matches nothing, or a rank exceeds a layer's min(in, out) (the layer is named).
        TypeError: a target is a module type adapt cannot adapt.
    """
    if not isinstance(config, SpectralConfig):
        raise TypeError(f"config must be a SpectralConfig, got {type(config).__name__}")
    targets = find_targets(model, config)
    ranks: dict[str, int] = {}
    for name, module in targets.items():
        _check_quantized_config(name, module, config)
        out_f, in_f = base_shape(module)
        if min(in_f, out_f) < 1:
            raise ValueError(f"layer {name!r} ({type(module).__name__} {in_f}→{out_f}) has no inputs or outputs, so no "
                             "spectrum to adapt; leave it out of target_modules")
        k = config.rank_for(in_f, out_f)
        if k > min(in_f, out_f):
            raise ValueError(f"rank {k} is too large for layer {name!r} ({type(module).__name__} {in_f}→{out_f}): "
                             f"it must be at most min(in_features, out_features) = {min(in_f, out_f)}")
        ranks[name] = k
    save = _match_modules_to_save(model, config)
    for keep in save:
        inside = [n for n in targets if n == keep or n.startswith(keep + ".")]
        if inside:
            raise ValueError(f"modules_to_save: module {keep!r} contains the target {inside[0]!r}; a module is "
                             "either adapted or kept trainable, not both")

    svd = _factors(targets, ranks, config, factors or {}, split_across_ranks(distributed))
    report = AdaptReport()
    for name, module in targets.items():
        layer = _build(module, ranks[name], svd[name], config)
        _set_submodule(model, name, layer)
        src = f"{type(module).__name__}({layer.in_features}→{layer.out_features})"
        extra = f", lora_rank {layer.lora_rank}" if isinstance(layer, SpecLoRALinear) else ""
        extra += f", base {layer.quant_kind}" if isinstance(layer, QuantizedSpectralLinear) else ""
        report.replaced[name] = f"{src} → {type(layer).__name__}(rank {layer.rank}, {config.mode}, {layer.form}{extra})"

    for p in model.parameters():
        p.requires_grad_(False)
    for layer in spectral_layers(model).values():
        layer.coeffs.requires_grad_(True)
        if config.train_bias and layer.bias is not None:
            layer.bias.requires_grad_(True)
        if isinstance(layer, SpecLoRALinear):
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
    for module in save.values():
        for p in module.parameters():
            p.requires_grad_(True)

    report.trainable, report.total = count_parameters(model)
    setattr(model, CONFIG_ATTR, config)
    model.spectral_report = report
    for hook in ADAPT_HOOKS:
        hook(model)
    logger.info("adapted %d layers; %s", len(report.replaced), trainable_summary(report.trainable, report.total))
    for name, what in report.replaced.items():
        logger.debug("  %s: %s", name, what)
    if verbose:
        print(report)
    return model


def _match_modules_to_save(model: nn.Module, config: SpectralConfig) -> dict[str, nn.Module]:
    if not config.modules_to_save:
        return {}
    named = [(n, m) for n, m in model.named_modules() if n]
    out: dict[str, nn.Module] = {}
    for entry in config.modules_to_save:
        hits = [(n, m) for n, m in named if name_matches(n, [entry])]
        if not hits:
            raise ValueError(f"modules_to_save: {entry!r} matches no module of the model "
                             f"(some module names: {_sample_names(named)})")
        out.update(hits)
    return out


def _check_quantized_config(name: str, module: nn.Module, config: SpectralConfig) -> None:
    """Refuse, naming the layer and its type, what a quantized base cannot do."""
    kind = quant_kind(module)
    if kind is None:
        return
    what = f"layer {name!r} is a quantized {type(module).__name__} ({kind})"
    if config.mode not in ("scale", "shift"):
        raise ValueError(f"{what}: mode {config.mode!r} is not supported on quantized bases; use mode 'scale' or "
                         "'shift' (the quantized weight stays frozen and a spectral term is added)")
    if config.form == "pure":
        raise ValueError(f"{what}: form 'pure' drops the base weight, which a quantized base keeps; use form "
                         "'delta' or 'auto'")
    if config.train_bias:
        raise ValueError(f"{what}: train_bias=True is not supported on quantized bases (the base and its bias "
                         "stay frozen and untouched)")


def _factors(targets: dict[str, nn.Module], ranks: dict[str, int], config: SpectralConfig,
             given: Mapping[str, Factors], split: bool = False) -> dict[str, Factors]:
    """Top-k factors of every target: given ones, else batched_truncated_svd per distinct k.

    Quantized targets are dequantized to float32 :data:`QUANT_SVD_CHUNK` layers at a time, each
    chunk SVD'd and dropped before the next, so peak memory is a few dense [out, in] matrices."""
    out = {n: tuple(given[n]) for n in targets if n in given}
    by_k: dict[int, dict[str, Tensor]] = {}
    quant_by_k: dict[int, list[str]] = {}
    for name, module in targets.items():
        if name in out:
            continue
        if quant_kind(module) is not None:
            quant_by_k.setdefault(ranks[name], []).append(name)
        else:
            by_k.setdefault(ranks[name], {})[name] = base_weight(module).detach()
    for k, mats in by_k.items():
        out.update(_batched_svd(mats, k, config, split))
    if quant_by_k:
        from spectral_kernels.tuning.quantized import dequantize

        for k, names in quant_by_k.items():
            for i in range(0, len(names), QUANT_SVD_CHUNK):
                chunk = {n: dequantize(targets[n]) for n in names[i:i + QUANT_SVD_CHUNK]}
                out.update(_batched_svd(chunk, k, config, split))
                del chunk
    return out


def _batched_svd(mats: dict[str, Tensor], k: int, config: SpectralConfig, split: bool = False) -> dict[str, Factors]:
    from spectral_kernels.ops.truncated_svd import batched_truncated_svd

    for name, W in mats.items():
        if W.is_meta:
            raise ValueError(f"layer {name!r}: its weight is a meta tensor (a shape without data, e.g. a model built "
                             "under device='meta' or init_empty_weights); load or materialise the weights before adapt")
        if not torch.isfinite(W).all():
            raise ValueError(f"layer {name!r}: its weight holds NaN or Inf; cannot take its SVD")

    def svd(share: dict[str, Tensor]) -> dict[str, Factors]:
        if not share:
            return {}
        res = batched_truncated_svd(
            share, k, oversample=config.svd_oversample, n_iter=config.svd_n_iter, tol=config.svd_tol,
            method=config.svd_method, generator=torch.Generator().manual_seed(config.svd_seed),
            cache_dir=config.svd_cache_dir, progress=config.progress,
        )
        return {n: (r.U, r.S, r.V) for n, r in res.items()}

    if split:  # each matrix decomposed on one rank, factors broadcast (opted in by the caller)
        return distributed_svd(mats, k, svd)
    return svd(mats)


@torch.no_grad()
def _build_quantized(module: nn.Module, k: int, svd: Factors, config: SpectralConfig) -> QuantizedSpectralLinear:
    from spectral_kernels.nn.spectral_linear import _check_factors
    from spectral_kernels.tuning.quantized import compute_dtype

    kind = quant_kind(module)
    out_f, in_f = module.out_features, module.in_features
    device = svd[0].device
    layer = QuantizedSpectralLinear(module, in_f, out_f, k, mode=config.mode, backend=config.backend,
                                    quant_kind=kind, device=device, dtype=compute_dtype(module))
    U, s, V = _check_factors(svd, torch.empty(out_f, in_f, device="meta"), k)
    layer.U.copy_(U)
    layer.s.copy_(s)
    layer.V.copy_(V)
    setattr(layer, SOURCE_ATTR, "linear")
    setattr(layer, FINGERPRINT_ATTR, quantized_fingerprint(module))
    layer.train(module.training)
    return layer


@torch.no_grad()
def _build(module: nn.Module, k: int, svd: Factors, config: SpectralConfig) -> SpectralLinear:
    if quant_kind(module) is not None:
        return _build_quantized(module, k, svd, config)
    W = base_weight(module)
    out_f, in_f = W.shape
    bias = module.bias
    if config.mode == "speclora":
        layer = SpecLoRALinear.from_weight(
            W, bias, k, svd, lora_rank=config.lora_rank, lora_alpha=config.lora_alpha,
            train_bias=config.train_bias, backend=config.backend,
        )
    else:
        form = config.form_for(k, in_f, out_f)
        if form == "pure" and k < min(in_f, out_f):
            warnings.warn(f"layer: form='pure' at rank {k} < min(in, out) = {min(in_f, out_f)} drops the rest of "
                          "the spectrum; the layer is not the pretrained one at initialisation", stacklevel=3)
        from spectral_kernels.nn.spectral_linear import _check_factors

        layer = SpectralLinear(in_f, out_f, k, bias=bias is not None, mode=config.mode, form=form,
                               train_bias=config.train_bias, backend=config.backend, device=W.device, dtype=W.dtype)
        U, s, V = _check_factors(svd, W, k)
        layer.U.copy_(U)
        layer.s.copy_(s)
        layer.V.copy_(V)
        if layer.weight is not None:
            layer.weight.copy_(W)
        if bias is not None:
            layer.bias.copy_(bias)
    setattr(layer, SOURCE_ATTR, "linear" if isinstance(module, nn.Linear) else "conv1d")
    if layer.weight is None:  # pure form keeps no W: record the base's fingerprint for adapter files
        setattr(layer, FINGERPRINT_ATTR, fingerprint(W))
    layer.train(module.training)
    return layer


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


# --- reporting ------------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; frozen base weights kept by delta-form layers count in the
    total, the frozen U, s, V buffers do not."""
    params = list(unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_summary(trainable: int, total: int) -> str:
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: N || all params: M || trainable%: P`` (peft's format)."""
    print(trainable_summary(*count_parameters(model)))
