// Validation and device dispatch of the packing kernels (device-neutral; it
// lives beside the CPU kernels because it is always built). Every check runs
// before any kernel writes, and every failure is an InvalidArgument naming the
// argument, so Python sees a ValueError with a useful message.
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <limits>

#include "fastserve/device.h"
#include "fastserve/errors.h"
#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {

DType dtype_from_string(const std::string& n) {
  if (n == "float32") return DType::kFloat32;
  if (n == "float16") return DType::kFloat16;
  if (n == "bfloat16") return DType::kBFloat16;
  if (n == "int32") return DType::kInt32;
  if (n == "int64") return DType::kInt64;
  return DType::kOther;
}

const char* to_string(DType d) {
  switch (d) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
    default: return "unsupported";
  }
}

size_t element_size(DType d) {
  switch (d) {
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: return 2;
    case DType::kInt64: return 8;
    default: return 0;
  }
}

PoolMode pool_mode_from_string(const std::string& n) {
  if (n == "mean") return PoolMode::kMean;
  if (n == "cls") return PoolMode::kCls;
  if (n == "max") return PoolMode::kMax;
  throw InvalidArgument("mode must be 'mean', 'cls' or 'max', got '" + n + "'");
}

namespace {

[[noreturn]] void fail(const std::string& msg) { throw InvalidArgument(msg); }

// Messages are formatted without iostreams: where a build links its own copy
// of libstdc++ (the lent H200 machine's toolchain did), its streams' locale is
// never set up and the first `<<` of a number crashed the process (a
// segfault in ostream::_M_insert<long>, seen under cuda-gdb), so a bad
// argument took the engine down instead of raising.
std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// A double as iostreams print one by default (%g: six significant digits).
std::string g_str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string dtype_name(const TensorArg& t) {
  return t.dtype == DType::kOther ? (t.dtype_name.empty() ? "unsupported" : t.dtype_name) : to_string(t.dtype);
}

std::string device_str(const TensorArg& t) {
  return t.device == DeviceType::kCPU ? "cpu" : "cuda:" + std::to_string(t.device_index);
}

// A double argument that the kernels use as a float32, as they will see it:
// rounded to nearest, +-inf beyond float32's range (checked here: the plain
// cast is undefined there in C++). Validation checks this value, not the
// double: 1e39 is finite as a double and +inf as a float, 1e-50 is > 0 as a
// double and 0 as a float.
float as_float32(double v) {
  if (std::isnan(v)) return std::numeric_limits<float>::quiet_NaN();
  if (v > double(FLT_MAX)) return std::numeric_limits<float>::infinity();
  if (v < -double(FLT_MAX)) return -std::numeric_limits<float>::infinity();
  return float(v);
}

// The argument for a message: "1e+39 (inf as a float32)", or just "-1"
// where the float32 reads the same.
std::string float32_arg_str(double v) {
  const std::string o = g_str(v), f = g_str(as_float32(v));
  return o == f ? o : o + " (" + f + " as a float32)";
}

// Shape, size and layout of one tensor: ndim, non-negative dims, element and
// byte counts within int64, row-major contiguity (size-1 dims have any stride),
// and a pointer unless empty. Returns the element count.
int64_t check_tensor(const TensorArg& t, const char* name, size_t ndim) {
  if (t.shape.size() != ndim)
    fail(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got shape " + shape_str(t.shape));
  int64_t n = 1;
  for (int64_t d : t.shape) {
    if (d < 0) fail(std::string(name) + " has a negative dimension: " + shape_str(t.shape));
    if (__builtin_mul_overflow(n, d, &n)) fail(std::string(name) + " has too many elements: " + shape_str(t.shape));
  }
  int64_t bytes;
  const size_t es = element_size(t.dtype) ? element_size(t.dtype) : 1;
  if (__builtin_mul_overflow(n, int64_t(es), &bytes))
    fail(std::string(name) + " is too large: " + shape_str(t.shape));
  if (!t.strides.empty() && n > 0) {
    if (t.strides.size() != t.shape.size())
      fail(std::string(name) + " has " + std::to_string(t.strides.size()) + " strides for " +
           std::to_string(t.shape.size()) + " dimensions");
    int64_t expect = 1;
    for (size_t i = t.shape.size(); i-- > 0;) {
      if (t.shape[i] != 1 && t.strides[i] != expect)
        fail(std::string(name) + " must be contiguous (row-major), got shape " + shape_str(t.shape) +
             " with strides " + shape_str(t.strides) + "; call .contiguous() first");
      expect *= t.shape[i];
    }
  }
  if (n > 0 && t.data == nullptr) fail(std::string(name) + " has a null data pointer");
  return n;
}

void check_float(const TensorArg& t, const char* name) {
  if (t.dtype != DType::kFloat32 && t.dtype != DType::kFloat16 && t.dtype != DType::kBFloat16)
    fail(std::string(name) + " must be float32, float16 or bfloat16, got " + dtype_name(t));
}

void check_same_dtype(const TensorArg& a, const char* an, const TensorArg& b, const char* bn) {
  if (a.dtype != b.dtype)
    fail(std::string(bn) + " must have the dtype of " + an + " (" + dtype_name(a) + "), got " + dtype_name(b));
}

// All tensors on one device, and that device usable by this build.
void check_devices(std::initializer_list<std::pair<const TensorArg*, const char*>> ts) {
  const TensorArg& first = *ts.begin()->first;
  for (const auto& [t, name] : ts) {
    if (t->device != first.device || (t->device == DeviceType::kCUDA && t->device_index != first.device_index))
      fail(std::string("all tensors must be on one device: ") + ts.begin()->second + " is on " + device_str(first) +
           ", " + name + " is on " + device_str(*t));
  }
  if (first.device == DeviceType::kCUDA) {
    if (!cuda_compiled())
      fail("CUDA tensors need fastserve built with CUDA (this build is CPU-only); move the tensors to the CPU");
    const int n = cuda_device_count();
    if (n == 0) fail("CUDA tensors given but no CUDA device is visible");
    if (first.device_index < 0 || first.device_index >= n)
      fail("CUDA device index " + std::to_string(first.device_index) + " out of range (" + std::to_string(n) +
           " visible)");
  }
}

void check_ints(const TensorArg& t, const char* name) {
  if (t.dtype != DType::kInt32 && t.dtype != DType::kInt64)
    fail(std::string(name) + " must be int32 or int64, got " + dtype_name(t));
}

// An int32 / int64 CPU vector read into host int64 (CUDA offsets are never
// read on the host: the kernels read them on the device).
std::vector<int64_t> read_ints(const TensorArg& t, const char* name, int64_t n) {
  check_ints(t, name);
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (n == 0) return out;
  if (t.dtype == DType::kInt64) {
    std::memcpy(out.data(), t.data, n * sizeof(int64_t));
  } else {
    std::vector<int32_t> tmp(static_cast<size_t>(n));
    std::memcpy(tmp.data(), t.data, n * sizeof(int32_t));
    for (int64_t i = 0; i < n; ++i) out[i] = tmp[i];
  }
  return out;
}

// cu_seqlens of B sequences over T rows, each at most L long (L < 0: no bound).
void check_cu(const std::vector<int64_t>& cu, const char* name, int64_t T, int64_t L) {
  if (cu[0] != 0) fail(std::string(name) + "[0] must be 0, got " + std::to_string(cu[0]));
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    if (cu[b + 1] < cu[b])
      fail(std::string(name) + " must be non-decreasing, but " + name + "[" + std::to_string(b + 1) + "] = " +
           std::to_string(cu[b + 1]) + " < " + name + "[" + std::to_string(b) + "] = " + std::to_string(cu[b]));
    if (L >= 0 && cu[b + 1] - cu[b] > L)
      fail("sequence " + std::to_string(b) + " has length " + std::to_string(cu[b + 1] - cu[b]) +
           " > max length " + std::to_string(L));
  }
  if (T >= 0 && cu.back() != T)
    fail(std::string(name) + "[-1] must equal the number of packed rows " + std::to_string(T) + ", got " +
         std::to_string(cu.back()));
}

void check_shape(const TensorArg& t, const char* name, const std::vector<int64_t>& want) {
  if (t.shape != want) fail(std::string(name) + " must have shape " + shape_str(want) + ", got " + shape_str(t.shape));
}

bool on_cuda(const TensorArg& t) { return t.device == DeviceType::kCUDA; }

cpu::Isa cap(bool portable) { return portable ? cpu::Isa::kPortable : cpu::Isa::kAvx512Bf16; }

}  // namespace

