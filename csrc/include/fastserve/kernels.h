// Packing kernels for padding-free execution: pack, unpack, segment_pool,
// gather, on float32 / float16 / bfloat16 rows, behind one dispatch by device.
//
// Tensors cross the boundary as TensorArg (pointer + shape + strides + dtype +
// device); the caller (torch, through python/fastserve/kernels.py) owns all
// memory, outputs included. Every entry point validates its arguments first
// and throws InvalidArgument (Python ValueError) with a message naming the
// argument; nothing is written before validation passes.
//
// Offsets (lengths, cu_seqlens) and indices may be int32 or int64. For CPU
// tensors they are read and validated on the host, and the kernels use the
// validated copy, so what is checked is exactly what is used. For CUDA
// tensors the kernels read them on the device: nothing is copied to the host
// and nothing waits for the stream, so their values are not validated (a
// value check would need that wait); the CUDA kernels are memory-safe on any
// values instead (see the CUDA section below).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace fastserve {
namespace kernels {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kOther };
enum class DeviceType : int32_t { kCPU, kCUDA };
enum class PoolMode : int32_t { kMean, kCls, kMax };

// "float32", "float16", "bfloat16", "int32", "int64"; anything else is kOther.
DType dtype_from_string(const std::string& name);
const char* to_string(DType d);
PoolMode pool_mode_from_string(const std::string& name);  // "mean", "cls", "max"

#if defined(__CUDACC__)
#define FS_HOST_DEVICE __host__ __device__
#else
#define FS_HOST_DEVICE
#endif
// Max pooling's step, on every device: a NaN row wins and stays (as torch's
// amax gives it), where v > acc ? v : acc would drop a NaN after the first row.
FS_HOST_DEVICE inline float pool_max(float acc, float v) { return (v > acc || v != v) ? v : acc; }
// Mean pooling's rows per partial sum, on every device: a segment of n rows
// is summed as about sqrt(n) blocks of about sqrt(n) rows, each block's sum
// added to the total, so float32 rounding grows as 2 sqrt(n) additions, not
// n (at n = 8192 with values near 1, 3.8e-6 from the exact mean one after
// another, 1.6e-7 as torch's cascade). Max and cls need no blocks (exact).
FS_HOST_DEVICE inline int64_t mean_block_rows(int64_t n) {
  int64_t b = 8;
  while (b * b < n) b *= 2;  // the power of two at or above sqrt(n), at least 8
  return b;
}
size_t element_size(DType d);                              // 0 for kOther

struct TensorArg {
  void* data = nullptr;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;  // in elements, like torch; empty means contiguous
  DType dtype = DType::kOther;
  std::string dtype_name;        // for error messages when dtype is kOther
  DeviceType device = DeviceType::kCPU;
  int device_index = 0;
};

// stream: the caller's cudaStream_t as an integer (0 = legacy default stream);
// ignored for CPU tensors.

// Padded x [B, L, H] -> packed out [T, H]. seqlens is lengths [B] or
// cu_seqlens [B + 1] (told apart by its size); T = sum of lengths. CUDA
// tensors take cu_seqlens only (lengths would need a prefix sum on the host),
// and T is out's row count.
void pack(const TensorArg& x, const TensorArg& seqlens, const TensorArg& out, uintptr_t stream = 0);

// Packed x [T, H] + cu_seqlens [B + 1] -> padded out [B, L, H]; rows past a
// sequence's length are zero.
void unpack(const TensorArg& x, const TensorArg& cu_seqlens, const TensorArg& out, uintptr_t stream = 0);

// Pool each segment of packed rows x [T, H] into out [B, H], always float32:
// embeddings leave the model here, and fp32 output keeps the fp32 accumulator's
// precision at a cost of B*H*4 bytes. mean / cls (first row) / max; an empty
// segment pools to zeros. normalize: divide by max(||row||_2, 1e-12), as
// torch.nn.functional.normalize does: a row with a NaN is all NaN.
// scratch: for CUDA tensors, float32 on x's device with at least
// segment_pool_scratch(x, cu_seqlens, mode) elements (may be null when that
// is 0); unused on the CPU.
void segment_pool(const TensorArg& x, const TensorArg& cu_seqlens, const TensorArg& out,
                  PoolMode mode, bool normalize, uintptr_t stream = 0, const TensorArg* scratch = nullptr);
