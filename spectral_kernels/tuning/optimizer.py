"""Optimizer parameter groups for an adapted model: separate learning rates for the spectral
coefficients, SpecLoRA's LoRA pair and everything else that trains.

Why the coefficients want their own learning rate: a scale coefficient c_i enters the weight as
U·diag(s ⊙ (c − 1))·Vᵀ, so an Adam step of size ≈ lr on c_i moves W by s_i·lr along its i-th
singular direction — lr *relative* to that singular value, whatever s_i is — while a LoRA pair
(B₀ = 0) starts by moving W by ‖(α/r)·ΔB·A‖, which grows as B and A grow together. The two want
learning rates an order of magnitude apart (docs/FINDINGS.md measures it on MiniLM-L6): with one
learning rate for both, either the LoRA pair runs away or the coefficients barely move. This is
the LoRA+ remedy (a second learning rate for part of the adapter) applied to SpecLoRA.

    opt = torch.optim.AdamW(sk.param_groups(model, lr=1e-3, coeff_lr_ratio=5.0))
"""
from __future__ import annotations

import math

from torch import nn

from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.tuning.banks import adapter_parameters
from spectral_kernels.tuning.inject import no_adapter_hint, spectral_layers, unwrap

__all__ = ["param_groups"]


def _number(name: str, value: float, *, zero_ok: bool) -> float:
    """``value`` as a float when it is a finite number > 0 (>= 0 with ``zero_ok``); else ValueError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) \
        and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise ValueError(f"param_groups: {name} must be a finite number {'>=' if zero_ok else '>'} 0; got {value!r}")
    return float(value)


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    coeff_lr_ratio: float = 1.0,
    lora_lr_ratio: float = 1.0,
    weight_decay: float = 0.0,
    coeff_weight_decay: float = 0.0,
) -> list[dict]:
    """Parameter groups for ``torch.optim`` over an adapted model.

    Groups (each dict has ``params``, ``lr``, ``weight_decay`` and a ``name``; empty groups are left
    out, so the list fits any optimizer constructor):

    - ``"spectral_coefficients"``: every adapter's coefficients of every spectral layer (the
      ``coeffs`` parameters and the named adapters of the banks; adapters that get no gradient are
      skipped by the optimizer), at ``lr × coeff_lr_ratio`` with ``coeff_weight_decay`` (default 0:
      decaying a scale coefficient pulls it to 0, i.e. towards removing the direction, not towards
      the base model).
    - ``"lora"``: SpecLoRA's ``lora_A`` and ``lora_B``, at ``lr × lora_lr_ratio``.
    - ``"other"``: every other parameter that requires grad (heads in ``modules_to_save``, trainable
      biases), at ``lr``.

    Args:
        model: a model adapted by :func:`spectral_kernels.adapt` (wrappers such as DDP or
            torch.compile are looked through).
        lr: the base learning rate (> 0).
        coeff_lr_ratio: learning-rate multiplier of the coefficients (> 0).
        lora_lr_ratio: learning-rate multiplier of the LoRA pair (> 0).
        weight_decay: weight decay of the "lora" and "other" groups (>= 0).
        coeff_weight_decay: weight decay of the coefficients (>= 0).

    Raises:
        ValueError: the model has no spectral layer, or a number is out of range (named).
    """
    lr = _number("lr", lr, zero_ok=False)
    coeff_lr_ratio = _number("coeff_lr_ratio", coeff_lr_ratio, zero_ok=False)
    lora_lr_ratio = _number("lora_lr_ratio", lora_lr_ratio, zero_ok=False)
    weight_decay = _number("weight_decay", weight_decay, zero_ok=True)
    coeff_weight_decay = _number("coeff_weight_decay", coeff_weight_decay, zero_ok=True)
    layers = spectral_layers(unwrap(model))
    if not layers:
        raise ValueError(f"param_groups: the model has no spectral layer; {no_adapter_hint(model)}")
    coeffs = adapter_parameters(model)
    lora = [p for layer in layers.values() if isinstance(layer, SpecLoRALinear)
            for p in (layer.lora_A, layer.lora_B) if p.requires_grad]
    taken = {id(p) for p in coeffs} | {id(p) for p in lora}
    other, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in taken and id(p) not in seen:
            seen.add(id(p))
            other.append(p)
    groups = [
        {"name": "spectral_coefficients", "params": coeffs, "lr": lr * coeff_lr_ratio,
         "weight_decay": coeff_weight_decay},
        {"name": "lora", "params": lora, "lr": lr * lora_lr_ratio, "weight_decay": weight_decay},
        {"name": "other", "params": other, "lr": lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
