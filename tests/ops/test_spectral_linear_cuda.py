"""The cuda backend (spectral_kernels._C) against the float64 reference, on a GPU.

The rule (DESIGN.md §9, tests/helpers.py): error ≤ 2× plain PyTorch's error in the same dtype, plus
a tiny floor. Shapes are odd on purpose: T ∈ {1, 3, 16} runs the decode plan (one launch), T = 129
the cuBLAS plan; in/out/k are not multiples of any tile, chunk or vector width unless a test says so.
Skipped unless a CUDA device is visible and _C is built for it.
"""
import pytest
import torch

import spectral_kernels as sk
from spectral_kernels import _ext
from spectral_kernels.ops.reference import lowrank_coeff_grad_ref, spectral_linear_ref
from tests.helpers import cuda_backend_ready, assert_matches_reference, check_backend_direct, make_operands, rel_err


_READY, _WHY = cuda_backend_ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda_backend = lambda *a: sk.spectral_linear(*a, backend="cuda")  # noqa: E731

# (leading dims, in, out, k)
SHAPES = [
    ((1,), 37, 53, 5),          # decode, T = 1
    ((3,), 257, 300, 130),      # decode, T = 3, k over several z tiles
    ((2, 8), 37, 53, 5),        # decode, T = 16 from batch dims
    ((16,), 257, 53, 130),
    ((3, 43), 37, 53, 5),       # cuBLAS plan, T = 129
    ((129,), 257, 300, 130),
    ((129,), 37, 300, 5),
]
# Shapes reaching the decode plan's aligned 16-byte path (in a multiple of 8), several x chunks and
# z splits (in > 2048 for T <= 4, > 512 for T <= 16) and several z ⊙ d chunks (k > 512).
DECODE_EDGES = [((1,), 2056, 53, 5), ((4,), 264, 61, 7), ((9,), 1032, 300, 130), ((16,), 37, 53, 600)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n_in,n_out,k", SHAPES)
def test_cuda_matches_reference(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device="cuda")
    assert_matches_reference(cuda_backend, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n_in,n_out,k", DECODE_EDGES)
def test_cuda_decode_edges(dtype, lead, n_in, n_out, k):
    ops = make_operands(lead, n_in, n_out, k, device="cuda")
    assert_matches_reference(cuda_backend, ops, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(3, 5), (5, 43)])  # decode (T = 15) and cuBLAS (T = 215)
def test_cuda_non_contiguous_x(dtype, lead):
    ops = make_operands(lead, 37, 53, 5, transpose_x=True, device="cuda")
    assert not ops.x.is_contiguous()
    assert_matches_reference(cuda_backend, ops, dtype)


@pytest.mark.parametrize("tokens", [3, 129])
@pytest.mark.parametrize("bias,weight", [(False, True), (True, False), (False, False)])
def test_cuda_optional_bias_and_weight(tokens, bias, weight):
    ops = make_operands((tokens,), 37, 53, 5, bias=bias, weight=weight, device="cuda")
    assert_matches_reference(cuda_backend, ops, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 129])
def test_cuda_transposed_weight_and_factors(tokens, dtype):
    """Every operand through its strides: weight, U, V as transposed views."""
    ops = make_operands((tokens,), 40, 56, 8, device="cuda")
    ops.weight = ops.weight.t().contiguous().t()
    ops.U = ops.U.t().contiguous().t()
    ops.V = ops.V.t().contiguous().t()
    assert not ops.weight.is_contiguous()
    assert_matches_reference(cuda_backend, ops, dtype)


def test_cuda_trainable_factors():
    ops = make_operands((2, 7), 37, 53, 5, device="cuda")
    report = assert_matches_reference(cuda_backend, ops, torch.float32, grads=("x", "U", "d", "V", "bias"))
    assert set(report) == {"y", "dx", "dU", "dd", "dV", "dbias"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 129, 1000])
