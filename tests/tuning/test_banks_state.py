"""adapter_batch state and adapter names: a backward after the block still trains the named
adapters; a block holds for its own thread only; an explicit batch dim for models that are not
batch-first and a refusal where the layout is ambiguous; adapter names that would shadow module
attributes are refused up front, and add_adapter is all or nothing across layers."""
import threading

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.tuning import spectral_layers
from tests.tuning.test_banks import _three_tasks

NAMES = ["b", "a", "b"]


def _grads(model):
    return {(layer_name, n): (p.grad.clone() if p.grad is not None else None)
            for layer_name, layer in spectral_layers(model).items() for n, p in layer.named_coefficients().items()}


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_same_grads(got, want):
    for key, w in want.items():
        assert (got[key] is None) == (w is None), key
        if w is not None:
            torch.testing.assert_close(got[key], w, rtol=1e-12, atol=1e-12)


def _clear(model):
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("after", ["backward", "autograd.grad"])
def test_backward_after_the_block_trains_the_named_adapters(after):
    model = _three_tasks().double()
    x = torch.randn(3, 4, 13, dtype=torch.float64)
    w = torch.randn(3, 4, 5, dtype=torch.float64)
    flags = _flags(model)
    with sk.adapter_batch(model, NAMES):
        (model(x) * w).sum().backward()
    inside = _grads(model)
    assert all(inside[(l, n)] is not None for l in ("fc1", "fc2") for n in ("a", "b"))
    _clear(model)
    with sk.adapter_batch(model, NAMES):
        loss = (model(x) * w).sum()
    assert _flags(model) == flags  # restored on exit, before the backward
    if after == "backward":
        loss.backward()
        assert _grads(model).keys() == inside.keys()
        for key, want in inside.items():
            got = _grads(model)[key]
            assert (got is None) == (want is None), key
            if want is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        params = sk.adapter_parameters(model, "a")
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(loss, params)  # torch refuses frozen inputs: no silent zero
    assert _flags(model) == flags  # and restored again once the backward ended


def test_optimizer_steps_on_a_loop_that_wraps_only_the_forward():
    model = _three_tasks()
    opt = torch.optim.SGD(sk.adapter_parameters(model), lr=0.1)
    before = {n: [p.detach().clone() for p in sk.adapter_parameters(model, n)] for n in sk.list_adapters(model)}
    x = torch.randn(3, 13)
    with sk.adapter_batch(model, ["a", "a", "b"]):
        loss = model(x).pow(2).sum()
    loss.backward()
    opt.step()
    for n, ps in before.items():
        moved = [not torch.equal(p, q) for p, q in zip(sk.adapter_parameters(model, n), ps)]
        assert all(moved) if n in ("a", "b") else not any(moved), n


def test_a_block_holds_for_its_own_thread_only():
    model = _three_tasks()
    x = torch.randn(2, 13)
    with torch.no_grad():
        plain = model(x)
        with sk.adapter_batch(model, ["a", "b"]):
            mixed = model(x)
        with sk.adapter_batch(model, ["b", "a"]):
            swapped = model(x)
    assert not torch.allclose(plain, mixed)
    barrier = threading.Barrier(2, timeout=60)
    results, errors = {}, []

    def inside_a_block():
        try:
            with torch.no_grad(), sk.adapter_batch(model, ["a", "b"]):
                barrier.wait()  # the other thread now runs while this block is open
                results["block"] = [model(x) for _ in range(20)]
                barrier.wait()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    def other_thread():
        try:
            barrier.wait()
            with torch.no_grad():
                results["plain"] = [model(x) for _ in range(20)]
                with sk.adapter_batch(model, ["b", "a"]):  # its own block, on the same model
                    results["own"] = [model(x) for _ in range(20)]
            with pytest.raises(RuntimeError, match="another thread"):
                sk.set_adapter(model, "a")  # the first thread's block is still open
            barrier.wait()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=inside_a_block), threading.Thread(target=other_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(y, plain) for y in results["plain"])
    assert all(torch.equal(y, mixed) for y in results["block"])
    assert all(torch.equal(y, swapped) for y in results["own"])
    assert all(layer._open_batches == 0 for layer in spectral_layers(model).values())
    sk.set_adapter(model, "a")  # allowed once every block closed


