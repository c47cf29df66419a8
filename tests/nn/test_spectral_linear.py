"""SpectralLinear: identity at initialisation, training, merge, dtype/device moves, compile, errors."""
import pytest
import torch
from torch import nn

import spectral_kernels as sk
from spectral_kernels import SpectralLinear
from tests.helpers import rel_err


def _linear(n_in=37, n_out=53, bias=True, dtype=torch.float32):
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


@pytest.mark.parametrize("mode", ["scale", "shift"])
@pytest.mark.parametrize("bias", [True, False])
def test_delta_form_is_exactly_the_source_layer(mode, bias):
    lin = _linear(bias=bias)
    layer = SpectralLinear.from_linear(lin, rank=5, mode=mode)
    x = torch.randn(2, 7, 37)
    assert torch.equal(layer(x), lin(x))


def test_pure_form_at_full_rank_reproduces_the_layer():
    lin = _linear(n_in=20, n_out=12, dtype=torch.float64)
    layer = SpectralLinear.from_linear(lin, rank=12, form="pure")
    assert layer.weight is None
    x = torch.randn(9, 20, dtype=torch.float64)
    assert rel_err(layer(x), lin(x)) < 1e-12


def test_only_coefficients_train_by_default():
    layer = SpectralLinear.from_linear(_linear(), rank=5)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"coeffs"}
    assert {n for n, _ in layer.named_buffers()} == {"U", "s", "V"}
    with_bias = SpectralLinear.from_linear(_linear(), rank=5, train_bias=True)
    assert {n for n, p in with_bias.named_parameters() if p.requires_grad} == {"coeffs", "bias"}


@pytest.mark.parametrize("mode", ["scale", "shift"])
def test_training_lowers_the_loss(mode):
    lin = _linear(n_in=24, n_out=16)
    layer = SpectralLinear.from_linear(lin, rank=6, mode=mode)
    x = torch.randn(64, 24)
    with torch.no_grad():  # a target the spectrum can reach: the top singular values doubled
        target = x @ (lin.weight + layer.U @ torch.diag(layer.s) @ layer.V.t()).t() + lin.bias
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("form,rank", [("delta", 5), ("pure", 37)])
def test_merge_equals_forward(form, rank):
    layer = SpectralLinear.from_linear(_linear(dtype=torch.float64), rank=rank, form=form, mode="shift")
    with torch.no_grad():
        layer.coeffs.copy_(torch.randn(rank, dtype=torch.float64))
    merged = layer.merge()
    assert isinstance(merged, nn.Linear)
    assert (merged.in_features, merged.out_features) == (37, 53)
    x = torch.randn(3, 4, 37, dtype=torch.float64)
    assert rel_err(merged(x), layer(x)) < 1e-12


def test_merged_weight_changes_only_the_top_spectrum():
    lin = _linear(n_in=30, n_out=20, dtype=torch.float64)
    layer = SpectralLinear.from_linear(lin, rank=3)
    with torch.no_grad():
        layer.coeffs.copy_(torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64))
    s_before = torch.linalg.svdvals(lin.weight)
    s_after = torch.linalg.svdvals(layer.merged_weight())
    expected = s_before.clone()
    expected[:2] = s_before[:2] * torch.tensor([2.0, 0.5], dtype=torch.float64)
    assert torch.allclose(s_after, expected.sort(descending=True).values, atol=1e-10)


def test_module_attributes_and_repr():
    layer = SpectralLinear.from_linear(_linear(), rank=5, mode="shift")
    assert (layer.in_features, layer.out_features, layer.rank) == (37, 53, 5)
    assert repr(layer) == (
        "SpectralLinear(in_features=37, out_features=53, rank=5, mode=shift, form=delta, bias=True, backend=auto)"
    )


