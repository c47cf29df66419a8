"""Adapter folders: sk.save_pretrained / sk.from_pretrained, transformers' save_pretrained hook, and
the guard that keeps a plain from_pretrained from returning the untuned base."""
import copy
import json
import os

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.tuning.folder import ADAPTER_NAME, CONFIG_NAME, GUARD_SHARD_NAME, HF_WEIGHTS_NAME
from tests.tuning.models import MLP, tiny_bert, tiny_gpt2, tokens

CFG = dict(target_modules=["query", "value"], rank=4, modules_to_save=["classifier"])


def _trained(model, cfg):
    sk.adapt(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("mode", ["scale", "shift", "speclora"])
def test_folder_round_trip(tmp_path, mode):
    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG, mode=mode, lora_rank=2))
    x = tokens()
    want = _logits(model, x)
    info = sk.save_pretrained(model, tmp_path / "run")
    assert info.num_layers == 4
    rebuilt = sk.from_pretrained(tiny_bert(), tmp_path / "run")
    assert torch.equal(_logits(rebuilt, x), want)
    assert {n for n, p in rebuilt.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_folder_description(tmp_path):
    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    sk.save_pretrained(model, tmp_path)
    with open(tmp_path / CONFIG_NAME) as f:
        desc = json.load(f)
    assert desc["format"] == "2" and desc["package_version"] == sk.__version__
    assert desc["config"]["rank"] == 4 and desc["config"]["mode"] == "scale"
    assert desc["config"]["target_modules"] == ["query", "value"]
    assert sorted(desc["layers"]) == sorted(sk.tuning.spectral_layers(model))
    layer = desc["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert layer["rank"] == 4 and len(layer["fingerprint"]["sha256"]) == 64
    assert desc["modules_to_save"] == ["classifier.bias", "classifier.weight"]
    assert desc["base_model_class"] == "BertForSequenceClassification"
    assert sk.tuning.read_folder(tmp_path)["adapter_file"] == ADAPTER_NAME


def test_transformers_save_pretrained_writes_the_adapter_folder(tmp_path):
    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    model.save_pretrained(tmp_path)  # what Trainer calls for its checkpoints and save_model
    files = set(os.listdir(tmp_path))
    assert {CONFIG_NAME, ADAPTER_NAME, "config.json", HF_WEIGHTS_NAME, "model.safetensors.index.json"} <= files
    assert "model.safetensors" not in files  # no full copy of the model
    held = torch.load(tmp_path / HF_WEIGHTS_NAME, weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(held) == trainable  # the adapter and modules_to_save only: no W, no U, s, V
    adapter_bytes = sum(t.numel() * t.element_size() for t in held.values())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert adapter_bytes < 0.05 * model_bytes
    assert torch.equal(_logits(sk.from_pretrained(tiny_bert(), tmp_path), tokens()), _logits(model, tokens()))


def test_plain_from_pretrained_is_refused_naming_the_fix(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    model.save_pretrained(tmp_path)
    for cls in (BertForSequenceClassification, AutoModelForSequenceClassification):
        with pytest.raises(Exception, match=r"spectral_kernels\.from_pretrained"):
            cls.from_pretrained(tmp_path)
    assert "spectral_kernels.from_pretrained" in GUARD_SHARD_NAME


def test_merged_model_saves_and_loads_as_a_plain_model(tmp_path):
    """After merge_adapter the model is dense again: its save_pretrained is transformers' own, and a
    plain from_pretrained loads the tuned (merged) model."""
    from transformers import BertForSequenceClassification

    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    want = _logits(model, tokens())
    sk.merge_adapter(model)
    model.save_pretrained(tmp_path)
    assert "model.safetensors" in os.listdir(tmp_path) and CONFIG_NAME not in os.listdir(tmp_path)
    plain = BertForSequenceClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(plain, tokens()), want, rtol=1e-5, atol=1e-5)
    assert "save_pretrained" not in model.__dict__


def test_deepcopy_saves_the_copy(tmp_path):
    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        sk.tuning.spectral_layers(twin)["bert.encoder.layer.0.attention.self.query"].coeffs.add_(1.0)
    twin.save_pretrained(tmp_path)
    assert torch.equal(_logits(sk.from_pretrained(tiny_bert(), tmp_path), tokens()), _logits(twin, tokens()))


def test_plain_module_folder(tmp_path):
    torch.manual_seed(0)
    model = sk.adapt(MLP(), sk.SpectralConfig(target_modules=["fc1", "fc2"], rank=3, modules_to_save=["head"]))
    with torch.no_grad():
        model.fc1.coeffs.add_(0.3)
    sk.save_pretrained(model, tmp_path)
    assert set(os.listdir(tmp_path)) == {CONFIG_NAME, ADAPTER_NAME}  # no transformers files
    torch.manual_seed(0)
    rebuilt = sk.from_pretrained(MLP(), tmp_path)
    x = torch.randn(3, 13)
    assert torch.equal(rebuilt(x), model(x))


def test_gpt2_folder(tmp_path):
    model = _trained(tiny_gpt2(), sk.SpectralConfig(target_modules=["c_attn"], rank=3))
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(sk.from_pretrained(tiny_gpt2(), tmp_path), tokens()), _logits(model, tokens()))


def test_folder_of_another_base_is_refused(tmp_path):
    sk.save_pretrained(_trained(tiny_bert(seed=0), sk.SpectralConfig(**CFG)), tmp_path)
    with pytest.raises(sk.AdapterMismatchError, match=r"layer 'bert\.encoder\.layer\.0\.attention\.self\.query'.*differs"):
        sk.from_pretrained(tiny_bert(seed=1), tmp_path)


def test_folder_of_another_config_is_refused(tmp_path):
    sk.save_pretrained(_trained(tiny_bert(), sk.SpectralConfig(**CFG)), tmp_path)
    other = sk.adapt(tiny_bert(), sk.SpectralConfig(**{**CFG, "rank": 2}))
    with pytest.raises(sk.AdapterMismatchError, match=r"rank=4 in the folder, 2 in the model"):
        sk.from_pretrained(other, tmp_path)
    shifted = sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG, mode="shift"))
    with pytest.raises(sk.AdapterMismatchError, match=r"mode='scale' in the folder, 'shift' in the model"):
        sk.from_pretrained(shifted, tmp_path)


