"""spectral_linear through the custom op on the torch backend: accuracy, autograd, saved
activations, torch.library registration, torch.compile, backend selection and bad input."""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.backends import BackendUnavailableError
from spectral_kernels.ops.spectral_linear import _spectral_linear_backward_op, _spectral_linear_op
from tests.helpers import assert_matches_reference, make_operands, rel_err

torch_backend = lambda *a: sk.spectral_linear(*a, backend="torch")  # noqa: E731


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(7,), (2, 3, 5), (67,), (3, 23)])
def test_torch_backend_matches_reference(dtype, lead):
    # T = 7, 30 < in = 37 < out = 53: the update is added into y and dx in place;
    # T = 67, 69 > out > in: the forward and the backward both fold it into the weight.
    assert_matches_reference(torch_backend, make_operands(lead, 37, 53, 5), dtype)


def test_torch_backend_plans_switch_on_token_count():
    """Between in and out tokens the forward folds the update into the weight and the backward
    does not; both plans agree with the reference in float64 at either side of the switch."""
    for lead in [(36,), (38,), (52,), (54,)]:
        assert_matches_reference(torch_backend, make_operands(lead, 37, 53, 5), torch.float64)


def test_non_contiguous_x():
    ops = make_operands((3, 7), 37, 53, 5, transpose_x=True)
    assert not ops.x.is_contiguous()
    assert_matches_reference(torch_backend, ops, torch.float32)


@pytest.mark.parametrize("bias,weight", [(False, True), (True, False), (False, False)])
def test_optional_bias_and_weight(bias, weight):
    assert_matches_reference(torch_backend, make_operands((9,), 20, 15, 4, bias=bias, weight=weight), torch.float32)


def test_trainable_factors_get_exact_gradients():
    report = assert_matches_reference(
        torch_backend, make_operands((4, 5), 12, 10, 3), torch.float64, grads=("x", "U", "d", "V", "bias")
    )
    assert set(report) == {"y", "dx", "dU", "dd", "dV", "dbias"}


def test_gradcheck_through_the_op():
    ops = make_operands((2, 3), 7, 5, 3).cast(torch.float64, ("x", "U", "d", "V", "bias"))
    fn = lambda x, U, d, V, b: sk.spectral_linear(x, U, d, V, b, ops.weight, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (ops.x, ops.U, ops.d, ops.V, ops.bias))


@pytest.mark.parametrize("lead", [(6,), (2, 3, 4)])
def test_only_some_operands_require_grad(lead):
    # A frozen x (the layer right after a frozen embedding) skips the backward op: dd, dV and
    # dbias then come from the glue, with every leading dim flattened.
    ops = make_operands(lead, 8, 7, 3)
    for grads in [("x",), ("d",), ("bias",), ("d", "V"), ("U",)]:
        assert_matches_reference(torch_backend, ops, torch.float64, grads=grads)


