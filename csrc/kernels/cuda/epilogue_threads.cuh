// Per-thread work of the CUDA epilogue kernels (epilogue.cu), as __host__
// __device__ functions: bias + GELU and bias + residual + LayerNorm, in place
// on a GEMM's output x [rows, N] in float32, float16 or bfloat16, computed in
// float32. epilogue.cu's __global__ wrappers only map (blockIdx, threadIdx)
// onto them and reduce a row's partial sums across its threads;
// tests/cpp/test_epilogue_cuda.cpp runs them over every (block, thread) of
// the grid the launcher would use, on the CPU, against the CPU epilogue
// kernels (epilogue_cpu.cpp), so the indexing, the vector and scalar paths
// and the rounding are tested on every CI run, GPU or not.
//
// Semantics are the CPU kernels': GELU exact (erf); LayerNorm over the last
// dimension with the biased variance, two passes (mean, then the squared
// deviations from it) in float32; in float16 and bfloat16 the sum x + bias +
// residual is rounded to x's dtype before LayerNorm reads it, as torch's
// add then LayerNorm would, and as the CPU bfloat16 kernel does.
//
// Plain C++ when not compiled by nvcc (FS_HD is then `inline`).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FS_UNROLL _Pragma("unroll")
#else
#define FS_UNROLL
#endif

#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace epilogue {

// ------------------------------------------------------------ conversions
// (float_bits and float_to_bf16: fastserve/kernels.h, shared with the CPU kernels.)

// float -> float16 bits, rounded to nearest even: subnormals kept, beyond
// 65504 (from 65520 up, the tie rounding to the odd 65504's even neighbour)
// infinity, a NaN kept quiet. The device converts in one instruction.
FS_HD uint16_t float_to_fp16(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (u >= 0x38800000u) {  // normal in float16: rebias the exponent by 127 - 15
    uint32_t h = (u - 0x38000000u) >> 13;
    const uint32_t rest = u & 0x1fffu;
    h += (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ? 1u : 0u;  // a carry moves the exponent up
    return uint16_t(sign | h);
  }
  // Below float16's smallest normal 2^-14: a multiple of 2^-24 (1024 of them
  // make that normal, which the rounding may reach).
  const int e = int(u >> 23);
  if (e < 102) return sign;  // below 2^-25: to zero (2^-25 itself is a tie, to the even 0)
  const uint32_t mant = (u & 0x7fffffu) | 0x800000u;
  const int shift = 126 - e;  // 14 .. 24
  uint32_t m = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
  m += (rest > half || (rest == half && (m & 1u))) ? 1u : 0u;
  return uint16_t(sign | m);
#endif
}

// Element storage: float, or the bits of a float16 / bfloat16 (as uint16_t).
struct F32 {
  using Storage = float;
  static FS_HD float load(float v) { return v; }
  static FS_HD float store(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v));  // one instruction; exact, as fp16_to_float
#else
    return fp16_to_float(v);
#endif
  }
  static FS_HD uint16_t store(float v) { return float_to_fp16(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) { return bf16_to_float(v); }
  static FS_HD uint16_t store(float v) { return float_to_bf16(v); }
};

// V contiguous elements: one 16-byte load or store when V * size = 16 (the
// launcher picks that V only where N and every base pointer allow it), else V = 1.
template <class E, int V>
struct alignas(sizeof(typename E::Storage) * V) Pack {
  typename E::Storage v[V];
};

template <class E, int V>
FS_HD void load_pack(const void* base, int64_t i, float (&f)[V]) {
  const Pack<E, V> c = static_cast<const Pack<E, V>*>(base)[i];
  FS_UNROLL
  for (int k = 0; k < V; ++k) f[k] = E::load(c.v[k]);
}

template <class E, int V>
FS_HD void store_pack(void* base, int64_t i, const float (&f)[V]) {
  Pack<E, V> c;
  FS_UNROLL
  for (int k = 0; k < V; ++k) c.v[k] = E::store(f[k]);
  static_cast<Pack<E, V>*>(base)[i] = c;
}

