"""Adapter banks on adapted models: named adapters, mixed-task batches (forward and training),
optimizer steps, adapter files into named slots, merging, backward-compatible keys, errors."""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.tuning import SpectralConfig, adapt, spectral_layers
from tests.tuning.models import MLP, tiny_bert, tokens

MODES = ["scale", "shift"]
BACKENDS = ["torch"] + (["triton"] if triton_interpret_enabled() or torch.cuda.is_available() else [])


def _model(mode="scale", seed=0, backend="auto", **cfg):
    torch.manual_seed(seed)
    model = MLP()
    adapt(model, SpectralConfig(target_modules=["fc1", "fc2"], rank=4, mode=mode, backend=backend, **cfg),
          verbose=False)
    return model


def _perturb(model, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in spectral_layers(model).values():
            c = layer.coefficients(name)
            c.add_(0.5 * torch.randn(c.shape, generator=g, dtype=c.dtype))


def _three_tasks(mode="scale", backend="auto"):
    model = _model(mode, backend=backend)
    for name in ("a", "b"):
        sk.add_adapter(model, name)
    for i, name in enumerate(("default", "a", "b")):
        _perturb(model, name, i)
    return model


@pytest.mark.parametrize("mode", MODES)
def test_added_adapter_is_identity_and_only_active_trains(mode):
    model = _model(mode)
    x = torch.randn(3, 13)
    with torch.no_grad():
        base = model(x)
    sk.add_adapter(model, "t1")
    assert sk.list_adapters(model) == ["default", "t1"] and sk.active_adapter(model) == "default"
    sk.set_adapter(model, "t1")
    with torch.no_grad():
        assert torch.equal(model(x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc1.coeff_bank.t1", "fc2.coeff_bank.t1"}
    model(x).sum().backward()
    assert model.fc1.coeffs.grad is None and model.fc1.coeff_bank["t1"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_mixed_batch_equals_each_sample_alone(mode, backend):
    # triton runs on CPU tensors under the interpreter, else on the GPU
    device = "cuda" if backend == "triton" and not triton_interpret_enabled() else "cpu"
    model = _three_tasks(mode, backend).to(device)
    names = ["b", "default", "a", "b", "a"]
    x = torch.randn(5, 6, 13, device=device)  # [batch, seq, in]: the index broadcasts over seq
    with torch.no_grad(), sk.adapter_batch(model, names):
        y = model(x)
    for i, name in enumerate(names):
        sk.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(y[i], model(x[i : i + 1])[0], rtol=1e-5, atol=1e-5)
    sk.set_adapter(model, "default")


def test_mixed_batch_gradients_equal_float64_reference():
    """Each adapter's gradient from one mixed batch = the sum of its own samples' gradients, each
    computed alone in float64."""
    model = _three_tasks().double()
    names = ["b", "a", "b", "a"]
    x = torch.randn(4, 3, 13, dtype=torch.float64)
    w = torch.randn(4, 3, 5, dtype=torch.float64)
    with sk.adapter_batch(model, names):
        (model(x) * w).sum().backward()
    got = {n: [layer.coefficients(n).grad.clone() for layer in spectral_layers(model).values()] for n in ("a", "b")}
    assert all(layer.coeffs.grad is None for layer in spectral_layers(model).values())  # "default" unused
    for n in ("a", "b"):
        for layer in spectral_layers(model).values():
            layer.coefficients(n).grad = None
        sk.set_adapter(model, n)
        rows = [i for i, m in enumerate(names) if m == n]
        (model(x[rows]) * w[rows]).sum().backward()
        for g, layer in zip(got[n], spectral_layers(model).values()):
            torch.testing.assert_close(g, layer.coefficients(n).grad, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for n in ("a", "b") for p in sk.adapter_parameters(model, n)
                   if sk.active_adapter(model) != n)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_unused_adapters_do_not_move_under_adamw(weight_decay):
    model = _three_tasks()
    opt = torch.optim.AdamW(sk.adapter_parameters(model), lr=0.1, weight_decay=weight_decay)
    before = {n: [p.detach().clone() for p in sk.adapter_parameters(model, n)] for n in sk.list_adapters(model)}
    x = torch.randn(3, 13)
    for _ in range(2):
        opt.zero_grad()
        with sk.adapter_batch(model, ["a", "a", "b"]):
            model(x).pow(2).sum().backward()
        opt.step()
    for n, ps in before.items():
        moved = [not torch.equal(p, q) for p, q in zip(sk.adapter_parameters(model, n), ps)]
        assert all(moved) if n in ("a", "b") else not any(moved), n


def test_single_task_file_loads_into_a_named_slot(tmp_path):
    """A task trained and saved alone, in a model of its own, joins another model's bank."""
    alone = _model(seed=0)
    _perturb(alone, "default", 7)
    sk.save_adapter(alone, tmp_path / "task.safetensors")
    bank = _model(seed=0)
    sk.load_adapter(bank, tmp_path / "task.safetensors", adapter="task")
    assert sk.list_adapters(bank) == ["default", "task"] and sk.active_adapter(bank) == "default"
    x = torch.randn(4, 13)
    with torch.no_grad(), sk.adapter_batch(bank, ["task", "default", "task", "default"]):
        y = bank(x)
    with torch.no_grad():
        torch.testing.assert_close(y[[0, 2]], alone(x[[0, 2]]))
        torch.testing.assert_close(y[[1, 3]], _model(seed=0)(x[[1, 3]]))
    # and back out of the slot: a named adapter saved from the bank equals the original file's
    sk.save_adapter(bank, tmp_path / "again.safetensors", adapter="task")
    torch.manual_seed(0)
    fresh = sk.load_adapter(MLP(), tmp_path / "again.safetensors")
    torch.manual_seed(0)
    ref = MLP()
    sk.load_adapter(ref, tmp_path / "task.safetensors")
    for a, b in zip(sk.adapter_parameters(fresh), sk.adapter_parameters(ref)):
        assert torch.equal(a, b)


def test_load_into_slot_of_an_unadapted_model_and_refusals(tmp_path):
    alone = _model(seed=0)
    _perturb(alone, "default", 3)
    sk.save_adapter(alone, tmp_path / "t.safetensors")
    torch.manual_seed(0)
    m = sk.load_adapter(MLP(), tmp_path / "t.safetensors", adapter="t")
    assert sk.list_adapters(m) == ["default", "t"]
    assert torch.equal(m.fc1.coeff_bank["t"], alone.fc1.coeffs) and torch.all(m.fc1.coeffs == 1)
    with_head = _model(seed=0, modules_to_save=["head"])
    sk.save_adapter(with_head, tmp_path / "head.safetensors")
    with pytest.raises(sk.AdapterMismatchError, match="every adapter of a bank shares"):
        sk.load_adapter(_model(seed=0, modules_to_save=["head"]), tmp_path / "head.safetensors", adapter="x")
    other = _model(seed=1)  # another base: fingerprints differ
    with pytest.raises(sk.AdapterMismatchError):
        sk.load_adapter(other, tmp_path / "t.safetensors", adapter="t")


def test_state_dict_keys_stay_backward_compatible():
    model = _model()
    assert {k for k in model.state_dict() if "coeff" in k} == {"fc1.coeffs", "fc2.coeffs"}
    sk.add_adapter(model, "t")
    keys = {k for k in model.state_dict() if "coeff" in k}
    assert keys == {"fc1.coeffs", "fc2.coeffs", "fc1.coeff_bank.t", "fc2.coeff_bank.t"}
    twin = _model()
    sk.add_adapter(twin, "t")
    twin.load_state_dict(model.state_dict())


def test_merge_a_named_adapter():
    model = _three_tasks()
    x = torch.randn(3, 13)
    sk.set_adapter(model, "b")
    with torch.no_grad():
        want = model(x)
    sk.set_adapter(model, "default")
    sk.merge_adapter(model, adapter="b")
    assert isinstance(model.fc1, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    sk.unmerge(model)
    assert sk.list_adapters(model) == ["default", "a", "b"]


def test_bert_mixed_batch():
    model = tiny_bert()
    adapt(model, SpectralConfig(target_modules=["query", "value"], rank=4), verbose=False)
    sk.add_adapter(model, "t")
    _perturb(model, "t", 1)
    x = tokens(batch=3)
    with torch.no_grad(), sk.adapter_batch(model, ["t", "default", "t"]):
        y = model(x).logits
    sk.set_adapter(model, "t")
    with torch.no_grad():
        torch.testing.assert_close(y[[0, 2]], model(x[[0, 2]]).logits, rtol=1e-5, atol=1e-5)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        sk.set_adapter(model, "nope")
    sk.add_adapter(model, "t")
    with pytest.raises(ValueError, match="already exists"):
        sk.add_adapter(model, "t")
    with pytest.raises(ValueError, match="without '.'"):
        sk.add_adapter(model, "a.b")
    with pytest.raises(ValueError, match='"default" adapter cannot be deleted'):
        sk.delete_adapter(model, "default")
    sk.set_adapter(model, "t")
    with pytest.raises(ValueError, match="is active"):
        sk.delete_adapter(model, "t")
    sk.set_adapter(model, "default")
    sk.delete_adapter(model, "t")
    assert sk.list_adapters(model) == ["default"]
    with pytest.raises(ValueError, match="first dim is not the batch of 2"):
        with sk.adapter_batch(model, ["default", "default"]):
            model(torch.randn(3, 13))
    with pytest.raises(ValueError, match="no adapter 'x'"):
        with sk.adapter_batch(model, ["x"]):
            pass
    speclora = MLP()
    adapt(speclora, SpectralConfig(target_modules=["fc1"], rank=3, mode="speclora", lora_rank=2), verbose=False)
    with pytest.raises(NotImplementedError, match="speclora"):
        sk.add_adapter(speclora, "t")


def test_adapter_set_changes_refused_inside_a_batch_block():
    model = _three_tasks()
    with sk.adapter_batch(model, ["a", "b", "a"]):
        for call, match in [(lambda: sk.add_adapter(model, "c"), "add_adapter"),
                            (lambda: sk.set_adapter(model, "b"), "set_adapter"),
                            (lambda: sk.delete_adapter(model, "b"), "delete_adapter")]:
            with pytest.raises(RuntimeError, match=f"{match}: not allowed inside an adapter_batch block"):
                call()
        with pytest.raises(RuntimeError, match="already inside an adapter_batch block"):
            with sk.adapter_batch(model, ["a", "a", "a"]):
                pass
    assert sk.list_adapters(model) == ["default", "a", "b"] and sk.active_adapter(model) == "default"
    sk.add_adapter(model, "c")  # allowed again after the block


def test_failed_block_setup_restores_every_layer(monkeypatch):
    """A failure while the block sets up its layers (here: the second layer's lookup) leaves no
    layer in batch mode and every requires_grad flag as it was."""
    from spectral_kernels.nn.spectral_linear import _BatchAdapters

    model = _three_tasks()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    real = _BatchAdapters.coefficients_of

    def fail_on_fc2(self, layer):
        if layer is model.fc2:
            raise KeyError("lookup failed")
        return real(self, layer)

    monkeypatch.setattr(_BatchAdapters, "coefficients_of", fail_on_fc2)
    with pytest.raises(KeyError, match="lookup failed"):
        with sk.adapter_batch(model, ["a", "b"]):
            pass
    assert all(layer.current_batch() is None and not layer._open_batches for layer in spectral_layers(model).values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_named_coefficients_lists_every_set_in_order():
    model = _three_tasks()
    named = model.fc1.named_coefficients()
    assert list(named) == sk.list_adapters(model) == ["default", "a", "b"]
    assert named["default"] is model.fc1.coeffs and named["b"] is model.fc1.coefficients("b")


def test_mixed_batch_does_not_read_its_index_back(monkeypatch):
    """The layers' index is built from adapter names, so its values are not re-checked (on a GPU
    that check is a device sync per layer); the public op still checks a caller's index."""
    import spectral_kernels.ops.spectral_linear as op_module

    model = _three_tasks()
    x = torch.randn(3, 13)
    with torch.no_grad(), sk.adapter_batch(model, ["a", "b", "default"]):
        want = model(x)

    def no_read_back(*args):
        raise AssertionError("adapter_index values read back")

    monkeypatch.setattr(op_module, "check_adapter_index_values", no_read_back)
    with torch.no_grad(), sk.adapter_batch(model, ["a", "b", "default"]):
        assert torch.equal(model(x), want)
    layer = model.fc1
    with pytest.raises(AssertionError, match="read back"):
        sk.spectral_linear(x, layer.U, torch.zeros(2, layer.rank), layer.V, layer.bias, layer.weight,
                           adapter_index=torch.zeros(3, dtype=torch.int64))
