"""Quantized base layers: detection, dequantization, fingerprints and re-quantization.

Supported bases (the module is kept as is; only its dequantized weight Ŵ [out, in] is read):

- ``"bnb-4bit"``: bitsandbytes ``Linear4bit`` (and ``LinearNF4`` / ``LinearFP4``): nf4 or fp4, any
  blocksize, with or without double quantisation (``compress_statistics``);
  Ŵ = ``bitsandbytes.functional.dequantize_4bit(weight, quant_state)``.
- ``"bnb-8bit"``: bitsandbytes ``Linear8bitLt`` with int8 weights (``has_fp16_weights=False``);
  Ŵ = CB ⊙ SCB / 127 (row-wise absmax int8).
- ``"torchao"``: an ``nn.Linear`` whose weight is a torchao weight-only quantized tensor subclass
  (``quantize_(model, Int8WeightOnlyConfig())``, ``Int4WeightOnlyConfig``, ``IntxWeightOnlyConfig``);
  Ŵ = ``weight.dequantize()``.

Anything else that looks quantized (another bitsandbytes module, another tensor subclass) is
refused with a TypeError naming its type and the supported ones. bitsandbytes and torchao are
optional (extras ``spectral-kernels[bnb]``, ``spectral-kernels[torchao]``); they are imported only
when a module from them is met.

The fingerprint of a quantized base is ``{shape, dtype: "<kind>", quant: {...settings}, sha256}``:
the settings (kind, quant type, blocksize, double quantisation, storage dtype, ...) and a sha256 over
the shape, the settings and the bytes of every stored tensor (packed codes, absmax / scales, nested
statistics), so an adapter refuses a base quantized with other settings, naming the setting.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from spectral_kernels._hashing import update_with_bytes

BNB_EXTRA = 'pip install "spectral-kernels[bnb]"'
TORCHAO_EXTRA = 'pip install "spectral-kernels[torchao]"'

#: torchao weight tensor classes adapt() accepts (weight-only quantisation with a dequantize())
TORCHAO_TENSORS = ("Int8Tensor", "Int4Tensor", "Int4TilePackedTo4dTensor", "Int4PreshuffledTensor",
                   "Int4PlainInt32Tensor", "IntxUnpackedToInt8Tensor", "AffineQuantizedTensor")
SUPPORTED = ("bitsandbytes Linear4bit (nf4/fp4, double quantisation)", "bitsandbytes Linear8bitLt (int8)",
             "nn.Linear with a torchao " + "/".join(TORCHAO_TENSORS) + " weight")


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - only without the extra
        raise ImportError(f"quantized bitsandbytes layers need bitsandbytes: {BNB_EXTRA}") from e
    return bitsandbytes


def _torchao():
    try:
        import torchao
    except ImportError as e:  # pragma: no cover - only without the extra
        raise ImportError(f"torchao quantized layers need torchao: {TORCHAO_EXTRA}") from e
    return torchao


def _from(obj: Any, package: str) -> bool:
    return type(obj).__module__.split(".")[0] == package


def quant_kind(module: nn.Module) -> str | None:
    """``"bnb-4bit"``, ``"bnb-8bit"`` or ``"torchao"`` for a supported quantized linear layer, None
    for anything not quantized (a plain nn.Linear included).

    Raises:
        TypeError: a quantized layer of a type adapt() does not support (named, with the supported ones).
    """
    if _from(module, "bitsandbytes"):
        bnb = _bnb()
        if isinstance(module, bnb.nn.Linear4bit):
            return "bnb-4bit"
        if isinstance(module, bnb.nn.Linear8bitLt):
            if getattr(module.weight, "dtype", None) == torch.int8:
                return "bnb-8bit"
            raise TypeError(f"bitsandbytes Linear8bitLt with has_fp16_weights=True (a {module.weight.dtype} weight) "
                            "is not a frozen quantized base; load it with has_fp16_weights=False")
        if isinstance(module, nn.Linear) or "Linear" in type(module).__name__:
            raise TypeError(f"quantized layer type {type(module).__module__}.{type(module).__name__} is not supported; "
                            f"supported: {'; '.join(SUPPORTED)}")
        return None
    if isinstance(module, nn.Linear):
        W = module.weight
        if isinstance(W, Tensor) and type(W) not in (Tensor, nn.Parameter):
            data = W.data if isinstance(W, nn.Parameter) else W
            cls = type(data)
            if cls in (Tensor, nn.Parameter):
                return None
            if _from(data, "torchao") and cls.__name__ in TORCHAO_TENSORS and hasattr(data, "dequantize"):
                return "torchao"
            raise TypeError(f"quantized weight type {cls.__module__}.{cls.__name__} (in an nn.Linear) is not supported; "
                            f"supported: {'; '.join(SUPPORTED)}")
    return None


def _torchao_weight(module: nn.Module) -> Tensor:
    W = module.weight
    return W.data if isinstance(W, nn.Parameter) else W


def _bnb4_canonical(module: nn.Module) -> tuple[Tensor, Any, dict[str, Any]]:
    """(codes, QuantState, settings) of a Linear4bit in bitsandbytes' standard layout, read without
    modifying the module.

    On CPUs with AVX512-BF16, bitsandbytes' own eval-mode forward repacks a Linear4bit in place
    (``packing_format_for_cpu``: codes re-tiled, absmax dequantized to bfloat16, double quantisation
    dropped). The settings reported here are the ones the layer was quantized with (its
    ``original_*`` fields), and the codes are unpacked back to the standard layout, so a repacked
    base and a fresh one give the same dequantized weight and fingerprint (see
    :func:`quantized_fingerprint`, which hashes absmax rounded to bfloat16 for that reason)."""
    import copy

    bnb = _bnb()
    F = bnb.functional
    w = module.weight
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        codes, _ = F._convert_weight_packed_for_cpu_inverse(w.data, copy.copy(qs))
        absmax = qs.absmax.t().reshape(-1).float()  # the bfloat16 absmax the packed kernel uses
        nested, dtype = bool(qs.original_nested), qs.original_dtype
    else:
        codes = w.data
        absmax = qs.absmax
        if qs.nested:
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
        absmax = absmax.float()
        nested, dtype = bool(qs.nested), qs.dtype
    state = F.QuantState(absmax=absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                         quant_type=qs.quant_type, dtype=dtype)
    settings = {"kind": "bnb-4bit", "quant_type": qs.quant_type, "blocksize": int(qs.blocksize),
                "double_quant": nested, "dtype": str(dtype).removeprefix("torch."),
                "quant_storage": str(codes.dtype).removeprefix("torch.")}
    return codes, state, settings


def _bnb8_scb(module: nn.Module) -> Tensor:
    scb = getattr(module.weight, "SCB", None)
    if scb is None:  # bitsandbytes moves it to the layer's state after the first forward
        scb = module.state.SCB
    return scb


@torch.no_grad()
def dequantize(module: nn.Module) -> Tensor:
    """The base's dequantized weight Ŵ ``[out, in]`` in float32 (a new tensor on the base's device)."""
    kind = quant_kind(module)
    if kind == "bnb-4bit":
        bnb = _bnb()
        codes, state, _ = _bnb4_canonical(module)
        W = bnb.functional.dequantize_4bit(codes, state)
    elif kind == "bnb-8bit":
        W = module.weight.data.float() * (_bnb8_scb(module).float()[:, None] / 127.0)
    elif kind == "torchao":
        W = _torchao_weight(module).dequantize()
    else:
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer")
    return W.float().reshape(module.out_features, module.in_features)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the base computes in (the spectral factors U, V are stored in it)."""
    kind = quant_kind(module)
    if kind == "bnb-4bit":
        return module.compute_dtype or getattr(torch, _bnb4_canonical(module)[2]["dtype"])
    if kind == "bnb-8bit":
        return module.bias.dtype if module.bias is not None else torch.get_default_dtype()
    if kind == "torchao":
        return _torchao_weight(module).dtype
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer")