def test_sequence_first_inputs_take_an_explicit_batch_dim():
    model = _three_tasks()
    x = torch.randn(4, 3, 13)  # [seq, batch, in]
    with torch.no_grad(), sk.adapter_batch(model, NAMES, batch_dim=1):
        y = model(x)
    for i, name in enumerate(NAMES):
        sk.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(y[:, i], model(x[:, i]), rtol=1e-5, atol=1e-5)
    sk.set_adapter(model, "default")
    with pytest.raises(ValueError, match="first dim is not the batch of 3; if dim 1 is the batch.*batch_dim=1"):
        with torch.no_grad(), sk.adapter_batch(model, NAMES):
            model(x)
    with pytest.raises(ValueError, match="dim 2 is not the batch of 3"):
        with torch.no_grad(), sk.adapter_batch(model, NAMES, batch_dim=2):
            model(x)


def test_a_flattened_batch_is_refused_naming_the_layer():
    """A model that flattens [batch, seq] into one dim before a layer (OPT's fc1/fc2) gives that
    layer no batch dim: refused, naming the layer and why, never indexed by position."""
    model = _three_tasks()
    with pytest.raises(ValueError, match=r"layer 'fc1' got an input of shape \(6, 13\).*multiple of 3.*flattens"):
        with torch.no_grad(), sk.adapter_batch(model, NAMES):
            model(torch.randn(6, 13))


def test_an_ambiguous_layout_is_refused():
    model = _three_tasks()
    x = torch.randn(3, 3, 13)  # seq == batch: batch-first or sequence-first cannot be told apart
    with pytest.raises(ValueError, match=r"ambiguous layout: layer 'fc1' got .*dims \[0, 1\].*batch_dim="):
        with torch.no_grad(), sk.adapter_batch(model, NAMES):
            model(x)
    for dim in (0, 1):
        with torch.no_grad(), sk.adapter_batch(model, NAMES, batch_dim=dim):
            y = model(x)
        for i, name in enumerate(NAMES):
            sk.set_adapter(model, name)
            with torch.no_grad():
                want = model(x.select(dim, i))
            torch.testing.assert_close(y.select(dim, i), want, rtol=1e-5, atol=1e-5)
        sk.set_adapter(model, "default")
    want = _with_active(model, "a", x)
    with torch.no_grad(), sk.adapter_batch(model, ["a", "a", "a"]):  # one adapter: any layout gives the same
        torch.testing.assert_close(model(x), want)
    for bad in (-1, True, "1", 0.0):
        with pytest.raises(ValueError, match="batch_dim must be None or a non-negative int"):
            with sk.adapter_batch(model, NAMES, batch_dim=bad):
                pass


def _with_active(model, name, x):
    sk.set_adapter(model, name)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        sk.set_adapter(model, "default")


@pytest.mark.parametrize("name", ["to", "keys", "update", "forward", "training", "_parameters", "state_dict",
                                  "parameters", "values", "items", "cuda", "eval", "half"])
def test_names_that_shadow_module_attributes_are_refused(name, tmp_path):
    model = _three_tasks()
    with pytest.raises(ValueError, match=f"adapter name '{name}' is reserved|letters, digits"):
        sk.add_adapter(model, name)
    assert sk.list_adapters(model) == ["default", "a", "b"]
    assert all(name not in layer.coeff_bank._parameters for layer in spectral_layers(model).values())
    sk.set_adapter(model, "a")  # the model still works: set, save, delete
    sk.save_adapter(model, tmp_path / "a.safetensors")
    sk.set_adapter(model, "default")
    sk.delete_adapter(model, "b")


@pytest.mark.parametrize("name", ["", " a", "a b", "-a", "a.b", "a/b", 3, None])
def test_malformed_names_are_refused(name):
    model = _three_tasks()
    with pytest.raises(ValueError, match="letters, digits, '_' and '-'"):
        sk.add_adapter(model, name)
    assert sk.list_adapters(model) == ["default", "a", "b"]


def test_well_formed_names_are_accepted():
    model = _three_tasks()
    for name in ("task-1", "Task_2", "3rd", "情感"):
        sk.add_adapter(model, name)
    assert sk.list_adapters(model)[3:] == ["task-1", "Task_2", "3rd", "情感"]