def _saved_numel(fn):
    """Elements of every tensor autograd saves during fn(), keyed by shape."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_frozen_factors_save_z_not_x():
    T, n_in, n_out, k = 64, 48, 40, 4
    ops = make_operands((T,), n_in, n_out, k).cast(torch.float32, ("x", "d"))
    frozen = {id(t) for t in (ops.U, ops.d, ops.V, ops.bias, ops.weight)}
    saved = _saved_numel(lambda: sk.spectral_linear(*ops.as_tuple(), backend="torch"))
    activations = [t for t in saved if id(t) not in frozen]
    assert [tuple(t.shape) for t in activations] == [(T, k)]
    assert not any(t is ops.x for t in saved)


def test_trainable_V_saves_x():
    ops = make_operands((16,), 12, 10, 3).cast(torch.float32, ("x", "d", "V"))
    saved = _saved_numel(lambda: sk.spectral_linear(*ops.as_tuple(), backend="torch"))
    assert any(t is ops.x for t in saved)


def test_opcheck_forward_and_backward_ops():
    ops = make_operands((2, 5), 9, 7, 3).cast(torch.float64, ("x", "d", "bias"))
    torch.library.opcheck(_spectral_linear_op, (*ops.as_tuple(), None, "torch", "torch"))
    dy = torch.randn(2, 5, 7, dtype=torch.float64)
    z = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.library.opcheck(_spectral_linear_backward_op, (dy, z, ops.U, ops.d.detach(), ops.V, ops.weight, None, "torch"))


def test_torch_compile_fullgraph():
    ops = make_operands((2, 5), 9, 7, 3).cast(torch.float32, ("x", "d"))
    fn = torch.compile(lambda *a: sk.spectral_linear(*a, backend="torch"), fullgraph=True, backend="aot_eager")
    y = fn(*ops.as_tuple())
    y.sum().backward()
    ref = make_operands((2, 5), 9, 7, 3)  # same seed stream is not needed: compare with eager
    eager = ops.cast(torch.float32, ("x", "d"))
    y_eager = sk.spectral_linear(*eager.as_tuple(), backend="torch")
    y_eager.sum().backward()
    assert rel_err(y, y_eager) < 1e-6
    assert rel_err(ops.x.grad, eager.x.grad) < 1e-6
    assert rel_err(ops.d.grad, eager.d.grad) < 1e-6
    del ref


def test_weight_requiring_grad_is_refused():
    ops = make_operands((4,), 6, 5, 2).cast(torch.float32, ("x", "weight"))
    with pytest.raises(RuntimeError, match="weight is frozen"):
        sk.spectral_linear(*ops.as_tuple(), backend="torch")


# --- bad input ------------------------------------------------------------------------------------
def _good():
    return make_operands((4,), 6, 5, 2).cast(torch.float32)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("x", torch.zeros(4, 7), r"x's last dim must equal V.shape\[0\] = in_features = 6.*\(4, 7\).*\(6, 2\)"),
        ("U", torch.zeros(5, 3), r"U must have k = V.shape\[1\] = 2 columns; got U of shape \(5, 3\)"),
        ("d", torch.zeros(3), r"d must have shape \(2,\).*got \(3,\)"),
        ("bias", torch.zeros(4), r"bias must have shape \(5,\).*got \(4,\)"),
        ("weight", torch.zeros(6, 5), r"weight must have shape \(out, in\) = \(5, 6\).*got \(6, 5\)"),
        ("U", torch.zeros(5), r"U must be 2-D, got shape \(5,\)"),
        ("d", torch.zeros(2, 1), r"d must be 1-D"),
    ],
)
def test_shape_errors_name_the_argument(name, bad, match):
    ops = _good()
    setattr(ops, name, bad)
    with pytest.raises(ValueError, match=match):
        sk.spectral_linear(*ops.as_tuple())


def test_integer_and_mixed_dtypes_are_refused():
    ops = _good()
    with pytest.raises(TypeError, match="x must be a floating tensor.*torch.int64"):
        sk.spectral_linear(ops.x.long(), *ops.as_tuple()[1:])
    ops.d = ops.d.double()
    with pytest.raises(TypeError, match="d must have x's dtype torch.float32, got torch.float64"):
        sk.spectral_linear(*ops.as_tuple())


def test_mixed_devices_are_refused():
    ops = _good()
    ops.V = ops.V.to("meta")
    with pytest.raises(ValueError, match="V is on meta but x is on cpu"):
        sk.spectral_linear(*ops.as_tuple())


def test_non_tensor_is_refused():
    ops = _good()
    with pytest.raises(TypeError, match="U must be a torch.Tensor, got list"):
        sk.spectral_linear(ops.x, [[1.0]], ops.d, ops.V)


# --- backend selection --------------------------------------------------------------------------
def _calls_backend(monkeypatch):
    """Record which concrete backend each spectral_linear call resolves to."""
    import spectral_kernels.ops.spectral_linear as mod

    seen = []
    real = mod.resolve_backend

    def spy(backend, device, dtype=None, shape=None, phase="forward", has_weight=True):
        if phase == "forward":
            seen.append(real(backend, device, dtype, shape, phase, has_weight))
        return "torch"  # run on torch whatever was chosen, so the test runs anywhere

    monkeypatch.setattr(mod, "resolve_backend", spy)
    return seen


def test_backend_argument_env_var_and_context(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # makes triton "available" for CPU tensors
    seen = _calls_backend(monkeypatch)
    ops = _good()
    sk.spectral_linear(*ops.as_tuple())
    monkeypatch.setenv("SPECTRAL_KERNELS_BACKEND", "triton")
    sk.spectral_linear(*ops.as_tuple())
    with sk.use_backend("torch"):
        sk.spectral_linear(*ops.as_tuple())
        sk.spectral_linear(*ops.as_tuple(), backend="triton")
    assert seen == ["torch", "triton", "torch", "triton"]


def test_unknown_backend_names_are_refused(monkeypatch):
    ops = _good()
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        sk.spectral_linear(*ops.as_tuple(), backend="cudnn")
    with pytest.raises(ValueError, match="use_backend: unknown backend"):
        with sk.use_backend("fast"):
            pass
    monkeypatch.setenv("SPECTRAL_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="environment variable SPECTRAL_KERNELS_BACKEND: unknown backend 'gpu'"):
        sk.spectral_linear(*ops.as_tuple())


def test_explicit_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops = _good()
    with pytest.raises(BackendUnavailableError, match="triton kernels need CUDA tensors"):
        sk.spectral_linear(*ops.as_tuple(), backend="triton")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable"):
        sk.spectral_linear(*ops.as_tuple(), backend="cuda")


def test_auto_sends_float64_to_torch_even_on_cuda(monkeypatch):
    from spectral_kernels import backends
    from spectral_kernels import plans

    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: backends.BackendStatus(name, True, "test"))
    monkeypatch.setattr(plans, "prefers_triton", lambda phase, shape, has_weight=True: True)
    cuda = torch.device("cuda")
    assert backends.resolve_backend("auto", cuda, torch.float64) == "torch"
    assert backends.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


def test_auto_follows_the_measured_plans(monkeypatch):
    """"auto" on CUDA: the decode plan's forward to cuda where plans.py says it measured
    faster, triton where a Triton plan did, torch (cuBLAS) otherwise; each direction on its own.
    Checked without a GPU by faking both backends' availability and the plan rules."""
    from spectral_kernels import backends
    from spectral_kernels import plans

    real_status = backends.backend_status
    monkeypatch.setattr(backends, "backend_status", lambda name, device=None: (
        backends.BackendStatus(name, True, "faked") if name in ("cuda", "triton") else real_status(name, device)))
    monkeypatch.setattr(plans, "DECODE_AUTO_MAX_TOKENS", 4)
    monkeypatch.setattr(plans, "prefers_triton",
                        lambda phase, shape, has_weight=True: has_weight and phase == "backward" and shape[0] >= 1024)
    cuda = torch.device("cuda")
    resolve = backends.resolve_backend
    assert resolve("auto", cuda, torch.float16, (4, 4096, 4096, 16), "forward") == "cuda"
    assert resolve("auto", cuda, torch.float16, (4, 4096, 4096, 16), "backward") == "torch"
    assert resolve("auto", cuda, torch.float16, (5, 4096, 4096, 16), "forward") == "torch"
    assert resolve("auto", cuda, torch.float16, (1024, 4096, 4096, 16), "forward") == "torch"
    assert resolve("auto", cuda, torch.float16, (1024, 4096, 4096, 16), "backward") == "triton"
    assert resolve("auto", cuda, torch.float16, (1024, 4096, 4096, 16), "backward", has_weight=False) == "torch"
    assert resolve("auto", cuda, torch.float64, (1, 64, 64, 4)) == "torch"
    with pytest.raises(ValueError, match="phase must be one of"):
        resolve("auto", cuda, torch.float16, (1, 64, 64, 4), "both")


