// Per-thread work of the CUDA packing kernels, as __host__ __device__
// functions. kernels.cu's __global__ wrappers only map (blockIdx, threadIdx)
// onto them; tests/cpp/test_kernels.cpp runs them over every (block, thread)
// of the same grid on the CPU and compares with the CPU kernels, so the
// indexing is tested on every CI run, GPU or not.
//
// Plain C++ when not compiled by nvcc (FS_HD is then `inline`).
#pragma once

#include <cmath>
#include <cstdint>

#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace threads {

// Copy unit of the row-copy kernels: 16 bytes when the row size and both base
// pointers allow it (one 128-bit load/store per thread), else 4, else 2 bytes.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Launch shape of a row-copy kernel: blockDim (bdx, bdy), one row per y.
// bdx covers a row's units (up to 256 threads, a power of two >= 32), the
// rest of the 256 threads take further rows so short rows still fill a block.
struct CopyShape {
  int bdx;
  int bdy;
  int64_t blocks;
};
FS_HD CopyShape copy_shape(int64_t rows, int64_t row_units) {
  int bdx = 32;
  while (bdx < 256 && bdx < row_units) bdx *= 2;
  const int bdy = 256 / bdx;
  return CopyShape{bdx, bdy, (rows + bdy - 1) / bdy};
}

// Largest copy unit (16, 4 or 2 bytes) dividing the row size and the base
// addresses; element sizes are 2 or 4, so 2 always works.
inline int copy_unit(size_t row_bytes, const void* a, const void* b) {
  const uintptr_t bits = uintptr_t(a) | uintptr_t(b) | uintptr_t(row_bytes);
  if (bits % 16 == 0) return 16;
  if (bits % 4 == 0) return 4;
  return 2;
}

struct CopyParams {
  const void* x;       // source rows
  void* out;           // destination rows
  const int64_t* cu;   // cu_seqlens [B + 1] (pack, unpack) or index [M] (gather)
  int64_t B;           // sequences (pack, unpack)
  int64_t L;           // padded length (pack, unpack)
  int64_t rows;        // destination rows: T (pack), B*L (unpack), M (gather)
  int64_t row_units;   // units of U per row
};

template <class U>
FS_HD void copy_row(const U* src, U* dst, int64_t units, int tx, int bdx) {
  for (int64_t k = tx; k < units; k += bdx) dst[k] = src[k];
}

// pack: destination row r of [T, H] comes from padded row (b, r - cu[b]),
// where cu[b] <= r < cu[b + 1] (binary search; empty segments never match).
template <class U>
FS_HD void pack_thread(const CopyParams& p, int64_t block, int tx, int ty, int bdx, int bdy) {
  const int64_t r = block * bdy + ty;
  if (r >= p.rows) return;
  int64_t lo = 0, hi = p.B;  // invariant: cu[lo] <= r < cu[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (p.cu[mid] <= r) lo = mid; else hi = mid;
  }
  const int64_t t = r - p.cu[lo];
  const U* src = static_cast<const U*>(p.x) + (lo * p.L + t) * p.row_units;
  copy_row(src, static_cast<U*>(p.out) + r * p.row_units, p.row_units, tx, bdx);
}

// unpack: destination row (b, t) of [B, L, H] is packed row cu[b] + t, or
// zeros past the sequence's length.
template <class U>
FS_HD void unpack_thread(const CopyParams& p, int64_t block, int tx, int ty, int bdx, int bdy) {
  const int64_t r = block * bdy + ty;
  if (r >= p.rows) return;
  const int64_t b = r / p.L, t = r - b * p.L;
  U* dst = static_cast<U*>(p.out) + r * p.row_units;
  if (t < p.cu[b + 1] - p.cu[b]) {
    copy_row(static_cast<const U*>(p.x) + (p.cu[b] + t) * p.row_units, dst, p.row_units, tx, bdx);
  } else {
    U zero;
    unsigned char* z = reinterpret_cast<unsigned char*>(&zero);
    for (unsigned i = 0; i < sizeof(U); ++i) z[i] = 0;
    for (int64_t k = tx; k < p.row_units; k += bdx) dst[k] = zero;
  }
}

// gather: destination row i is source row index[i] (p.cu holds the index).
template <class U>
FS_HD void gather_thread(const CopyParams& p, int64_t block, int tx, int ty, int bdx, int bdy) {
  const int64_t r = block * bdy + ty;
  if (r >= p.rows) return;
  copy_row(static_cast<const U*>(p.x) + p.cu[r] * p.row_units,
           static_cast<U*>(p.out) + r * p.row_units, p.row_units, tx, bdx);
}