def test_add_adapter_is_all_or_nothing(monkeypatch):
    model = _three_tasks()

    def broken(name):
        raise RuntimeError("out of memory on the second layer")

    monkeypatch.setattr(model.fc2, "add_adapter", broken)
    with pytest.raises(RuntimeError, match="second layer"):
        sk.add_adapter(model, "c")
    assert "c" not in model.fc1.coeff_bank._parameters
    monkeypatch.undo()
    assert sk.list_adapters(model) == ["default", "a", "b"]
    sk.add_adapter(model, "c")  # and the name is free again
    assert sk.list_adapters(model) == ["default", "a", "b", "c"]


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("where", ["inside", "after"])
def test_activation_checkpointing_recomputes_with_the_block(reentrant, where):
    """A checkpointed forward is recomputed in the backward: after the block closed it still runs
    with the block's adapters, so the gradients equal those of a plain backward in the block."""
    from torch.utils.checkpoint import checkpoint

    model = _three_tasks().double()
    x = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    with sk.adapter_batch(model, NAMES):
        model(x).pow(2).sum().backward()
    want = _grads(model)
    _clear(model)
    flags = _flags(model)
    with sk.adapter_batch(model, NAMES):
        loss = checkpoint(model, x, use_reentrant=reentrant).pow(2).sum()
        if where == "inside":
            loss.backward()
    if where == "after":
        loss.backward()
    _assert_same_grads(_grads(model), want)
    assert _flags(model) == flags


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("between", ["block", "plain"])
def test_checkpointed_forwards_of_several_blocks_recompute_each_with_its_own(reentrant, between):
    """Gradient accumulation: a loss summed over two blocks' checkpointed forwards (or one block's,
    with a forward outside any block in between) and one backward after them recomputes each
    forward with the block it ran in, so the gradients equal a backward inside each block."""
    from torch.utils.checkpoint import checkpoint

    model = _three_tasks().double()
    x1 = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(3, 13, dtype=torch.float64, requires_grad=True)  # same size: a wrong block runs silently
    second = ["a", "default", "a"]
    with sk.adapter_batch(model, NAMES):
        model(x1).pow(2).sum().backward()
    if between == "block":
        with sk.adapter_batch(model, second):
            model(x2).pow(3).sum().backward()
    want = _grads(model)
    _clear(model)
    flags = _flags(model)
    with sk.adapter_batch(model, NAMES):
        loss = checkpoint(model, x1, use_reentrant=reentrant).pow(2).sum()
    if between == "block":
        with sk.adapter_batch(model, second):
            loss = loss + checkpoint(model, x2, use_reentrant=reentrant).pow(3).sum()
    else:
        with torch.no_grad():
            model(x2)
    loss.backward()
    _assert_same_grads(_grads(model), want)
    assert _flags(model) == flags
    # a checkpointed forward outside any block afterwards recomputes with the active adapter
    _clear(model)
    model(x1).pow(2).sum().backward()
    want = _grads(model)
    _clear(model)
    checkpoint(model, x1, use_reentrant=reentrant).pow(2).sum().backward()
    _assert_same_grads(_grads(model), want)


def test_a_copy_of_a_layer_is_in_no_block():
    import copy

    model = _three_tasks()
    with torch.no_grad(), sk.adapter_batch(model, ["a", "b"]):
        model(torch.randn(2, 13))
        clone = copy.deepcopy(model)
    assert all(layer._open_batches == 0 and layer._recorded_batch is None and layer._recorded_batches is None
               for layer in spectral_layers(clone).values())
    sk.add_adapter(clone, "c")  # not refused: no block is open on the copy


def test_load_adapter_into_a_reserved_slot_is_refused_before_any_layer_changes(tmp_path):
    model = _three_tasks()
    sk.save_adapter(model, tmp_path / "a.safetensors", adapter="a")
    with pytest.raises(ValueError, match="'update' is reserved"):
        sk.load_adapter(model, tmp_path / "a.safetensors", adapter="update")
    assert sk.list_adapters(model) == ["default", "a", "b"]
    assert all("update" not in layer.coeff_bank._parameters for layer in spectral_layers(model).values())