// Elements per vector for storage of `elem_bytes`: 16-byte vectors where N
// and every pointer allow them, else 1.
inline int vector_width(size_t elem_bytes, int64_t N, std::initializer_list<const void*> ptrs) {
  const int V = int(16 / elem_bytes);
  uintptr_t bits = 0;
  for (const void* p : ptrs) bits |= uintptr_t(p);
  return (N % V == 0 && bits % 16 == 0) ? V : 1;
}

// ------------------------------------------------------------ bias + GELU
// Block (bdx, bdy): thread (tx, ty) of block (bx, by) takes column group g =
// bx * bdx + tx (V columns) of rows by * bdy + ty, then every gridDim.y * bdy
// rows after it (a grid's y extent stops at 65535 blocks), loading the
// bias's group once for them all.
FS_HD float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

struct BiasGeluParams {
  void* x;           // [rows, N]
  const void* bias;  // [N]
  int64_t rows;
  int64_t groups;    // N / V
};

struct BiasGeluShape {
  int bdx, bdy;
  int64_t gx, gy;  // grid
};

// Blocks of up to 256 threads: a row's groups across one block when they fit
// (several rows a block where a row is short), else 128 threads across and
// two rows a block (768 and 384 groups, BERT's 3072 and 1536 columns in
// 16-bit, divide evenly).
// max_gy: the grid's y extent at most (CUDA's limit; tests pass less).
FS_HD BiasGeluShape bias_gelu_shape(int64_t rows, int64_t groups, int64_t max_gy = 65535) {
  const int bdx = groups <= 256 ? int((groups + 31) / 32 * 32) : 128;
  const int bdy = bdx >= 256 ? 1 : 256 / bdx;
  const int64_t gx = (groups + bdx - 1) / bdx, gy_all = (rows + bdy - 1) / bdy;
  return BiasGeluShape{bdx, bdy, gx, gy_all < max_gy ? gy_all : max_gy};
}

template <class E, int V>
FS_HD void bias_gelu_thread(const BiasGeluParams& p, int64_t bx, int64_t by, int tx, int ty, int bdx, int bdy,
                            int64_t gy) {
  const int64_t g = bx * bdx + tx;
  if (g >= p.groups) return;
  float b[V], f[V];
  load_pack<E, V>(p.bias, g, b);
  for (int64_t r = by * bdy + ty; r < p.rows; r += gy * bdy) {
    load_pack<E, V>(p.x, r * p.groups + g, f);
    FS_UNROLL
    for (int k = 0; k < V; ++k) f[k] = gelu(f[k] + b[k]);
    store_pack<E, V>(p.x, r * p.groups + g, f);
  }
}

// ------------------------------------------------------- residual + LayerNorm
// One row per y of a block (bdx, bdy); thread tx owns the row's column groups
// g = tx, tx + bdx, ... The first kCached of them stay in registers between
// the passes; any further ones (rows wider than kCached * bdx groups) are
// written back to x as the rounded sum and read again by the same thread,
// which loses nothing (the sum is stored in x's dtype in either case) and
// needs no synchronisation (each thread reads only what it wrote).
constexpr int kCached = 4;
constexpr int kMaxRowThreads = 512;

struct LayerNormParams {
  void* x;               // [rows, N]
  const void* bias;      // [N]
  const void* residual;  // [rows, N]
  const void* w;         // [N]
  const void* b;         // [N]
  float eps;
  int64_t rows;
  int64_t N;
  int64_t groups;        // N / V
};

template <int V>
struct RowCache {
  float v[kCached][V];
};

struct LayerNormShape {
  int bdx, bdy;
  int64_t blocks;
};

// Threads per row: a multiple of 32 covering the row's groups kCached to a
// thread (one warp up to 128 groups: BERT-base's 768 columns in 16-bit
// take 3 a thread), at most kMaxRowThreads; rows of up to 128 threads share
// a block of 128.
FS_HD LayerNormShape layer_norm_shape(int64_t rows, int64_t groups) {
  const int64_t need = (groups + kCached - 1) / kCached;
  int bdx = 32;
  while (bdx < kMaxRowThreads && bdx < need) bdx += 32;
  const int bdy = bdx >= 128 ? 1 : 128 / bdx;
  return LayerNormShape{bdx, bdy, (rows + bdy - 1) / bdy};
}