// ---------------------------------------------------------------- pooling
// One block per segment; thread tx owns column groups g = tx, tx + bdx, ...
// of V contiguous columns (V elements = one 16-byte load when H and the base
// pointer allow it, else V = 1) and walks the segment's rows in order, so a
// column's float32 sum is accumulated in the same order as the CPU kernel's.

// Element storage: float, or the uint16 bit pattern of fp16 / bf16.
struct F32 {
  using Storage = float;
  static FS_HD float load(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) { return fp16_to_float(v); }
};
struct BF16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) { return bf16_to_float(v); }
};

template <class E, int V>
struct alignas(sizeof(typename E::Storage) * V) Chunk {
  typename E::Storage v[V];
};

struct PoolParams {
  const void* x;      // [T, H]
  const int64_t* cu;  // [B + 1]
  float* out;         // [B, H]
  int64_t B;
  int64_t H;
  PoolMode mode;
};

template <class E, int V>
FS_HD void load_chunk(const PoolParams& p, int64_t row, int64_t g, float (&f)[V]) {
  const Chunk<E, V> c = static_cast<const Chunk<E, V>*>(p.x)[row * (p.H / V) + g];
  for (int i = 0; i < V; ++i) f[i] = E::load(c.v[i]);
}

// Phase 1: pool this thread's columns of segment b into out; returns the
// thread's share of the squared L2 norm (the wrapper reduces it over the block).
template <class E, int V>
FS_HD float pool_thread(const PoolParams& p, int64_t b, int tx, int bdx) {
  const int64_t begin = p.cu[b], end = p.cu[b + 1], groups = p.H / V;
  float sq = 0.f;
  for (int64_t g = tx; g < groups; g += bdx) {
    float acc[V], f[V];
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    if (end > begin && p.mode != PoolMode::kMean) {
      load_chunk<E, V>(p, begin, g, acc);
      if (p.mode == PoolMode::kMax) {
        for (int64_t r = begin + 1; r < end; ++r) {
          load_chunk<E, V>(p, r, g, f);
          for (int i = 0; i < V; ++i) acc[i] = pool_max(acc[i], f[i]);
        }
      }
    } else if (end > begin) {
      // Blocks of mean_block_rows rows, each block's sum added to the total
      // (as the CPU kernels: about 2 sqrt(n) roundings deep, not n).
      const int64_t step = mean_block_rows(end - begin);
      float part[V];
      for (int64_t b0 = begin; b0 < end; b0 += step) {
        const int64_t b1 = b0 + step < end ? b0 + step : end;
        load_chunk<E, V>(p, b0, g, part);
        for (int64_t r = b0 + 1; r < b1; ++r) {
          load_chunk<E, V>(p, r, g, f);
          for (int i = 0; i < V; ++i) part[i] += f[i];
        }
        for (int i = 0; i < V; ++i) acc[i] = b0 == begin ? part[i] : acc[i] + part[i];
      }
      const float inv = 1.f / float(end - begin);
      for (int i = 0; i < V; ++i) acc[i] *= inv;
    }
    float* o = p.out + b * p.H + g * V;
    for (int i = 0; i < V; ++i) {
      o[i] = acc[i];
      sq += acc[i] * acc[i];
    }
  }
  return sq;
}

FS_HD float inv_norm(float sq) {
  const float n = sqrtf(sq);
  return 1.f / (n < 1e-12f ? 1e-12f : n);  // a NaN norm stays NaN, as in F.normalize
}

// Phase 2 (normalize only): scale this thread's columns by the block's 1/||row||.
template <int V>
FS_HD void scale_thread(const PoolParams& p, int64_t b, int tx, int bdx, float scale) {
  const int64_t groups = p.H / V;
  for (int64_t g = tx; g < groups; g += bdx) {
    float* o = p.out + b * p.H + g * V;
    for (int i = 0; i < V; ++i) o[i] *= scale;
  }
}

// Threads per pooling block: enough warps to cover the column groups, <= 256.
FS_HD int pool_threads(int64_t groups) {
  int n = 32;
  while (n < 256 && n < groups) n *= 2;
  return n;
}

}  // namespace threads
}  // namespace kernels
}  // namespace fastserve
