"""peft's names on an adapted model: model.print_trainable_parameters(), model.merge_and_unload()
(and sk.merge_and_unload(model)), bound by adapt and by from_pretrained; the package's names unchanged."""
import copy
import warnings

import pytest
import torch
from torch import nn

import spectral_kernels as sk
from tests.tuning.models import MLP, tiny_bert, tokens


def _trained(model, config):
    model = sk.adapt(model, config)
    with torch.no_grad():
        for layer in sk.tuning.spectral_layers(model).values():
            layer.coeffs.add_(0.3 * torch.randn_like(layer.coeffs))
    return model


def test_print_trainable_parameters_as_peft_users_call_it(capsys):
    model = sk.adapt(MLP(), sk.SpectralConfig(target_modules=["fc1", "fc2"], rank=4))
    model.print_trainable_parameters()
    method = capsys.readouterr().out
    sk.print_trainable_parameters(model)
    assert capsys.readouterr().out == method
    trainable, total = model.get_nb_trainable_parameters()
    assert method.strip() == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: " \
                             f"{100 * trainable / total:.4f}"
    assert trainable == 8


def test_merge_and_unload_gives_the_plain_model_computing_the_same():
    torch.manual_seed(0)
    model = _trained(MLP(), sk.SpectralConfig(target_modules=["fc1", "fc2"], rank=5))
    x = torch.randn(6, 13)
    want = model(x).double()
    out = model.merge_and_unload()
    assert out is model
    assert type(model.fc1) is nn.Linear and type(model.fc2) is nn.Linear
    assert torch.allclose(model(x).double(), want, atol=1e-5)
    for attr in ("merge_and_unload", "print_trainable_parameters", "spectral_config", "_spectral_merged"):
        assert not hasattr(model, attr), attr
    with pytest.raises(ValueError, match="no merged adapter"):
        sk.unmerge(model)
    with pytest.raises(ValueError, match="has no adapter"):
        sk.merge_and_unload(model)


def test_module_level_function_and_existing_names_agree():
    torch.manual_seed(1)
    a = _trained(MLP(), sk.SpectralConfig(target_modules=["fc2"], rank=3, mode="shift"))
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    sk.merge_and_unload(a)
    b.merge_and_unload()  # the deep copy's method merges the copy, not the original
    sk.merge_adapter(c)
    for m in (b, c):
        assert torch.equal(a.fc2.weight, m.fc2.weight)
    assert sk.unmerge(c) is c  # merge_adapter keeps the way back; merge_and_unload does not


def test_methods_survive_save_and_reload_and_merge_a_transformers_model(tmp_path):
    model = _trained(tiny_bert(), sk.SpectralConfig(target_modules=["query", "value"], rank=4,
                                                    modules_to_save=["classifier"]))
    ids = tokens()
    want = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = sk.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert torch.allclose(reloaded(ids).logits, want, atol=1e-6)
    merged = reloaded.merge_and_unload()
    assert torch.allclose(merged(ids).logits, want, atol=1e-5)
    assert not sk.tuning.spectral_layers(merged)
    # transformers' own save_pretrained is back: a full checkpoint that a plain from_pretrained reads
    merged.save_pretrained(tmp_path / "full")
    from transformers import BertForSequenceClassification

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = BertForSequenceClassification.from_pretrained(tmp_path / "full").eval()
    assert torch.allclose(again(ids).logits, want, atol=1e-5)


def test_merge_and_unload_arguments():
    model = _trained(MLP(), sk.SpectralConfig(target_modules=["fc1"], rank=2))
    with pytest.raises(ValueError, match="one\\s+coefficient set"):
        model.merge_and_unload(adapter_names=["a", "b"])
    with torch.no_grad():
        model.fc1.coeffs[0] = float("nan")
    with pytest.raises(ValueError, match="layer 'fc1' holds NaN"):
        model.merge_and_unload(safe_merge=True)
    assert sk.tuning.spectral_layers(model), "a refused safe merge leaves the model unmerged"


def test_a_method_of_the_models_class_is_not_shadowed():
    class Own(MLP):
        def merge_and_unload(self):
            return "own"

    model = sk.adapt(Own(), sk.SpectralConfig(target_modules=["fc1"], rank=2))
    assert model.merge_and_unload() == "own"
    assert callable(model.print_trainable_parameters)