def test_to_dtype_and_device():
    layer = SpectralLinear.from_linear(_linear(), rank=5).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in list(layer.parameters()) + list(layer.buffers()))
    x = torch.randn(4, 37, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    meta = layer.to("meta")
    assert meta.U.device.type == "meta" and meta.weight.device.type == "meta"


def test_state_dict_round_trip():
    layer = SpectralLinear.from_linear(_linear(), rank=5)
    with torch.no_grad():
        layer.coeffs.mul_(1.5)
    fresh = SpectralLinear(37, 53, 5)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(6, 37)
    assert torch.equal(fresh(x), layer(x))


def test_torch_compile_fullgraph():
    layer = SpectralLinear.from_linear(_linear(), rank=5)
    with torch.no_grad():
        layer.coeffs.add_(0.3)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 7, 37, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    g_compiled = layer.coeffs.grad.clone()
    layer.coeffs.grad = None
    y_eager = layer(x_eager)
    y_eager.square().sum().backward()
    assert rel_err(y, y_eager) < 1e-5
    assert rel_err(x.grad, x_eager.grad) < 1e-5
    assert rel_err(g_compiled, layer.coeffs.grad) < 1e-5


def test_autocast_bfloat16():
    layer = SpectralLinear.from_linear(_linear(), rank=5)
    x = torch.randn(8, 37)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.coeffs.grad is not None and layer.coeffs.grad.dtype == torch.float32


def test_backend_selection_on_the_module(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = SpectralLinear.from_linear(_linear(), rank=5, backend="triton")
    with pytest.raises(sk.BackendUnavailableError, match="triton"):
        layer(torch.randn(2, 37))


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, -1, 38, 2.5, True, "4"])
def test_rank_out_of_range_is_a_value_error(rank):
    with pytest.raises(ValueError, match=r"rank must be an integer in 1..min\(in_features, out_features\) = 1..37"):
        SpectralLinear.from_linear(_linear(), rank=rank)


def test_bad_mode_form_and_source():
    with pytest.raises(ValueError, match="mode must be one of"):
        SpectralLinear.from_linear(_linear(), rank=2, mode="speclora-typo")
    with pytest.raises(ValueError, match="form must be one of"):
        SpectralLinear.from_linear(_linear(), rank=2, form="residual")
    with pytest.raises(ValueError, match="backend must be one of"):
        SpectralLinear.from_linear(_linear(), rank=2, backend="cudnn")
    with pytest.raises(TypeError, match="linear must be an nn.Linear, got Conv1d"):
        SpectralLinear.from_linear(nn.Conv1d(3, 3, 1), rank=2)


def test_non_finite_weight_is_refused():
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        SpectralLinear.from_linear(lin, rank=2)


def test_precomputed_factors():
    lin = _linear(dtype=torch.float64)
    U, s, Vh = torch.linalg.svd(lin.weight.detach(), full_matrices=False)
    layer = SpectralLinear.from_linear(lin, rank=4, svd=(U[:, :8], s[:8], Vh[:8].t()))
    assert torch.equal(layer.s, s[:4])
    with pytest.raises(ValueError, match=r"r >= rank = 4"):
        SpectralLinear.from_linear(lin, rank=4, svd=(U[:, :3], s[:3], Vh[:3].t()))


def test_wrong_input_width_names_x():
    layer = SpectralLinear.from_linear(_linear(), rank=5)
    with pytest.raises(ValueError, match="x's last dim must equal"):
        layer(torch.randn(4, 36))


def test_from_linear_takes_its_factors_from_truncated_svd(monkeypatch):
    import spectral_kernels.nn.spectral_linear as mod

    calls = []
    real = mod.truncated_svd

    def spy(A, k, **kw):
        calls.append((tuple(A.shape), k))
        return real(A, k, **kw)

    monkeypatch.setattr(mod, "truncated_svd", spy)
    lin = _linear()
    layer = SpectralLinear.from_linear(lin, rank=5)
    assert calls == [((53, 37), 5)]
    s_exact = torch.linalg.svdvals(lin.weight.detach().double())[:5]
    assert rel_err(layer.s, s_exact) < 1e-3
    eye = torch.eye(5)
    assert torch.allclose(layer.U.t() @ layer.U, eye, atol=1e-5)
    assert torch.allclose(layer.V.t() @ layer.V, eye, atol=1e-5)
