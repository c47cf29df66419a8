"""sk.param_groups: which parameters land in which group, at which learning rate, and that an
optimizer built from the groups moves each group by its own learning rate."""
import math

import pytest
import torch
from torch import nn

import spectral_kernels as sk
from spectral_kernels.nn.speclora import SpecLoRALinear
from spectral_kernels.tuning import SpectralConfig, adapt, spectral_layers
from tests.tuning.models import MLP


def _model(mode="speclora", **cfg):
    torch.manual_seed(0)
    model = MLP()
    adapt(model, SpectralConfig(target_modules=["fc1", "fc2"], rank=4, mode=mode, lora_rank=3,
                                modules_to_save=["head"], **cfg), verbose=False)
    return model


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_speclora_groups_partition_the_trainable_parameters():
    model = _model()
    groups = _by_name(sk.param_groups(model, 1e-3, coeff_lr_ratio=5.0, lora_lr_ratio=0.5, weight_decay=0.01))
    assert set(groups) == {"spectral_coefficients", "lora", "other"}
    layers = spectral_layers(model).values()
    assert {id(p) for p in groups["spectral_coefficients"]["params"]} == {id(layer.coeffs) for layer in layers}
    assert {id(p) for p in groups["lora"]["params"]} == {id(p) for layer in layers for p in (layer.lora_A, layer.lora_B)}
    assert {id(p) for p in groups["other"]["params"]} == {id(p) for p in model.head.parameters()}
    assert groups["spectral_coefficients"]["lr"] == pytest.approx(5e-3)
    assert groups["lora"]["lr"] == pytest.approx(5e-4)
    assert groups["other"]["lr"] == pytest.approx(1e-3)
    assert groups["spectral_coefficients"]["weight_decay"] == 0.0
    assert groups["lora"]["weight_decay"] == groups["other"]["weight_decay"] == 0.01
    every = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(every) == len({id(p) for p in every}) == len(trainable)


def test_scale_model_has_no_lora_group_and_banks_join_the_coefficients():
    model = _model(mode="scale")
    sk.add_adapter(model, "other_task")
    groups = _by_name(sk.param_groups(model, 2e-3))
    assert set(groups) == {"spectral_coefficients", "other"}
    coeff_ids = {id(p) for p in groups["spectral_coefficients"]["params"]}
    for layer in spectral_layers(model).values():
        assert id(layer.coeffs) in coeff_ids and id(layer.coefficients("other_task")) in coeff_ids


def test_each_group_moves_by_its_own_learning_rate():
    """Adam's first step moves every entry by ≈ lr (|m̂/√v̂| = 1): the coefficients by 10× the LoRA pair."""
    model = _model()
    opt = torch.optim.Adam(sk.param_groups(model, 1e-3, coeff_lr_ratio=10.0))
    layer = next(m for m in model.modules() if isinstance(m, SpecLoRALinear))
    with torch.no_grad():
        layer.lora_B.normal_()  # so that A gets a gradient on the first step
    before = {"c": layer.coeffs.detach().clone(), "A": layer.lora_A.detach().clone()}
    x = torch.randn(8, 13)
    model(x).square().sum().backward()
    opt.step()
    dc = (layer.coeffs.detach() - before["c"]).abs()
    dA = (layer.lora_A.detach() - before["A"]).abs()
    moved_c, moved_A = dc[dc > 0], dA[dA > 0]
    assert moved_c.numel() and moved_A.numel()
    assert torch.allclose(moved_c, torch.full_like(moved_c, 1e-2), rtol=1e-3)
    assert torch.allclose(moved_A, torch.full_like(moved_A, 1e-3), rtol=1e-3)


def test_wrapped_model_and_frozen_head():
    model = _model(mode="scale")
    for p in model.head.parameters():
        p.requires_grad_(False)
    groups = sk.param_groups(torch.compile(model, backend="eager"), 1e-3)
    assert [g["name"] for g in groups] == ["spectral_coefficients"]


@pytest.mark.parametrize("kwargs, word", [
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": math.nan}, "lr"),
    ({"lr": 1e-3, "coeff_lr_ratio": 0}, "coeff_lr_ratio"), ({"lr": 1e-3, "lora_lr_ratio": math.inf}, "lora_lr_ratio"),
    ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay"), ({"lr": 1e-3, "coeff_weight_decay": True}, "coeff_weight_decay"),
])
def test_bad_numbers_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        sk.param_groups(_model(), **kwargs)


def test_unadapted_model_is_refused():
    with pytest.raises(ValueError, match="no spectral layer"):
        sk.param_groups(nn.Sequential(nn.Linear(3, 3)), 1e-3)
