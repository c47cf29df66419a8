"""The compiled extension spectral_kernels._C on any machine (CPU CI included): it imports without a
GPU or a driver, reports what it was built for, and refuses what would fault on a device with a
clear Python exception. Skipped where _C is not built (pip install on a machine without a GPU or
nvcc; SPECTRAL_KERNELS_CUDA=1 pip install -e . builds it with nvcc and no GPU)."""
import re
import subprocess

import pytest
import torch

import spectral_kernels as sk
from spectral_kernels import _ext
from spectral_kernels.backends import BackendUnavailableError
from spectral_kernels.ops import spectral_linear_cuda as cuda_ops

needs_ext = pytest.mark.skipif(_ext._C is None, reason=f"spectral_kernels._C is not built ({_ext.IMPORT_ERROR}); {_ext.REBUILD_HINT}")
no_device = pytest.mark.skipif(
    _ext._C is not None and _ext._C.device_count()[0] > 0,
    reason="launching on bogus pointers is only safe with no CUDA device",
)


def _cpu_operands(tokens=3, n_in=8, n_out=5, k=2):
    g = torch.randn
    return g(tokens, n_in), g(n_out, k), g(k), g(n_in, k), g(n_out), g(n_out, n_in)


def test_missing_extension_names_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", "No module named 'spectral_kernels._C'")
    with pytest.raises(RuntimeError, match="SPECTRAL_KERNELS_CUDA=1 pip install"):
        _ext.extension()
    assert not _ext.cuda_status(None)[0]
    assert "not built" in _ext.extension_summary()
    assert _ext.compiled_archs() == []


@needs_ext
def test_compiled_archs_are_reported():
    archs = _ext.compiled_archs()
    assert archs, "compiled_archs() is empty"
    assert all(re.fullmatch(r"\d+-(real|virtual)", a) for a in archs), archs
    assert all(int(a.split("-")[0]) >= 80 for a in archs)
    assert "built for" in _ext.extension_summary()
    assert _ext._C.cuda_runtime_version() >= 11000


@needs_ext
def test_cuda_runtime_is_linked_statically():
    """Importing _C must not need libcudart.so (CPU machines have none)."""
    out = subprocess.run(["ldd", _ext._C.__file__], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"ldd unavailable: {out.stderr.strip()}")
    assert "libcudart" not in out.stdout, out.stdout


@needs_ext
def test_device_count_never_raises():
    count, error = _ext._C.device_count()
    assert count >= 0
    if count == 0:
        assert error  # the CUDA error, in words


@needs_ext
def test_runs_on_reads_sass_and_ptx(monkeypatch):
    monkeypatch.setattr(_ext, "compiled_archs", lambda: ["80-real", "90-real", "90-virtual"])
    assert _ext.runs_on((8, 0)) and _ext.runs_on((8, 6)) and _ext.runs_on((9, 0))
    assert _ext.runs_on((10, 0))  # PTX of sm_90, JIT-compiled
    assert not _ext.runs_on((7, 5))
    monkeypatch.setattr(_ext, "compiled_archs", lambda: ["90-real"])
    assert not _ext.runs_on((8, 9)) and not _ext.runs_on((10, 0))


@needs_ext
@pytest.mark.parametrize("tokens", [3, 40])  # decode plan, then cuBLAS
def test_cpu_tensors_are_refused_before_any_pointer(tokens):
    x, U, d, V, bias, weight = _cpu_operands(tokens)
    with pytest.raises(ValueError, match=r"x must be a CUDA tensor.*cpu"):
        cuda_ops.spectral_linear_fwd_cuda(x, U, d, V, bias, weight)
    dy, z = torch.randn(tokens, 5), torch.randn(tokens, 2)
    with pytest.raises(ValueError, match=r"dy must be a CUDA tensor"):
        cuda_ops.spectral_linear_bwd_cuda(dy, z, U, d, V, weight)
    with pytest.raises(ValueError, match=r"z must be a CUDA tensor"):
        cuda_ops.coeff_and_bias_grads(dy, z, z.clone())


def test_public_function_refuses_cpu_tensors_on_cuda_backend():
    x, U, d, V, bias, weight = _cpu_operands()
    with pytest.raises(BackendUnavailableError, match="cuda"):
        sk.spectral_linear(x, U, d, V, bias, weight, backend="cuda")


