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

// Largest copy unit (16, 4 or 2 bytes) dividing the row size and the base
// addresses; element sizes are 2 or 4, so 2 always works.
inline int copy_unit(size_t row_bytes, const void* a, const void* b) {
  const uintptr_t bits = uintptr_t(a) | uintptr_t(b) | uintptr_t(row_bytes);
  if (bits % 16 == 0) return 16;
  if (bits % 4 == 0) return 4;
  return 2;
}

// ------------------------------------------------------------ offsets
// Offsets (cu_seqlens, index) are read in the kernels from the caller's device
// tensor, int32 or int64 (I), never staged or validated on the host: the
// kernels are memory-safe on any values instead. Segment b is clamped to
// begin in [0, T], end in [begin, T], length <= L, so a malformed cu_seqlens
// gives wrong rows, never an access outside the tensors.
struct Segment {
  int64_t begin;
  int64_t len;
};
template <class I>
FS_HD Segment segment_at(const I* cu, int64_t b, int64_t T, int64_t L) {
  int64_t s = int64_t(cu[b]), e = int64_t(cu[b + 1]);
  s = s < 0 ? 0 : (s > T ? T : s);
  e = e < s ? s : (e > T ? T : e);
  return Segment{s, e - s < L ? e - s : L};
}

// ------------------------------------------------------------ row copies
// Each block copies one run of up to run_rows rows that are contiguous on both
// sides (pack, unpack: consecutive rows of one sequence; gather: consecutive
// destination rows), as one flat range of units: kCopyThreads threads, each
// loading kCopyUnroll units before storing them (loads in flight, not one
// load-store round trip after another). run_rows makes a run about
// kCopyRunUnits units (32 KiB of 16-byte units), so a block's work is the
// same whatever the row width, and B * L / run_rows blocks fill the device.
constexpr int kCopyThreads = 256;
constexpr int kCopyUnroll = 4;
constexpr int64_t kCopyRunUnits = 2048;

FS_HD int64_t copy_run_rows(int64_t row_units, int64_t max_rows) {
  int64_t r = (kCopyRunUnits + row_units - 1) / row_units;
  if (r > max_rows) r = max_rows;
  return r < 1 ? 1 : r;
}

template <class I>
struct CopyParams {
  const void* x;       // source rows
  void* out;           // destination rows
  const I* cu;         // cu_seqlens [B + 1] (pack, unpack) or index [M] (gather)
  int64_t B;           // sequences (pack, unpack)
  int64_t L;           // padded length (pack, unpack)
  int64_t src_rows;    // rows of x: B*L (pack), T (unpack), N (gather)
  int64_t dst_rows;    // rows of out: T (pack), B*L (unpack), M (gather)
  int64_t row_units;   // units of U per row
  int64_t run_rows;    // rows per block (copy_run_rows)
};

// Blocks of a copy launch: B * ceil(L / run_rows) runs (pack, unpack; runs
// past a sequence's length return at once) or ceil(M / run_rows) (gather).
template <class I>
FS_HD int64_t copy_blocks(const CopyParams<I>& p, bool per_sequence) {
  if (p.run_rows <= 0) return 0;
  if (!per_sequence) return (p.dst_rows + p.run_rows - 1) / p.run_rows;
  return p.B * ((p.L + p.run_rows - 1) / p.run_rows);
}

// Units [0, n_copy) of dst from src, [n_copy, n_total) zeros.
template <class U>
FS_HD void copy_units(const U* src, U* dst, int64_t n_copy, int64_t n_total, int tid) {
  for (int64_t k0 = tid; k0 < n_total; k0 += int64_t(kCopyThreads) * kCopyUnroll) {
    U v[kCopyUnroll];
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t k = k0 + int64_t(i) * kCopyThreads;
      v[i] = k < n_copy ? src[k] : U{};
    }
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t k = k0 + int64_t(i) * kCopyThreads;
      if (k < n_total) dst[k] = v[i];
    }
  }
}