// Floats of scratch segment_pool needs for these arguments (0 on the CPU and
// where the CUDA kernel does not split segments).
int64_t segment_pool_scratch(const TensorArg& x, const TensorArg& cu_seqlens, PoolMode mode);

// out[i] = x[index[i]] for x [N, ...], index [M], out [M, ...]; 0 <= index < N
// (CUDA: a row whose index is outside [0, N) is written as zeros).
void gather(const TensorArg& x, const TensorArg& index, const TensorArg& out, uintptr_t stream = 0);

// Exact self-attention of every sequence of a packed batch, CPU and float32
// only: qkv [T, 3, nh, hd] (queries, keys, values of each token), cu_seqlens
// [B + 1], out [T, nh, hd] = softmax(q k^T * scale) v within each sequence.
// bias: null, or the [3 * nh * hd] bias of the projection that made qkv
// (added to q, k and v here). threads: at most this many threads (the
// caller's torch thread count). portable: run the portable loops, not the
// vector paths (tests).
void attention(const TensorArg& qkv, const TensorArg& cu_seqlens, const TensorArg& out, const TensorArg* bias,
               double scale, int threads, bool portable = false);

// The elementwise tails of an encoder layer, in place on a GEMM's output x
// [rows, N] that ran without its bias [N]:
// bias_gelu: x = gelu(x + bias), GELU exact (erf);
// add_layer_norm: x = LayerNorm(x + bias + residual) * weight + beta, over N.
// CPU tensors: float32 or bfloat16, on up to `threads` threads. CUDA tensors
// (a CUDA build): float32, float16 or bfloat16, one launch on `stream`
// (threads and portable unused); validation reads only shapes, dtypes and
// devices, so a call never waits on the GPU and may be captured in a graph.
void bias_gelu(const TensorArg& x, const TensorArg& bias, int threads, bool portable = false, uintptr_t stream = 0);
void add_layer_norm(const TensorArg& x, const TensorArg& bias, const TensorArg& residual, const TensorArg& weight,
                    const TensorArg& beta, double eps, int threads, bool portable = false, uintptr_t stream = 0);
// Their CUDA kernels (csrc/kernels/cuda/epilogue.cu, only when CUDA is
// compiled in), on validated contiguous device memory of `dtype`.
namespace cuda {
void bias_gelu(void* x, const void* bias, DType dtype, int64_t rows, int64_t N, int device, uintptr_t stream);
void add_layer_norm(void* x, const void* bias, const void* residual, const void* w, const void* b, float eps,
                    DType dtype, int64_t rows, int64_t N, int device, uintptr_t stream);
}  // namespace cuda

namespace cpu {
void pack(const void* x, int64_t B, int64_t L, const int64_t* cu, size_t row_bytes, void* out);
void unpack(const void* x, const int64_t* cu, int64_t B, int64_t L, size_t row_bytes, void* out);
void segment_pool(const void* x, DType dtype, const int64_t* cu, int64_t B, int64_t H,
                  PoolMode mode, bool normalize, float* out);
void gather(const void* x, const int64_t* index, int64_t M, size_t row_bytes, void* out);
// Worker threads a CPU kernel uses for `bytes` of traffic (1 below the
// threshold where threads pay; see kernels_cpu.cpp).
int threads_for(size_t bytes);
// Whether the CPU kernels' AVX2 + FMA paths run on this CPU (x86-64 with
// AVX2, F16C and FMA, and FASTSERVE_KERNEL_NO_SIMD off: unset, empty or "0").
bool vector_paths();
// The instruction sets of the layer kernels' paths, narrowest first. A call
// takes a cap and runs the widest path this CPU has up to it (kAvx512 where
// the CPU has AVX-512F and FASTSERVE_KERNEL_NO_AVX512 is off (unset, empty
// or "0"), and the width
// is a multiple of 16; kAvx512Bf16 where it also has AVX512-BF16; kAvx2 as
// vector_paths() says, width a multiple of 8): the default runs the best,
// tests and benchmarks compare them. kAvx512Bf16 is kAvx512 with bfloat16
// stores in one instruction (vcvtneps2bf16), bit for bit the same results,
// and, for bfloat16 memory, attention's products in bfloat16 arithmetic
// (vdpbf16ps; cpu/attention_dpbf16.inc): within a stated bound of kAvx512's
// attention, not bitwise.
enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
// The path a layer kernel runs for rows of `width` floats (head width or row
// width) under `cap` and the process-wide cap; best_isa() is
// isa_for(Isa::kAvx512Bf16, 16), the widest this CPU runs now.
Isa isa_for(Isa cap, int64_t width);
Isa best_isa();
// A process-wide cap on every layer kernel call (kAvx512Bf16 at start: none),
// and on segment_pool (its portable path under kPortable), for A/B
// measurements and tests in one process; returns the previous cap.
Isa set_isa_cap(Isa cap);
// The layer kernels, on float32 or on bfloat16 (by its bits: uint16_t),
// computing in float32 either way.
void attention(const float* qkv, const float* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
               float scale, int threads, float* out, Isa isa = Isa::kAvx512Bf16);
void attention(const uint16_t* qkv, const uint16_t* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
               float scale, int threads, uint16_t* out, Isa isa = Isa::kAvx512Bf16);
void bias_gelu(float* x, const float* bias, int64_t rows, int64_t N, int threads, Isa isa = Isa::kAvx512Bf16);
void bias_gelu(uint16_t* x, const uint16_t* bias, int64_t rows, int64_t N, int threads, Isa isa = Isa::kAvx512Bf16);
void add_layer_norm(float* x, const float* bias, const float* residual, const float* w, const float* b, float eps,
                    int64_t rows, int64_t N, int threads, Isa isa = Isa::kAvx512Bf16);
void add_layer_norm(uint16_t* x, const uint16_t* bias, const uint16_t* residual, const uint16_t* w,
                    const uint16_t* b, float eps, int64_t rows, int64_t N, int threads, Isa isa = Isa::kAvx512Bf16);
}  // namespace cpu