@needs_ext
def test_wrapper_checks_dtypes_and_shapes():
    # fakes run the same checks without a device: meta tensors reach them on CPU
    m = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    with pytest.raises(TypeError, match="U has dtype torch.float16"):
        torch.ops.spectral_kernels.cuda_decode_forward(m(3, 8), m(5, 2, dtype=torch.float16), m(2), m(8, 2), None, None)
    with pytest.raises(TypeError, match="float64"):
        torch.ops.spectral_kernels.cuda_lowrank_gemm(m(3, 8, dtype=torch.float64), m(8, 5, dtype=torch.float64),
                                                     None, None, None, None)
    with pytest.raises(ValueError, match=r"V must have shape \(8, 2\)"):
        torch.ops.spectral_kernels.cuda_decode_forward(m(3, 8), m(5, 2), m(2), m(9, 2), None, None)
    with pytest.raises(ValueError, match="1 to 16 rows"):
        torch.ops.spectral_kernels.cuda_decode_forward(m(17, 8), m(5, 2), m(2), m(8, 2), None, None)
    with pytest.raises(ValueError, match=r"b2 must have shape \(2, 5\)"):
        torch.ops.spectral_kernels.cuda_lowrank_gemm(m(40, 8), m(8, 5), m(40, 2), m(3, 5), None, None)


@needs_ext
def test_bindings_check_bank_arguments_before_any_device_call():
    """The adapter-bank arguments of _C (bank matrix, int64 index vector, n) are checked in the
    bindings, naming the argument, before anything asks the driver (no GPU needed)."""
    C = _ext.extension()
    mat, vec = (1, 1, 1), (1, 1)
    gemm = (None, None, mat, mat)
    with pytest.raises(ValueError, match="^scale_index: the bank scale_bank and scale_index go together"):
        C.lowrank_gemm(*gemm, None, None, mat, 4, 4, 0, 4, 1, 0, scale_bank=mat)
    with pytest.raises(ValueError, match="^scale: give scale or scale_bank"):
        C.lowrank_gemm(*gemm, vec, None, mat, 4, 4, 0, 4, 1, 0, scale_bank=mat, scale_index=vec, n_adapters=2)
    with pytest.raises(ValueError, match="^scale_index: null device pointer"):
        C.lowrank_gemm(*gemm, None, None, mat, 4, 4, 0, 4, 1, 0, scale_bank=mat, scale_index=(0, 1), n_adapters=2)
    with pytest.raises(ValueError, match="^n_adapters: must be positive"):
        C.lowrank_gemm(*gemm, None, None, mat, 4, 4, 0, 4, 1, 0, scale_bank=mat, scale_index=vec, n_adapters=0)
    decode = (mat, mat, None, mat, None, None, mat, mat, 1, 1, 10, 10, 3, 8, 5, 2, 0, 0)
    with pytest.raises(ValueError, match="^d: required, got None"):
        C.spectral_linear_decode_fwd(*decode)
    with pytest.raises(ValueError, match="^adapter_index: the bank d_bank and adapter_index go together"):
        C.spectral_linear_decode_fwd(*decode, d_bank=mat)
    with pytest.raises(ValueError, match="^d: give d"):
        C.spectral_linear_decode_fwd(*(decode[:2] + (vec,) + decode[3:]), d_bank=mat, adapter_index=vec, n_adapters=2)
    with pytest.raises(ValueError, match="^order: null device pointer"):
        C.bank_coeff_grads(mat, mat, 0, 1, 1, 4, 4, 2, 0, 0)
    with pytest.raises(ValueError, match="^adapter_index: needs a bank of n > 0 rows"):
        C.bank_coeff_grads(mat, mat, 1, 1, 1, 4, 4, 0, 0, 0)


@needs_ext
def test_fakes_give_output_shapes():
    m = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    y, z = torch.ops.spectral_kernels.cuda_decode_forward(m(3, 8), m(5, 2), m(2), m(8, 2), m(5), m(5, 8))
    assert y.shape == (3, 5) and z.shape == (3, 2)
    out = torch.ops.spectral_kernels.cuda_lowrank_gemm(m(40, 8), m(8, 5), m(40, 2), m(2, 5), m(2), m(5))
    assert out.shape == (40, 5)
    dd, db = torch.ops.spectral_kernels.cuda_coeff_and_bias_grads(m(40, 2), m(40, 2), m(40, 5))
    assert dd.shape == (2,) and dd.dtype == torch.float32 and db.shape == (5,)


