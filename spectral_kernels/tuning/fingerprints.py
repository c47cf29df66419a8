"""Fingerprints of base weights: how an adapter recognises the base it was trained on.

The fingerprint of a base weight W (in nn.Linear orientation [out, in]) is ``{shape, dtype, sha256,
sum, abs_sum, norm}``: the sha256 covers shape, dtype and W's bytes (all of them up to 2²² entries,
16 MiB of float32; beyond that 2²⁰ entries at evenly spaced positions, so the hash costs a bounded
copy off the device), and the float64 sums and Frobenius norm cover every entry. Loading onto a
base of the same dtype needs an equal sha256: a different checkpoint changes essentially every
entry, so equal hashes mean the same base. A base of another dtype (the same model loaded in bf16,
say) cannot match bytes; it is accepted when its sum and norm agree within 4 ulps of the coarser
dtype (rounding moves the sum by at most ε·Σ|w|), which a different checkpoint does not.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from spectral_kernels.nn.spectral_linear import SpectralLinear

#: a base weight with at most this many entries is hashed whole; a larger one by a strided sample
FULL_HASH_NUMEL = 1 << 22
SAMPLE_NUMEL = 1 << 20
#: attribute where a pure-form layer keeps its base fingerprint (it has no W left to hash)
FINGERPRINT_ATTR = "spectral_fingerprint"


@torch.no_grad()
def fingerprint(W: Tensor) -> dict[str, Any]:
    """Fingerprint of a base weight (see the module docstring for what it covers and why). An
    FSDP2-sharded weight (a DTensor) is gathered first: every rank must call this together."""
    W = W.detach()
    if hasattr(W, "full_tensor"):
        W = W.full_tensor()
    flat = W.reshape(-1)
    n = flat.numel()
    if n > FULL_HASH_NUMEL:
        flat = flat[torch.linspace(0, n - 1, SAMPLE_NUMEL, device=W.device).long()]
    h = hashlib.sha256(repr((tuple(W.shape), str(W.dtype))).encode())
    h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return {
        "shape": list(W.shape),
        "dtype": str(W.dtype).removeprefix("torch."),
        "sha256": h.hexdigest(),
        "sum": W.sum(dtype=torch.float64).item(),
        "abs_sum": W.abs().sum(dtype=torch.float64).item(),
        "norm": torch.linalg.vector_norm(W, dtype=torch.float64).item(),
    }


def compare_fingerprints(stored: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """None when ``actual`` is the base ``stored`` was taken from; otherwise what differs, in words.

    A quantized base's fingerprint (:func:`spectral_kernels.tuning.quantized.quantized_fingerprint`)
    carries its settings under ``quant``: it matches only a base quantized with the same settings
    (each differing setting is named) and the same stored bytes."""
    if list(stored["shape"]) != list(actual["shape"]):
        return f"base weight shape {actual['shape']} differs from the adapter's {stored['shape']}"
    sq, aq = stored.get("quant"), actual.get("quant")
    if sq is not None or aq is not None:
        return _compare_quantized(stored, actual, sq, aq)
    if stored["dtype"] == actual["dtype"]:
        if stored["sha256"] == actual["sha256"]:
            return None
        return (f"base weight differs from the one the adapter was trained on (sha256 {actual['sha256'][:12]} vs "
                f"{stored['sha256'][:12]}; norm {actual['norm']:.6g} vs {stored['norm']:.6g})")
    eps = max(torch.finfo(getattr(torch, stored["dtype"])).eps, torch.finfo(getattr(torch, actual["dtype"])).eps)
    tol = 4 * eps
    norm_ok = abs(actual["norm"] - stored["norm"]) <= tol * max(stored["norm"], 1e-30)
    sum_ok = abs(actual["sum"] - stored["sum"]) <= tol * max(stored["abs_sum"], 1e-30)
    if norm_ok and sum_ok:
        return None
    return (f"base weight ({actual['dtype']}) differs from the adapter's ({stored['dtype']}) beyond rounding: "
            f"norm {actual['norm']:.6g} vs {stored['norm']:.6g}, sum {actual['sum']:.6g} vs {stored['sum']:.6g}")


def _describe_quant(q: dict[str, Any] | None, dtype: str) -> str:
    if q is None:
        return f"an unquantized {dtype} weight"
    return q["kind"] + " (" + ", ".join(f"{k}={v}" for k, v in q.items() if k != "kind") + ")"


def _compare_quantized(stored: dict[str, Any], actual: dict[str, Any], sq: dict | None, aq: dict | None) -> str | None:
    if sq is None or aq is None:
        return (f"the base is {_describe_quant(aq, actual['dtype'])} but the adapter was trained on "
                f"{_describe_quant(sq, stored['dtype'])}")
    diffs = [f"{k}={aq.get(k)!r} (adapter: {sq.get(k)!r})" for k in sorted(set(sq) | set(aq)) if sq.get(k) != aq.get(k)]
    if diffs:
        return "the base is quantized differently from the adapter's: " + ", ".join(diffs)
    if stored["sha256"] != actual["sha256"]:
        return (f"quantized base weight differs from the one the adapter was trained on (same settings "
                f"{_describe_quant(aq, actual['dtype'])}, sha256 {actual['sha256'][:12]} vs {stored['sha256'][:12]})")
    return None


def layer_fingerprint(layer: SpectralLinear) -> dict[str, Any] | None:
    """The base fingerprint of an adapted layer: hashed from its frozen W (delta form), or the one
    adapt() recorded (pure form); None if neither exists."""
    if getattr(layer, FINGERPRINT_ATTR, None) is not None:
        return getattr(layer, FINGERPRINT_ATTR)
    if layer.weight is not None:
        return fingerprint(layer.weight)
    return None