// Pass 1: s = x + bias + residual, rounded to x's dtype, for this thread's
// groups of `row`; returns their float32 sum.
template <class E, int V>
FS_HD float ln_sum_thread(const LayerNormParams& p, int64_t row, int tx, int bdx, RowCache<V>& c) {
  float sum = 0.f, xb[V], bb[V], rb[V];
  const int64_t base = row * p.groups;
  FS_UNROLL
  for (int k = 0; k < kCached; ++k) {
    const int64_t g = tx + int64_t(k) * bdx;
    if (g < p.groups) {
      load_pack<E, V>(p.x, base + g, xb);
      load_pack<E, V>(p.bias, g, bb);
      load_pack<E, V>(p.residual, base + g, rb);
      FS_UNROLL
      for (int i = 0; i < V; ++i) {
        c.v[k][i] = E::load(E::store(xb[i] + bb[i] + rb[i]));
        sum += c.v[k][i];
      }
    }
  }
  for (int64_t g = tx + int64_t(kCached) * bdx; g < p.groups; g += bdx) {
    load_pack<E, V>(p.x, base + g, xb);
    load_pack<E, V>(p.bias, g, bb);
    load_pack<E, V>(p.residual, base + g, rb);
    FS_UNROLL
    for (int i = 0; i < V; ++i) {
      xb[i] = E::load(E::store(xb[i] + bb[i] + rb[i]));
      sum += xb[i];
    }
    store_pack<E, V>(p.x, base + g, xb);
  }
  return sum;
}

FS_HD float ln_mean(float row_sum, int64_t N) { return row_sum / float(N); }
FS_HD float ln_rstd(float row_sq, int64_t N, float eps) { return 1.f / sqrtf(row_sq / float(N) + eps); }

// Pass 2: this thread's sum of squared deviations from the row's mean.
template <class E, int V>
FS_HD float ln_sq_thread(const LayerNormParams& p, int64_t row, int tx, int bdx, float mean, const RowCache<V>& c) {
  float sq = 0.f, f[V];
  FS_UNROLL
  for (int k = 0; k < kCached; ++k) {
    if (tx + int64_t(k) * bdx < p.groups) {
      FS_UNROLL
      for (int i = 0; i < V; ++i) sq += (c.v[k][i] - mean) * (c.v[k][i] - mean);
    }
  }
  for (int64_t g = tx + int64_t(kCached) * bdx; g < p.groups; g += bdx) {
    load_pack<E, V>(p.x, row * p.groups + g, f);
    FS_UNROLL
    for (int i = 0; i < V; ++i) sq += (f[i] - mean) * (f[i] - mean);
  }
  return sq;
}

// Pass 3: x = (s - mean) * rstd * w + b for this thread's groups.
template <class E, int V>
FS_HD void ln_out_thread(const LayerNormParams& p, int64_t row, int tx, int bdx, float mean, float rstd,
                         const RowCache<V>& c) {
  float f[V], wb[V], bb[V];
  const int64_t base = row * p.groups;
  FS_UNROLL
  for (int k = 0; k < kCached; ++k) {
    const int64_t g = tx + int64_t(k) * bdx;
    if (g < p.groups) {
      load_pack<E, V>(p.w, g, wb);
      load_pack<E, V>(p.b, g, bb);
      FS_UNROLL
      for (int i = 0; i < V; ++i) f[i] = (c.v[k][i] - mean) * rstd * wb[i] + bb[i];
      store_pack<E, V>(p.x, base + g, f);
    }
  }
  for (int64_t g = tx + int64_t(kCached) * bdx; g < p.groups; g += bdx) {
    load_pack<E, V>(p.x, base + g, f);
    load_pack<E, V>(p.w, g, wb);
    load_pack<E, V>(p.b, g, bb);
    FS_UNROLL
    for (int i = 0; i < V; ++i) f[i] = (f[i] - mean) * rstd * wb[i] + bb[i];
    store_pack<E, V>(p.x, base + g, f);
  }
}

}  // namespace epilogue
}  // namespace kernels
}  // namespace fastserve
