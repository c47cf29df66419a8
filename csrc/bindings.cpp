// pybind11 module spectral_kernels._C: argument plumbing only, no math.
//
// A matrix crosses as (device pointer, stride0, stride1), a vector as (device pointer, stride),
// strides in elements; None for an absent operand. dtype is 0 = float32, 1 = float16,
// 2 = bfloat16; stream is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
// Adapter banks: the bank [n, k] crosses as a matrix, the per-token index as a vector of int64
// values, and n as an integer; a one-d call passes none of them.
// The Python wrappers (spectral_kernels/ops/spectral_linear_cuda.py) check devices, dtypes, shapes
// and strides before calling; the checks here catch what would otherwise fault on the device.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>

#include "spectral_linear.h"

namespace py = pybind11;
namespace sk = spectral_kernels;

namespace {

using Matrix = std::tuple<uint64_t, int64_t, int64_t>;
using Vector = std::tuple<uint64_t, int64_t>;

sk::MatrixArg matrix(const std::optional<Matrix>& m, const char* name, bool required) {
  sk::MatrixArg out;
  if (!m) {
    SK_CHECK_ARG(!required, name, "required, got None");
    return out;
  }
  const auto [ptr, s0, s1] = *m;
  SK_CHECK_ARG(ptr != 0, name, "null device pointer");
  SK_CHECK_ARG(s0 >= 0 && s1 >= 0, name, "strides must be non-negative");
  out.ptr = reinterpret_cast<const void*>(ptr);
  out.s0 = s0;
  out.s1 = s1;
  return out;
}

const void* vector(const std::optional<Vector>& v, const char* name, bool required, int64_t* stride) {
  if (!v) {
    SK_CHECK_ARG(!required, name, "required, got None");
    return nullptr;
  }
  const auto [ptr, s] = *v;
  SK_CHECK_ARG(ptr != 0, name, "null device pointer");
  SK_CHECK_ARG(s >= 0, name, "stride must be non-negative");
  *stride = s;
  return reinterpret_cast<const void*>(ptr);
}

void* stream_ptr(uint64_t stream) { return reinterpret_cast<void*>(stream); }

// An adapter bank: (bank [n, cols] as a matrix, int64 index as a vector, n), all or none.
struct Bank {
  sk::MatrixArg rows;
  const int64_t* index = nullptr;
  int64_t index_s = 1, n = 0;
};

Bank bank(const std::optional<Matrix>& rows, const char* rows_name, const std::optional<Vector>& index,
          const char* index_name, int64_t n) {
  Bank b;
  SK_CHECK_ARG(rows.has_value() == index.has_value(), index_name,
               std::string("the bank ") + rows_name + " and " + index_name + " go together");
  if (!index) return b;
  b.rows = matrix(rows, rows_name, true);
  b.index = static_cast<const int64_t*>(vector(index, index_name, true, &b.index_s));
  SK_CHECK_ARG(n > 0, "n_adapters", "must be positive with a bank, got " + std::to_string(n));
  b.n = n;
  return b;
}

void decode_fwd(const Matrix& x, const Matrix& U, const std::optional<Vector>& d, const Matrix& V,
                const std::optional<Vector>& bias, const std::optional<Matrix>& weight, const Matrix& y,
                const Matrix& z, uint64_t workspace, uint64_t counters, int64_t workspace_floats,
                int64_t counter_ints, int64_t tokens, int64_t in_features, int64_t out_features,
                int64_t rank, int dtype, uint64_t stream, const std::optional<Matrix>& d_bank,
                const std::optional<Vector>& adapter_index, int64_t n_adapters) {
  sk::DecodeFwdParams p;
  p.x = matrix(x, "x", true);
  p.U = matrix(U, "U", true);
  p.V = matrix(V, "V", true);
  p.weight = matrix(weight, "weight", false);
  const Bank b = bank(d_bank, "d_bank", adapter_index, "adapter_index", n_adapters);
  if (b.index != nullptr) {
    SK_CHECK_ARG(!d, "d", "give d (one adapter) or d_bank with adapter_index, not both");
    p.d = b.rows.ptr;
    p.d_s0 = b.rows.s0;
    p.d_s = b.rows.s1;
    p.idx = b.index;
    p.idx_s = b.index_s;
    p.n = b.n;
  } else {
    p.d = vector(d, "d", true, &p.d_s);
  }
  p.bias = vector(bias, "bias", false, &p.bias_s);
  const sk::MatrixArg ya = matrix(y, "y", true), za = matrix(z, "z", true);
  p.y = const_cast<void*>(ya.ptr);
  p.y_s0 = ya.s0;
  p.y_s1 = ya.s1;
  p.z = const_cast<void*>(za.ptr);
  p.z_s0 = za.s0;
  p.z_s1 = za.s1;
  CHECK_PTR(workspace);
  CHECK_PTR(counters);
  p.workspace = reinterpret_cast<float*>(workspace);
  p.counters = reinterpret_cast<int*>(counters);
  p.workspace_floats = workspace_floats;
  p.counter_ints = counter_ints;
  p.T = tokens;
  p.in = in_features;
  p.out = out_features;
  p.k = rank;
  p.dtype = sk::dtype_from_code(dtype);
  py::gil_scoped_release release;
  sk::launch_spectral_linear_decode_fwd(p, stream_ptr(stream));
}

void lowrank_gemm(const std::optional<Matrix>& a1, const std::optional<Matrix>& b1,
                  const std::optional<Matrix>& a2, const std::optional<Matrix>& b2,
                  const std::optional<Vector>& scale, const std::optional<Vector>& bias, const Matrix& out,
                  int64_t M, int64_t N, int64_t K1, int64_t K2, int dtype, uint64_t stream,
                  const std::optional<Matrix>& scale_bank, const std::optional<Vector>& scale_index,
                  int64_t n_adapters) {
  sk::LowRankGemmParams p;
  p.a1 = matrix(a1, "a1", false);
  p.b1 = matrix(b1, "b1", a1.has_value());
  p.a2 = matrix(a2, "a2", false);
  p.b2 = matrix(b2, "b2", a2.has_value());
  SK_CHECK_ARG(a1 || a2, "a1", "at least one of the two products is needed");
  const Bank b = bank(scale_bank, "scale_bank", scale_index, "scale_index", n_adapters);
  if (b.index != nullptr) {
    SK_CHECK_ARG(!scale, "scale", "give scale or scale_bank with scale_index, not both");
    SK_CHECK_ARG(a2.has_value(), "scale_bank", "scales a2, which is absent");
    p.scale = b.rows.ptr;
    p.scale_s0 = b.rows.s0;
    p.scale_s = b.rows.s1;
    p.scale_index = b.index;
    p.scale_index_s = b.index_s;
    p.scale_rows = b.n;
  } else {
    p.scale = vector(scale, "scale", false, &p.scale_s);
  }
  p.bias = vector(bias, "bias", false, &p.bias_s);
  const sk::MatrixArg o = matrix(out, "out", true);
  p.out = const_cast<void*>(o.ptr);
  p.out_s0 = o.s0;
  p.out_s1 = o.s1;
  p.M = M;
  p.N = N;
  p.K1 = a1 ? K1 : 0;
  p.K2 = a2 ? K2 : 0;
  p.dtype = sk::dtype_from_code(dtype);
  py::gil_scoped_release release;
  sk::launch_lowrank_gemm(p, stream_ptr(stream));
}

void coeff_and_bias_grads(const Matrix& z, const Matrix& g, const std::optional<Matrix>& dy, uint64_t dd,
                          uint64_t dbias, int64_t tokens, int64_t rank, int64_t out_features, int dtype,
                          uint64_t stream) {
  sk::CoeffBiasGradParams p;
  p.z = matrix(z, "z", true);
  p.g = matrix(g, "g", true);
  p.dy = matrix(dy, "dy", false);
  CHECK_PTR(dd);
  p.dd = reinterpret_cast<float*>(dd);
  p.dbias = reinterpret_cast<void*>(dbias);
  p.T = tokens;
  p.k = rank;
  p.out = out_features;
  p.dtype = sk::dtype_from_code(dtype);
  py::gil_scoped_release release;
  sk::launch_coeff_and_bias_grads(p, stream_ptr(stream));
}

void bank_coeff_grads(const Matrix& z, const Matrix& g, uint64_t order, uint64_t starts, uint64_t dd,
                      int64_t tokens, int64_t rank, int64_t n_adapters, int dtype, uint64_t stream) {
  sk::BankCoeffGradParams p;
  p.z = matrix(z, "z", true);
  p.g = matrix(g, "g", true);
  CHECK_PTR(order);
  CHECK_PTR(starts);
  CHECK_PTR(dd);
  p.order = reinterpret_cast<const int64_t*>(order);
  p.starts = reinterpret_cast<const int64_t*>(starts);
  p.dd = reinterpret_cast<float*>(dd);
  p.T = tokens;
  p.k = rank;
  p.n = n_adapters;
  p.dtype = sk::dtype_from_code(dtype);
  py::gil_scoped_release release;
  sk::launch_bank_coeff_grads(p, stream_ptr(stream));
}

void check_decode_shape(int64_t tokens, int64_t in_features, int64_t rank) {
  CHECK_POSITIVE(tokens);
  CHECK_LE(tokens, sk::kDecodeMaxTokens);
  CHECK_POSITIVE(in_features);
  CHECK_POSITIVE(rank);
}

py::tuple decode_workspace_sizes(int64_t tokens, int64_t in_features, int64_t rank, int device) {
  check_decode_shape(tokens, in_features, rank);
  SK_CHECK_ARG(device >= 0, "device", "must be a CUDA device index, got " + std::to_string(device));
  int64_t n_float = 0, n_int = 0;
  {
    py::gil_scoped_release release;  // the first call per device asks the driver
    sk::decode_workspace_sizes(tokens, in_features, rank, device, &n_float, &n_int);
  }
  return py::make_tuple(n_float, n_int);
}

py::dict decode_plan(int64_t tokens, int64_t in_features, int64_t out_features, int64_t rank,
                     int sm_count) {
  check_decode_shape(tokens, in_features, rank);
  CHECK_POSITIVE(out_features);
  CHECK_POSITIVE(sm_count);
  const sk::DecodePlan g = sk::decode_plan(tokens, in_features, out_features, rank, sm_count);
  py::dict out;
  out["split_rows"] = g.split_rows;
  out["splits"] = g.splits;
  out["col_tiles"] = g.col_tiles;
  out["z_blocks"] = g.z_blocks;
  out["rows_per_block"] = g.rows_per_block;
  out["y_blocks"] = g.y_blocks;
  out["blocks"] = g.blocks;
  out["n_float"] = g.n_float;
  out["n_int"] = g.n_int;
  return out;
}

py::tuple device_count() {
  std::string error;
  const int n = sk::device_count(&error);
  return py::make_tuple(n, error);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of spectral-kernels (torch-free: pointers, sizes, strides, dtype code, stream)";
  m.attr("DECODE_MAX_TOKENS") = sk::kDecodeMaxTokens;

  m.def("compiled_archs", [] { return std::string(sk::compiled_archs()); },
        "CUDA architectures compiled in, CMake syntax joined by ',' (e.g. '80-real,90-real,90-virtual')");
  m.def("cuda_runtime_version", &sk::cuda_runtime_version,
        "CUDA runtime version linked in (statically), e.g. 13000");
  m.def("device_count", &device_count,
        "(number of visible CUDA devices, '' or the CUDA error when there are none); never raises");
  m.def("decode_workspace_sizes", &decode_workspace_sizes, py::arg("tokens"), py::arg("in_features"),
        py::arg("rank"), py::arg("device"),
        "(fp32 elements, int32 counters) of the decode plan's workspace for a launch on CUDA device "
        "`device` (the split depends on its multiprocessor count); the counters must be zero at "
        "launch and the kernel leaves them zero");
  m.def("decode_plan", &decode_plan, py::arg("tokens"), py::arg("in_features"), py::arg("out_features"),
        py::arg("rank"), py::arg("sm_count"),
        "The decode plan's layout for a device of sm_count multiprocessors (no device needed): "
        "split_rows, splits, col_tiles, z_blocks, rows_per_block, y_blocks, blocks, n_float, n_int");
  m.def("spectral_linear_decode_fwd", &decode_fwd, py::arg("x"), py::arg("U"), py::arg("d"), py::arg("V"),
        py::arg("bias"), py::arg("weight"), py::arg("y"), py::arg("z"), py::arg("workspace"),
        py::arg("counters"), py::arg("workspace_floats"), py::arg("counter_ints"), py::arg("tokens"),
        py::arg("in_features"), py::arg("out_features"), py::arg("rank"), py::arg("dtype"),
        py::arg("stream"), py::arg("d_bank") = py::none(), py::arg("adapter_index") = py::none(),
        py::arg("n_adapters") = 0,
        "Decode plan, tokens <= DECODE_MAX_TOKENS: y = x·weightᵀ + ((x·V) ⊙ d)·Uᵀ + bias and z = x·V. "
        "workspace (workspace_floats fp32) and counters (counter_ints int32, zero at launch, left "
        "zero) must hold at least decode_workspace_sizes() for the current device. Adapter bank: d "
        "None, d_bank [n_adapters, rank] and adapter_index (int64 [tokens]): token t reads "
        "d_bank[adapter_index[t]]");
  m.def("lowrank_gemm", &lowrank_gemm, py::arg("a1"), py::arg("b1"), py::arg("a2"), py::arg("b2"),
        py::arg("scale"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K1"),
        py::arg("K2"), py::arg("dtype"), py::arg("stream"), py::arg("scale_bank") = py::none(),
        py::arg("scale_index") = py::none(), py::arg("n_adapters") = 0,
        "out[M, N] = a1[M, K1]·b1[K1, N] + (a2[M, K2] ⊙ scale[K2])·b2[K2, N] + bias[N]; with "
        "scale_bank [n_adapters, K2] and scale_index (int64 [M]) in place of scale, row m of a2 is "
        "scaled by scale_bank[scale_index[m]]");
  m.def("coeff_and_bias_grads", &coeff_and_bias_grads, py::arg("z"), py::arg("g"), py::arg("dy"),
        py::arg("dd"), py::arg("dbias"), py::arg("tokens"), py::arg("rank"), py::arg("out_features"),
        py::arg("dtype"), py::arg("stream"),
        "dd = Σ_t z ⊙ g (fp32) and, when dy is given, dbias = Σ_t dy, in one launch");
  m.def("bank_coeff_grads", &bank_coeff_grads, py::arg("z"), py::arg("g"), py::arg("order"), py::arg("starts"),
        py::arg("dd"), py::arg("tokens"), py::arg("rank"), py::arg("n_adapters"), py::arg("dtype"),
        py::arg("stream"),
        "dd[a] = Σ_{t: idx_t = a} z_t ⊙ g_t (fp32, [n_adapters, rank], contiguous) from the tokens "
        "sorted by adapter: order (int64 [tokens], a stable sort by idx) and starts (int64 "
        "[n_adapters + 1], adapter a's tokens are order[starts[a]:starts[a + 1]]); fixed order");
}