@needs_ext
def test_bindings_name_the_bad_argument():
    C = _ext._C
    with pytest.raises(ValueError, match="^x: null device pointer"):
        C.spectral_linear_decode_fwd((0, 8, 1), (16, 2, 1), (16, 1), (16, 2, 1), None, None, (16, 5, 1),
                                     (16, 2, 1), 16, 16, 64, 8, 3, 8, 5, 2, 0, 0)
    with pytest.raises(ValueError, match="^dtype: unknown dtype code 7"):
        C.lowrank_gemm((16, 4, 1), (16, 4, 1), None, None, None, None, (16, 4, 1), 4, 4, 4, 0, 7, 0)
    with pytest.raises(ValueError, match="^p.T: must be at most 16"):
        C.spectral_linear_decode_fwd((16, 8, 1), (16, 2, 1), (16, 1), (16, 2, 1), None, None, (16, 5, 1),
                                     (16, 2, 1), 16, 16, 64, 8, 17, 8, 5, 2, 0, 0)
    with pytest.raises(ValueError, match="^b1: required"):
        C.lowrank_gemm((16, 4, 1), None, None, None, None, None, (16, 4, 1), 4, 4, 4, 0, 0, 0)


@needs_ext
@no_device
def test_launch_without_a_device_raises_naming_the_kernel():
    """No GPU or driver: the launch fails, and the error names the kernel and the CUDA error."""
    C = _ext._C
    mat = (16, 4, 1)
    with pytest.raises(RuntimeError, match=r"^lowrank_gemm_fma: CUDA error cuda\w+"):
        C.lowrank_gemm(mat, mat, None, None, None, None, mat, 4, 4, 4, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"^spectral_linear_decode_fwd\[?.*CUDA error"):
        C.spectral_linear_decode_fwd(mat, mat, (16, 1), mat, None, None, mat, mat, 16, 16, 64, 8, 3, 4, 4, 4,
                                     1, 0)
    with pytest.raises(RuntimeError, match=r"^decode_workspace_sizes: CUDA error cuda\w+"):
        C.decode_workspace_sizes(3, 4, 4, 0)
    with pytest.raises(RuntimeError, match=r"^coeff_and_bias_grads: CUDA error"):
        C.coeff_and_bias_grads(mat, mat, None, 16, 0, 3, 4, 0, 2, 0)


@needs_ext
def test_decode_workspace_sizes_checks_its_arguments():
    C = _ext._C
    with pytest.raises(ValueError, match="^tokens: must be at most 16"):
        C.decode_workspace_sizes(17, 8, 2, 0)
    with pytest.raises(ValueError, match="^rank: must be positive"):
        C.decode_workspace_sizes(3, 8, 0, 0)
    with pytest.raises(ValueError, match="^device: must be a CUDA device index"):
        C.decode_workspace_sizes(3, 8, 2, -1)


@needs_ext
@pytest.mark.parametrize("sm_count", [1, 7, 132, 170])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("n_in,k", [(1, 1), (37, 5), (257, 130), (4096, 64), (4096, 16), (14336, 128),
                                    (65536, 8), (300, 5000)])