def test_coeff_and_bias_grads(dtype, tokens):
    from spectral_kernels.ops.spectral_linear_cuda import coeff_and_bias_grads

    dy = torch.randn(tokens, 53, device="cuda", dtype=torch.float64)
    z = torch.randn(tokens, 130, device="cuda", dtype=torch.float64)
    g = torch.randn(tokens, 130, device="cuda", dtype=torch.float64)
    dd, db = coeff_and_bias_grads(dy.to(dtype), z.to(dtype), g.to(dtype))
    assert dd.dtype == torch.float32 and db.dtype == dtype
    dd_ref = lowrank_coeff_grad_ref(z.to(dtype), g.to(dtype)).double()  # inputs rounded as ours were
    assert rel_err(dd, dd_ref) < 1e-4
    db_ref = dy.to(dtype).double().sum(0)
    assert rel_err(db, db_ref) <= 2 * rel_err(dy.to(dtype).sum(0), db_ref) + torch.finfo(dtype).eps
    dd2, db2 = coeff_and_bias_grads(dy.to(dtype), z.to(dtype), g.to(dtype))
    assert torch.equal(dd, dd2) and torch.equal(db, db2)  # fixed summation order


@pytest.mark.parametrize("tokens", [1, 16, 129])
def test_cuda_forward_is_deterministic(tokens):
    ops = make_operands((tokens,), 257, 300, 130, device="cuda").cast(torch.float16)
    y1 = cuda_backend(*ops.as_tuple())
    y2 = cuda_backend(*ops.as_tuple())
    assert torch.equal(y1, y2)


def test_cuda_on_a_side_stream():
    ops = make_operands((5,), 257, 300, 130, device="cuda").cast(torch.float32)
    expected = spectral_linear_ref(*ops.as_tuple())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = cuda_backend(*ops.as_tuple())
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [4, 129])
def test_cuda_opcheck(tokens):
    from spectral_kernels.ops import spectral_linear_cuda as cu

    ops = make_operands((tokens,), 37, 53, 5, device="cuda").cast(torch.float16)
    x, U, d, V, bias, weight = ops.as_tuple()
    if tokens <= cu.DECODE_MAX_TOKENS:
        torch.library.opcheck(cu._cuda_decode_forward, (x, U, d, V, bias, weight))
    torch.library.opcheck(cu._cuda_lowrank_gemm, (x, weight.t(), x @ V, U.t(), d, bias))
    torch.library.opcheck(cu._cuda_coeff_and_bias_grads, (x @ V, x @ V, x @ weight.t()))


def test_cuda_under_torch_compile():
    from spectral_kernels.ops import spectral_linear_cuda as cu

    ops = make_operands((2, 9), 37, 53, 5, device="cuda").cast(torch.float16)
    x, U, d, V, bias, weight = ops.as_tuple()
    x2d = x.reshape(-1, x.shape[-1])
    for tokens in (5, 18):  # decode plan, cuBLAS plan
        args = (x2d[:tokens], U, d, V, bias, weight)
        fwd = torch.compile(cu.spectral_linear_fwd_cuda, fullgraph=True)
        for got, want in zip(fwd(*args), cu.spectral_linear_fwd_cuda(*args)):
            torch.testing.assert_close(got, want)
    fn = torch.compile(cuda_backend)
    torch.testing.assert_close(fn(*ops.as_tuple()), cuda_backend(*ops.as_tuple()))


def test_bad_pointer_is_refused_before_launch():
    """The bindings check what would fault on the device, and name the argument."""
    C = _ext.extension()
    with pytest.raises(ValueError, match="^a2: null device pointer"):
        C.lowrank_gemm(None, None, (0, 1, 1), (0, 1, 1), None, None, (0, 1, 1), 4, 4, 0, 4, 1, 0)


# --- operands the op's own reshapes never produce: the backend functions called directly ----------------
def _cuda_backend_fns():
    from spectral_kernels.ops import spectral_linear_cuda as cu

    return cu.spectral_linear_fwd_cuda, cu.spectral_linear_bwd_cuda


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 16, 131])  # decode plan and cuBLAS plan
def test_cuda_strided_x_and_dy(dtype, tokens):
    """x = randn(in, T).t() and dy = randn(out, T).t(): column-major token matrices reach the
    kernels as they are (the op's reshape would have copied them)."""
    n_in, n_out, k = 37, 53, 5
    ops = make_operands((tokens,), n_in, n_out, k, device="cuda").cast(dtype)
    x = torch.randn(n_in, tokens, device="cuda", dtype=dtype).t()
    dy = torch.randn(n_out, tokens, device="cuda", dtype=dtype).t()
    assert x.stride() == (1, tokens) and dy.stride() == (1, tokens)
    check_backend_direct(*_cuda_backend_fns(), x, ops.U, ops.d, ops.V, ops.bias, ops.weight, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [4, 129])
