"""save_adapter / load_adapter: contents, round trip, and refusal of another base, rank or mode."""
import json

import pytest
import torch
from safetensors import safe_open

from spectral_kernels.tuning import (
    AdapterMismatchError,
    SpectralConfig,
    adapt,
    fingerprint,
    load_adapter,
    read_adapter,
    save_adapter,
    spectral_layers,
)
from tests.tuning.models import tiny_bert, tiny_gpt2, tokens

CFG = dict(target_modules=["query", "value"], rank=4, modules_to_save=["classifier"])


def _trained(model, cfg):
    adapt(model, cfg, verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("mode", ["scale", "shift", "speclora"])
def test_round_trip_into_a_fresh_model(tmp_path, mode):
    cfg = SpectralConfig(**CFG, mode=mode, lora_rank=2, train_bias=True)
    model = _trained(tiny_bert(), cfg)
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
    info = save_adapter(model, tmp_path / "a.safetensors", verbose=False)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert info.num_tensors == len(trainable) and info.num_parameters == sum(p.numel() for p in trainable.values())
    assert info.num_bytes == (tmp_path / "a.safetensors").stat().st_size and info.num_layers == 4

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(trainable)  # only the trainable tensors, no base weights
        meta = f.metadata()
    assert SpectralConfig.from_json(meta["spectral_kernels.config"]) == cfg
    layers = json.loads(meta["spectral_kernels.layers"])
    q0 = "bert.encoder.layer.0.attention.self.query"
    assert layers[q0]["rank"] == 4 and layers[q0]["mode"] == mode
    assert layers[q0]["fingerprint"] == fingerprint(spectral_layers(model)[q0].weight)

    fresh = tiny_bert()  # same seed: the same base
    load_adapter(fresh, tmp_path / "a.safetensors", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(trainable)


def test_load_into_an_adapted_model_and_basis(tmp_path):
    cfg = SpectralConfig(**CFG)
    model = _trained(tiny_bert(), cfg)
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
    small = save_adapter(model, tmp_path / "a.safetensors", verbose=False)
    big = save_adapter(model, tmp_path / "b.safetensors", include_basis=True, verbose=False)
    assert big.num_parameters == small.num_parameters and big.num_bytes > small.num_bytes
    target = adapt(tiny_bert(), cfg, verbose=False)
    load_adapter(target, tmp_path / "a.safetensors", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, want)
    fresh = load_adapter(tiny_bert(), tmp_path / "b.safetensors", verbose=False)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, want)  # stored basis: bit-identical


def test_gpt2_conv1d_pure_form_round_trip(tmp_path):
    cfg = SpectralConfig(target_modules="all-linear", rank="full", progress=False)
    model = _trained(tiny_gpt2(), cfg)
    x = tokens()
    with torch.no_grad():
        want = model(x).logits
    save_adapter(model, tmp_path / "g.safetensors", verbose=False)
    fresh = load_adapter(tiny_gpt2(), tmp_path / "g.safetensors", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want)
    with pytest.raises(AdapterMismatchError, match=r"layer 'transformer\.h\.0\.attn\.c_attn': base weight differs"):
        load_adapter(tiny_gpt2(seed=1), tmp_path / "g.safetensors", verbose=False)


def test_refuses_another_base(tmp_path):
    save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "a.safetensors", verbose=False)
    other = tiny_bert(seed=1)
    with pytest.raises(AdapterMismatchError,
                       match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query': base weight differs"):
        load_adapter(other, tmp_path / "a.safetensors", verbose=False)
    assert not spectral_layers(other)  # refused before anything was changed
    adapted_other = adapt(tiny_bert(seed=1), SpectralConfig(**CFG), verbose=False)
    with pytest.raises(AdapterMismatchError, match="base weight differs"):
        load_adapter(adapted_other, tmp_path / "a.safetensors", verbose=False)


def test_one_changed_entry_is_another_base(tmp_path):
    save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "a.safetensors", verbose=False)
    other = tiny_bert()
    with torch.no_grad():
        other.bert.encoder.layer[1].attention.self.value.weight[3, 5] += 1e-3
    with pytest.raises(AdapterMismatchError, match=r"layer 'bert\.encoder\.layer\.1\.attention\.self\.value'"):
        load_adapter(other, tmp_path / "a.safetensors", verbose=False)


def test_accepts_the_same_base_in_another_dtype(tmp_path):
    save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "a.safetensors", verbose=False)
    model = load_adapter(tiny_bert().double(), tmp_path / "a.safetensors", verbose=False)
    assert spectral_layers(model)["bert.encoder.layer.0.attention.self.query"].coeffs.dtype == torch.float64


@pytest.mark.parametrize("change, match", [
    (dict(rank=3), "the adapter has rank=4, the model's layer has 3"),
    (dict(mode="shift"), "the adapter has mode='scale', the model's layer has 'shift'"),
    (dict(mode="speclora"), "the adapter has mode='scale', the model's layer has 'speclora'"),
    (dict(target_modules=["query"]), "is in the adapter but not adapted in the model"),
    (dict(target_modules=["query", "value", "key"]), "is adapted in the model but not in the adapter"),
    (dict(modules_to_save=None), r"holds \['classifier.bias', 'classifier.weight'\] which are not trainable"),
])
def test_refuses_another_rank_mode_or_layers(tmp_path, change, match):
    save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "a.safetensors", verbose=False)
    model = adapt(tiny_bert(), SpectralConfig(**{**CFG, **change}), verbose=False)
    with pytest.raises(AdapterMismatchError, match=match):
        load_adapter(model, tmp_path / "a.safetensors", verbose=False)


def test_errors_without_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="the model has no adapter"):
        save_adapter(tiny_bert(), tmp_path / "a.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="is not a spectral_kernels adapter"):
        read_adapter(tmp_path / "plain.safetensors")


def test_size_is_reported_and_nothing_printed_by_default(tmp_path, capsys):
    info = save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "a.safetensors")
    assert capsys.readouterr().out == ""
    assert "4 layers" in str(info) and "parameters" in str(info) and "KiB" in str(info)
    save_adapter(_trained(tiny_bert(), SpectralConfig(**CFG)), tmp_path / "b.safetensors", verbose=True)
    assert "4 layers" in capsys.readouterr().out


def test_fingerprint_samples_large_weights(monkeypatch):
    import spectral_kernels.tuning.fingerprints as io

    monkeypatch.setattr(io, "FULL_HASH_NUMEL", 100)
    monkeypatch.setattr(io, "SAMPLE_NUMEL", 50)
    W = torch.randn(30, 40)
    a = io.fingerprint(W)
    W2 = W.clone()
    W2[0, 0] += 1.0  # position 0 is always sampled
    assert a["sha256"] != io.fingerprint(W2)["sha256"]
    assert io.compare_fingerprints(a, io.fingerprint(W.clone())) is None