def test_from_pretrained_into_the_same_config_loads(tmp_path):
    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG))
    sk.save_pretrained(model, tmp_path)
    again = sk.adapt(tiny_bert(), sk.SpectralConfig(**CFG))
    assert torch.equal(_logits(sk.from_pretrained(again, tmp_path), tokens()), _logits(model, tokens()))


def test_not_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        sk.from_pretrained(tiny_bert(), tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="is not a spectral adapter folder: it has no spectral_config.json"):
        sk.from_pretrained(tiny_bert(), tmp_path)
    with open(tmp_path / CONFIG_NAME, "w") as f:
        json.dump({"format": "99"}, f)
    with pytest.raises(ValueError, match="folder format '99'"):
        sk.from_pretrained(tiny_bert(), tmp_path)


def test_save_pretrained_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="the model has no adapter"):
        sk.save_pretrained(tiny_bert(), tmp_path)


def test_from_pretrained_uses_the_svd_cache(tmp_path, monkeypatch):
    """A warm cache: the rebuild runs no SVD at all."""
    import spectral_kernels.ops.truncated_svd as tsvd

    model = _trained(tiny_bert(), sk.SpectralConfig(**CFG, svd_cache_dir=str(tmp_path / "cache")))
    sk.save_pretrained(model, tmp_path / "run")
    calls = []
    real = tsvd._svd_group
    monkeypatch.setattr(tsvd, "_svd_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    rebuilt = sk.from_pretrained(tiny_bert(), tmp_path / "run", cache_dir=tmp_path / "cache")
    assert calls == []
    assert torch.equal(_logits(rebuilt, tokens()), _logits(model, tokens()))
