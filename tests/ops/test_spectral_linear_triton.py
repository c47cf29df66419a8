"""The triton backend against the float64 reference.

On CPU these run under the Triton interpreter (TRITON_INTERPRET=1, set by README's test command;
fp32 and fp16 only, small shapes). Tests marked gpu run the compiled kernels on CUDA, bf16 and
large shapes included.
"""
import functools

import pytest
import torch
import triton
import triton.language as tl

import spectral_kernels as sk
from spectral_kernels.backends import triton_interpret_enabled
from spectral_kernels.ops.reference import spectral_linear_ref
from spectral_kernels.ops.spectral_linear_triton import _offsets
from tests.helpers import (assert_bank_matches_reference, assert_matches_reference, check_backend_direct,
                           make_bank_operands, make_operands, rel_err)

pytestmark = pytest.mark.skipif(
    not (triton_interpret_enabled() or torch.cuda.is_available()),
    reason="triton kernels need CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpret_enabled() else "cpu"
triton_backend = lambda *a: sk.spectral_linear(*a, backend="triton")  # noqa: E731


def _dtype_id(dtype: torch.dtype) -> str:
    """Test ids name the dtype ("float32"), so that ``-k float32`` selects the float32 cases
    (benchmarks/gpu/run.sh does)."""
    return str(dtype).removeprefix("torch.")

# (leading dims, in, out, k): odd sizes that are not multiples of any block. k=130 walks k in
# several chunks; k=300 > FUSED_MAX_RANK takes the two-GEMM plan.
SHAPES = [((7,), 37, 53, 5), ((7,), 37, 53, 130), ((2, 3, 5), 37, 53, 5), ((1,), 19, 33, 17), ((5,), 311, 301, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("lead,n_in,n_out,k", SHAPES)
def test_triton_matches_reference(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device=DEVICE)
    assert_matches_reference(triton_backend, ops, dtype)


@pytest.mark.parametrize("bias,weight", [(False, True), (True, False), (False, False)])
def test_triton_optional_bias_and_weight_float32(bias, weight):
    ops = make_operands((9,), 37, 53, 5, bias=bias, weight=weight, device=DEVICE)
    assert_matches_reference(triton_backend, ops, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
def test_triton_non_contiguous_x(dtype):
    ops = make_operands((3, 7), 37, 53, 5, transpose_x=True, device=DEVICE)
    assert not ops.x.is_contiguous()
    assert_matches_reference(triton_backend, ops, dtype)


def test_triton_trainable_factors_float32():
    ops = make_operands((2, 7), 37, 53, 5, device=DEVICE)
    report = assert_matches_reference(triton_backend, ops, torch.float32, grads=("x", "U", "d", "V", "bias"))
    assert set(report) == {"y", "dx", "dU", "dd", "dV", "dbias"}


def test_triton_plans_agree_float32():
    """The fused plan (d applied on chip) and the two-GEMM plan (z ⊙ d from the epilogue) agree."""
    from spectral_kernels.ops import spectral_linear_triton as tri

    ops = make_operands((11,), 37, 53, 20, device=DEVICE).cast(torch.float32)
    z, zd, _ = tri.lowrank_project(ops.x, ops.V, d=ops.d)
    fused = tri.dense_plus_lowrank(ops.x, ops.weight, z, ops.d, ops.U, ops.bias)
    two_gemm = tri.dense_plus_lowrank(ops.x, ops.weight, zd, None, ops.U, ops.bias)
    torch.testing.assert_close(fused, two_gemm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(zd, z * ops.d)


@pytest.mark.parametrize("plan", ["fused", "two_gemm", "fold"])
def test_triton_every_plan_matches_reference_float32(plan):
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


def test_triton_opcheck_float32():
    from spectral_kernels.ops.spectral_linear import _spectral_linear_op

    ops = make_operands((2, 5), 37, 19, 3, device=DEVICE).cast(torch.float32, ("x", "d", "bias"))
    torch.library.opcheck(_spectral_linear_op, (*ops.as_tuple(), None, "triton", "triton"))


def test_triton_refuses_float64():
    ops = make_operands((3,), 8, 6, 2, device=DEVICE)
    with pytest.raises(TypeError, match="triton backend computes in float16, bfloat16 or float32; got torch.float64"):
        sk.spectral_linear(*ops.as_tuple(), backend="triton")


# --- views of d, bias and the adapter index: every operand is read through its strides -------------
def _direct(plan=None):
    from spectral_kernels.ops import spectral_linear_triton as tri

    return (lambda *a: tri.spectral_linear_fwd_triton(*a, plan=plan),
            lambda *a: tri.spectral_linear_bwd_triton(*a, plan=plan))


@pytest.mark.parametrize("view", ["broadcast", "sliced"])
def test_triton_bank_index_views_float32(view):
    """An index broadcast from one value (stride 0, what spectral_linear passes for
    adapter_index=torch.tensor([a])) and a sliced one (stride 3) give the reference's y, z, dx, dd
    and g: the dense kernel reads the index through its stride."""
    tokens, n = 13, 4
    ops = make_bank_operands((tokens,), 37, 53, 5, n, device=DEVICE).cast(torch.float32)
    if view == "broadcast":
        idx = torch.tensor([2], device=DEVICE).expand(tokens)
        assert idx.stride() == (0,)
    else:
        idx = torch.randint(0, n, (3 * tokens,), device=DEVICE)[::3]
    dy = torch.randn(tokens, 53, device=DEVICE)
    check_backend_direct(*_direct(), ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, dy, idx)


def test_triton_one_index_for_every_token_through_the_op_float32():
    """adapter_index=torch.tensor([1]) broadcast over x [3, 7, in]: y, dx, dd and dbias as the reference."""
    ops = make_bank_operands((3, 7), 29, 21, 6, 3, device=DEVICE)
    ours = assert_bank_matches_reference(functools.partial(sk.spectral_linear, backend="triton"), ops,
                                         torch.float32, torch.tensor([1], device=DEVICE))
    assert torch.count_nonzero(ours["dd"][[0, 2]]) == 0


def test_triton_strided_bank_and_bias_float32():
    """A bank whose rows and columns are both strided (every other column of a wider tensor) and
    a bias with stride 2: y, dx and dd (forward and dx gather d[idx[m], r] by both strides)."""
    tokens, n_in, n_out, k, n = 19, 37, 53, 6, 5
    ops = make_bank_operands((tokens,), n_in, n_out, k, n, device=DEVICE).cast(torch.float32)
    wide = torch.randn(n, 2 * k + 3, device=DEVICE)
    bank = wide[:, 1:2 * k + 1:2]
    bias = torch.randn(2 * n_out, device=DEVICE)[::2]
    assert bank.stride() == (2 * k + 3, 2) and bias.stride() == (2,)
    idx = torch.randint(0, n, (tokens,), device=DEVICE)
    dy = torch.randn(tokens, n_out, device=DEVICE)
    check_backend_direct(*_direct(), ops.x, ops.U, bank, ops.V, bias, ops.weight, dy, idx)


@pytest.mark.parametrize("plan", ["fused", "two_gemm", "fold"])
def test_triton_strided_d_and_bias_float32(plan):
    """One d [k] and a bias read with strides 3 and 2 (slices of wider tensors), on every plan."""
    tokens, n_in, n_out, k = 11, 37, 53, 7
    ops = make_operands((tokens,), n_in, n_out, k, device=DEVICE).cast(torch.float32)
    d = torch.randn(3 * k, device=DEVICE)[::3]
    bias = torch.randn(2 * n_out, device=DEVICE)[::2]
    dy = torch.randn(tokens, n_out, device=DEVICE)
    check_backend_direct(*_direct(plan), ops.x, ops.U, d, ops.V, bias, ops.weight, dy)


def test_triton_bank_index_out_of_range_float32():
    """Index values outside 0..n-1 (possible only under torch.compile, which does not read the
    values): those tokens' y and dx rows are NaN, as on the cuda backend, their z ⊙ g adds to no
    row of dd, and every other token is computed as if they were absent."""
    from spectral_kernels.ops import spectral_linear_triton as tri
    from spectral_kernels.ops.reference import spectral_linear_bwd_ref, spectral_linear_fwd_ref

    tokens, n = 10, 3
    ops = make_bank_operands((tokens,), 21, 17, 4, n, device=DEVICE).cast(torch.float32)
    idx = torch.tensor([0, 3, 1, -1, 2, 2, 7, 0, 1, 2], device=DEVICE)
    bad = (idx < 0) | (idx >= n)
    dy = torch.randn(tokens, 17, device=DEVICE)
    y, z = tri.spectral_linear_fwd_triton(ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, idx)
    dx, dd, g = tri.spectral_linear_bwd_triton(dy, z, ops.U, ops.d, ops.V, ops.weight, idx)
    assert torch.isnan(y[bad]).all() and torch.isnan(dx[bad]).all()
    assert torch.isfinite(g).all() and torch.isfinite(dd).all()
    good = ~bad
    f64 = lambda t: t.double()  # noqa: E731
    y_ref, z_ref = spectral_linear_fwd_ref(*map(f64, (ops.x[good], ops.U, ops.d, ops.V, ops.bias, ops.weight)), idx[good])
    dx_ref, dd_ref, _ = spectral_linear_bwd_ref(f64(dy[good]), z_ref, *map(f64, (ops.U, ops.d, ops.V, ops.weight)), idx[good])
    torch.testing.assert_close(y[good].double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx[good].double(), dx_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dd.double(), dd_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.double(), f64(dy) @ f64(ops.U), rtol=1e-4, atol=1e-4)


@triton.jit
def _offsets_probe(out_ptr, stride_row, stride_col, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], _offsets(rows, cols, stride_row, stride_col))


def test_triton_offsets_do_not_wrap_at_2_31_int64():
    """The kernels' element offsets (``_offsets``: every load and store of the four kernels) are
    int64 even when the strides arrive as int32: a column-major x [T, in] has stride_ak = T, and
    kk·T passes 2³¹ once T·in does. Here 63·2²⁶ ≈ 4.2e9 must come out exact, not wrapped."""
    stride_row, stride_col = 3, 2**26  # both fit int32, so the launcher passes them as int32
    out = torch.empty(16, 64, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, stride_row, stride_col, ROWS=16, COLS=64)
    rows = torch.arange(16, dtype=torch.int64, device=DEVICE)[:, None]
    cols = torch.arange(64, dtype=torch.int64, device=DEVICE)[None, :]
    assert torch.equal(out, rows * stride_row + cols * stride_col)
    assert int(out.max()) > 2**31


# --- on a GPU ------------------------------------------------------------------------------------
# bf16 and fp32 only: fp16 takes every code path bf16 takes (same tiles, tensor-core dots, only the
# element type differs) and runs on CPU under the interpreter above. Each (dtype, shape class)
# compiles its own kernel specialisations, seconds each: this keeps the GPU file to minutes.
GPU_DTYPES = [torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("lead,n_in,n_out,k", [((3, 129), 1000, 777, 16), ((1000,), 4096, 1024, 64), ((513,), 1024, 1100, 300)])
def test_triton_gpu_large(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device="cuda")
    assert_matches_reference(triton_backend, ops, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
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
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=_dtype_id)
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
# Largest dynamic shared memory a block may opt into (CUDA programming guide, per capability):
# A100 (sm_80) 163 KiB = 166,912 B, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.slow
def test_kernels_compile_for_ampere_and_hopper():
    """Every kernel variant the launchers use (the dense kernel's bank gather HAS_INDEX and pure
    form, the projection kernel's per-adapter rows HAS_ROWS, fold and segment sum included)
    compiles to sm_80 and sm_90 machine code and fits in that architecture's shared memory: the
    interpreter alone would not catch codegen errors or a pipelining depth that overflows it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("aot_compile_triton.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script), *map(str, SHARED_LIMIT)], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    # per dtype: dense 2 directions × 2 (delta, pure) × 3 (d applied, d pre-applied, bank gather),
    # projection 5 (4 epilogue sets + the bank rows), fold, segment sum
    assert len(rows) == 2 * 3 * (12 + 5 + 1 + 1)
    assert sum(r["variant"].get("HAS_INDEX", False) for r in rows) == 2 * 3 * 4
    assert sum(r["variant"].get("HAS_ROWS", False) for r in rows) == 2 * 3
    for row in rows:
        assert row["shared"] <= SHARED_LIMIT[row["capability"]], row