def test_cuda_padded_weight_rows(dtype, tokens):
    """weight = Wbig[:, :in] with in % 8 != 0: a row pitch wider than the row, unaligned for 16-byte
    loads (the decode plan must take its scalar path)."""
    n_in, n_out, k = 45, 70, 6
    ops = make_operands((tokens,), n_in, n_out, k, device="cuda").cast(dtype)
    big = torch.randn(n_out, n_in + 19, device="cuda", dtype=dtype) / n_in**0.5
    weight = big[:, :n_in]
    assert weight.stride() == (n_in + 19, 1)
    dy = torch.randn(tokens, n_out, device="cuda", dtype=dtype)
    check_backend_direct(*_cuda_backend_fns(), ops.x, ops.U, ops.d, ops.V, ops.bias, weight, dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [3, 129])
def test_cuda_expanded_dy(dtype, tokens):
    """y.sum().backward() hands the backward an expanded dy (stride 0 in both dims)."""
    base = make_operands((tokens,), 37, 53, 5, device="cuda")
    grads = ("x", "d", "bias")
    ours = base.cast(dtype, grads)
    exact = base.cast(torch.float64, grads)
    plain = base.cast(dtype, grads)
    cuda_backend(*ours.as_tuple()).sum().backward()
    spectral_linear_ref(*exact.as_tuple()).sum().backward()
    spectral_linear_ref(*plain.as_tuple()).sum().backward()
    floor = torch.finfo(dtype).eps / 8
    for name in grads:
        got, ref, pl = getattr(ours, name).grad, getattr(exact, name).grad, getattr(plain, name).grad
        assert rel_err(got, ref) <= 2 * rel_err(pl, ref) + floor, name


def test_cuda_expanded_dy_reaches_the_kernels_with_zero_strides():
    dy = torch.ones(1, 1, device="cuda", dtype=torch.float16).expand(7, 53)
    assert dy.stride() == (0, 0)
    ops = make_operands((7,), 37, 53, 5, device="cuda").cast(torch.float16)
    fwd, bwd = _cuda_backend_fns()
    check_backend_direct(fwd, bwd, ops.x, ops.U, ops.d, ops.V, ops.bias, ops.weight, dy)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_cuda_decode_stress_is_bitwise_repeatable(tokens):
    """A grid far larger than the device holds at once (out = 16384 rows), 100 launches: the
    ticketed z blocks never deadlock and every result is bitwise equal."""
    from spectral_kernels.ops import spectral_linear_cuda as cu

    n_in, n_out, k = 4096, 16384, 64
    ops = make_operands((tokens,), n_in, n_out, k, device="cuda").cast(torch.bfloat16)
    y0, z0 = cu.spectral_linear_fwd_cuda(*ops.as_tuple())
    for _ in range(100):
        y, z = cu.spectral_linear_fwd_cuda(*ops.as_tuple())
        assert torch.equal(y, y0) and torch.equal(z, z0)
    torch.cuda.synchronize()
    ref = spectral_linear_ref(*ops.cast(torch.float64).as_tuple())
    plain = spectral_linear_ref(*ops.as_tuple())
    assert rel_err(y0, ref) <= 2 * rel_err(plain, ref) + torch.finfo(torch.bfloat16).eps / 8


# --- the decode plan's workspace: cached per (device, stream), counters left zero by the kernel ----------
def _cached_workspace(stream):
    from spectral_kernels.ops import spectral_linear_cuda as cu

    return cu._DECODE_WORKSPACES.get((stream.device.index, stream.cuda_stream))