// pack: run `block` is rows [t0, t0 + run_rows) of sequence b of the padded x,
// copied to packed rows cu[b] + t0, ... (contiguous on both sides).
template <class U, class I>
FS_HD void pack_thread(const CopyParams<I>& p, int64_t block, int tid) {
  const int64_t runs = (p.L + p.run_rows - 1) / p.run_rows;
  const int64_t b = block / runs, t0 = (block - b * runs) * p.run_rows;
  const Segment s = segment_at(p.cu, b, p.dst_rows, p.L);
  if (t0 >= s.len) return;
  const int64_t rows = s.len - t0 < p.run_rows ? s.len - t0 : p.run_rows;
  const int64_t n = rows * p.row_units;
  copy_units(static_cast<const U*>(p.x) + (b * p.L + t0) * p.row_units,
             static_cast<U*>(p.out) + (s.begin + t0) * p.row_units, n, n, tid);
}

// unpack: run `block` is padded rows [t0, t0 + run_rows) of sequence b: packed
// rows cu[b] + t0, ... up to the sequence's length, zeros after (the padding
// is written too, as a copy of the padded tensor would).
template <class U, class I>
FS_HD void unpack_thread(const CopyParams<I>& p, int64_t block, int tid) {
  const int64_t runs = (p.L + p.run_rows - 1) / p.run_rows;
  const int64_t b = block / runs, t0 = (block - b * runs) * p.run_rows;
  const int64_t rows = p.L - t0 < p.run_rows ? p.L - t0 : p.run_rows;
  const Segment s = segment_at(p.cu, b, p.src_rows, p.L);
  int64_t valid = s.len - t0;
  valid = valid < 0 ? 0 : (valid > rows ? rows : valid);
  const U* src = static_cast<const U*>(p.x) + (valid ? (s.begin + t0) * p.row_units : 0);
  copy_units(src, static_cast<U*>(p.out) + (b * p.L + t0) * p.row_units, valid * p.row_units,
             rows * p.row_units, tid);
}

// gather: run `block` is destination rows [r0, r0 + run_rows); destination
// row r is source row index[r], or zeros where index[r] is outside [0, N).
template <class U, class I>
FS_HD void gather_thread(const CopyParams<I>& p, int64_t block, int tid) {
  const int64_t r0 = block * p.run_rows;
  const int64_t rows = p.dst_rows - r0 < p.run_rows ? p.dst_rows - r0 : p.run_rows;
  const int64_t n = rows * p.row_units;
  const U* x = static_cast<const U*>(p.x);
  U* dst = static_cast<U*>(p.out) + r0 * p.row_units;
  for (int64_t k0 = tid; k0 < n; k0 += int64_t(kCopyThreads) * kCopyUnroll) {
    U v[kCopyUnroll];
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t k = k0 + int64_t(i) * kCopyThreads;
      v[i] = U{};
      if (k < n) {
        // run_rows > 1 only where row_units < kCopyRunUnits, so k < 2 *
        // kCopyRunUnits and the division is a 32-bit one.
        const int64_t q = rows == 1 ? 0 : int64_t(uint32_t(k) / uint32_t(p.row_units));
        const int64_t j = int64_t(p.cu[r0 + q]);
        if (j >= 0 && j < p.src_rows) v[i] = x[j * p.row_units + (k - q * p.row_units)];
      }
    }
    for (int i = 0; i < kCopyUnroll; ++i) {
      const int64_t k = k0 + int64_t(i) * kCopyThreads;
      if (k < n) dst[k] = v[i];
    }
  }
}

// ---------------------------------------------------------------- pooling
// Blocks over (segment b, piece s): segment b's rows are split into S pieces
// of about n / S rows (S = pool_splits: 1 where the batch alone fills the
// device, more where a few long sequences would leave most of it idle). A
// block is kPoolThreads threads as (tx, ty): tx over column groups of V
// contiguous columns (V elements = one 16-byte load where H and the base
// pointer allow it, else V = 1), ty over row lanes: lane ty reduces rows
// ty, ty + bdy, ... of the piece, then lanes are combined in lane order
// through shared memory (deterministic). S = 1: the block finishes the row
// (mean's division, normalize). S > 1: pieces go to a float32 scratch
// [B * S, H] and a second kernel combines them in piece order, one block
// per segment. cls reads one row: always S = 1, lane 0.

