"""The triton backend against the float64 reference.

On CPU these run under the Triton interpreter (TRITON_INTERPRET=1, set by README's test command;
fp32 and fp16 only, small shapes). Tests marked gpu run the compiled kernels on CUDA, bf16 and
large shapes included.
"""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.ops.reference import spectral_linear_ref
from tests.helpers import assert_matches_reference, check_backend_direct, make_operands, rel_err

pytestmark = pytest.mark.skipif(
    not (triton_interpret_enabled() or torch.cuda.is_available()),
    reason="triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret_enabled() else "cpu"
triton_backend = lambda *a: sk.spectral_linear(*a, backend="triton")  # noqa: E731

# (leading dims, in, out, k): odd sizes that are not multiples of any block. k=130 walks k in
# several chunks; k=300 > FUSED_MAX_RANK takes the two-GEMM plan.
SHAPES = [((7,), 37, 53, 5), ((7,), 37, 53, 130), ((2, 3, 5), 37, 53, 5), ((1,), 19, 33, 17), ((5,), 311, 301, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,n_in,n_out,k", SHAPES)
def test_triton_matches_reference(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device=DEVICE)
    assert_matches_reference(triton_backend, ops, dtype)


@pytest.mark.parametrize("bias,weight", [(False, True), (True, False), (False, False)])
def test_triton_optional_bias_and_weight(bias, weight):
    ops = make_operands((9,), 37, 53, 5, bias=bias, weight=weight, device=DEVICE)
    assert_matches_reference(triton_backend, ops, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_non_contiguous_x(dtype):
    ops = make_operands((3, 7), 37, 53, 5, transpose_x=True, device=DEVICE)
    assert not ops.x.is_contiguous()
    assert_matches_reference(triton_backend, ops, dtype)


def test_triton_trainable_factors():
    ops = make_operands((2, 7), 37, 53, 5, device=DEVICE)
    report = assert_matches_reference(triton_backend, ops, torch.float32, grads=("x", "U", "d", "V", "bias"))
    assert set(report) == {"y", "dx", "dU", "dd", "dV", "dbias"}


def test_triton_plans_agree():
    """The fused plan (d applied on chip) and the two-GEMM plan (z ⊙ d from the epilogue) agree."""
    from spectral_kernels.ops import spectral_linear_triton as tri

    ops = make_operands((11,), 37, 53, 20, device=DEVICE).cast(torch.float32)
    z, zd, _ = tri.lowrank_project(ops.x, ops.V, d=ops.d)
    fused = tri.dense_plus_lowrank(ops.x, ops.weight, z, ops.d, ops.U, ops.bias)
    two_gemm = tri.dense_plus_lowrank(ops.x, ops.weight, zd, None, ops.U, ops.bias)
    torch.testing.assert_close(fused, two_gemm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zd, z * ops.d)


@pytest.mark.parametrize("plan", ["fused", "two_gemm", "fold"])
def test_triton_every_plan_matches_reference(plan):
    """Each plan of the triton backend, forced, against the float64 reference (the automatic choice
    by shape would reach "fold" only at thousands of tokens)."""
    from spectral_kernels.ops import spectral_linear_triton as tri
    from tests.helpers import check_backend_direct

    ops = make_operands((9,), 37, 53, 20, device=DEVICE).cast(torch.float32)
    dy = torch.randn(9, 53, device=DEVICE)
    check_backend_direct(lambda *a: tri.spectral_linear_fwd_triton(*a, plan=plan),
                         lambda *a: tri.spectral_linear_bwd_triton(*a, plan=plan), *ops.as_tuple(), dy)


def test_fold_weight_matches_addmm():
    from spectral_kernels.ops import spectral_linear_triton as tri

    for dtype in (torch.float32, torch.float16):
        W, U = torch.randn(45, 70, device=DEVICE), torch.randn(45, 21, device=DEVICE)
        d, V = torch.randn(21, device=DEVICE), torch.randn(70, 21, device=DEVICE)
        W, U, d, V = (t.to(dtype) for t in (W, U, d, V))
        exact = torch.addmm(W.double(), (U * d).double(), V.double().t())
        plain = torch.addmm(W.float(), (U * d).float(), V.float().t()).to(dtype)
        got = tri.fold_weight(W, U, d, V.t().contiguous().t())  # V through its strides too
        assert got.dtype == dtype
        assert rel_err(got, exact) <= 2 * rel_err(plain, exact) + torch.finfo(dtype).eps / 8


def test_triton_opcheck():
    from spectral_kernels.ops.spectral_linear import _spectral_linear_op

    ops = make_operands((2, 5), 37, 19, 3, device=DEVICE).cast(torch.float32, ("x", "d", "bias"))
    torch.library.opcheck(_spectral_linear_op, (*ops.as_tuple(), None, "triton", "triton"))


def test_triton_refuses_float64():
    ops = make_operands((3,), 8, 6, 2, device=DEVICE)
    with pytest.raises(TypeError, match="triton backend computes in float16, bfloat16 or float32; got torch.float64"):
        sk.spectral_linear(*ops.as_tuple(), backend="triton")


# --- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n_in,n_out,k", [((3, 129), 1000, 777, 16), ((1000,), 4096, 1024, 64), ((513,), 1024, 1100, 300)])
def test_triton_gpu_large(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device="cuda")
    assert_matches_reference(triton_backend, ops, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 131])
def test_triton_gpu_strided_operands(dtype, tokens):
    """The launchers called directly with what the op's reshape never produces: column-major x and
    dy, a weight with padded rows (in % 8 != 0), transposed factors."""
    from spectral_kernels.ops import spectral_linear_triton as tri

    n_in, n_out, k = 45, 70, 6
    ops = make_operands((tokens,), n_in, n_out, k, device="cuda").cast(dtype)
    x = torch.randn(n_in, tokens, device="cuda", dtype=dtype).t()
    dy = torch.randn(n_out, tokens, device="cuda", dtype=dtype).t()
    weight = (torch.randn(n_out, n_in + 19, device="cuda", dtype=dtype) / n_in**0.5)[:, :n_in]
    U, V = ops.U.t().contiguous().t(), ops.V.t().contiguous().t()
    check_backend_direct(tri.spectral_linear_fwd_triton, tri.spectral_linear_bwd_triton,
                         x, U, ops.d, V, ops.bias, weight, dy)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gpu_expanded_dy(dtype):
    """y.sum().backward(): the backward's dy is expanded, strides (0, 0)."""
    base = make_operands((129,), 37, 53, 5, device="cuda")
    grads = ("x", "d", "bias")
    ours, exact, plain = base.cast(dtype, grads), base.cast(torch.float64, grads), base.cast(dtype, grads)
    triton_backend(*ours.as_tuple()).sum().backward()
    spectral_linear_ref(*exact.as_tuple()).sum().backward()
    spectral_linear_ref(*plain.as_tuple()).sum().backward()
    for name in grads:
        got, ref, pl = getattr(ours, name).grad, getattr(exact, name).grad, getattr(plain, name).grad
        assert rel_err(got, ref) <= 2 * rel_err(pl, ref) + torch.finfo(dtype).eps / 8, name


@pytest.mark.gpu
def test_auto_on_cuda_follows_the_measured_plans():
    from spectral_kernels.backends import resolve_backend
    from spectral_kernels import plans

    cuda = torch.device("cuda")
    for phase in ("forward", "backward"):
        shape = (8192, 4096, 4096, 16)
        want = "triton" if plans.prefers_triton(phase, shape, True) else "torch"
        assert resolve_backend("auto", cuda, torch.bfloat16, shape, phase) == want


# --- compiled for real GPUs, without one ----------------------------------------------------------
# Largest dynamic shared memory a block may opt into (CUDA programming guide, per capability).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    """Every kernel variant the launchers use compiles to sm_80 and sm_90 machine code and fits
    in that architecture's shared memory: the interpreter alone would not catch codegen errors."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("aot_compile_triton.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), *map(str, SHARED_LIMIT)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 2 * 3 * 8  # capabilities × dtypes × variants
    for row in rows:
        assert row["shared"] <= SHARED_LIMIT[row["capability"]], row