def test_eager_function_and_custom_op_agree():
    """Eager calls take the autograd.Function, compiled graphs the custom op: same outputs and
    gradients, bit for bit, for every operand that can require grad."""
    from spectral_kernels.ops.spectral_linear import _SpectralLinearFunction, _spectral_linear_op

    base = make_operands((2, 5), 9, 7, 3)
    grads = ("x", "U", "d", "V", "bias")
    results = []
    for fn in (_SpectralLinearFunction.apply, _spectral_linear_op):
        ops = base.cast(torch.float32, grads)
        y, z = fn(*ops.as_tuple(), None, "torch", "torch")
        assert z.requires_grad  # z = x·V is differentiable: a double backward goes through it
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        results.append([y.detach(), z.detach()] + [getattr(ops, g).grad for g in grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_measured_plan_rules():
    """The thresholds of plans.py as measured: the fold plan of the triton backend for the delta
    form at T >= FOLD_MIN_TOKENS and k <= FOLD_AUTO_MAX_RANK, torch elsewhere, no decode plan."""
    from spectral_kernels import plans

    big, k_small, k_big = plans.FOLD_MIN_TOKENS, plans.FOLD_AUTO_MAX_RANK, plans.FOLD_AUTO_MAX_RANK + 1
    assert plans.prefers_triton("forward", (big, 4096, 4096, k_small))
    assert plans.prefers_triton("backward", (big, 4096, 4096, k_small))
    assert not plans.prefers_triton("forward", (big, 4096, 4096, k_small), has_weight=False)
    assert not plans.prefers_triton("forward", (big - 1, 4096, 4096, k_small))
    assert not plans.prefers_triton("forward", (big, 4096, 4096, k_big))
    assert not plans.prefers_triton("forward", None)
    assert plans.triton_plan(big, 16, True) == "fold"
    assert plans.triton_plan(big, 16, False) == "fused"
    assert plans.triton_plan(16, plans.FUSED_MAX_RANK + 1, True) == "two_gemm"
    assert not any(plans.prefers_cuda(t, 4096, 4096, 16) for t in range(0, 17))
