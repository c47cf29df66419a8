"""SpecLoRALinear: one fused call of the op, exact identity at start, gradients only where they belong."""
import math

import pytest
import torch
from torch import nn

import spectral_kernels.nn.speclora as speclora_mod
from spectral_kernels.nn.speclora import SpecLoRALinear


def _layer(in_f=13, out_f=11, k=4, r=3, alpha=6.0, dtype=torch.float64):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, dtype=dtype)
    U, s, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    layer = SpecLoRALinear.from_weight(lin.weight.detach(), lin.bias.detach(), k, (U, s, Vh.t()),
                                       lora_rank=r, lora_alpha=alpha)
    layer.coeffs.requires_grad_(True)
    return lin, layer


def test_identity_at_init_and_init_like_peft():
    lin, layer = _layer(dtype=torch.float32)
    x = torch.randn(2, 5, 13)
    assert torch.equal(layer(x), lin(x))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(13)  # kaiming_uniform(a=√5) on [r, in]: U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2


def test_one_call_of_the_op_with_the_rank_k_plus_r_chain(monkeypatch):
    _, layer = _layer()
    calls = []
    real = speclora_mod.spectral_linear

    def spy(x, U, d, V, bias, weight, **kw):
        calls.append((U, d, V))
        return real(x, U, d, V, bias, weight, **kw)

    monkeypatch.setattr(speclora_mod, "spectral_linear", spy)
    layer(torch.randn(3, 13, dtype=torch.float64))
    assert len(calls) == 1
    U, d, V = calls[0]
    assert U.shape == (11, 7) and V.shape == (13, 7) and d.shape == (7,)
    assert torch.equal(U[:, 4:], layer.lora_B) and torch.equal(V[:, 4:], layer.lora_A.t())
    assert torch.equal(d[4:], torch.full((3,), 2.0, dtype=torch.float64))  # α / r = 6 / 3


def test_forward_and_gradients_match_the_unfused_math():
    """y = x·Wᵀ + ((x·V_k) ⊙ s⊙(c−1))·U_kᵀ + (α/r)·x·Aᵀ·Bᵀ + b, in float64, after a perturbation."""
    _, layer = _layer()
    with torch.no_grad():
        layer.coeffs.add_(torch.randn(4, dtype=torch.float64) * 0.3)
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 5, 11, dtype=torch.float64)
    layer(x).backward(dy)
    got = {"x": x.grad, "c": layer.coeffs.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}

    c, A, B = (t.detach().clone().requires_grad_(True) for t in (layer.coeffs, layer.lora_A, layer.lora_B))
    x2 = x.detach().clone().requires_grad_(True)
    y = (x2 @ layer.weight.t() + ((x2 @ layer.V) * (layer.s * (c - 1))) @ layer.U.t()
         + 2.0 * (x2 @ A.t()) @ B.t() + layer.bias)
    y.backward(dy)
    torch.testing.assert_close(layer(x.detach()), y.detach())
    for name, ref in {"x": x2.grad, "c": c.grad, "A": A.grad, "B": B.grad}.items():
        torch.testing.assert_close(got[name], ref, msg=lambda m: f"d{name}: {m}")
    assert layer.U.grad is None and layer.V.grad is None and not layer.weight.requires_grad


def test_merged_weight_and_merge():
    _, layer = _layer()
    with torch.no_grad():
        layer.coeffs.mul_(1.3)
        layer.lora_B.normal_()
    x = torch.randn(4, 13, dtype=torch.float64)
    torch.testing.assert_close(layer.merge()(x), layer(x))


def test_bad_lora_rank():
    with pytest.raises(ValueError, match="lora_rank must be an int >= 1"):
        SpecLoRALinear(8, 8, 2, lora_rank=0)