def quant_settings(module: nn.Module) -> dict[str, Any]:
    """The quantisation settings of a base, as JSON-ready values (part of its fingerprint)."""
    kind = quant_kind(module)
    if kind == "bnb-4bit":
        return _bnb4_canonical(module)[2]
    if kind == "bnb-8bit":
        return {"kind": kind, "quant_type": "int8-rowwise", "threshold": float(module.state.threshold)}
    if kind == "torchao":
        W = _torchao_weight(module)
        names, ctx = W.__tensor_flatten__()
        attrs = {k: _jsonable(v) for k, v in sorted(ctx.items())}
        return {"kind": kind, "tensor_type": type(W).__name__, **attrs}
    raise TypeError(f"{type(module).__name__} is not a quantized linear layer")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)


def _stored_tensors(module: nn.Module) -> list[Tensor]:
    kind = quant_kind(module)
    if kind == "bnb-4bit":
        codes, state, _ = _bnb4_canonical(module)
        # absmax rounded to bfloat16: what survives bitsandbytes' CPU repacking (see _bnb4_canonical)
        return [codes, state.absmax.to(torch.bfloat16), state.code]
    if kind == "bnb-8bit":
        return [module.weight.data, _bnb8_scb(module)]
    W = _torchao_weight(module)
    names, _ = W.__tensor_flatten__()
    return [getattr(W, n) for n in names if isinstance(getattr(W, n, None), Tensor)]