def _workspace_ptrs(stream):
    ws = _cached_workspace(stream)
    return None if ws is None else (ws.partials.data_ptr(), ws.counters.data_ptr())


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_cuda_decode_workspace_is_reused_and_left_zero(tokens):
    """Launch after launch on one stream, then interleaved on two streams: one workspace per stream,
    allocated once (same data_ptr), its counters zero after every launch (the kernel resets them),
    and every result bitwise equal to the first call's. A shape needing more workspace replaces it
    with a bigger, zeroed one, and the first shape still gives its first result."""
    from spectral_kernels.ops import spectral_linear_cuda as cu

    fwd = cu.spectral_linear_fwd_cuda
    # k = 70: three z tiles and element loads of U (70 % 8 != 0); in = 1032: many z splits
    small = make_operands((tokens,), 1032, 300, 70, device="cuda").cast(torch.bfloat16).as_tuple()
    # k = 64: 16-byte loads of U; more z ⊙ d values and more tiles' counters than `small`
    big = make_operands((tokens,), 4104, 520, 200, device="cuda").cast(torch.bfloat16).as_tuple()
    main = torch.cuda.current_stream()
    cu._DECODE_WORKSPACES.pop((main.device.index, main.cuda_stream), None)

    y0, z0 = fwd(*small)
    ptrs = _workspace_ptrs(main)
    assert ptrs is not None, "the decode workspace was not cached"
    for _ in range(50):
        y, z = fwd(*small)
        assert torch.equal(y, y0) and torch.equal(z, z0)
    assert _workspace_ptrs(main) == ptrs  # nothing allocated per call
    torch.cuda.synchronize()
    assert int(_cached_workspace(main).counters.count_nonzero()) == 0

    yb0, zb0 = fwd(*big)
    C = _ext.extension()
    n_float, n_int = C.decode_workspace_sizes(tokens, 4104, 200, main.device.index)
    grown = _cached_workspace(main)
    assert grown.partials.numel() >= n_float and grown.counters.numel() >= n_int
    for _ in range(10):
        for args, (ye, ze) in ((small, (y0, z0)), (big, (yb0, zb0))):
            y, z = fwd(*args)
            assert torch.equal(y, ye) and torch.equal(z, ze)
    torch.cuda.synchronize()
    assert int(_cached_workspace(main).counters.count_nonzero()) == 0

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(main)
    outs = {0: [], 1: []}
    for _ in range(20):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(fwd(*small))
    for s in streams:
        main.wait_stream(s)
    torch.cuda.synchronize()
    for results in outs.values():
        for y, z in results:
            assert torch.equal(y, y0) and torch.equal(z, z0)
    a, b, m = (_workspace_ptrs(s) for s in (*streams, main))
    assert a is not None and b is not None
    assert len({a[0], b[0], m[0]}) == 3 and len({a[1], b[1], m[1]}) == 3  # one workspace per stream
    for s in streams:
        assert int(_cached_workspace(s).counters.count_nonzero()) == 0


def test_cuda_decode_in_a_cuda_graph():
    """A captured decode call owns its workspace (from the graph's pool, counters zeroed at each
    replay): replays, interleaved with eager calls, match the eager result bitwise, and the capture
    neither uses nor changes the per-stream cache."""
    from spectral_kernels.ops import spectral_linear_cuda as cu

    args = make_operands((4,), 1032, 300, 64, device="cuda").cast(torch.float16).as_tuple()
    y0, z0 = cu.spectral_linear_fwd_cuda(*args)
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):  # warm-up away from the capture, as torch.cuda.graph advises
        cu.spectral_linear_fwd_cuda(*args)
    main.wait_stream(side)
    torch.cuda.synchronize()
    before = {key: (ws.partials.data_ptr(), ws.counters.data_ptr()) for key, ws in cu._DECODE_WORKSPACES.items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, z = cu.spectral_linear_fwd_cuda(*args)
    after = {key: (ws.partials.data_ptr(), ws.counters.data_ptr()) for key, ws in cu._DECODE_WORKSPACES.items()}
    assert after == before
    for _ in range(10):
        graph.replay()
        ye, ze = cu.spectral_linear_fwd_cuda(*args)
        torch.cuda.synchronize()
        assert torch.equal(y, y0) and torch.equal(z, z0)
        assert torch.equal(ye, y0) and torch.equal(ze, z0)