// ----------------------------------------------------------------- CUDA kernels
// Defined in csrc/kernels/cuda/kernels.cu (only when CUDA is compiled in).
// Offsets and indices are the caller's device tensors (int32 or int64, by
// offsets_dtype), read by the kernels; one launch per op on `stream` (two for
// a segment_pool with splits > 1), no allocation, copy or synchronisation.
// Memory-safe on any offset values: a segment is clamped to [0, T] and to
// length <= L, an index outside [0, N) gives a row of zeros; rows of pack's
// out that no clamped segment covers are left as they were.
namespace cuda {
void pack(const void* x, int64_t B, int64_t L, const void* cu, DType cu_dtype, int64_t T, size_t row_bytes, void* out,
          int device, uintptr_t stream);
void unpack(const void* x, int64_t T, const void* cu, DType cu_dtype, int64_t B, int64_t L, size_t row_bytes,
            void* out, int device, uintptr_t stream);
// Pieces each segment is split into (threads::pool_splits on this device).
int64_t pool_splits(int64_t B, int64_t T, PoolMode mode, int device);
// scratch: [B * splits, H] floats when splits > 1.
void segment_pool(const void* x, DType dtype, int64_t T, const void* cu, DType cu_dtype, int64_t B, int64_t H,
                  PoolMode mode, bool normalize, float* out, float* scratch, int64_t splits, int device,
                  uintptr_t stream);
void gather(const void* x, int64_t N, const void* index, DType index_dtype, int64_t M, size_t row_bytes, void* out,
            int device, uintptr_t stream);
}  // namespace cuda

// ----------------------------------------------------------------- conversions
// Bit-exact fp16 / bf16 -> float, branch-free so the CPU loops vectorise; the
// same code runs in the CUDA per-thread functions.
FS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
FS_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
FS_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// float -> bfloat16 bits, rounded to nearest even, a NaN kept quiet (as
// torch converts, and as the CPU kernels store it).
FS_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
#endif
}
FS_HD float fp16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Exponent and mantissa shifted into place, rescaled by 2^(127-15): exact for
  // normals and subnormals. Inf/NaN (exponent 31) get the float exponent 255.
  const float scaled = bits_to_float(em << 13) * 5.192296858534828e33f;  // 2^112
  uint32_t mag;
#if defined(__CUDA_ARCH__)
  mag = __float_as_uint(scaled);
#else
  std::memcpy(&mag, &scaled, sizeof mag);
#endif
  // A mask, not a branch: GCC leaves a ternary here as control flow, and the
  // portable CPU pooling loop then does not vectorise.
  mag |= (0u - uint32_t(em >= 0x7c00u)) & 0x7f800000u;
  return bits_to_float(sign | mag);
}

}  // namespace kernels
}  // namespace fastserve
