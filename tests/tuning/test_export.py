"""export_peft and save_merged: exact peft LoRA folders and merged checkpoints, checked with the real
peft and transformers on tiny BERT, GPT-2 and Llama models built from configs."""
import copy
import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

import spectral_kernels as sk
from spectral_kernels.tuning.export import META_EXPORT, VLLM_LORA_RANKS, PureFormExportError, lora_factors
from tests.tuning.models import MLP, tiny_bert, tiny_gpt2, tiny_llama, tokens

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

MODELS = {
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "llama": (tiny_llama, ["q_proj", "v_proj", "gate_proj", "down_proj"]),
}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def _perturb(model, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _adapted(kind, mode="scale", **cfg):
    make, targets = MODELS[kind]
    model = make()
    base = copy.deepcopy(model)
    sk.adapt(model, sk.SpectralConfig(target_modules=targets, mode=mode, **{"rank": 5, "lora_rank": 3, **cfg}))
    _perturb(model)
    return base, model


def _export(model, directory, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sk.export_peft(model, directory, **kw)


def _peft(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, directory).eval()


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("mode", ["scale", "shift", "speclora"])
def test_peft_loads_the_exact_model(kind, mode, tmp_path):
    base, model = _adapted(kind, mode)
    x = tokens(batch=3, length=9, seed=4)
    want = _logits(model, x)
    assert _rel(want, _logits(base, x)) > 1e-3  # the adapter changes the model
    written = sk.export_peft(model, tmp_path / "out")
    assert written == {"default": str(tmp_path / "out")}
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = _peft(base, tmp_path / "out")
    assert _rel(_logits(peft_model, x), want) < 1e-5
    # peft's own merge (fan_in_fan_out for GPT-2's Conv1D) gives the same model
    assert _rel(_logits(peft_model.merge_and_unload(), x), want) < 1e-5


def test_config_is_standard_lora_with_scaling_one(tmp_path):
    base, model = _adapted("gpt2", "speclora")
    sk.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 8  # k + r = 5 + 3, padded to vLLM's next rank
    assert not config["use_rslora"] and not config["use_dora"] and config["bias"] == "none"
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    assert config["rank_pattern"] == {} and config["modules_to_save"] is None
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
        meta = json.loads(f.metadata()[META_EXPORT])
        A = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight")
        B = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
    assert len(keys) == 8 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    assert A.shape == (8, 32) and B.shape == (96, 8)
    assert torch.all(A[5 + 3:] == 0) and torch.all(B[:, 5 + 3:] == 0)  # zero padding
    assert meta["mode"] == ["speclora"] and meta["base_quantization"] is None
    layer = model.transformer.h[0].attn.c_attn
    torch.testing.assert_close((B.double() @ A.double()).float(),
                               layer.merged_weight().float() - layer.weight.float(), rtol=0, atol=1e-5)


def test_base_model_name_is_the_unadapted_base(tmp_path):
    base, model = _adapted("llama")
    model.config._name_or_path = "org/tiny-llama"
    sk.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"


def test_factors_match_a_float64_reference_on_odd_shapes():
    layer = sk.SpectralLinear.from_linear(torch.nn.Linear(23, 17), rank=7, mode="shift")
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(7) * torch.tensor([1, -1] * 3 + [0.0]))  # mixed signs and a zero
    A, B = lora_factors(layer)
    ref = layer.U.double() @ torch.diag(layer.coefficient_delta().double()) @ layer.V.double().t()
    assert A.shape == (7, 23) and B.shape == (17, 7) and A.dtype == torch.float64
    torch.testing.assert_close(B @ A, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind, mode, extra", [("llama", "shift", {}),
                                               ("bert", "scale", {"modules_to_save": ["classifier"]})])
def test_a_bank_in_peft_mixed_batch_equals_adapter_batch(kind, mode, extra, tmp_path):
    base, model = _adapted(kind, mode, **extra)
    for i, name in enumerate(["sentiment", "topic"]):
        sk.add_adapter(model, name)
        with torch.no_grad():
            for p in sk.adapter_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)) * 0.3)
    written = _export(model, tmp_path / "bank")
    assert written == {"default": str(tmp_path / "bank"), "sentiment": str(tmp_path / "bank" / "sentiment"),
                       "topic": str(tmp_path / "bank" / "topic")}
    pm = _peft(base, tmp_path / "bank")
    for name in ("sentiment", "topic"):
        pm.load_adapter(str(tmp_path / "bank" / name), adapter_name=name)
    names = ["topic", "default", "sentiment", "topic"]
    x = tokens(batch=4, length=6, seed=3)
    with sk.adapter_batch(model, names):
        want = _logits(model, x)
    got = _logits(pm, x, adapter_names=names)
    assert _rel(got, want) < 1e-5
    # one adapter only, and exporting a chosen one
    _export(model, tmp_path / "one", adapter="topic")
    assert os.listdir(tmp_path / "one") == ["topic"]