void pack(const TensorArg& x, const TensorArg& seqlens, const TensorArg& out, uintptr_t stream) {
  check_tensor(x, "x", 3);
  check_float(x, "x");
  check_tensor(seqlens, "lengths", 1);
  check_tensor(out, "out", 2);
  check_same_dtype(x, "x", out, "out");
  check_devices({{&x, "x"}, {&seqlens, "lengths"}, {&out, "out"}});
  const int64_t B = x.shape[0], L = x.shape[1], H = x.shape[2];
  const size_t row_bytes = size_t(H) * element_size(x.dtype);
  if (on_cuda(x)) {
    check_ints(seqlens, "cu_seqlens");
    if (seqlens.shape[0] != B + 1)
      fail("on CUDA, pack takes cu_seqlens [B + 1 = " + std::to_string(B + 1) + "], got " +
           std::to_string(seqlens.shape[0]) + " entries (lengths [B] would need a host prefix sum; "
           "fastserve.kernels.pack converts them on the device)");
    if (out.shape[1] != H) fail("out must have shape [T, " + std::to_string(H) + "], got " + shape_str(out.shape));
    if (out.shape[0] > B * L)
      fail("out has " + std::to_string(out.shape[0]) + " rows, more than the " + std::to_string(B * L) +
           " tokens x [B, L, H] can hold");
    if (out.shape[0] == 0 || H == 0) return;
#ifdef FASTSERVE_WITH_CUDA
    cuda::pack(x.data, B, L, seqlens.data, seqlens.dtype, out.shape[0], row_bytes, out.data, x.device_index, stream);
#endif
    return;
  }
  std::vector<int64_t> cu;
  if (seqlens.shape[0] == B) {
    const auto len = read_ints(seqlens, "lengths", B);
    cu.assign(size_t(B) + 1, 0);
    for (int64_t b = 0; b < B; ++b) {
      if (len[b] < 0 || len[b] > L)
        fail("lengths[" + std::to_string(b) + "] = " + std::to_string(len[b]) + " is outside [0, L = " +
             std::to_string(L) + "]");
      cu[b + 1] = cu[b] + len[b];
    }
  } else if (seqlens.shape[0] == B + 1) {
    cu = read_ints(seqlens, "cu_seqlens", B + 1);
    check_cu(cu, "cu_seqlens", -1, L);
  } else {
    fail("lengths must have B = " + std::to_string(B) + " entries (lengths) or B + 1 (cu_seqlens), got " +
         std::to_string(seqlens.shape[0]));
  }
  check_shape(out, "out", {cu.back(), H});
  if (cu.back() == 0 || H == 0) return;
  cpu::pack(x.data, B, L, cu.data(), row_bytes, out.data);
}