// Element storage: float, or the uint16 bit pattern of fp16 / bf16.
struct F32 {
  using Storage = float;
  static FS_HD float load(float v) { return v; }
};
struct F16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) {
#if defined(__CUDA_ARCH__)
    // One conversion instruction (exact, as fp16_to_float): the branch-free
    // bit arithmetic held enough registers to spill the 8-row loads.
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
#else
    return fp16_to_float(v);
#endif
  }
};
struct BF16 {
  using Storage = uint16_t;
  static FS_HD float load(uint16_t v) { return bf16_to_float(v); }
};

template <class E, int V>
struct alignas(sizeof(typename E::Storage) * V) Chunk {
  typename E::Storage v[V];
};

constexpr int kPoolThreads = 512;
constexpr int kPoolUnroll = 8;
constexpr int64_t kPoolMinPieceRows = 64;  // a piece's partial row (H floats) costs <= 1/16 of its rows' bytes (fp16)
constexpr int64_t kPoolMaxSplits = 1024;

// Block shape (bdx, bdy) of the pooling kernels: bdx a multiple of 32 covering
// the column groups (at most 256; more groups take several passes), bdy row
// lanes filling kPoolThreads.
struct PoolShape {
  int bdx;
  int bdy;
};
FS_HD PoolShape pool_shape(int64_t groups) {
  int bdx = 32;
  while (bdx < 256 && bdx < groups) bdx += 32;
  return PoolShape{bdx, kPoolThreads / bdx};
}

// Pieces per segment: 1 where B blocks fill `sms` multiprocessors twice over,
// else enough for 2 * sms blocks, but pieces of >= kPoolMinPieceRows rows on
// average (T / B is what the host knows without reading cu_seqlens).
FS_HD int64_t pool_splits(int64_t B, int64_t T, PoolMode mode, int64_t sms) {
  if (mode == PoolMode::kCls || B <= 0) return 1;
  const int64_t want = 2 * sms;
  if (B >= want) return 1;
  int64_t s = (want + B - 1) / B;
  const int64_t by_rows = T / (B * kPoolMinPieceRows);
  if (s > by_rows) s = by_rows;
  if (s > kPoolMaxSplits) s = kPoolMaxSplits;
  return s < 1 ? 1 : s;
}

template <class I>
struct PoolParams {
  const void* x;      // [T, H]
  const I* cu;        // [B + 1]
  float* out;         // [B, H]
  float* partial;     // [B * S, H] when S > 1
  int64_t B;
  int64_t T;
  int64_t H;
  int64_t S;
  PoolMode mode;
};

// Rows [r0, r1) of piece s of a segment (all of it for S = 1).
FS_HD void piece_rows(const Segment& g, int64_t s, int64_t S, int64_t& r0, int64_t& r1) {
  r0 = g.begin + g.len * s / S;
  r1 = g.begin + g.len * (s + 1) / S;
}

// The identity of a mode's reduction: 0 for sums, -inf for max (a piece or a
// lane with no rows; an empty segment's output is 0 whatever the mode).
FS_HD float pool_identity(PoolMode m) { return m == PoolMode::kMax ? -INFINITY : 0.f; }
FS_HD float pool_step(PoolMode m, float acc, float v) { return m == PoolMode::kMax ? pool_max(acc, v) : acc + v; }

