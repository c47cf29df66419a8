"""spectral_linear on edge inputs: Inf in x gives what F.linear on the merged weight gives, on every
plan; meta tensors, zero input features and bfloat16 under the Triton interpreter are refused
with errors that name the argument and say what to do."""
import pytest
import torch
import torch.nn.functional as F

import spectral_kernels as sk
from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.nn import SpectralLinear

BACKENDS = ["torch"] + (["triton"] if triton_interpret_enabled() else [])


def _operands(n_in=16, n_out=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(n_out, k), r(k), r(n_in, k), r(n_out), r(n_out, n_in)


def _same_ieee(y, want):
    return (torch.equal(torch.isnan(y), torch.isnan(want)) and torch.equal(torch.isinf(y), torch.isinf(want))
            and torch.equal(torch.signbit(y[torch.isinf(y)]), torch.signbit(want[torch.isinf(want)])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [3, 40])  # fewer and more tokens than in_features: both torch plans
@pytest.mark.parametrize("form", ["delta", "pure", "delta at init"])
def test_inf_in_x_gives_what_f_linear_gives(backend, tokens, form):
    U, d, V, b, W = _operands()
    if form == "delta at init":
        d = torch.zeros_like(d)
    weight = None if form == "pure" else W
    merged = (U * d) @ V.t() + (0 if weight is None else weight)
    x = torch.randn(2, tokens, 16)
    x[0, 1, 5] = float("inf")
    x[1, 2, 3] = float("-inf")
    x[1, 0, 7] = float("nan")
    y = sk.spectral_linear(x, U, d, V, b, weight, backend=backend)
    want = F.linear(x, merged, b)
    assert torch.isinf(want).any()
    assert _same_ieee(y, want)
    finite = torch.isfinite(want)
    torch.testing.assert_close(y[finite], want[finite], rtol=1e-4, atol=1e-4)


def test_inf_in_x_with_a_bank():
    U, _, V, b, W = _operands()
    bank = torch.randn(3, 4)
    index = torch.tensor([2, 0, 2, 1])
    x = torch.randn(4, 16)
    x[0, 2] = float("inf")
    x[1, 9] = float("-inf")
    y = sk.spectral_linear(x, U, bank, V, b, W, adapter_index=index, backend="torch")
    for t in range(4):
        want = F.linear(x[t], W + (U * bank[index[t]]) @ V.t(), b)
        assert _same_ieee(y[t], want), t


def test_meta_tensors_are_refused_naming_the_argument():
    U, d, V, b, W = _operands()
    meta = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(ValueError, match="x is a meta tensor.*materialise"):
        sk.spectral_linear(torch.randn(3, 16, device="meta"), U, d, V, b, W)
    with pytest.raises(ValueError, match="x is a meta tensor"):
        sk.spectral_linear(*(meta(t) for t in (torch.randn(3, 16), U, d, V, b, W)))
    with pytest.raises(ValueError, match="U is on meta but x is on cpu"):
        sk.spectral_linear(torch.randn(3, 16), meta(U), d, V, b, W)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        sk.spectral_linear(torch.randn(3, 16), U, d, V, b, meta(W))
    layer = SpectralLinear(16, 12, 4, device="meta")
    with pytest.raises(ValueError, match="x is a meta tensor"):
        layer(torch.randn(3, 16, device="meta"))


def test_adapt_refuses_meta_weights():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, device="meta"))
    with pytest.raises(ValueError, match="layer '0': its weight is a meta tensor"):
        sk.adapt(model, sk.SpectralConfig(target_modules="all-linear", rank=2, progress=False))


def test_zero_features_are_refused():
    with pytest.raises(ValueError, match="last dim \\(in_features\\) is 0"):
        sk.spectral_linear(torch.randn(3, 0), torch.randn(4, 2), torch.randn(2), torch.randn(0, 2), None,
                           torch.randn(4, 0))
    for n_in, n_out in ((0, 4), (4, 0)):
        with pytest.raises(ValueError, match="(in|out)_features must be an integer >= 1, got 0"):
            SpectralLinear(n_in, n_out, 1)
    with pytest.raises(ValueError, match="has no inputs or outputs"):
        sk.adapt(torch.nn.Sequential(torch.nn.Linear(0, 4)),
                 sk.SpectralConfig(target_modules="all-linear", rank=1, progress=False))


@pytest.mark.skipif(not triton_interpret_enabled(), reason="the refusal is for the Triton interpreter")
def test_bf16_under_the_triton_interpreter_is_refused():
    U, d, V, b, W = (t.bfloat16() for t in _operands())
    with pytest.raises(TypeError, match="Triton interpreter.*bfloat16.*float32 or float16.*backend='torch'"):
        sk.spectral_linear(torch.randn(3, 16, dtype=torch.bfloat16), U, d, V, b, W, backend="triton")
    # the torch backend still takes bfloat16 on the CPU
    y = sk.spectral_linear(torch.randn(3, 16, dtype=torch.bfloat16), U, d, V, b, W, backend="torch")
    assert y.dtype == torch.bfloat16