def test_decode_plan_splits_z_over_the_device(sm_count, tokens, n_in, k):
    """The decode plan's layout (no device needed): z blocks at least as many as multiprocessors
    where `in` has rows enough, split sizes that the kernel's shared memory and row step hold, and
    the workspace sizes (decode_workspace_sizes and the launch's check compute them the same way)."""
    plan = _ext._C.decode_plan(tokens, n_in, 300, k, sm_count)
    granule, chunk = 32, (512 if tokens > 4 else 2048)
    rows, splits = plan["split_rows"], plan["splits"]
    assert rows % granule == 0 and granule <= rows <= chunk
    assert splits == -(-n_in // rows) and (splits - 1) * rows < n_in
    assert plan["col_tiles"] == -(-k // 32) and plan["z_blocks"] == splits * plan["col_tiles"]
    most = -(-n_in // granule) * plan["col_tiles"]  # every split a single granule
    assert plan["z_blocks"] >= min(sm_count, most)
    assert plan["rows_per_block"] == (16 if tokens > 4 else 32)
    assert plan["y_blocks"] == -(-300 // plan["rows_per_block"])
    assert plan["blocks"] == plan["z_blocks"] + plan["y_blocks"]
    assert plan["n_float"] == (splits + 1) * tokens * k and plan["n_int"] == 3 + plan["col_tiles"]


@needs_ext
def test_decode_plan_checks_its_arguments():
    with pytest.raises(ValueError, match="^sm_count: must be positive"):
        _ext._C.decode_plan(3, 8, 5, 2, 0)
    with pytest.raises(ValueError, match="^out_features: must be positive"):
        _ext._C.decode_plan(3, 8, 0, 2, 132)


def test_prefers_cuda_only_where_the_decode_plan_measured_faster(monkeypatch):
    from spectral_kernels import plans

    assert not any(cuda_ops.prefers_cuda(t, 4096, 4096, 16, torch.float16) for t in range(17))  # as measured
    monkeypatch.setattr(plans, "DECODE_AUTO_MAX_TOKENS", 4)
    assert cuda_ops.prefers_cuda(1, 4096, 4096, 16, torch.float16)
    assert cuda_ops.prefers_cuda(4, 4096, 4096, 16, torch.bfloat16)
    assert not cuda_ops.prefers_cuda(5, 4096, 4096, 16, torch.float16)
    assert not cuda_ops.prefers_cuda(17, 4096, 4096, 16, torch.float16)  # mma plan: never
    assert not cuda_ops.prefers_cuda(0, 4096, 4096, 16, torch.float16)
    assert not cuda_ops.prefers_cuda(1, 4096, 4096, 16, torch.float64)


@pytest.mark.parametrize("bank", [False, True])
@pytest.mark.parametrize("weight", [True, False])
def test_past_the_decode_plan_the_cuda_backend_runs_cublas(monkeypatch, bank, weight):
    """T > 16: the forward and dx are torch GEMMs (cuBLAS on a device), never the WMMA GEMM of
    _C (36-43x slower than cuBLAS on an H100); dd comes from the hand-written reductions (stood in
    for here by the reference, the device checks lifted, on CPU). y, z, dx and dd match float64."""
    from spectral_kernels.ops import reference

    monkeypatch.setattr(cuda_ops, "_check_operands", lambda op, tensors, on_device=True: torch.float32)
    monkeypatch.setattr(cuda_ops, "_check_index", lambda *a: None)

    def no_gemm(*a, **kw):
        raise AssertionError("the WMMA GEMM of _C ran")

    monkeypatch.setattr(cuda_ops, "_cuda_lowrank_gemm", no_gemm)
    monkeypatch.setattr(cuda_ops, "_cuda_coeff_and_bias_grads", lambda z, g, dy: (reference.lowrank_coeff_grad_ref(z, g), None))
    monkeypatch.setattr(cuda_ops, "_cuda_bank_coeff_grads", reference.lowrank_coeff_grad_ref)
    tokens, n_in, n_out, k, n = 41, 23, 19, 5, 4
    x, U, d, V, bias, w = _cpu_operands(tokens, n_in, n_out, k)
    w = w if weight else None
    idx = torch.randint(0, n, (tokens,)) if bank else None
    if bank:
        d = torch.randn(n, k)
    dy = torch.randn(tokens, n_out)
    y, z = cuda_ops.spectral_linear_fwd_cuda(x, U, d, V, bias, w, idx)
    dx, dd, g = cuda_ops.spectral_linear_bwd_cuda(dy, z, U, d, V, w, idx)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y64, z64 = reference.spectral_linear_fwd_ref(*map(f64, (x, U, d, V, bias, w)), idx)
    dx64, dd64, g64 = reference.spectral_linear_bwd_ref(f64(dy), z64, *map(f64, (U, d, V, w)), idx)
    for got, ref in ((y, y64), (z, z64), (dx, dx64), (dd, dd64), (g, g64)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_cuda_bank_rows_give_nan_for_an_index_outside_the_bank():
    """Under torch.compile the index values are not checked: past the decode plan a token whose
    index is outside 0..n-1 gets NaN coefficients (hence NaN y and dx rows), as the decode plan
    and the triton backend give, instead of a read outside the bank."""
    d = torch.randn(3, 4)
    rows = cuda_ops._bank_rows(d, torch.tensor([2, 3, -1, 0]))
    assert torch.equal(rows[[0, 3]], d[[2, 0]]) and torch.isnan(rows[[1, 2]]).all()