void unpack(const TensorArg& x, const TensorArg& cu_seqlens, const TensorArg& out, uintptr_t stream) {
  check_tensor(x, "packed", 2);
  check_float(x, "packed");
  check_tensor(cu_seqlens, "cu_seqlens", 1);
  check_tensor(out, "out", 3);
  check_same_dtype(x, "packed", out, "out");
  check_devices({{&x, "packed"}, {&cu_seqlens, "cu_seqlens"}, {&out, "out"}});
  const int64_t T = x.shape[0], H = x.shape[1];
  if (cu_seqlens.shape[0] < 1) fail("cu_seqlens must have B + 1 >= 1 entries, got 0");
  const int64_t B = cu_seqlens.shape[0] - 1, L = out.shape[1];
  const size_t row_bytes = size_t(H) * element_size(x.dtype);
  if (on_cuda(x)) {
    check_ints(cu_seqlens, "cu_seqlens");
    check_shape(out, "out", {B, L, H});
    if (B * L == 0 || H == 0) return;
#ifdef FASTSERVE_WITH_CUDA
    cuda::unpack(x.data, T, cu_seqlens.data, cu_seqlens.dtype, B, L, row_bytes, out.data, x.device_index, stream);
#endif
    return;
  }
  const auto cu = read_ints(cu_seqlens, "cu_seqlens", B + 1);
  check_cu(cu, "cu_seqlens", T, L);
  check_shape(out, "out", {B, L, H});
  if (B * L == 0 || H == 0) return;
  cpu::unpack(x.data, cu.data(), B, L, row_bytes, out.data);
}

