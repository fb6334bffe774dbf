// CUDA packing kernels: one launch per op on the caller's stream. Each
// __global__ only maps the grid onto the per-thread functions of
// kernel_threads.cuh (tested on the CPU by tests/cpp/test_kernels.cpp).
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "fastserve/kernels.h"
#include "kernel_threads.cuh"

namespace fastserve {
namespace kernels {
namespace cuda {
namespace {

using namespace threads;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
  }
}

// Makes `device` current for the scope of one call, restoring the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

// Validated offsets staged in stream-ordered scratch memory, freed in stream
// order after the kernel that reads them.
class DeviceOffsets {
 public:
  DeviceOffsets(const std::vector<int64_t>& host, cudaStream_t s) : s_(s) {
    const size_t bytes = host.size() * sizeof(int64_t);
    check(cudaMallocAsync(reinterpret_cast<void**>(&p_), bytes, s), "cudaMallocAsync");
    // From pageable memory: returns once `host` is staged, so it may be freed after.
    const cudaError_t e = cudaMemcpyAsync(p_, host.data(), bytes, cudaMemcpyHostToDevice, s);
    if (e != cudaSuccess) {
      cudaFreeAsync(p_, s);
      check(e, "cudaMemcpyAsync");
    }
  }
  ~DeviceOffsets() { cudaFreeAsync(p_, s_); }
  DeviceOffsets(const DeviceOffsets&) = delete;
  DeviceOffsets& operator=(const DeviceOffsets&) = delete;
  const int64_t* get() const { return p_; }

 private:
  int64_t* p_ = nullptr;
  cudaStream_t s_;
};

enum class CopyOp { kPack, kUnpack, kGather };

template <CopyOp Op, class U>
__global__ void copy_kernel(CopyParams p) {
  const int64_t block = blockIdx.x;
  if (Op == CopyOp::kPack) pack_thread<U>(p, block, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y);
  if (Op == CopyOp::kUnpack) unpack_thread<U>(p, block, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y);
  if (Op == CopyOp::kGather) gather_thread<U>(p, block, threadIdx.x, threadIdx.y, blockDim.x, blockDim.y);
}

template <CopyOp Op, class U>
void launch_copy(CopyParams p, size_t row_bytes, cudaStream_t s) {
  p.row_units = int64_t(row_bytes / sizeof(U));
  const CopyShape c = copy_shape(p.rows, p.row_units);
  if (c.blocks > 0x7fffffffLL) throw std::runtime_error("too many rows for one CUDA launch");
  copy_kernel<Op, U><<<unsigned(c.blocks), dim3(c.bdx, c.bdy), 0, s>>>(p);
  check(cudaGetLastError(), "kernel launch");
}

template <CopyOp Op>
void copy_rows(CopyParams p, size_t row_bytes, cudaStream_t s) {
  switch (copy_unit(row_bytes, p.x, p.out)) {
    case 16: launch_copy<Op, Vec16>(p, row_bytes, s); break;
    case 4: launch_copy<Op, uint32_t>(p, row_bytes, s); break;
    default: launch_copy<Op, uint16_t>(p, row_bytes, s); break;
  }
}

template <class E, int V>
__global__ void pool_kernel(PoolParams p, bool normalize) {
  const int64_t b = blockIdx.x;
  float sq = pool_thread<E, V>(p, b, threadIdx.x, blockDim.x);
  if (!normalize) return;
  // Block sum of the squared norm: warp shuffles, then one value per warp.
  __shared__ float warp_sums[32];
  __shared__ float scale;
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sq;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (unsigned w = 0; w < (blockDim.x + 31) / 32; ++w) t += warp_sums[w];
    scale = inv_norm(t);
  }
  __syncthreads();
  scale_thread<V>(p, b, threadIdx.x, blockDim.x, scale);
}

template <class E>
void launch_pool(const PoolParams& p, bool normalize, cudaStream_t s) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  if (p.H % V == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0) {
    pool_kernel<E, V><<<unsigned(p.B), pool_threads(p.H / V), 0, s>>>(p, normalize);
  } else {
    pool_kernel<E, 1><<<unsigned(p.B), pool_threads(p.H), 0, s>>>(p, normalize);
  }
  check(cudaGetLastError(), "kernel launch");
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

void copy_to_host(void* dst, const void* src, size_t bytes, int device, uintptr_t stream) {
  DeviceGuard g(device);
  check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, as_stream(stream)), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
}

void pack(const void* x, int64_t B, int64_t L, const std::vector<int64_t>& cu, size_t row_bytes, void* out,
          int device, uintptr_t stream) {
  DeviceGuard g(device);
  DeviceOffsets d(cu, as_stream(stream));
  copy_rows<CopyOp::kPack>(CopyParams{x, out, d.get(), B, L, cu.back(), 0}, row_bytes, as_stream(stream));
}

void unpack(const void* x, const std::vector<int64_t>& cu, int64_t L, size_t row_bytes, void* out, int device,
            uintptr_t stream) {
  DeviceGuard g(device);
  DeviceOffsets d(cu, as_stream(stream));
  const int64_t B = int64_t(cu.size()) - 1;
  copy_rows<CopyOp::kUnpack>(CopyParams{x, out, d.get(), B, L, B * L, 0}, row_bytes, as_stream(stream));
}

void segment_pool(const void* x, DType dtype, const std::vector<int64_t>& cu, int64_t H, PoolMode mode,
                  bool normalize, float* out, int device, uintptr_t stream) {
  DeviceGuard g(device);
  DeviceOffsets d(cu, as_stream(stream));
  const int64_t B = int64_t(cu.size()) - 1;
  if (B > 0x7fffffffLL) throw std::runtime_error("too many segments for one CUDA launch");
  const PoolParams p{x, d.get(), out, B, H, mode};
  switch (dtype) {
    case DType::kFloat32: launch_pool<F32>(p, normalize, as_stream(stream)); break;
    case DType::kFloat16: launch_pool<F16>(p, normalize, as_stream(stream)); break;
    case DType::kBFloat16: launch_pool<BF16>(p, normalize, as_stream(stream)); break;
    default: throw std::logic_error("segment_pool: unvalidated dtype");
  }
}

void gather(const void* x, const std::vector<int64_t>& index, size_t row_bytes, void* out, int device,
            uintptr_t stream) {
  DeviceGuard g(device);
  DeviceOffsets d(index, as_stream(stream));
  const int64_t M = int64_t(index.size());
  copy_rows<CopyOp::kGather>(CopyParams{x, out, d.get(), 0, 0, M, 0}, row_bytes, as_stream(stream));
}

}  // namespace cuda
}  // namespace kernels
}  // namespace fastserve