def test_bias_and_modules_to_save_travel_as_peft_writes_them(tmp_path):
    base, model = _adapted("bert", "scale", train_bias=True, modules_to_save=["classifier"])
    x = tokens(seed=5)
    want = _logits(model, x)
    model.requires_grad_(False)  # frozen for inference: the trained biases still travel
    with pytest.warns(UserWarning) as record:
        sk.export_peft(model, tmp_path)
    text = " ".join(str(w.message) for w in record)
    assert "bert.encoder.layer.0.attention.self.query" in text and "vLLM and SGLang refuse adapters with a bias" in text
    assert "'classifier'" in text and "refuse adapters with modules_to_save" in text
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["classifier"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.classifier.weight" in keys
    assert "base_model.model.bert.encoder.layer.1.attention.self.value.base_layer.bias" in keys
    assert _rel(_logits(_peft(base, tmp_path), x), want) < 1e-5


def test_bias_of_a_bank_goes_with_one_adapter(tmp_path):
    base2, model2 = _adapted("bert", "scale", train_bias=True)
    sk.add_adapter(model2, "b")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sk.export_peft(model2, tmp_path / "x")
    assert any("travel with adapter 'default' only" in str(w.message) for w in record)
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["bias"] == "lora_only"
    assert json.loads((tmp_path / "x" / "b" / "adapter_config.json").read_text())["bias"] == "none"
    pm = _peft(base2, tmp_path / "x")
    pm.load_adapter(str(tmp_path / "x" / "b"), adapter_name="b")  # peft accepts: one adapter has a bias


def test_pure_form_full_rank_is_exact_and_truncated_pure_is_refused(tmp_path):
    make, _ = MODELS["bert"]
    model, base = make(), make()
    sk.adapt(model, sk.SpectralConfig(target_modules=["query", "key"], rank="full", mode="scale"))
    assert model.bert.encoder.layer[0].attention.self.query.form == "pure"
    _perturb(model, 0.1)
    x = tokens(seed=6)
    _export(model, tmp_path / "full", rank=None)
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["r"] == 32
    assert _rel(_logits(_peft(base, tmp_path / "full"), x), _logits(model, x)) < 1e-5

    truncated = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk.adapt(truncated, sk.SpectralConfig(target_modules=["query"], rank=4, form="pure"))
    with pytest.raises(PureFormExportError, match=r"layer 'bert.encoder.layer.0.attention.self.query' is in pure "
                                                  r"form at rank 4 < min\(in, out\) = 32.*save_merged"):
        sk.export_peft(truncated, tmp_path / "pure")
    assert not (tmp_path / "pure").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_dtype_and_low_precision_models(dtype, tmp_path):
    base, model = _adapted("llama", "scale")
    sk.export_peft(model, tmp_path / "a", dtype=dtype)
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
        A = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        B = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    layer = model.model.layers[0].self_attn.q_proj
    ref = (layer.merged_weight().double() - layer.weight.double())
    err = _rel(B.double() @ A.double(), ref)
    assert err < 4 * torch.finfo(dtype).eps  # one rounding of each balanced factor
    # a model adapted in that dtype exports in it by default, and loads in peft close to it
    low = tiny_llama().to(dtype)
    low_base = copy.deepcopy(low)
    sk.adapt(low, sk.SpectralConfig(target_modules=["q_proj", "v_proj"], rank=4))
    _perturb(low)
    sk.export_peft(low, tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    x = tokens(seed=2)
    assert _rel(_logits(_peft(low_base, tmp_path / "b"), x), _logits(low, x)) < 0.05


def test_rank_options(tmp_path):
    base, model = _adapted("llama", "scale", rank=0.2)  # k = round(0.2·min(in, out)) differs per layer
    ranks = {n: layer.rank for n, layer in sk.tuning.spectral_layers(model).items()}
    assert len(set(ranks.values())) > 1
    x = tokens(seed=7)
    want = _logits(model, x)
    sk.export_peft(model, tmp_path / "own", rank=None)
    config = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    common = config["r"]
    assert config["rank_pattern"] == config["alpha_pattern"] == {n: r for n, r in ranks.items() if r != common}
    assert config["rank_pattern"]
    assert _rel(_logits(_peft(copy.deepcopy(base), tmp_path / "own"), x), want) < 1e-5
    sk.export_peft(model, tmp_path / "max", rank="max")
    config = json.loads((tmp_path / "max" / "adapter_config.json").read_text())
    assert config["r"] == max(ranks.values()) and config["rank_pattern"] == {}
    assert _rel(_logits(_peft(copy.deepcopy(base), tmp_path / "max"), x), want) < 1e-5
    sk.export_peft(model, tmp_path / "sixteen", rank=16)
    assert json.loads((tmp_path / "sixteen" / "adapter_config.json").read_text())["r"] == 16
    assert _rel(_logits(_peft(copy.deepcopy(base), tmp_path / "sixteen"), x), want) < 1e-5
    with pytest.raises(ValueError, match="rank=2 is below layer 'model.layers.0.self_attn.q_proj'"):
        sk.export_peft(model, tmp_path / "low", rank=2)
    for bad in ("big", 1.5, True):
        with pytest.raises(ValueError, match="rank must be 'vllm', 'max', None or an int"):
            sk.export_peft(model, tmp_path / "bad", rank=bad)
    assert VLLM_LORA_RANKS[0] == 8 and VLLM_LORA_RANKS[-1] == 512


def test_engine_limits_warn_naming_the_layer(tmp_path):
    base, model = _adapted("llama", "speclora", rank=12, lora_rank=8)  # k + r = 20 → padded to 32
    with pytest.warns(UserWarning, match=r"layer 'model.layers.0.self_attn.q_proj' has rank 32 > 16 \(max_lora_rank\)"):
        sk.export_peft(model, tmp_path, max_lora_rank=16)
    with pytest.raises(ValueError, match="max_lora_rank must be a positive int"):
        sk.export_peft(model, tmp_path / "x", max_lora_rank=0)


def test_bad_input_is_refused_and_nothing_is_touched(tmp_path):
    with pytest.raises(ValueError, match="the model has no adapter"):
        sk.export_peft(tiny_llama(), tmp_path / "none")
    base, model = _adapted("llama")
    with pytest.raises(ValueError, match=r"no adapter 'nope'; the model's adapters are \['default'\]"):
        sk.export_peft(model, tmp_path / "x", adapter="nope")
    with pytest.raises(ValueError, match="dtype 'float99' is not a torch dtype"):
        sk.export_peft(model, tmp_path / "x", dtype="float99")
    with pytest.raises(ValueError, match="floating dtype"):
        sk.export_peft(model, tmp_path / "x", dtype=torch.int8)
    assert not (tmp_path / "x").exists() and not (tmp_path / "none").exists()
    sk.add_adapter(model, "a/b")
    with pytest.raises(ValueError, match="adapter 'a/b' cannot be exported.*path separator"):
        sk.export_peft(model, tmp_path / "x")
    sk.delete_adapter(model, "a/b")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        sk.export_peft(model, tmp_path / "file")

    other_base, other = _adapted("llama", "shift")
    sk.export_peft(other, tmp_path / "held")
    before = {f: (tmp_path / "held" / f).read_bytes() for f in os.listdir(tmp_path / "held")}
    with pytest.raises(FileExistsError, match="already holds an adapter.*overwrite=True"):
        sk.export_peft(model, tmp_path / "held")
    assert {f: (tmp_path / "held" / f).read_bytes() for f in os.listdir(tmp_path / "held")} == before
    sk.export_peft(model, tmp_path / "held", overwrite=True)
    x = tokens(seed=8)
    assert _rel(_logits(_peft(base, tmp_path / "held"), x), _logits(model, x)) < 1e-5
    assert not [f for f in os.listdir(tmp_path / "held") if ".tmp" in f]


def test_a_bank_sub_folder_holding_an_adapter_is_refused_before_anything_is_written(tmp_path):
    base, model = _adapted("llama")
    sk.add_adapter(model, "b")
    sk.export_peft(model, tmp_path / "bank", adapter="b")
    with pytest.raises(FileExistsError, match="bank/b"):
        sk.export_peft(model, tmp_path / "bank")
    assert sorted(os.listdir(tmp_path / "bank")) == ["b"]  # "default" was not written either


def test_plain_module_exports_with_full_names(tmp_path):
    model = MLP()
    base = copy.deepcopy(model)
    sk.adapt(model, sk.SpectralConfig(target_modules=["fc1"], rank=3, mode="shift"))
    _perturb(model)
    sk.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["fc1"] and config["task_type"] is None
    x = torch.randn(4, 13)
    pm = _peft(base, tmp_path)
    with torch.no_grad():
        assert _rel(pm(x), model(x)) < 1e-5


def test_quantized_base_export_says_what_it_is_the_delta_of(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tests.tuning.test_quantized import quantized_net

    model = quantized_net("bnb-int8")
    sk.adapt(model, sk.SpectralConfig(target_modules=["up", "down"], rank=8))
    _perturb(model, 0.2)
    with pytest.warns(UserWarning, match=r"'up', 'down' sit on a quantized base \(bnb-8bit\).*another precision"):
        sk.export_peft(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()[META_EXPORT])
    assert meta["base_quantization"] == {"up": "bnb-8bit", "down": "bnb-8bit"}
    assert "quantized base" in meta["base"]
    up = model.up
    A, B = lora_factors(up)
    torch.testing.assert_close(B @ A, up.delta_weight().double(), rtol=0, atol=1e-5)
    from tests.tuning.test_quantized import _x

    x = _x()
    with torch.no_grad():
        want = model(x)
        got = _peft(quantized_net("bnb-int8"), tmp_path)(x)  # peft's LoRA on the same quantized base
    assert _rel(got, want) < 1e-5


# --- merged checkpoints -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_merged_loads_in_plain_transformers(kind, tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    base, model = _adapted(kind, "speclora" if kind == "gpt2" else "scale")
    x = tokens(seed=9)
    want = _logits(model, x)
    layers_before = dict(sk.tuning.spectral_layers(model))
    coeffs_before = {n: layer.coeffs.detach().clone() for n, layer in layers_before.items()}
    out = sk.save_merged(model, tmp_path / "merged")
    assert out == str(tmp_path / "merged")
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "merged").eval()
    assert not sk.tuning.spectral_layers(loaded)
    assert _rel(_logits(loaded, x), want) < 1e-5
    if kind == "gpt2":  # tied weights stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # the adapted model is unchanged: same layers, same coefficients, still saves as an adapter folder
    assert sk.tuning.spectral_layers(model) == layers_before
    for n, layer in layers_before.items():
        assert torch.equal(layer.coeffs, coeffs_before[n]) and layer.coeffs.requires_grad
    assert _rel(_logits(model, x), want) == 0
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "spectral_adapter.safetensors").exists()
    AutoModel.from_pretrained(tmp_path / "merged")  # the bare model class loads it too


def test_save_merged_keeps_the_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama().to(torch.bfloat16)
    sk.adapt(model, sk.SpectralConfig(target_modules=["q_proj"], rank=4))
    _perturb(model)
    sk.save_merged(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(loaded.model.layers[0].self_attn.q_proj.weight,
                               model.model.layers[0].self_attn.q_proj.merged_weight(), rtol=0, atol=0)


def test_save_merged_bad_input(tmp_path):
    with pytest.raises(ValueError, match="the model has no adapter"):
        sk.save_merged(tiny_llama(), tmp_path / "a")
    mlp = MLP()
    sk.adapt(mlp, sk.SpectralConfig(target_modules=["fc1"], rank=3))
    with pytest.raises(TypeError, match="MLP is not a transformers model"):
        sk.save_merged(mlp, tmp_path / "a")
    base, model = _adapted("llama")
    with pytest.raises(ValueError, match="no adapter 'x'"):
        sk.save_merged(model, tmp_path / "a", adapter="x")
    sk.save_merged(model, tmp_path / "a")
    before = (tmp_path / "a" / "model.safetensors").read_bytes()
    _perturb(model)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        sk.save_merged(model, tmp_path / "a")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == before
    sk.save_merged(model, tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != before


# --- merged weights without a model (what `spectral-kernels analyze BASE ADAPTER` compares) -------------
@pytest.mark.parametrize("include_basis", [False, True])
def test_merged_state_dict_equals_the_merged_model(include_basis, tmp_path):
    from spectral_kernels.tuning.merged_checkpoint import merged_state_dict

    base, model = _adapted("gpt2", "speclora", train_bias=True, modules_to_save=["ln_f"])
    sk.save_adapter(model, tmp_path / "a.safetensors", include_basis=include_basis)
    state = merged_state_dict(base.state_dict(), tmp_path / "a.safetensors")
    want = sk.merge_adapter(copy.deepcopy(model)).state_dict()
    assert state.keys() == base.state_dict().keys()
    for key, t in state.items():
        torch.testing.assert_close(t, want[key], rtol=0, atol=2e-6, msg=key)
    assert not torch.equal(state["transformer.h.0.attn.c_attn.weight"], base.state_dict()["transformer.h.0.attn.c_attn.weight"])
    # a checkpoint without the model prefix (the bare GPT2Model's keys) matches too
    bare = {k.removeprefix("transformer."): v for k, v in base.state_dict().items() if k.startswith("transformer.")}
    merged = merged_state_dict(bare, tmp_path / "a.safetensors")
    torch.testing.assert_close(merged["h.1.mlp.c_fc.weight"], want["transformer.h.1.mlp.c_fc.weight"], rtol=0, atol=2e-6)


def test_merged_state_dict_bad_input(tmp_path):
    from spectral_kernels.tuning.adapter_io import AdapterMismatchError
    from spectral_kernels.tuning.merged_checkpoint import merged_state_dict

    base, model = _adapted("llama")
    sk.save_adapter(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="is not a spectral adapter"):
        merged_state_dict(base.state_dict(), tmp_path / "nothing.safetensors")
    state = base.state_dict()
    del state["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(AdapterMismatchError, match="layer 'model.layers.1.self_attn.q_proj' .* has no weight"):
        merged_state_dict(state, tmp_path / "a.safetensors")
    with pytest.raises(AdapterMismatchError, match="layer 'model.layers.0.[a-z_.]+': base weight differs"):
        merged_state_dict(tiny_llama(seed=3).state_dict(), tmp_path / "a.safetensors")


def test_merged_state_dict_of_a_pure_form_adapter(tmp_path):
    from spectral_kernels.tuning.merged_checkpoint import merged_state_dict

    make, _ = MODELS["bert"]
    model, base = make(), make()
    sk.adapt(model, sk.SpectralConfig(target_modules=["query"], rank="full", mode="scale"))
    _perturb(model, 0.1)
    sk.save_adapter(model, tmp_path / "pure.safetensors")
    state = merged_state_dict(base.state_dict(), tmp_path / "pure.safetensors")
    key = "bert.encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(state[key], model.bert.encoder.layer[1].attention.self.query.merged_weight(),
                               rtol=0, atol=1e-6)


def test_target_modules_select_exactly_the_adapted_layers(tmp_path):
    from spectral_kernels.tuning.export import _target_modules

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(6, 6)
            self.inner = torch.nn.Module()
            self.inner.fc1 = torch.nn.Linear(6, 6)
            self.block = torch.nn.Module()
            self.block.inner = torch.nn.Module()
            self.block.inner.fc1 = torch.nn.Linear(6, 5)

        def forward(self, x):
            return self.block.inner.fc1(self.inner.fc1(self.fc1(x)))

    for targets, want in ((["block.inner.fc1"], ["block.inner.fc1"]),  # "fc1" would take all three
                          (["inner.fc1"], r"^(?:inner\.fc1)$")):      # "inner.fc1" is block.inner.fc1's tail too
        model = Nested()
        base = copy.deepcopy(model)
        sk.adapt(model, sk.SpectralConfig(target_modules=targets, rank=2, exclude_modules=
                                          ["block.inner.fc1"] if targets == ["inner.fc1"] else None))
        adapted = set(sk.tuning.spectral_layers(model))
        assert _target_modules(model, sk.tuning.spectral_layers(model)) == want
        _perturb(model)
        sk.export_peft(model, tmp_path / str(len(adapted)) / targets[0])
        pm = _peft(base, tmp_path / str(len(adapted)) / targets[0])
        lora = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in pm.named_modules()
                if n.endswith(".lora_A")}
        assert lora == adapted
        x = torch.randn(3, 6)
        with torch.no_grad():
            assert _rel(pm(x), model(x)) < 1e-5
