// CUDA epilogue kernels: bias + GELU and bias + residual + LayerNorm, in place
// on a GEMM's output, one launch per call on the caller's stream. Each
// __global__ maps the grid onto the per-thread functions of
// epilogue_threads.cuh (tested on the CPU by tests/cpp/test_epilogue_cuda.cpp)
// and, for LayerNorm, sums a row's partials across its threads. Nothing here
// allocates, copies to or from the host or waits on the device, and the launch
// shape depends only on the shapes and pointers: a call can be captured in a
// CUDA graph and replayed.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "epilogue_threads.cuh"
#include "fastserve/kernels.h"
#include "guard.cuh"

namespace fastserve {
namespace kernels {
namespace cuda {
namespace {

using namespace epilogue;

template <class E, int V>
__global__ void __launch_bounds__(256) bias_gelu_kernel(BiasGeluParams p) {
  bias_gelu_thread<E, V>(p, blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y, gridDim.y);
}

// The sum of v over the threads of one row (one threadIdx.y): a butterfly in
// each warp, then, where a row spans several warps, the warps' totals in
// order through shared memory. Every thread of the row gets the same bits
// (both lanes of a butterfly pair add the same two values), so they all
// normalise with one mean and one rstd. Called by every thread of the block,
// rows past the end included: it synchronises the block.
__device__ float row_sum(float v, float* warp_part) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (blockDim.x == 32) return v;  // a row is one warp (blockDim.x is a multiple of 32)
  const int warps = int(blockDim.x) / 32, slot = int(threadIdx.y) * warps;
  if ((threadIdx.x & 31) == 0) warp_part[slot + int(threadIdx.x) / 32] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < warps; ++w) t += warp_part[slot + w];
  __syncthreads();  // before the next call writes warp_part again
  return t;
}

template <class E, int V>
__global__ void __launch_bounds__(kMaxRowThreads) add_layer_norm_kernel(LayerNormParams p) {
  __shared__ float warp_part[kMaxRowThreads / 32];
  const int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = row < p.rows;
  const int tx = threadIdx.x, bdx = blockDim.x;
  RowCache<V> c;
  const float sum = live ? ln_sum_thread<E, V>(p, row, tx, bdx, c) : 0.f;
  const float mean = ln_mean(row_sum(sum, warp_part), p.N);
  const float sq = live ? ln_sq_thread<E, V>(p, row, tx, bdx, mean, c) : 0.f;
  const float rstd = ln_rstd(row_sum(sq, warp_part), p.N, p.eps);
  if (live) ln_out_thread<E, V>(p, row, tx, bdx, mean, rstd, c);
}

template <class E, int V>
void launch_bias_gelu(void* x, const void* bias, int64_t rows, int64_t N, cudaStream_t s) {
  const BiasGeluParams p{x, bias, rows, N / V};
  const BiasGeluShape sh = bias_gelu_shape(rows, p.groups);
  if (sh.gx > 0x7fffffffLL) throw std::runtime_error("bias_gelu: rows too wide for one CUDA launch");
  bias_gelu_kernel<E, V><<<dim3(unsigned(sh.gx), unsigned(sh.gy)), dim3(sh.bdx, sh.bdy), 0, s>>>(p);
  check(cudaGetLastError(), "bias_gelu launch");
}

template <class E>
void bias_gelu_as(void* x, const void* bias, int64_t rows, int64_t N, cudaStream_t s) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  if (vector_width(sizeof(typename E::Storage), N, {x, bias}) == V) launch_bias_gelu<E, V>(x, bias, rows, N, s);
  else launch_bias_gelu<E, 1>(x, bias, rows, N, s);
}

template <class E, int V>
void launch_add_layer_norm(LayerNormParams p, cudaStream_t s) {
  p.groups = p.N / V;
  const LayerNormShape sh = layer_norm_shape(p.rows, p.groups);
  if (sh.blocks > 0x7fffffffLL) throw std::runtime_error("add_layer_norm: too many rows for one CUDA launch");
  add_layer_norm_kernel<E, V><<<unsigned(sh.blocks), dim3(sh.bdx, sh.bdy), 0, s>>>(p);
  check(cudaGetLastError(), "add_layer_norm launch");
}

template <class E>
void add_layer_norm_as(const LayerNormParams& p, cudaStream_t s) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  if (vector_width(sizeof(typename E::Storage), p.N, {p.x, p.bias, p.residual, p.w, p.b}) == V)
    launch_add_layer_norm<E, V>(p, s);
  else
    launch_add_layer_norm<E, 1>(p, s);
}

}  // namespace

void bias_gelu(void* x, const void* bias, DType dtype, int64_t rows, int64_t N, int device, uintptr_t stream) {
  DeviceGuard g(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: bias_gelu_as<F32>(x, bias, rows, N, s); break;
    case DType::kFloat16: bias_gelu_as<F16>(x, bias, rows, N, s); break;
    case DType::kBFloat16: bias_gelu_as<BF16>(x, bias, rows, N, s); break;
    default: throw std::logic_error("bias_gelu: unvalidated dtype");
  }
}

void add_layer_norm(void* x, const void* bias, const void* residual, const void* w, const void* b, float eps,
                    DType dtype, int64_t rows, int64_t N, int device, uintptr_t stream) {
  DeviceGuard g(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const LayerNormParams p{x, bias, residual, w, b, eps, rows, N, 0};
  switch (dtype) {
    case DType::kFloat32: add_layer_norm_as<F32>(p, s); break;
    case DType::kFloat16: add_layer_norm_as<F16>(p, s); break;
    case DType::kBFloat16: add_layer_norm_as<BF16>(p, s); break;
    default: throw std::logic_error("add_layer_norm: unvalidated dtype");
  }
}

}  // namespace cuda
}  // namespace kernels
}  // namespace fastserve
