"""adapt(): target selection, exact identity at initialisation, freezing, errors, the batched SVD."""
import pytest
import torch

from spectral_kernels.tuning import SpectralConfig, adapt, count_parameters, print_trainable_parameters, spectral_layers
from spectral_kernels.nn.speclora import SpecLoRALinear
from tests.tuning.models import MLP, tiny_bert, tiny_gpt2, tokens

MODES = ["scale", "shift", "speclora"]


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", MODES)
def test_bert_identity_at_init(mode):
    model = tiny_bert()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    adapt(model, SpectralConfig(target_modules=["query", "value", "intermediate.dense"], rank=5, mode=mode,
                                lora_rank=3, modules_to_save=["classifier"]), verbose=False)
    layers = spectral_layers(model)
    assert len(layers) == 6 and all(layer.rank == 5 for layer in layers.values())
    with torch.no_grad():
        out = model(x).logits
    assert torch.equal(out, ref), (out - ref).abs().max()  # delta form: bitwise the pretrained model at c₀
    expected = {f"{n}.coeffs" for n in layers} | {"classifier.weight", "classifier.bias"}
    if mode == "speclora":
        expected |= {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
        assert all(isinstance(layer, SpecLoRALinear) for layer in layers.values())
    assert _trainable(model) == expected


@pytest.mark.parametrize("mode", MODES)
def test_gpt2_conv1d_identity_at_init(mode):
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    adapt(model, SpectralConfig(target_modules=["c_attn", "c_fc", "mlp.c_proj"], rank=0.25, mode=mode,
                                train_bias=True), verbose=False)
    layers = spectral_layers(model)
    assert set(layers) == {f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")}
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.in_features, c_attn.out_features, c_attn.rank) == (32, 96, 8)
    assert c_attn.spectral_source == "conv1d"
    assert isinstance(model.transformer.h[0].attn.c_proj, Conv1D)  # attn.c_proj not targeted
    with torch.no_grad():
        out = model(x).logits
    assert torch.equal(out, ref), (out - ref).abs().max()
    assert all(layer.bias.requires_grad for layer in layers.values())


def test_full_rank_scale_is_pure_form():
    model = tiny_gpt2()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    adapt(model, SpectralConfig(target_modules="all-linear", rank="full"), verbose=False)
    layers = spectral_layers(model)
    assert len(layers) == 8  # lm_head (the output embedding, tied to wte) is left alone
    assert all(layer.form == "pure" and layer.weight is None for layer in layers.values())
    assert all(layer.rank == min(layer.in_features, layer.out_features) for layer in layers.values())
    with torch.no_grad():
        out = model(x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # exact up to the SVD's rounding


def test_regex_and_exclude():
    model = tiny_bert()
    cfg = SpectralConfig(target_modules=r".*attention\.(self\.(query|key)|output\.dense)", rank=2,
                         exclude_modules=["layer.1.attention.self.key"])
    adapt(model, cfg, verbose=False)
    assert set(spectral_layers(model)) == {
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.output.dense"}


def test_scale_mode_math():
    """W' = W + U_k·diag(s_k⊙(c−1))·V_kᵀ, with U_k, s_k, V_k the top-k SVD of W."""
    torch.manual_seed(0)
    model = MLP().double()
    W = model.fc2.weight.detach().clone()
    adapt(model, SpectralConfig(target_modules=["fc2"], rank=4), verbose=False)
    layer = model.fc2
    with torch.no_grad():
        layer.coeffs.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0], dtype=torch.float64))
    U, s, Vh = torch.linalg.svd(W)
    c = layer.coeffs.detach()
    expected = W + (U[:, :4] * (s[:4] * (c - 1))) @ Vh[:4]
    torch.testing.assert_close(layer.merged_weight(), expected, rtol=1e-10, atol=1e-10)
    x = torch.randn(3, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.t() + layer.bias)


def test_freezing_and_modules_to_save():
    model = MLP()
    adapt(model, SpectralConfig(target_modules=["fc1", "fc2"], rank=3, modules_to_save=["head"]), verbose=False)
    assert _trainable(model) == {"fc1.coeffs", "fc2.coeffs", "head.weight", "head.bias"}
    assert not model.fc1.weight.requires_grad and not model.fc1.bias.requires_grad
    trainable, total = count_parameters(model)
    assert trainable == 3 + 3 + 24 * 5 + 5
    x = torch.randn(4, 13)
    model(x).sum().backward()
    assert model.fc1.coeffs.grad is not None and model.head.weight.grad is not None
    assert model.fc1.weight.grad is None