namespace {

// The checks segment_pool makes before reading any offset; returns B.
int64_t check_pool_args(const TensorArg& x, const TensorArg& cu_seqlens) {
  check_tensor(x, "x", 2);
  check_float(x, "x");
  check_tensor(cu_seqlens, "cu_seqlens", 1);
  if (cu_seqlens.shape[0] < 1) fail("cu_seqlens must have B + 1 >= 1 entries, got 0");
  return cu_seqlens.shape[0] - 1;
}

int64_t pool_splits(const TensorArg& x, int64_t B, PoolMode mode) {
  if (!on_cuda(x) || B == 0 || x.shape[1] == 0) return 1;
#ifdef FASTSERVE_WITH_CUDA
  return cuda::pool_splits(B, x.shape[0], mode, x.device_index);
#else
  (void)mode;
  return 1;
#endif
}

}  // namespace

int64_t segment_pool_scratch(const TensorArg& x, const TensorArg& cu_seqlens, PoolMode mode) {
  const int64_t B = check_pool_args(x, cu_seqlens);
  check_devices({{&x, "x"}, {&cu_seqlens, "cu_seqlens"}});
  const int64_t S = pool_splits(x, B, mode);
  return S > 1 ? B * S * x.shape[1] : 0;
}

void segment_pool(const TensorArg& x, const TensorArg& cu_seqlens, const TensorArg& out, PoolMode mode,
                  bool normalize, uintptr_t stream, const TensorArg* scratch) {
  const int64_t B = check_pool_args(x, cu_seqlens);
  check_tensor(out, "out", 2);
  if (out.dtype != DType::kFloat32) fail("out must be float32, got " + dtype_name(out));
  check_devices({{&x, "x"}, {&cu_seqlens, "cu_seqlens"}, {&out, "out"}});
  const int64_t T = x.shape[0], H = x.shape[1];
  if (on_cuda(x)) {
    check_ints(cu_seqlens, "cu_seqlens");
    check_shape(out, "out", {B, H});
    if (B == 0 || H == 0) return;
    const int64_t S = pool_splits(x, B, mode);
    float* scratch_data = nullptr;
    if (S > 1) {
      if (scratch == nullptr) fail("scratch must hold " + std::to_string(B * S * H) + " float32 values, got none");
      const int64_t n = check_tensor(*scratch, "scratch", scratch->shape.size());
      if (scratch->dtype != DType::kFloat32) fail("scratch must be float32, got " + dtype_name(*scratch));
      check_devices({{&x, "x"}, {scratch, "scratch"}});
      if (n < B * S * H)
        fail("scratch must hold " + std::to_string(B * S * H) + " float32 values, got " + std::to_string(n));
      scratch_data = static_cast<float*>(scratch->data);
    }
#ifdef FASTSERVE_WITH_CUDA
    cuda::segment_pool(x.data, x.dtype, T, cu_seqlens.data, cu_seqlens.dtype, B, H, mode, normalize,
                       static_cast<float*>(out.data), scratch_data, S, x.device_index, stream);
#else
    (void)stream;
    (void)scratch_data;
#endif
    return;
  }
  const auto cu = read_ints(cu_seqlens, "cu_seqlens", B + 1);
  check_cu(cu, "cu_seqlens", T, -1);
  check_shape(out, "out", {B, H});
  if (B == 0 || H == 0) return;
  cpu::segment_pool(x.data, x.dtype, cu.data(), B, H, mode, normalize, static_cast<float*>(out.data));
}

void gather(const TensorArg& x, const TensorArg& index, const TensorArg& out, uintptr_t stream) {
  if (x.shape.empty()) fail("x must have at least 1 dimension, got shape []");
  check_tensor(x, "x", x.shape.size());
  if (element_size(x.dtype) == 0)
    fail("x must be float32, float16, bfloat16, int32 or int64, got " + dtype_name(x));
  check_tensor(index, "index", 1);
  check_tensor(out, "out", out.shape.size());
  check_same_dtype(x, "x", out, "out");
  check_devices({{&x, "x"}, {&index, "index"}, {&out, "out"}});
  const int64_t N = x.shape[0], M = index.shape[0];
  std::vector<int64_t> want = x.shape;
  want[0] = M;
  check_shape(out, "out", want);
  size_t row_bytes = element_size(x.dtype);
  for (size_t d = 1; d < x.shape.size(); ++d) row_bytes *= size_t(x.shape[d]);
  if (on_cuda(x)) {
    check_ints(index, "index");
    if (M == 0 || row_bytes == 0) return;
#ifdef FASTSERVE_WITH_CUDA
    cuda::gather(x.data, N, index.data, index.dtype, M, row_bytes, out.data, x.device_index, stream);
#endif
    return;
  }
  const auto idx = read_ints(index, "index", M);
  for (int64_t i = 0; i < M; ++i)
    if (idx[i] < 0 || idx[i] >= N)
      fail("index[" + std::to_string(i) + "] = " + std::to_string(idx[i]) + " is out of range for " +
           std::to_string(N) + " rows");
  if (M == 0 || row_bytes == 0) return;
  cpu::gather(x.data, idx.data(), M, row_bytes, out.data);
}

