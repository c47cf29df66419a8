"""The adapted model under training tools: autocast, torch.compile, gradient checkpointing, a real step."""
import pytest
import torch

from spectral_kernels.tuning import SpectralConfig, adapt, spectral_layers
from tests.tuning.models import MLP, tiny_bert, tiny_gpt2, tokens


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("mode", ["scale", "speclora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(mode, dtype):
    model = adapt(tiny_gpt2(), SpectralConfig(target_modules=["c_attn", "c_fc"], rank=4, mode=mode, lora_rank=2),
                  verbose=False)
    x = tokens()
    out32 = model(x, labels=x)
    out32.loss.backward()
    ref = _grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, labels=x)
        assert out.logits.dtype == dtype  # the lm_head runs in the autocast dtype; so do the spectral layers
    out.loss.backward()
    got = _grads(model)
    assert set(got) == set(ref) and got  # every trainable tensor got a gradient, in its own dtype
    for n, g in got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), n
        if ref[n].norm() == 0:  # lora_A while B = 0
            assert g.norm() == 0, n
            continue
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[n].flatten(), dim=0)
        assert cos > 0.9, f"{n}: cosine {cos:.3f} with the float32 gradient"


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = adapt(MLP(), SpectralConfig(target_modules=["fc1", "fc2"], rank=4, mode="speclora", lora_rank=2),
                  verbose=False)
    with torch.no_grad():
        model.fc1.lora_B.normal_()
    x = torch.randn(6, 13)
    eager = model(x)
    eager.square().sum().backward()
    ref = _grads(model)
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], msg=lambda m: f"{n}: {m}")


def test_torch_compile_transformers_model():
    torch._dynamo.reset()
    model = adapt(tiny_bert(), SpectralConfig(target_modules=["query", "value"], rank=4), verbose=False)
    x = tokens()
    eager = model(x).logits
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x).logits, eager)
    compiled(x).logits.sum().backward()
    assert all(layer.coeffs.grad is not None for layer in spectral_layers(model).values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    model = adapt(tiny_bert(), SpectralConfig(target_modules=["query", "value", "dense"], rank=4, mode="speclora",
                                              lora_rank=2, modules_to_save=["classifier"]), verbose=False)
    model.train()
    x, y = tokens(4), torch.tensor([0, 1, 2, 1])
    model(x, labels=y).loss.backward()
    ref = _grads(model)
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_activation_checkpointing
    model(x, labels=y).loss.backward()
    got = _grads(model)
    assert set(got) == set(ref)
    for n, g in got.items():
        torch.testing.assert_close(g, ref[n], msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("mode", ["scale", "shift", "speclora"])
def test_training_lowers_the_loss(mode):
    torch.manual_seed(0)
    model = adapt(tiny_bert(), SpectralConfig(target_modules="all-linear", rank=8, mode=mode, lora_rank=4,
                                              modules_to_save=["classifier"]), verbose=False)
    model.train()
    x = tokens(8, 6, seed=3)
    y = torch.arange(8) % 3
    lr = {"scale": 5e-2, "shift": 5e-2, "speclora": 2e-2}[mode]  # LoRA's A, B move faster than coefficients
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(15):
        loss = model(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("mode", ["scale", "speclora"])
def test_frozen_input_with_leading_dims(mode):
    """The first adapted layer after frozen embeddings sees x [B, T, in] that does not require grad."""
    model = adapt(MLP(), SpectralConfig(target_modules=["fc1"], rank=4, mode=mode, lora_rank=2), verbose=False)
    x = torch.randn(2, 3, 13)
    model(x).sum().backward()
    assert model.fc1.coeffs.grad is not None and model.fc1.coeffs.grad.shape == (4,)