// Step 1 (every thread, per column group g): lane ty's reduction of its rows
// of [r0, r1) into f. cls: lane 0 reads row r0.
template <class E, int V, class I>
FS_HD void pool_lane(const PoolParams<I>& p, int64_t r0, int64_t r1, int64_t g, int ty, int bdy, float (&f)[V]) {
  for (int i = 0; i < V; ++i) f[i] = pool_identity(p.mode);
  const Chunk<E, V>* x = static_cast<const Chunk<E, V>*>(p.x) + g;
  const int64_t stride = p.H / V, by = bdy;
  if (p.mode == PoolMode::kCls) {
    if (ty != 0 || r0 >= r1) return;
    const Chunk<E, V> c = x[r0 * stride];
    for (int i = 0; i < V; ++i) f[i] = E::load(c.v[i]);
    return;
  }
  const int64_t n = r1 - r0 > ty ? (r1 - r0 - ty + by - 1) / by : 0;  // this lane's rows
  // Mean: the lane's rows summed in blocks of mean_block_rows, each block's
  // sum added to the total, as the CPU kernel does (about 2 sqrt(n)
  // roundings deep, not n). Max: one block.
  const int64_t step = (p.mode == PoolMode::kMean ? mean_block_rows(n) : n) * by;
  for (int64_t b0 = r0 + ty; b0 < r1; b0 += step) {
    const int64_t b1 = b0 + step < r1 ? b0 + step : r1;
    float part[V];
    for (int i = 0; i < V; ++i) part[i] = pool_identity(p.mode);
    int64_t r = b0;
    // kPoolUnroll rows' loads issued before their sums (memory-level
    // parallelism: a lane's rows are what bounds a long segment's block).
    for (; r + (kPoolUnroll - 1) * by < b1; r += kPoolUnroll * by) {
      Chunk<E, V> c[kPoolUnroll];
      for (int u = 0; u < kPoolUnroll; ++u) c[u] = x[(r + u * by) * stride];
      for (int u = 0; u < kPoolUnroll; ++u)
        for (int i = 0; i < V; ++i) part[i] = pool_step(p.mode, part[i], E::load(c[u].v[i]));
    }
    for (; r < b1; r += by) {
      const Chunk<E, V> c = x[r * stride];
      for (int i = 0; i < V; ++i) part[i] = pool_step(p.mode, part[i], E::load(c.v[i]));
    }
    for (int i = 0; i < V; ++i) f[i] = pool_step(p.mode, f[i], part[i]);
  }
}

// Step 2 (threads of lane 0, per column group): the lanes' values (lane l's
// f for this thread's group at lanes + l * stride) combined in lane order.
template <int V>
FS_HD void pool_combine_lanes(PoolMode m, const float* lanes, int64_t stride, int bdy, float (&f)[V]) {
  for (int i = 0; i < V; ++i) f[i] = lanes[i];
  if (m == PoolMode::kCls) return;
  for (int l = 1; l < bdy; ++l)
    for (int i = 0; i < V; ++i) f[i] = pool_step(m, f[i], lanes[l * stride + i]);
}

// A segment's reduced value made its output: mean divides by the length, an
// empty segment gives 0.
FS_HD float pool_finish(PoolMode m, float v, int64_t len) {
  if (len <= 0) return 0.f;
  return m == PoolMode::kMean ? v * (1.f / float(len)) : v;
}

// Step 3 (lane 0, per column group): S = 1 writes the output row's columns
// and returns their share of the squared norm; S > 1 writes piece s's partial.
template <int V, class I>
FS_HD float pool_store(const PoolParams<I>& p, int64_t b, int64_t s, int64_t g, int64_t len, const float (&f)[V]) {
  float sq = 0.f;
  if (p.S == 1) {
    float* o = p.out + b * p.H + g * V;
    for (int i = 0; i < V; ++i) {
      o[i] = pool_finish(p.mode, f[i], len);
      sq += o[i] * o[i];
    }
  } else {
    float* o = p.partial + (b * p.S + s) * p.H + g * V;
    for (int i = 0; i < V; ++i) o[i] = f[i];
  }
  return sq;
}

// Second kernel (S > 1), per column h of segment b: the pieces combined in
// piece order, finished; returns the column's share of the squared norm.
template <class I>
FS_HD float pool_combine_thread(const PoolParams<I>& p, int64_t b, int64_t h) {
  const Segment g = segment_at(p.cu, b, p.T, p.T);
  const float* q = p.partial + b * p.S * p.H + h;
  float acc = q[0];
  for (int64_t s = 1; s < p.S; ++s) acc = pool_step(p.mode, acc, q[s * p.H]);
  const float v = pool_finish(p.mode, acc, g.len);
  p.out[b * p.H + h] = v;
  return v * v;
}

FS_HD float inv_norm(float sq) {
  const float n = sqrtf(sq);
  return 1.f / (n < 1e-12f ? 1e-12f : n);  // a NaN norm stays NaN, as in F.normalize
}

// Normalize (every thread of segment b's block): scale the row by 1/||row||.
template <class I>
FS_HD void scale_thread(const PoolParams<I>& p, int64_t b, int tid, int nthreads, float scale) {
  float* o = p.out + b * p.H;
  for (int64_t h = tid; h < p.H; h += nthreads) o[h] *= scale;
}

}  // namespace threads
}  // namespace kernels
}  // namespace fastserve