// A CPU tensor for the fused layer kernels below: float32 or bfloat16, and
// (dtype given) the same dtype as the kernel's first tensor.
void check_cpu_layer(const TensorArg& t, const char* name, size_t ndim, const char* kernel,
                     const DType* same = nullptr) {
  check_tensor(t, name, ndim);
  if (same == nullptr && t.dtype != DType::kFloat32 && t.dtype != DType::kBFloat16)
    fail(std::string(name) + " must be float32 or bfloat16, got " + dtype_name(t));
  if (same != nullptr && t.dtype != *same)
    fail(std::string(name) + " must have the dtype of the kernel's input (" + to_string(*same) + "), got " +
         dtype_name(t));
  if (on_cuda(t)) fail(std::string(kernel) + " runs on the CPU only; " + name + " is on " + device_str(t));
}

void check_threads(int threads) {
  if (threads < 1) fail("threads must be >= 1, got " + std::to_string(threads));
}

template <typename T>
const T* cptr(const TensorArg* t) { return t ? static_cast<const T*>(t->data) : nullptr; }

void attention(const TensorArg& qkv, const TensorArg& cu_seqlens, const TensorArg& out, const TensorArg* bias,
               double scale, int threads, bool portable) {
  check_cpu_layer(qkv, "qkv", 4, "attention");
  check_tensor(cu_seqlens, "cu_seqlens", 1);
  check_cpu_layer(out, "out", 3, "attention", &qkv.dtype);
  check_devices({{&qkv, "qkv"}, {&cu_seqlens, "cu_seqlens"}, {&out, "out"}});
  const int64_t T = qkv.shape[0], nh = qkv.shape[2], hd = qkv.shape[3];
  if (qkv.shape[1] != 3) fail("qkv must have shape [T, 3, heads, head_dim], got " + shape_str(qkv.shape));
  if (bias) {
    check_cpu_layer(*bias, "bias", 1, "attention", &qkv.dtype);
    check_shape(*bias, "bias", {3 * nh * hd});
  }
  if (cu_seqlens.shape[0] < 1) fail("cu_seqlens must have B + 1 >= 1 entries, got 0");
  const int64_t B = cu_seqlens.shape[0] - 1;
  const auto cu = read_ints(cu_seqlens, "cu_seqlens", B + 1);
  check_cu(cu, "cu_seqlens", T, -1);
  check_shape(out, "out", {T, nh, hd});
  const float scale32 = as_float32(scale);
  if (!(std::isfinite(scale32) && scale32 > 0))
    fail("scale must be finite and > 0 as a float32, got " + float32_arg_str(scale));
  check_threads(threads);
  if (T == 0 || nh == 0 || hd == 0) return;
  if (qkv.dtype == DType::kBFloat16)
    cpu::attention(cptr<uint16_t>(&qkv), cptr<uint16_t>(bias), cu.data(), B, nh, hd, scale32, threads,
                   static_cast<uint16_t*>(out.data), cap(portable));
  else
    cpu::attention(cptr<float>(&qkv), cptr<float>(bias), cu.data(), B, nh, hd, scale32, threads,
                   static_cast<float*>(out.data), cap(portable));
}

// An epilogue's tensor on CUDA: float32, float16 or bfloat16 (x), or x's
// dtype (the others), contiguous, of `ndim` dimensions.
void check_cuda_layer(const TensorArg& t, const char* name, size_t ndim, const TensorArg& x) {
  check_tensor(t, name, ndim);
  if (&t == &x) check_float(t, name);
  else check_same_dtype(x, "x", t, name);
}

