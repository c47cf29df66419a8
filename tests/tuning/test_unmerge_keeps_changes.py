"""unmerge keeps what was trained while merged: a trained bias goes back into the spectral
layers; a merged weight changed while merged is refused, leaving the model merged and intact."""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.tuning import SpectralConfig, adapt, merge_adapter, spectral_layers, unmerge
from tests.tuning.models import MLP, tiny_gpt2, tokens


def _adapted(model, targets, **cfg):
    adapt(model, SpectralConfig(target_modules=targets, rank=3, train_bias=True, **cfg), verbose=False)
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            layer.coeffs.add_(0.3)
    return model


@pytest.mark.parametrize("which", ["mlp", "gpt2"])
def test_a_bias_trained_while_merged_survives_unmerge(which):
    if which == "mlp":
        torch.manual_seed(0)
        model, x, targets = MLP(), torch.randn(4, 13), ["fc1", "fc2"]
        run = lambda: model(x)  # noqa: E731
    else:
        model, x, targets = tiny_gpt2(), tokens(), ["c_attn", "c_fc"]
        run = lambda: model(x).logits  # noqa: E731
    _adapted(model, targets)
    merge_adapter(model)
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert biases
    opt = torch.optim.SGD(biases, lr=0.5)
    run().pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        merged = run()
    unmerge(model)
    with torch.no_grad():
        torch.testing.assert_close(run(), merged, rtol=1e-5, atol=1e-5)
    for name, layer in spectral_layers(model).items():
        assert layer.bias.requires_grad, name


def test_a_changed_merged_weight_is_refused():
    torch.manual_seed(0)
    model, x = _adapted(MLP(), ["fc1", "fc2"]), torch.randn(4, 13)
    merge_adapter(model)
    original = model.fc2.weight[0, 0].item()
    with torch.no_grad():
        model.fc1.bias.add_(1.0)  # kept
        model.fc2.weight[0, 0] += 0.5  # cannot be kept
        merged = model(x)
    with pytest.raises(ValueError, match="merged weight of layer 'fc2' was changed"):
        unmerge(model)
    assert not spectral_layers(model)  # still merged, untouched
    with torch.no_grad():
        assert torch.equal(model(x), merged)
        model.fc2.weight[0, 0] = original
    unmerge(model)
    assert sorted(spectral_layers(model)) == ["fc1", "fc2"]


def test_unmerge_of_a_named_adapter_checks_against_that_adapter():
    torch.manual_seed(0)
    model = adapt(MLP(), SpectralConfig(target_modules=["fc1", "fc2"], rank=3), verbose=False)
    sk.add_adapter(model, "t")
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            layer.coefficients("t").add_(0.4)
    merge_adapter(model, adapter="t")
    unmerge(model)  # the merged weights are those of "t", not of the active "default"
    assert sk.list_adapters(model) == ["default", "t"]


def test_calls_on_a_merged_model_say_to_unmerge():
    torch.manual_seed(0)
    model = adapt(MLP(), SpectralConfig(target_modules=["fc1", "fc2"], rank=3), verbose=False)
    merge_adapter(model)
    for call in (lambda: sk.add_adapter(model, "t"), lambda: sk.list_adapters(model),
                 lambda: sk.active_adapter(model), lambda: sk.param_groups(model, lr=1e-3)):
        with pytest.raises(ValueError, match=r"merged into dense layers \(merge_adapter\); call unmerge\(model\) first"):
            call()
    unmerge(model)
    assert sk.list_adapters(model) == ["default"]
    with pytest.raises(ValueError, match=r"call adapt\(model, config\) first"):
        sk.list_adapters(MLP())


def test_an_unchanged_bias_keeps_its_precision_through_a_cast_merged_model():
    torch.manual_seed(0)
    model = _adapted(MLP(), ["fc1", "fc2"])
    bias = model.fc1.bias.detach().clone()
    merge_adapter(model)
    model.half()  # the merged dense layers only; the spectral layers wait aside in float32
    unmerge(model)
    assert torch.equal(model.fc1.bias.detach(), bias)
