// CUDA packing kernels: one launch per op on the caller's stream (two for a
// segment_pool that splits segments), reading offsets from the caller's
// device tensor: no host staging, allocation or synchronisation. Each
// __global__ only maps the grid onto the per-thread functions of
// kernel_threads.cuh (tested on the CPU by tests/cpp/test_kernels.cpp).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fastserve/kernels.h"
#include "guard.cuh"
#include "kernel_threads.cuh"

namespace fastserve {
namespace kernels {
namespace cuda {
namespace {

using namespace threads;

enum class CopyOp { kPack, kUnpack, kGather };

template <CopyOp Op, class U, class I>
__global__ void __launch_bounds__(kCopyThreads) copy_kernel(CopyParams<I> p) {
  const int64_t block = blockIdx.x;
  if (Op == CopyOp::kPack) pack_thread<U>(p, block, threadIdx.x);
  if (Op == CopyOp::kUnpack) unpack_thread<U>(p, block, threadIdx.x);
  if (Op == CopyOp::kGather) gather_thread<U>(p, block, threadIdx.x);
}

template <CopyOp Op, class U, class I>
void launch_copy(CopyParams<I> p, size_t row_bytes, cudaStream_t s) {
  p.row_units = int64_t(row_bytes / sizeof(U));
  p.run_rows = copy_run_rows(p.row_units, Op == CopyOp::kGather ? p.dst_rows : p.L);
  const int64_t blocks = copy_blocks(p, Op != CopyOp::kGather);
  if (blocks == 0) return;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("too many rows for one CUDA launch");
  copy_kernel<Op, U, I><<<unsigned(blocks), kCopyThreads, 0, s>>>(p);
  check(cudaGetLastError(), "kernel launch");
}

template <CopyOp Op, class I>
void copy_rows(CopyParams<I> p, size_t row_bytes, cudaStream_t s) {
  switch (copy_unit(row_bytes, p.x, p.out)) {
    case 16: launch_copy<Op, Vec16>(p, row_bytes, s); break;
    case 4: launch_copy<Op, uint32_t>(p, row_bytes, s); break;
    default: launch_copy<Op, uint16_t>(p, row_bytes, s); break;
  }
}

template <CopyOp Op>
void copy_rows(const void* x, void* out, const void* offsets, DType offsets_dtype, int64_t B, int64_t L,
               int64_t src_rows, int64_t dst_rows, size_t row_bytes, cudaStream_t s) {
  if (offsets_dtype == DType::kInt32)
    copy_rows<Op>(CopyParams<int32_t>{x, out, static_cast<const int32_t*>(offsets), B, L, src_rows, dst_rows, 0, 0},
                  row_bytes, s);
  else
    copy_rows<Op>(CopyParams<int64_t>{x, out, static_cast<const int64_t*>(offsets), B, L, src_rows, dst_rows, 0, 0},
                  row_bytes, s);
}

// Sum over the block of one float per thread of lane 0 (threads 0 .. bdx - 1,
// whole warps): warp shuffles, then one value per warp; every thread gets it.
__device__ float block_sum_lane0(float v, int bdx) {
  __shared__ float warp_sums[8];
  __shared__ float total;
  if (threadIdx.y == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  }
  __syncthreads();
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    float t = 0.f;
    for (int w = 0; w < bdx / 32; ++w) t += warp_sums[w];
    total = t;
  }
  __syncthreads();
  return total;
}

// Blocks (segment, piece), block (bdx, bdy) = pool_shape: see kernel_threads.cuh.
// Two blocks per multiprocessor at least (<= 64 registers a thread): one
// would leave a quarter of the threads a multiprocessor holds.
template <class E, int V, class I>
__global__ void __launch_bounds__(kPoolThreads, 2) pool_kernel(PoolParams<I> p, bool normalize) {
  __shared__ float lanes[kPoolThreads * V];
  const int64_t b = blockIdx.x / p.S, s = blockIdx.x - b * p.S;
  const int tx = threadIdx.x, ty = threadIdx.y, bdx = blockDim.x, bdy = blockDim.y;
  const Segment g = segment_at(p.cu, b, p.T, p.T);
  int64_t r0, r1;
  piece_rows(g, s, p.S, r0, r1);
  const int64_t groups = p.H / V;
  float sq = 0.f;
  for (int64_t g0 = 0; g0 < groups; g0 += bdx) {  // uniform over the block: syncs below
    const int64_t grp = g0 + tx;
    float f[V];
    if (grp < groups) pool_lane<E, V>(p, r0, r1, grp, ty, bdy, f);
    for (int i = 0; i < V; ++i) lanes[(ty * bdx + tx) * V + i] = grp < groups ? f[i] : 0.f;
    __syncthreads();
    if (ty == 0 && grp < groups) {
      pool_combine_lanes<V>(p.mode, &lanes[tx * V], int64_t(bdx) * V, bdy, f);
      sq += pool_store<V>(p, b, s, grp, g.len, f);
    }
    __syncthreads();
  }
  if (!normalize || p.S != 1) return;
  const float scale = inv_norm(block_sum_lane0(sq, bdx));
  scale_thread(p, b, ty * bdx + tx, bdx * bdy, scale);  // this block's own writes: visible after the syncs
}

// S > 1: one block of 256 threads per segment combines its pieces.
template <class I>
__global__ void __launch_bounds__(256) pool_combine_kernel(PoolParams<I> p, bool normalize) {
  const int64_t b = blockIdx.x;
  float sq = 0.f;
  for (int64_t h = threadIdx.x; h < p.H; h += blockDim.x) sq += pool_combine_thread(p, b, h);
  if (!normalize) return;
  __shared__ float warp_sums[8];
  __shared__ float scale;
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int w = 0; w < 8; ++w) t += warp_sums[w];
    scale = inv_norm(t);
  }
  __syncthreads();
  scale_thread(p, b, threadIdx.x, blockDim.x, scale);
}

template <class E, class I>
void launch_pool(const PoolParams<I>& p, bool normalize, cudaStream_t s) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  const int64_t blocks = p.B * p.S;
  if (blocks > 0x7fffffffLL) throw std::runtime_error("too many segments for one CUDA launch");
  if (p.H % V == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
    const PoolShape c = pool_shape(p.H / V);
    pool_kernel<E, V, I><<<unsigned(blocks), dim3(c.bdx, c.bdy), 0, s>>>(p, normalize);
  } else {
    const PoolShape c = pool_shape(p.H);
    pool_kernel<E, 1, I><<<unsigned(blocks), dim3(c.bdx, c.bdy), 0, s>>>(p, normalize);
  }
  check(cudaGetLastError(), "kernel launch");
  if (p.S > 1) {
    pool_combine_kernel<I><<<unsigned(p.B), 256, 0, s>>>(p, normalize);
    check(cudaGetLastError(), "kernel launch");
  }
}