def test_reports_quietly_by_default(capsys, caplog):
    import logging

    model = tiny_bert()
    with caplog.at_level(logging.DEBUG, logger="spectral_kernels"):
        adapt(model, SpectralConfig(target_modules=["query"], rank=4))
    assert capsys.readouterr().out == ""  # nothing printed: hundreds of layers on an LLM
    logged = caplog.text
    assert "adapted 2 layers" in logged and "trainable params: 8 ||" in logged
    assert "bert.encoder.layer.1.attention.self.query: Linear(32→32) → SpectralLinear(rank 4" in logged
    report = str(model.spectral_report)
    assert "adapted 2 layers" in report and "bert.encoder.layer.1.attention.self.query: Linear(32→32)" in report
    adapt(tiny_bert(), SpectralConfig(target_modules=["query"], rank=4), verbose=True)
    out = capsys.readouterr().out
    assert "adapted 2 layers" in out and "trainable params: 8 ||" in out
    print_trainable_parameters(model)
    assert capsys.readouterr().out.startswith("trainable params: 8 || all params: ")
    assert model.spectral_report.replaced and model.spectral_config.rank == 4


def test_model_wide_svd_is_one_batched_call(monkeypatch):
    import spectral_kernels.ops.truncated_svd as tsvd

    calls = []
    real = tsvd.batched_truncated_svd

    def spy(mats, k, **kw):
        calls.append((sorted(mats), k, kw))
        return real(mats, k, **kw)

    monkeypatch.setattr(tsvd, "batched_truncated_svd", spy)
    adapt(tiny_gpt2(), SpectralConfig(target_modules="all-linear", rank=4, svd_method="gram", progress=False),
          verbose=False)
    assert len(calls) == 1 and len(calls[0][0]) == 8 and calls[0][1] == 4
    assert calls[0][2]["method"] == "gram" and calls[0][2]["progress"] is False


def test_fraction_rank_groups_by_k(monkeypatch):
    import spectral_kernels.ops.truncated_svd as tsvd

    ks = []
    real = tsvd.batched_truncated_svd
    monkeypatch.setattr(tsvd, "batched_truncated_svd", lambda mats, k, **kw: ks.append(k) or real(mats, k, **kw))
    model = MLP()
    adapt(model, SpectralConfig(target_modules=["fc1", "fc2", "head"], rank=0.5), verbose=False)
    assert sorted(ks) == [2, 6, 12]  # min(in, out) = 13 → 6 (round half to even), 24 → 12, 5 → 2
    assert [model.fc1.rank, model.fc2.rank, model.head.rank] == [6, 12, 2]


# --- errors -----------------------------------------------------------------------------------------
def test_target_matching_nothing_is_named():
    with pytest.raises(ValueError, match="target 'qurey' matches no module"):
        adapt(tiny_bert(), SpectralConfig(target_modules=["query", "qurey"]), verbose=False)
    with pytest.raises(ValueError, match=r"regex 'nothing\.\*' matches no module"):
        adapt(tiny_bert(), SpectralConfig(target_modules="nothing.*"), verbose=False)
    with pytest.raises(ValueError, match="modules_to_save: 'clasifier' matches no module"):
        adapt(tiny_bert(), SpectralConfig(target_modules=["query"], modules_to_save=["clasifier"]), verbose=False)


def test_rank_too_large_names_the_layer():
    with pytest.raises(ValueError, match=r"rank 10 is too large for layer 'head' \(Linear 24→5\).*at most .* = 5"):
        adapt(MLP(), SpectralConfig(target_modules=["fc1", "head"], rank=10), verbose=False)


def test_module_type_it_cannot_adapt():
    with pytest.raises(TypeError, match="module 'bert.embeddings.word_embeddings' is a Embedding, which adapt cannot adapt"):
        adapt(tiny_bert(), SpectralConfig(target_modules=["query", "word_embeddings"]), verbose=False)
    with pytest.raises(TypeError, match="is a BertSelfAttention"):
        adapt(tiny_bert(), SpectralConfig(target_modules=["attention.self"]), verbose=False)


def test_adapting_twice_is_an_error():
    model = adapt(MLP(), SpectralConfig(target_modules=["fc1"], rank=2), verbose=False)
    with pytest.raises(TypeError, match="already a SpectralLinear"):
        adapt(model, SpectralConfig(target_modules=["fc1"], rank=2), verbose=False)


def test_modules_to_save_overlapping_a_target():
    with pytest.raises(ValueError, match="contains the target"):
        adapt(tiny_bert(), SpectralConfig(target_modules=["query"], modules_to_save=["layer.0"]), verbose=False)


def test_not_a_config():
    with pytest.raises(TypeError, match="config must be a SpectralConfig"):
        adapt(MLP(), {"target_modules": ["fc1"]})


def test_pure_form_below_full_rank_warns():
    with pytest.warns(UserWarning, match="not the pretrained one at initialisation"):
        adapt(MLP(), SpectralConfig(target_modules=["fc2"], rank=3, form="pure"), verbose=False)