void bias_gelu(const TensorArg& x, const TensorArg& bias, int threads, bool portable, uintptr_t stream) {
  if (on_cuda(x)) {
    check_cuda_layer(x, "x", 2, x);
    check_cuda_layer(bias, "bias", 1, x);
    check_shape(bias, "bias", {x.shape[1]});
    check_devices({{&x, "x"}, {&bias, "bias"}});
    if (x.shape[0] == 0 || x.shape[1] == 0) return;
#ifdef FASTSERVE_WITH_CUDA
    cuda::bias_gelu(x.data, bias.data, x.dtype, x.shape[0], x.shape[1], x.device_index, stream);
#endif
    return;
  }
  check_devices({{&x, "x"}, {&bias, "bias"}});  // x on the CPU: so must the others be
  check_cpu_layer(x, "x", 2, "bias_gelu");
  check_cpu_layer(bias, "bias", 1, "bias_gelu", &x.dtype);
  check_shape(bias, "bias", {x.shape[1]});
  check_threads(threads);
  if (x.shape[0] == 0 || x.shape[1] == 0) return;
  if (x.dtype == DType::kBFloat16)
    cpu::bias_gelu(static_cast<uint16_t*>(x.data), cptr<uint16_t>(&bias), x.shape[0], x.shape[1], threads,
                   cap(portable));
  else
    cpu::bias_gelu(static_cast<float*>(x.data), cptr<float>(&bias), x.shape[0], x.shape[1], threads,
                   cap(portable));
}

void add_layer_norm(const TensorArg& x, const TensorArg& bias, const TensorArg& residual, const TensorArg& weight,
                    const TensorArg& beta, double eps, int threads, bool portable, uintptr_t stream) {
  if (on_cuda(x)) {
    check_cuda_layer(x, "x", 2, x);
    check_cuda_layer(residual, "residual", 2, x);
    check_shape(residual, "residual", x.shape);
    for (const auto& [t, name] : {std::pair{&bias, "bias"}, {&weight, "weight"}, {&beta, "beta"}}) {
      check_cuda_layer(*t, name, 1, x);
      check_shape(*t, name, {x.shape[1]});
    }
    const float eps32 = as_float32(eps);  // as on the CPU, below
    if (!(std::isfinite(eps32) && eps32 >= 0))
      fail("eps must be finite and >= 0 as a float32, got " + float32_arg_str(eps));
    check_devices({{&x, "x"}, {&bias, "bias"}, {&residual, "residual"}, {&weight, "weight"}, {&beta, "beta"}});
    if (x.shape[0] == 0 || x.shape[1] == 0) return;
#ifdef FASTSERVE_WITH_CUDA
    cuda::add_layer_norm(x.data, bias.data, residual.data, weight.data, beta.data, eps32, x.dtype, x.shape[0],
                         x.shape[1], x.device_index, stream);
#endif
    return;
  }
  check_devices({{&x, "x"}, {&bias, "bias"}, {&residual, "residual"}, {&weight, "weight"}, {&beta, "beta"}});
  check_cpu_layer(x, "x", 2, "add_layer_norm");
  check_cpu_layer(residual, "residual", 2, "add_layer_norm", &x.dtype);
  check_shape(residual, "residual", x.shape);
  const int64_t N = x.shape[1];
  for (const auto& [t, name] : {std::pair{&bias, "bias"}, {&weight, "weight"}, {&beta, "beta"}}) {
    check_cpu_layer(*t, name, 1, "add_layer_norm", &x.dtype);
    check_shape(*t, name, {N});
  }
  // eps = 0 is torch.nn.LayerNorm's too (a constant row is then NaN, as in torch).
  // eps below float32's smallest rounds to 0, which is allowed.
  const float eps32 = as_float32(eps);
  if (!(std::isfinite(eps32) && eps32 >= 0))
    fail("eps must be finite and >= 0 as a float32, got " + float32_arg_str(eps));
  check_threads(threads);
  if (x.shape[0] == 0 || N == 0) return;
  if (x.dtype == DType::kBFloat16)
    cpu::add_layer_norm(static_cast<uint16_t*>(x.data), cptr<uint16_t>(&bias), cptr<uint16_t>(&residual),
                        cptr<uint16_t>(&weight), cptr<uint16_t>(&beta), eps32, x.shape[0], N, threads,
                        cap(portable));
  else
    cpu::add_layer_norm(static_cast<float*>(x.data), cptr<float>(&bias), cptr<float>(&residual), cptr<float>(&weight),
                        cptr<float>(&beta), eps32, x.shape[0], N, threads, cap(portable));
}

}  // namespace kernels
}  // namespace fastserve
