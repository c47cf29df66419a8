"""merge_adapter / unmerge / unload on nn.Linear and GPT-2 Conv1D layers."""
import pytest
import torch
from torch import nn

from spectral_kernels.tuning import SpectralConfig, adapt, merge_adapter, spectral_layers, unload, unmerge
from spectral_kernels.nn import SpectralLinear
from tests.tuning.models import tiny_bert, tiny_gpt2, tokens


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("mode", ["scale", "shift", "speclora"])
def test_merge_gpt2_to_conv1d_and_back(mode):
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        base = model(x).logits
    adapt(model, SpectralConfig(target_modules=["c_attn", "c_fc"], rank=6, mode=mode, lora_rank=2),
          verbose=False)
    _perturb(model)
    with torch.no_grad():
        adapted = model(x).logits
    assert not torch.allclose(adapted, base)
    merge_adapter(model)
    assert not spectral_layers(model)
    c_attn = model.transformer.h[0].attn.c_attn
    assert type(c_attn) is Conv1D and c_attn.weight.shape == (32, 96) and not c_attn.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)
    unmerge(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, SpectralLinear)
    with torch.no_grad():
        assert torch.equal(model(x).logits, adapted)
    unload(model)
    assert type(model.transformer.h[1].mlp.c_fc) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base, rtol=0, atol=0)  # delta form keeps W bit-exact


def test_merge_bert_to_linear():
    model = tiny_bert()
    x = tokens()
    adapt(model, SpectralConfig(target_modules="all-linear", rank=0.5, modules_to_save=["classifier"]), verbose=False)
    _perturb(model)
    with torch.no_grad():
        adapted = model(x).logits
    merge_adapter(model)
    q = model.bert.encoder.layer[0].attention.self.query
    assert type(q) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_pure_form_merge_and_unload():
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        base = model(x).logits
    adapt(model, SpectralConfig(target_modules=["c_proj"], rank="full"), verbose=False)
    _perturb(model)
    with torch.no_grad():
        adapted = model(x).logits
    merge_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)
    unmerge(model)
    unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base, rtol=1e-4, atol=1e-4)


def test_merge_errors():
    with pytest.raises(ValueError, match="no spectral layer to merge"):
        merge_adapter(tiny_bert())
    with pytest.raises(ValueError, match="holds no merged adapter"):
        unmerge(tiny_bert())
