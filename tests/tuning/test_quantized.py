"""Spectral fine-tuning on quantized bases (bitsandbytes 4-bit / 8-bit, torchao int8 / int4) on CPU.

Each supported type is tested when its package is installed (extras ``bnb``, ``torchao``) and
skipped with the reason otherwise.
"""
import warnings

import pytest
import torch
from torch import nn

import spectral_kernels as sk
from spectral_kernels.nn.quantized import QuantizedSpectralLinear
from spectral_kernels.nn.spectral_linear import SpectralLinear
from spectral_kernels.tuning.adapter_io import AdapterMismatchError

# bitsandbytes' CPU eval path (AVX512-BF16 repacking) needs out_features divisible by 32 and in_features by the blocksize
IN, HID, OUT = 128, 256, 64


class Net(nn.Module):
    """x [B, T, 128] → up (128→256) → gelu → down (256→64) → head (64→64, kept float)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(IN, HID)
        self.down = nn.Linear(HID, OUT)
        self.head = nn.Linear(OUT, OUT)

    def forward(self, x):
        return self.head(torch.nn.functional.gelu(self.down(torch.nn.functional.gelu(self.up(x)))))


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (extra: spectral-kernels[bnb])")


def _torchao():
    return pytest.importorskip("torchao", reason="torchao not installed (extra: spectral-kernels[torchao])")


def _bnb4(lin: nn.Linear, quant_type="nf4", double_quant=True, blocksize=64):
    bnb = _bnb()
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compute_dtype=torch.float32,
                          quant_type=quant_type, compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                 compress_statistics=double_quant, blocksize=blocksize)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _bnb8(lin: nn.Linear):
    bnb = _bnb()
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=False, threshold=0.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def _quantize_torchao(model, config):
    _torchao()
    from torchao.quantization import quantize_

    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in ("up", "down"))
    return model


def quantized_net(kind: str, seed: int = 0) -> Net:
    """Net with up and down quantized as ``kind``, head left in float32."""
    model = Net(seed)
    if kind.startswith("bnb-"):
        opts = {"bnb-nf4": {}, "bnb-fp4": {"quant_type": "fp4", "double_quant": False},
                "bnb-nf4-bs128": {"blocksize": 128}}
        if kind == "bnb-int8":
            model.up, model.down = _bnb8(model.up), _bnb8(model.down)
        else:
            model.up, model.down = _bnb4(model.up, **opts[kind]), _bnb4(model.down, **opts[kind])
    elif kind == "ao-int8":
        from_torchao = _torchao()  # noqa: F841
        from torchao.quantization import Int8WeightOnlyConfig

        _quantize_torchao(model, Int8WeightOnlyConfig())
    elif kind == "ao-int4":
        _torchao()
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        # torchao's Int4WeightOnlyConfig needs CUDA; its CPU int4 weight-only path is Intx with int4
        _quantize_torchao(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    else:
        raise ValueError(kind)
    return model.eval()


KINDS = ["bnb-nf4", "bnb-fp4", "bnb-int8", "ao-int8", "ao-int4"]
CFG = dict(target_modules=["up", "down"], rank=8)


def _x(seed=1):
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(seed))


def _train(model, steps=8, lr=0.05):
    """A few Adam steps in train mode (bitsandbytes' CPU eval forward repacks 4-bit weights into an
    inference-only layout), leaving the model in eval mode."""
    model.train()
    x = _x()
    target = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["scale", "shift"])
def test_identity_at_init_bitwise(kind, mode):
    model = quantized_net(kind)
    x = _x()
    with torch.no_grad():
        want = model(x)
    bases = {"up": model.up, "down": model.down}
    sk.adapt(model, sk.SpectralConfig(**CFG, mode=mode))
    assert isinstance(model.up, QuantizedSpectralLinear) and model.up.base is bases["up"]
    assert model.down.base is bases["down"]
    assert model.up.weight is None and model.up.bias is None
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_factors_are_the_dequantized_spectrum(kind):
    from spectral_kernels.tuning.quantized import dequantize

    model = quantized_net(kind)
    W = dequantize(model.up)
    sk.adapt(model, sk.SpectralConfig(**CFG))
    s_ref = torch.linalg.svdvals(W)[:8]
    torch.testing.assert_close(model.up.s, s_ref, rtol=1e-4, atol=1e-5)
    assert model.up.U.shape == (HID, 8) and model.up.V.shape == (IN, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_coeffs_only_and_loss_falls(kind):
    model = sk.adapt(quantized_net(kind), sk.SpectralConfig(**CFG))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.coeffs", "down.coeffs"}
    loss = model(_x()).square().mean()
    loss.backward()
    for n, p in model.named_parameters():
        if n.endswith("coeffs"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    model.zero_grad()
    losses = _train(model)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_and_folder_round_trip_on_a_fresh_quantized_base(kind, tmp_path):
    model = sk.adapt(quantized_net(kind), sk.SpectralConfig(**CFG, mode="shift"))
    _train(model, steps=3)
    x = _x(3)
    with torch.no_grad():
        want = model(x)
    sk.save_adapter(model, tmp_path / "a.safetensors")
    loaded = sk.load_adapter(quantized_net(kind), tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    sk.save_pretrained(model, tmp_path / "run")
    rebuilt = sk.from_pretrained(quantized_net(kind), tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(rebuilt(x), want)
    # adapted model loading the file: the same base passes the fingerprint check
    sk.load_adapter(sk.adapt(quantized_net(kind), sk.SpectralConfig(**CFG, mode="shift")), tmp_path / "a.safetensors")


@pytest.mark.parametrize("other, what", [("bnb-fp4", "quant_type='fp4'"), ("bnb-nf4-bs128", "blocksize=128")])
def test_a_base_quantized_differently_is_refused(tmp_path, other, what):
    model = sk.adapt(quantized_net("bnb-nf4"), sk.SpectralConfig(**CFG))
    sk.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="quantized differently") as e:
        sk.load_adapter(quantized_net(other), tmp_path / "a.safetensors")
    assert what in str(e.value) and "'up'" in str(e.value)
    sk.save_pretrained(model, tmp_path / "run")
    with pytest.raises(AdapterMismatchError, match=what):
        sk.from_pretrained(quantized_net(other), tmp_path / "run")


def test_an_unquantized_or_reseeded_base_is_refused(tmp_path):
    model = sk.adapt(quantized_net("bnb-nf4"), sk.SpectralConfig(**CFG))
    sk.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="unquantized float32"):
        sk.load_adapter(Net(), tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="same settings"):
        sk.load_adapter(quantized_net("bnb-nf4", seed=5), tmp_path / "a.safetensors")


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_warns_with_the_error(kind):
    from spectral_kernels.tuning.quantized import dequantize

    model = sk.adapt(quantized_net(kind), sk.SpectralConfig(**CFG))
    _train(model, steps=4)
    base_type = type(model.up.base)
    base_weight_type = type(model.up.base.weight.data)
    x = _x(4)
    with torch.no_grad():
        want = model(x)
        targets = {n: dequantize(getattr(model, n).base) + getattr(model, n).delta_weight() for n in ("up", "down")}
    with pytest.warns(UserWarning, match=r"lossy.*relative error .* = \d\.\d+e[-+]\d+ at most") as rec:
        sk.merge_adapter(model)
    assert type(model.up) is base_type and type(model.up.weight.data) is base_weight_type
    errs = {n: (torch.linalg.vector_norm(dequantize(getattr(model, n)).double() - t.double())
                / torch.linalg.vector_norm(t.double())).item() for n, t in targets.items()}
    worst = max(errs, key=errs.get)
    assert 0 < errs[worst] < 0.3
    assert f"= {errs[worst]:.3e} at most (layer {worst!r})" in str(rec[0].message)
    with torch.no_grad():
        got = model(x)
    assert (got - want).norm() / want.norm() < 0.3
    sk.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_refuses_a_quantized_layer_changed_while_merged(kind):
    """The quantized base goes back untouched, so a bias edited while merged would be lost:
    unmerge refuses, naming the layer, and leaves the model merged."""
    model = sk.adapt(quantized_net(kind), sk.SpectralConfig(**CFG))
    _train(model, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.merge_adapter(model)
    merged_up, merged_down = model.up, model.down
    bias = merged_up.bias.detach().clone()
    with torch.no_grad():
        merged_up.bias.add_(1.0)
    with pytest.raises(ValueError, match=r"bias of layer 'up' \(a quantized base\) was changed"):
        sk.unmerge(model)
    assert model.up is merged_up and model.down is merged_down  # still merged, untouched
    with torch.no_grad():
        merged_up.bias.copy_(bias)
    sk.unmerge(model)
    assert isinstance(model.up, QuantizedSpectralLinear) and isinstance(model.down, QuantizedSpectralLinear)


@pytest.mark.parametrize("kind", KINDS)
def test_unload_returns_the_quantized_module_itself(kind):
    model = quantized_net(kind)
    up, down = model.up, model.down
    storage = up.weight.data.clone() if not kind.startswith("ao") else up.weight.dequantize().clone()
    sk.adapt(model, sk.SpectralConfig(**CFG))
    _train(model, steps=2)
    sk.unload(model)
    assert model.up is up and model.down is down
    now = up.weight.data if not kind.startswith("ao") else up.weight.dequantize()
    assert torch.equal(now, storage)


def test_unsupported_quantized_type_is_a_type_error():
    bnb = _bnb()
    model = Net()
    model.up = bnb.nn.OutlierAwareLinear(IN, HID)
    with pytest.raises(TypeError, match=r"'up'.*OutlierAwareLinear is not supported; supported: .*Linear4bit"):
        sk.adapt(model, sk.SpectralConfig(**CFG))
    with pytest.raises(TypeError, match="OutlierAwareLinear is not supported"):
        sk.adapt(model, sk.SpectralConfig(target_modules="all-linear", rank=4))


@pytest.mark.parametrize("kw, what", [(dict(mode="speclora"), "mode 'speclora'"), (dict(form="pure"), "form 'pure'"),
                                      (dict(train_bias=True), "train_bias")])
def test_modes_a_quantized_base_cannot_take_are_refused(kw, what):
    model = quantized_net("bnb-nf4")
    with pytest.raises(ValueError, match=rf"'up' is a quantized Linear4bit \(bnb-4bit\): {what}"):
        sk.adapt(model, sk.SpectralConfig(**CFG, **kw))


def test_all_linear_adapts_quantized_layers_and_the_float_head():
    model = sk.adapt(quantized_net("bnb-nf4"), sk.SpectralConfig(target_modules="all-linear", rank=4))
    assert isinstance(model.up, QuantizedSpectralLinear) and isinstance(model.down, QuantizedSpectralLinear)
    assert type(model.head) is SpectralLinear
    assert "base bnb-4bit" in model.spectral_report.replaced["up"]


def test_svd_of_many_quantized_layers_runs_in_chunks(monkeypatch):
    from spectral_kernels.tuning import inject

    calls = []
    real = inject._batched_svd
    monkeypatch.setattr(inject, "QUANT_SVD_CHUNK", 1)
    monkeypatch.setattr(inject, "_batched_svd", lambda mats, k, cfg, *rest: calls.append(len(mats)) or real(mats, k, cfg, *rest))
    model = quantized_net("bnb-nf4")
    x = _x()
    with torch.no_grad():
        want = model(x)
    sk.adapt(model, sk.SpectralConfig(**CFG))
    assert calls == [1, 1]
    with torch.no_grad():
        assert torch.equal(model(x), want)


@pytest.mark.gpu
def test_cuda_bnb4_identity_at_init():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _bnb()
    model = quantized_net("bnb-nf4").to("cuda")
    x = _x().cuda()
    with torch.no_grad():
        want = model(x)
    sk.adapt(model, sk.SpectralConfig(**CFG))
    with torch.no_grad():
        assert torch.equal(model(x), want)