template <class I>
void pool_typed(const PoolParams<I>& p, DType dtype, bool normalize, cudaStream_t s) {
  switch (dtype) {
    case DType::kFloat32: launch_pool<F32>(p, normalize, s); break;
    case DType::kFloat16: launch_pool<F16>(p, normalize, s); break;
    case DType::kBFloat16: launch_pool<BF16>(p, normalize, s); break;
    default: throw std::logic_error("segment_pool: unvalidated dtype");
  }
}

int multiprocessors(int device) {
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return n;
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void pack(const void* x, int64_t B, int64_t L, const void* cu, DType cu_dtype, int64_t T, size_t row_bytes,
          void* out, int device, uintptr_t stream) {
  DeviceGuard g(device);
  copy_rows<CopyOp::kPack>(x, out, cu, cu_dtype, B, L, B * L, T, row_bytes, as_stream(stream));
}

void unpack(const void* x, int64_t T, const void* cu, DType cu_dtype, int64_t B, int64_t L, size_t row_bytes,
            void* out, int device, uintptr_t stream) {
  DeviceGuard g(device);
  copy_rows<CopyOp::kUnpack>(x, out, cu, cu_dtype, B, L, T, B * L, row_bytes, as_stream(stream));
}

int64_t pool_splits(int64_t B, int64_t T, PoolMode mode, int device) {
  DeviceGuard g(device);
  return threads::pool_splits(B, T, mode, multiprocessors(device));
}

void segment_pool(const void* x, DType dtype, int64_t T, const void* cu, DType cu_dtype, int64_t B, int64_t H,
                  PoolMode mode, bool normalize, float* out, float* scratch, int64_t splits, int device,
                  uintptr_t stream) {
  DeviceGuard g(device);
  if (cu_dtype == DType::kInt32)
    pool_typed(PoolParams<int32_t>{x, static_cast<const int32_t*>(cu), out, scratch, B, T, H, splits, mode}, dtype,
               normalize, as_stream(stream));
  else
    pool_typed(PoolParams<int64_t>{x, static_cast<const int64_t*>(cu), out, scratch, B, T, H, splits, mode}, dtype,
               normalize, as_stream(stream));
}

void gather(const void* x, int64_t N, const void* index, DType index_dtype, int64_t M, size_t row_bytes, void* out,
            int device, uintptr_t stream) {
  DeviceGuard g(device);
  copy_rows<CopyOp::kGather>(x, out, index, index_dtype, 0, 0, N, M, row_bytes, as_stream(stream));
}

}  // namespace cuda
}  // namespace kernels
}  // namespace fastserve