@torch.no_grad()
def quantized_fingerprint(module: nn.Module) -> dict[str, Any]:
    """``{shape, dtype, quant, sha256}`` of a quantized base (see the module docstring)."""
    settings = quant_settings(module)
    shape = [module.out_features, module.in_features]
    h = hashlib.sha256(repr((shape, sorted(settings.items()))).encode())
    for t in _stored_tensors(module):
        t = t.detach()
        if t.dim() == 0:
            t = t.reshape(1)
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        update_with_bytes(h, t)
    return {"shape": shape, "dtype": settings["kind"], "quant": settings, "sha256": h.hexdigest()}


@torch.no_grad()
def requantize(module: nn.Module, W: Tensor) -> nn.Module:
    """A new quantized layer of ``module``'s type and settings holding ``W`` [out, in] quantized
    (and ``module``'s bias), on ``module``'s device; ``module`` is not modified."""
    kind = quant_kind(module)
    bias = module.bias
    device = bias.device if bias is not None else W.device
    if kind == "bnb-4bit":
        bnb = _bnb()
        _, _, st = _bnb4_canonical(module)
        storage = getattr(torch, st["quant_storage"])
        new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=bias is not None,
                                compute_dtype=module.compute_dtype, compress_statistics=st["double_quant"],
                                quant_type=st["quant_type"], quant_storage=storage, device="cpu")
        new.weight = bnb.nn.Params4bit(W.detach().to("cpu", getattr(torch, st["dtype"])), requires_grad=False,
                                       quant_type=st["quant_type"], blocksize=st["blocksize"],
                                       compress_statistics=st["double_quant"], quant_storage=storage)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=bias.requires_grad)
        new = new.to(device)
    elif kind == "bnb-8bit":
        bnb = _bnb()
        dtype = compute_dtype(module)
        new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=bias is not None,
                                  has_fp16_weights=False, threshold=module.state.threshold, device="cpu")
        new.weight = bnb.nn.Int8Params(W.detach().to("cpu", dtype), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().cpu().clone(), requires_grad=bias.requires_grad)
        new = new.to(device)
    elif kind == "torchao":
        from torchao.quantization import quantize_

        Wq = _torchao_weight(module)
        new = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=W.device, dtype=Wq.dtype)
        new.weight.copy_(W)
        if bias is not None:
            new.bias.copy_(bias)
            new.bias.requires_grad_(bias.requires_grad)
        quantize_(new, _torchao_config(Wq, module.in_features))
        new.weight.requires_grad_(False)
    else:
        raise TypeError(f"{type(module).__name__} is not a quantized linear layer")
    new.train(module.training)
    return new


def _torchao_config(Wq: Tensor, in_features: int):
    """The torchao config that quantizes a weight the way ``Wq`` was quantized."""
    _torchao()
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

    name = type(Wq).__name__
    block = list(getattr(Wq, "block_size", [1, in_features]))
    group = block[-1]
    if name == "Int8Tensor":
        return Int8WeightOnlyConfig(granularity=PerRow() if group == in_features else PerGroup(group))
    if name == "IntxUnpackedToInt8Tensor":
        return IntxWeightOnlyConfig(weight_dtype=Wq.target_dtype,
                                    granularity=PerAxis(0) if group == in_features else PerGroup(group))
    if name.startswith("Int4"):
        return Int4WeightOnlyConfig(group_size=group)
    raise TypeError(f"merging into a torchao {name} weight is not supported (no re-quantisation recipe); "
                    "unload() or keep the adapter separate")
