// Packing kernels: the CUDA per-thread functions (kernel_threads.cuh), run on
// the CPU over every (block, thread) of the grid the CUDA launcher would use,
// against the CPU kernels; the CPU kernels against naive loops; validation.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/kernels/cuda/kernel_threads.cuh"
#include "fastserve/errors.h"
#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace {

using namespace threads;

// Random cu_seqlens of B sequences of length 0..L, with length-1 and
// length-L sequences mixed in.
std::vector<int64_t> random_cu(std::mt19937& rng, int64_t B, int64_t L, bool allow_empty) {
  std::uniform_int_distribution<int64_t> len(allow_empty ? 0 : 1, L);
  std::vector<int64_t> cu(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = len(rng);
    if (b % 5 == 1) n = 1;
    if (b % 7 == 2) n = L;
    cu[b + 1] = cu[b] + n;
  }
  return cu;
}

// Random row data as raw bytes; 16-bit types get finite values of moderate size.
std::vector<uint8_t> random_bytes(std::mt19937& rng, DType dt, int64_t n) {
  std::vector<uint8_t> out(n * element_size(dt) + 16);
  std::normal_distribution<float> nd(0.f, 2.f);
  for (int64_t i = 0; i < n; ++i) {
    const float f = nd(rng);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (dt == DType::kFloat32) {
      std::memcpy(out.data() + 4 * i, &f, 4);
    } else if (dt == DType::kBFloat16) {
      const uint16_t h = uint16_t(u >> 16);
      std::memcpy(out.data() + 2 * i, &h, 2);
    } else {
      // fp16: sign, exponent 5..20 (values 2^-10 .. 2^5), random mantissa.
      const uint16_t h = uint16_t((u & 0x80000000u) >> 16 | (5 + rng() % 16) << 10 | (rng() & 0x3ff));
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
  }
  return out;
}

// Every (block, thread) of the launch kernels.cu makes for this op.
enum class Op { kPack, kUnpack, kGather };
template <class U, class I>
void run_copy_grid(Op op, CopyParams<I> p, size_t row_bytes) {
  p.row_units = int64_t(row_bytes / sizeof(U));
  p.run_rows = copy_run_rows(p.row_units, op == Op::kGather ? p.dst_rows : p.L);
  const int64_t blocks = copy_blocks(p, op != Op::kGather);
  if (op == Op::kGather) ASSERT_GE(blocks * p.run_rows, p.dst_rows);
  else ASSERT_GE(blocks * p.run_rows, p.B * p.L);
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int tid = 0; tid < kCopyThreads; ++tid) {
      if (op == Op::kPack) pack_thread<U>(p, blk, tid);
      if (op == Op::kUnpack) unpack_thread<U>(p, blk, tid);
      if (op == Op::kGather) gather_thread<U>(p, blk, tid);
    }
}

// Runs one copy op's per-thread function with the copy unit `unit` (if the
// row allows it), offsets as I.
template <class I>
void run_op(Op op, int unit, const void* x, void* out, const std::vector<int64_t>& offsets, int64_t B, int64_t L,
            int64_t src_rows, int64_t dst_rows, size_t row_bytes) {
  const std::vector<I> cu(offsets.begin(), offsets.end());
  const CopyParams<I> p{x, out, cu.data(), B, L, src_rows, dst_rows, 0, 0};
  if (unit == 16) run_copy_grid<Vec16>(op, p, row_bytes);
  if (unit == 4) run_copy_grid<uint32_t>(op, p, row_bytes);
  if (unit == 2) run_copy_grid<uint16_t>(op, p, row_bytes);
}

const DType kFloatTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

TEST(KernelConversions, Fp16AndBf16BitPatternsConvertExactly) {
  EXPECT_EQ(fp16_to_float(0x3c00), 1.0f);
  EXPECT_EQ(fp16_to_float(0xc000), -2.0f);
  EXPECT_EQ(fp16_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(fp16_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(fp16_to_float(0x03ff), std::ldexp(1023.0f, -24));  // largest subnormal
  EXPECT_EQ(fp16_to_float(0x8000), -0.0f);
  EXPECT_TRUE(std::signbit(fp16_to_float(0x8000)));
  EXPECT_EQ(fp16_to_float(0x7c00), INFINITY);
  EXPECT_EQ(fp16_to_float(0xfc00), -INFINITY);
  EXPECT_TRUE(std::isnan(fp16_to_float(0x7e00)));
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_float(0xc2f7), -123.5f);
  // Every fp16 finite value against a double-precision decode.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 31) continue;
    double v = e ? std::ldexp(1024.0 + m, e - 25) : std::ldexp(double(m), -24);
    if (h & 0x8000) v = -v;
    ASSERT_EQ(fp16_to_float(uint16_t(h)), float(v)) << std::hex << h;
  }
}

TEST(KernelThreads, CopyGridsMatchCpuKernelsForEveryUnitShapeAndOffsetType) {
  std::mt19937 rng(7);
  const int64_t Hs[] = {1, 3, 8, 13, 64, 384, 1000, 8200};
  for (DType dt : kFloatTypes) {
    for (int64_t H : Hs) {
      for (int trial = 0; trial < 4; ++trial) {
        // Long sequences (L up to 700) take several runs of run_rows rows.
        const int64_t B = 1 + rng() % 9, L = 1 + rng() % (H >= 1000 ? 40 : 700);
        const auto cu = random_cu(rng, B, L, trial % 2 == 0);
        const int64_t T = cu[B];
        const size_t es = element_size(dt), row_bytes = H * es;
        auto padded = random_bytes(rng, dt, B * L * H);
        auto packed = random_bytes(rng, dt, T * H);
        std::vector<int64_t> index(T + 3);
        for (auto& i : index) i = rng() % (T ? T : 1);

        for (int unit : {16, 4, 2}) {
          if (row_bytes % unit) continue;
          for (bool i32 : {false, true}) {
            auto run = [&](Op op, const void* x, void* out, const std::vector<int64_t>& off, int64_t src_rows,
                           int64_t dst_rows) {
              if (i32) run_op<int32_t>(op, unit, x, out, off, B, L, src_rows, dst_rows, row_bytes);
              else run_op<int64_t>(op, unit, x, out, off, B, L, src_rows, dst_rows, row_bytes);
            };
            // pack
            std::vector<uint8_t> want(T * row_bytes + 1, 0xAB), got(want.size(), 0xCD);
            cpu::pack(padded.data(), B, L, cu.data(), row_bytes, want.data());
            run(Op::kPack, padded.data(), got.data(), cu, B * L, T);
            ASSERT_EQ(0, std::memcmp(want.data(), got.data(), T * row_bytes)) << "pack unit " << unit << " H " << H;
            ASSERT_EQ(got.back(), 0xCD);
            // unpack (destination pre-filled with garbage: padding must be zeroed)
            want.assign(B * L * row_bytes, 0xAB);
            cpu::unpack(packed.data(), cu.data(), B, L, row_bytes, want.data());
            got.assign(want.size(), 0xCD);
            run(Op::kUnpack, packed.data(), got.data(), cu, T, B * L);
            ASSERT_EQ(want, got) << "unpack unit " << unit << " H " << H;
            // gather
            if (T == 0) continue;
            const int64_t M = int64_t(index.size());
            want.assign(M * row_bytes, 0xAB);
            cpu::gather(packed.data(), index.data(), M, row_bytes, want.data());
            got.assign(want.size(), 0xCD);
            run(Op::kGather, packed.data(), got.data(), index, T, M);
            ASSERT_EQ(want, got) << "gather unit " << unit << " H " << H;
          }
        }
      }
    }
  }
}

// Malformed offsets on the CUDA path (never validated there) must not make a
// kernel touch memory outside the tensors: each buffer sits between guard
// bytes that must survive, and every read comes from inside the source.
TEST(KernelThreads, CopyGridsStayInBoundsOnMalformedOffsets) {
  const int64_t B = 4, L = 6, H = 8, T = 10;
  const size_t row_bytes = H * 4;
  const std::vector<std::vector<int64_t>> bad_cus = {
      {0, 3, 2, 7, 10},            // decreasing
      {-5, 3, 6, 9, 10},           // negative
      {0, 2, 4, 6, 1000},          // past T
      {0, 9, 9, 9, 10},            // longer than L
      {int64_t(1) << 40, 0, -(int64_t(1) << 40), 3, 10},  // int32 wraps these
  };
  const uint8_t guard = 0x5A;
  auto buffer = [&](size_t bytes) { return std::vector<uint8_t>(bytes + 2 * 64, guard); };
  auto intact = [&](const std::vector<uint8_t>& buf, size_t bytes) {
    for (size_t i = 0; i < 64; ++i)
      if (buf[i] != guard || buf[64 + bytes + i] != guard) return false;
    return true;
  };
  for (const auto& cu : bad_cus) {
    for (bool i32 : {false, true}) {
      // Sources filled with 0x11: a destination byte is 0x11, 0 (unpack's
      // padding, gather's out-of-range rows) or untouched (0x5A).
      auto padded = buffer(B * L * row_bytes), packed = buffer(T * row_bytes);
      std::fill(padded.begin() + 64, padded.end() - 64, 0x11);
      std::fill(packed.begin() + 64, packed.end() - 64, 0x11);
      auto out_p = buffer(T * row_bytes), out_u = buffer(B * L * row_bytes);
      auto run = [&](Op op, const uint8_t* x, uint8_t* out, const std::vector<int64_t>& off, int64_t src, int64_t dst) {
        if (i32) run_op<int32_t>(op, 16, x, out, off, B, L, src, dst, row_bytes);
        else run_op<int64_t>(op, 16, x, out, off, B, L, src, dst, row_bytes);
      };
      run(Op::kPack, padded.data() + 64, out_p.data() + 64, cu, B * L, T);
      run(Op::kUnpack, packed.data() + 64, out_u.data() + 64, cu, T, B * L);
      EXPECT_TRUE(intact(out_p, T * row_bytes) && intact(out_u, B * L * row_bytes)) << "cu[0] " << cu[0];
      for (size_t i = 64; i < out_u.size() - 64; ++i) ASSERT_TRUE(out_u[i] == 0x11 || out_u[i] == 0) << i;
      const std::vector<int64_t> index = {0, -1, T - 1, T, int64_t(1) << 40, -(int64_t(1) << 35), 3};
      const int64_t M = int64_t(index.size());
      auto out_g = buffer(M * row_bytes);
      run(Op::kGather, packed.data() + 64, out_g.data() + 64, index, T, M);
      EXPECT_TRUE(intact(out_g, M * row_bytes));
      for (int64_t r = 0; r < M; ++r) {
        const int64_t j = i32 ? int64_t(int32_t(index[r])) : index[r];
        const uint8_t want = j >= 0 && j < T ? 0x11 : 0;
        for (size_t k = 0; k < row_bytes; ++k) ASSERT_EQ(out_g[64 + r * row_bytes + k], want) << "row " << r;
      }
    }
  }
}

TEST(KernelThreads, CopyUnitIsTheLargestThatDividesRowAndPointers) {
  alignas(16) static uint8_t buf[64];
  EXPECT_EQ(copy_unit(768, buf, buf + 16), 16);
  EXPECT_EQ(copy_unit(770, buf, buf + 16), 2);
  EXPECT_EQ(copy_unit(768, buf + 4, buf), 4);
  EXPECT_EQ(copy_unit(26, buf, buf), 2);
  // A run is about kCopyRunUnits units, at most max_rows rows, at least one.
  EXPECT_EQ(copy_run_rows(96, 256), 22);   // fp16 H = 768 in 16-byte units
  EXPECT_EQ(copy_run_rows(96, 5), 5);
  EXPECT_EQ(copy_run_rows(5000, 256), 1);
  CopyParams<int32_t> p{nullptr, nullptr, nullptr, 256, 256, 0, 0, 96, 22};
  EXPECT_EQ(copy_blocks(p, true), 256 * 12);
  p.dst_rows = 45;
  EXPECT_EQ(copy_blocks(p, false), 3);
}

// Pool per-thread functions over the full grid, step by step as
// pool_kernel runs them between its __syncthreads (lanes in shared memory,
// lane 0 combining, the block's squared norm, the scale), then, for S > 1,
// pool_combine_kernel's. splits: as pool_splits gives it on the device.
template <class E, int V, class I = int64_t>
std::vector<float> pool_grid(const void* x, const std::vector<int64_t>& cu64, int64_t T, int64_t H, PoolMode mode,
                             bool normalize, int64_t S = 1) {
  const std::vector<I> cu(cu64.begin(), cu64.end());
  const int64_t B = int64_t(cu.size()) - 1, groups = H / V;
  std::vector<float> out(B * H, -777.f), partial(S > 1 ? B * S * H : 0, -555.f);
  const PoolParams<I> p{x, cu.data(), out.data(), partial.data(), B, T, H, S, mode};
  const PoolShape c = pool_shape(groups);
  EXPECT_LE(c.bdx * c.bdy, kPoolThreads);
  EXPECT_GT(c.bdx * (c.bdy + 1), kPoolThreads);
  std::vector<float> lanes(size_t(kPoolThreads) * V);
  for (int64_t blk = 0; blk < B * S; ++blk) {
    const int64_t b = blk / S, s = blk % S;
    const Segment g = segment_at(p.cu, b, T, T);
    int64_t r0, r1;
    piece_rows(g, s, S, r0, r1);
    std::vector<float> sq(c.bdx, 0.f);
    for (int64_t g0 = 0; g0 < groups; g0 += c.bdx) {
      for (int ty = 0; ty < c.bdy; ++ty)
        for (int tx = 0; tx < c.bdx; ++tx) {
          float f[V];
          if (g0 + tx < groups) pool_lane<E, V>(p, r0, r1, g0 + tx, ty, c.bdy, f);
          for (int i = 0; i < V; ++i) lanes[(ty * c.bdx + tx) * V + i] = g0 + tx < groups ? f[i] : 0.f;
        }
      for (int tx = 0; tx < c.bdx && g0 + tx < groups; ++tx) {
        float f[V];
        pool_combine_lanes<V>(mode, &lanes[tx * V], int64_t(c.bdx) * V, c.bdy, f);
        sq[tx] += pool_store<V>(p, b, s, g0 + tx, g.len, f);
      }
    }
    if (!normalize || S != 1) continue;
    float t = 0.f;
    for (float v : sq) t += v;
    for (int tid = 0; tid < c.bdx * c.bdy; ++tid) scale_thread(p, b, tid, c.bdx * c.bdy, inv_norm(t));
  }
  if (S == 1) return out;
  for (int64_t b = 0; b < B; ++b) {
    float t = 0.f;
    for (int64_t h = 0; h < H; ++h) t += pool_combine_thread(p, b, h);
    if (normalize)
      for (int tid = 0; tid < 256; ++tid) scale_thread(p, b, tid, 256, inv_norm(t));
  }
  return out;
}

template <class E>
void check_pool(std::mt19937& rng, DType dt) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  const int64_t Hs[] = {1, 5, 8, 16, 100, 384, 768};
  for (int64_t H : Hs) {
    for (int trial = 0; trial < 3; ++trial) {
      const int64_t B = 1 + rng() % 7, L = 1 + rng() % 50;
      const auto cu = random_cu(rng, B, L, trial == 0);
      const auto x = random_bytes(rng, dt, cu[B] * H);
      for (PoolMode mode : {PoolMode::kMean, PoolMode::kCls, PoolMode::kMax}) {
        for (bool norm : {false, true}) {
          std::vector<float> want(B * H, -999.f);
          cpu::segment_pool(x.data(), dt, cu.data(), B, H, mode, norm, want.data());
          // One piece per segment and several (S = 3, as pool_splits gives
          // for a few long sequences), int64 and int32 offsets.
          const int64_t S = mode == PoolMode::kCls ? 1 : 3;
          std::vector<std::vector<float>> gots{pool_grid<E, 1>(x.data(), cu, cu[B], H, mode, norm),
                                               pool_grid<E, 1, int32_t>(x.data(), cu, cu[B], H, mode, norm, S)};
          if (H % V == 0) {
            gots.push_back(pool_grid<E, V>(x.data(), cu, cu[B], H, mode, norm, S));
            gots.push_back(pool_grid<E, V, int32_t>(x.data(), cu, cu[B], H, mode, norm));
          }
          for (const auto& got : gots)
            for (int64_t i = 0; i < B * H; ++i)
              ASSERT_NEAR(got[i], want[i], 1e-5f * (1.f + std::fabs(want[i])))
                  << "dtype " << to_string(dt) << " H " << H << " mode " << int(mode) << " norm " << norm << " i " << i;
        }
      }
    }
  }
}

// Pieces per segment: none where the batch fills the device, else enough
// blocks for it, in pieces of >= kPoolMinPieceRows rows on average.
TEST(KernelThreads, PoolSplitsSpreadFewLongSequencesOverBlocks) {
  EXPECT_EQ(pool_splits(256, 256 * 87, PoolMode::kMean, 132), 1);  // the benchmark's batch
  EXPECT_EQ(pool_splits(264, 264 * 4096, PoolMode::kMax, 132), 1);
  EXPECT_EQ(pool_splits(1, 8192, PoolMode::kMean, 132), 128);
  EXPECT_EQ(pool_splits(1, 100000, PoolMode::kMax, 132), 264);
  EXPECT_EQ(pool_splits(16, 16 * 512, PoolMode::kMean, 132), 8);
  EXPECT_EQ(pool_splits(4, 100, PoolMode::kMean, 132), 1);  // short: not worth a second kernel
  EXPECT_EQ(pool_splits(1, 1 << 20, PoolMode::kCls, 132), 1);
  EXPECT_EQ(pool_splits(1, int64_t(1) << 40, PoolMode::kMean, 100000), kPoolMaxSplits);
  EXPECT_EQ(pool_shape(96).bdx, 96);
  EXPECT_EQ(pool_shape(96).bdy, 5);
  EXPECT_EQ(pool_shape(1).bdx, 32);
  EXPECT_EQ(pool_shape(2000).bdx, 256);
}

// Malformed cu_seqlens (never validated on CUDA) read no row outside x: x
// sits in a buffer whose rows outside [0, T) are NaN, and every output is
// finite.
TEST(KernelThreads, PoolGridStaysInBoundsOnMalformedOffsets) {
  const int64_t T = 10, H = 8, pad = 4;
  std::vector<float> buf((T + 2 * pad) * H, std::nanf(""));
  for (int64_t i = pad * H; i < (pad + T) * H; ++i) buf[i] = float(i % 7);
  const float* x = buf.data() + pad * H;
  const std::vector<std::vector<int64_t>> bad_cus = {
      {0, 3, 2, 7, 10}, {-5, 3, 6, 9, 10}, {0, 2, 4, 6, 1000}, {int64_t(1) << 40, 0, -(int64_t(1) << 40), 3, 10}};
  for (const auto& cu : bad_cus)
    for (PoolMode mode : {PoolMode::kMean, PoolMode::kCls, PoolMode::kMax})
      for (int64_t S : {int64_t(1), int64_t(3)}) {
        if (mode == PoolMode::kCls && S > 1) continue;
        for (const auto& got : {pool_grid<F32, 1>(x, cu, T, H, mode, true, S),
                                pool_grid<F32, 4, int32_t>(x, cu, T, H, mode, false, S)})
          for (float v : got) ASSERT_TRUE(std::isfinite(v)) << "cu[0] " << cu[0] << " mode " << int(mode);
      }
}

TEST(KernelThreads, PoolGridsMatchCpuKernelForEveryDtypeModeAndWidth) {
  std::mt19937 rng(11);
  check_pool<F32>(rng, DType::kFloat32);
  check_pool<F16>(rng, DType::kFloat16);
  check_pool<BF16>(rng, DType::kBFloat16);
}

// Mean pooling of a long segment stays near the exact mean: rows summed one
// after another drifted by n roundings (3.8e-6 at 8192 rows near 1.0); in
// blocks of mean_block_rows rows, about 2 sqrt(n). Both the CPU kernel and
// the CUDA per-thread function, every column path (64-column blocks, 8, tail).
TEST(KernelThreads, MeanOfALongSegmentIsNearTheExactMean) {
  EXPECT_EQ(mean_block_rows(1), 8);
  EXPECT_EQ(mean_block_rows(64), 8);
  EXPECT_EQ(mean_block_rows(65), 16);
  EXPECT_EQ(mean_block_rows(8192), 128);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(1.f, 1.f);
  const int64_t L = 16384, H = 64 + 8 + 3;
  std::vector<float> x((3 + L) * H);  // 3 rows of the short segment, then L
  for (float& v : x) v = normal(rng);
  const std::vector<int64_t> cu = {0, 3, 3 + L};  // a short segment before it: offsets, not 0
  std::vector<double> exact(H, 0.0);
  for (int64_t r = 3; r < 3 + L; ++r)
    for (int64_t h = 0; h < H; ++h) exact[h] += x[r * H + h];
  std::vector<float> cpu_out(2 * H);
  cpu::segment_pool(x.data(), DType::kFloat32, cu.data(), 2, H, PoolMode::kMean, false, cpu_out.data());
  // The CUDA grid with one piece per segment (lanes of 16384 / 5 rows) and
  // split over 128 pieces of 128 rows, as pool_splits splits it on 132 SMs.
  EXPECT_EQ(pool_splits(2, 3 + L, PoolMode::kMean, 132), 128);
  const auto grid = pool_grid<F32, 1>(x.data(), cu, 3 + L, H, PoolMode::kMean, false);
  const auto split = pool_grid<F32, 1>(x.data(), cu, 3 + L, H, PoolMode::kMean, false, 128);
  for (int64_t h = 0; h < H; ++h) {
    const double want = exact[h] / double(L);
    EXPECT_NEAR(cpu_out[H + h], want, 1.5e-6) << "cpu, column " << h;
    EXPECT_NEAR(grid[H + h], want, 1.5e-6) << "cuda grid, column " << h;
    EXPECT_NEAR(split[H + h], want, 1.5e-6) << "cuda grid split, column " << h;
  }
}

TEST(KernelCpu, PoolMatchesNaiveLoopsIncludingEmptySegments) {
  const int64_t H = 3;
  const std::vector<float> x = {1, 2, 3, -4, 5, 0, 7, -8, 9};
  const std::vector<int64_t> cu = {0, 2, 2, 3};
  std::vector<float> out(3 * H);
  cpu::segment_pool(x.data(), DType::kFloat32, cu.data(), 3, H, PoolMode::kMean, false, out.data());
  EXPECT_EQ(out, (std::vector<float>{-1.5f, 3.5f, 1.5f, 0, 0, 0, 7, -8, 9}));
  cpu::segment_pool(x.data(), DType::kFloat32, cu.data(), 3, H, PoolMode::kMax, false, out.data());
  EXPECT_EQ(out, (std::vector<float>{1, 5, 3, 0, 0, 0, 7, -8, 9}));
  cpu::segment_pool(x.data(), DType::kFloat32, cu.data(), 3, H, PoolMode::kCls, true, out.data());
  const float n = std::sqrt(14.f), m = std::sqrt(194.f);
  const std::vector<float> want = {1 / n, 2 / n, 3 / n, 0, 0, 0, 7 / m, -8 / m, 9 / m};
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-6f);
}

// Rows of 0.5 in dtype dt's bits, with a NaN at row r, column c.
std::vector<uint8_t> halves_with_nan(DType dt, int64_t rows, int64_t H, int64_t r, int64_t c) {
  const size_t es = element_size(dt);
  std::vector<uint8_t> out(rows * H * es + 16);
  const uint32_t half = dt == DType::kFloat32 ? 0x3f000000u : dt == DType::kBFloat16 ? 0x3f00u : 0x3800u;
  const uint32_t nan = dt == DType::kFloat32 ? 0x7fc00000u : dt == DType::kBFloat16 ? 0x7fc0u : 0x7e00u;
  for (int64_t i = 0; i < rows * H; ++i) {
    const uint32_t v = i == r * H + c ? nan : half;
    std::memcpy(out.data() + i * es, &v, es);  // little-endian: the low es bytes
  }
  return out;
}

template <class E>
void expect_grid_nan_rows(const std::vector<uint8_t>& x, const std::vector<int64_t>& cu, int64_t H, PoolMode mode) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  std::vector<std::vector<float>> gots{pool_grid<E, 1>(x.data(), cu, cu.back(), H, mode, true)};
  if (H % V == 0) gots.push_back(pool_grid<E, V>(x.data(), cu, cu.back(), H, mode, true));
  if (mode != PoolMode::kCls) gots.push_back(pool_grid<E, 1>(x.data(), cu, cu.back(), H, mode, true, 2));
  for (const auto& got : gots)
    for (int64_t h = 0; h < H; ++h) {
      EXPECT_TRUE(std::isnan(got[h])) << "grid H " << H << " mode " << int(mode) << " h " << h;
      EXPECT_NEAR(got[H + h], 1.f / std::sqrt(float(H)), 1e-6f) << "grid H " << H << " h " << h;
    }
}

// F.normalize of a row with a NaN is all NaN: the norm is NaN, and
// max(NaN, 1e-12) must stay NaN (`n > 1e-12 ? n : 1e-12` took 1e-12 and
// scaled the row's other values by 1e12). On every path: portable, AVX2
// (vector columns and scalar tail) and the CUDA per-thread functions.
TEST(KernelCpu, NormalizedPoolOfARowWithANaNIsAllNaNOnEveryPath) {
  EXPECT_TRUE(std::isnan(inv_norm(std::nanf(""))));
  EXPECT_EQ(inv_norm(0.f), 1e12f);
  EXPECT_EQ(inv_norm(4.f), 0.5f);
  const std::vector<int64_t> cu = {0, 2, 4};  // the NaN in segment 0's first row; segment 1 clean
  for (DType dt : kFloatTypes) {
    for (int64_t H : {3, 8, 19, 64, 75}) {
      const auto x = halves_with_nan(dt, 4, H, 0, H / 2);
      for (PoolMode mode : {PoolMode::kMean, PoolMode::kCls, PoolMode::kMax}) {
        for (cpu::Isa cap : {cpu::Isa::kPortable, cpu::Isa::kAvx512Bf16}) {
          const cpu::Isa prev = cpu::set_isa_cap(cap);
          std::vector<float> out(2 * H, -999.f), raw(2 * H, -999.f);
          cpu::segment_pool(x.data(), dt, cu.data(), 2, H, mode, true, out.data());
          cpu::segment_pool(x.data(), dt, cu.data(), 2, H, mode, false, raw.data());
          cpu::set_isa_cap(prev);
          for (int64_t h = 0; h < H; ++h) {
            const auto where = [&] {
              return "dtype " + std::string(to_string(dt)) + " H " + std::to_string(H) + " mode " +
                     std::to_string(int(mode)) + " cap " + std::to_string(int(cap)) + " h " + std::to_string(h);
            };
            EXPECT_TRUE(std::isnan(out[h])) << where() << " got " << out[h];
            EXPECT_NEAR(out[H + h], 1.f / std::sqrt(float(H)), 1e-6f) << where();
            EXPECT_EQ(std::isnan(raw[h]), h == H / 2) << where();  // unnormalized: the NaN column only
          }
        }
        switch (dt) {
          case DType::kFloat32: expect_grid_nan_rows<F32>(x, cu, H, mode); break;
          case DType::kFloat16: expect_grid_nan_rows<F16>(x, cu, H, mode); break;
          default: expect_grid_nan_rows<BF16>(x, cu, H, mode); break;
        }
      }
    }
  }
}

TEST(KernelCpu, MultiThreadedPackAndUnpackMatchNaiveLoopsOnLargeInputs) {
  // Large enough that threads_for() picks more than one thread where cores allow.
  std::mt19937 rng(3);
  const int64_t B = 64, L = 256, H = 384;
  const auto cu = random_cu(rng, B, L, true);
  std::vector<float> x(B * L * H);
  for (auto& v : x) v = float(rng() % 1000);
  std::vector<float> packed(cu[B] * H), back(B * L * H, 5.f);
  cpu::pack(x.data(), B, L, cu.data(), H * 4, packed.data());
  cpu::unpack(packed.data(), cu.data(), B, L, H * 4, back.data());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t)
      for (int64_t h = 0; h < H; h += 37) {
        const float want = t < cu[b + 1] - cu[b] ? x[(b * L + t) * H + h] : 0.f;
        ASSERT_EQ(back[(b * L + t) * H + h], want) << b << "," << t << "," << h;
        if (t < cu[b + 1] - cu[b]) ASSERT_EQ(packed[(cu[b] + t) * H + h], want);
      }
}

TensorArg cpu_tensor(void* p, std::vector<int64_t> shape, DType dt) {
  TensorArg t;
  t.data = p;
  t.shape = std::move(shape);
  t.dtype = dt;
  return t;
}

TEST(KernelDispatch, RejectsBadArgumentsBeforeWriting) {
  std::vector<float> x(2 * 3 * 4, 1.f), out(5 * 4, -1.f);
  std::vector<int32_t> len = {2, 3};
  const auto X = cpu_tensor(x.data(), {2, 3, 4}, DType::kFloat32);
  const auto O = cpu_tensor(out.data(), {5, 4}, DType::kFloat32);
  const auto Lg = cpu_tensor(len.data(), {2}, DType::kInt32);
  pack(X, Lg, O);
  EXPECT_EQ(out[0], 1.f);
  std::fill(out.begin(), out.end(), -1.f);
  len[1] = 4;  // > L
  EXPECT_THROW(pack(X, Lg, O), InvalidArgument);
  len[1] = -1;
  EXPECT_THROW(pack(X, Lg, O), InvalidArgument);
  len[1] = 3;
  auto bad = X;
  bad.strides = {12, 1, 3};
  EXPECT_THROW(pack(bad, Lg, O), InvalidArgument);
  bad = X;
  bad.dtype = DType::kFloat16;
  EXPECT_THROW(pack(bad, Lg, O), InvalidArgument);  // dtype mismatch with out
  bad = X;
  bad.device = DeviceType::kCUDA;
  EXPECT_THROW(pack(bad, Lg, O), InvalidArgument);  // device mismatch
  bad = X;
  bad.shape = {int64_t(1) << 40, int64_t(1) << 40, 4};
  EXPECT_THROW(pack(bad, Lg, O), InvalidArgument);  // overflow
  EXPECT_EQ(out[0], -1.f);
}


// Every path of the layer kernels: a cap above what this CPU has runs its
// widest (so on an AVX2 machine the AVX-512 caps repeat the AVX2 path, and
// a width the path does not divide falls back to the next).
constexpr cpu::Isa kIsas[] = {cpu::Isa::kPortable, cpu::Isa::kAvx2, cpu::Isa::kAvx512, cpu::Isa::kAvx512Bf16};

TEST(KernelIsa, ThePathFollowsTheCapTheCpuAndTheWidth) {
  const cpu::Isa vec = cpu::vector_paths() ? cpu::Isa::kAvx2 : cpu::Isa::kPortable;
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kPortable, 16), cpu::Isa::kPortable);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx2, 16), vec);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512, 8), vec);  // 8 floats: not a 16-lane path
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512, 12), cpu::Isa::kPortable);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512Bf16, 8), vec);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512Bf16, 16), cpu::best_isa());
  EXPECT_GE(int(cpu::best_isa()), int(vec));
  // AVX512-BF16 only above AVX-512F: the kAvx512 cap runs kAvx512 wherever
  // the CPU has AVX512-BF16 too.
  const cpu::Isa wide = cpu::isa_for(cpu::Isa::kAvx512, 16);
  EXPECT_LE(int(wide), int(cpu::Isa::kAvx512));
  if (cpu::best_isa() == cpu::Isa::kAvx512Bf16) EXPECT_EQ(wide, cpu::Isa::kAvx512);
  // The process-wide cap narrows every call, and restores.
  const cpu::Isa best = cpu::best_isa();
  EXPECT_EQ(cpu::set_isa_cap(cpu::Isa::kAvx512), cpu::Isa::kAvx512Bf16);
  EXPECT_EQ(cpu::best_isa(), wide);
  EXPECT_EQ(cpu::set_isa_cap(cpu::Isa::kAvx2), cpu::Isa::kAvx512);
  EXPECT_EQ(cpu::best_isa(), vec);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512Bf16, 16), vec);
  EXPECT_EQ(cpu::set_isa_cap(cpu::Isa::kPortable), cpu::Isa::kAvx2);
  EXPECT_EQ(cpu::isa_for(cpu::Isa::kAvx512Bf16, 16), cpu::Isa::kPortable);
  EXPECT_EQ(cpu::set_isa_cap(cpu::Isa::kAvx512Bf16), cpu::Isa::kPortable);
  EXPECT_EQ(cpu::best_isa(), best);
#if defined(FASTSERVE_AVX512_EMULATED)
  // The emulated build exists to run the AVX-512 paths: it must have them.
  if (cpu::vector_paths()) EXPECT_EQ(cpu::best_isa(), cpu::Isa::kAvx512Bf16);
#endif
}

// bfloat16 by its bits: to nearest even (the oracle's rounding), and back.
uint16_t to_bf16(double x) {
  const float f = float(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
// softmax(q k^T * scale) v per (sequence, head) in double, the oracle. With
// bf16_weights, what the native AVX512-BF16 path computes (its q, k and v
// already rounded by the caller): each score rounded to float32, each weight
// exp(s - max) rounded to bfloat16, normalised by the sum of the rounded
// weights. spread[i] is sum_j p_j |v_j| for output i: a weight rounded the
// other way (float32's exp against double's) moves the output by up to 2^-8
// of it.
struct Oracle {
  std::vector<double> want, spread;
};
Oracle oracle_attention(const std::vector<float>& qkv, const std::vector<int64_t>& cu, int64_t nh, int64_t hd,
                        double scale, bool bf16_weights) {
  const int64_t B = int64_t(cu.size()) - 1, T = cu[B], H = nh * hd;
  Oracle o{std::vector<double>(T * H, 0.0), std::vector<double>(T * H, 0.0)};
  auto at = [&](int64_t t, int which, int64_t h, int64_t d) { return double(qkv[t * 3 * H + which * H + h * hd + d]); };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < nh; ++h)
      for (int64_t i = cu[b]; i < cu[b + 1]; ++i) {
        std::vector<double> s;
        double m = -1e300, sum = 0;
        for (int64_t j = cu[b]; j < cu[b + 1]; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < hd; ++d) dot += at(i, 0, h, d) * at(j, 1, h, d);
          s.push_back(bf16_weights ? double(float(dot) * float(scale)) : dot * scale);
          m = std::max(m, s.back());
        }
        for (auto& v : s) {
          v = std::exp(v - m);
          if (bf16_weights) v = bf16_to_float(to_bf16(v));
          sum += v;
        }
        for (int64_t j = cu[b]; j < cu[b + 1]; ++j)
          for (int64_t d = 0; d < hd; ++d) {
            const double p = s[j - cu[b]] / sum, v = at(j, 2, h, d);
            o.want[i * H + h * hd + d] += p * v;
            o.spread[i * H + h * hd + d] += p * std::abs(v);
          }
      }
  return o;
}
std::vector<double> naive_attention(const std::vector<float>& qkv, const std::vector<int64_t>& cu, int64_t nh,
                                    int64_t hd, double scale) {
  return oracle_attention(qkv, cu, nh, hd, scale, false).want;
}

TEST(KernelAttention, MatchesNaiveAttentionForEveryPathHeadWidthAndLength) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  // Lengths around the 4-row blocks and the 8- and 16-key vectors (and their
  // pairs), empty sequences, one long one.
  const std::vector<int64_t> lengths = {1, 0, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 130};
  std::vector<int64_t> cu = {0};
  for (int64_t l : lengths) cu.push_back(cu.back() + l);
  const int64_t T = cu.back();
  for (int64_t hd : {8, 12, 16, 24, 32, 48, 64}) {
    for (int64_t nh : {1, 3}) {
      const int64_t H3 = 3 * nh * hd;
      std::vector<float> qkv(T * H3), bias(H3), biased(T * H3);
      for (auto& v : qkv) v = nd(rng);
      for (auto& v : bias) v = nd(rng);
      for (int64_t i = 0; i < T * H3; ++i) biased[i] = qkv[i] + bias[i % H3];
      const double scale = 1.0 / std::sqrt(double(hd));
      for (bool with_bias : {false, true}) {
        // The projection's bias added in the kernel, or already in qkv.
        const auto want = naive_attention(with_bias ? biased : qkv, cu, nh, hd, scale);
        for (cpu::Isa isa : kIsas)
          for (int threads : {1, 4}) {
            std::vector<float> out(T * nh * hd, std::nanf(""));
            cpu::attention(qkv.data(), with_bias ? bias.data() : nullptr, cu.data(), int64_t(lengths.size()), nh, hd,
                           float(scale), threads, out.data(), isa);
            for (int64_t i = 0; i < T * nh * hd; ++i)
              ASSERT_NEAR(out[i], want[i], 2e-6 * (1 + std::abs(want[i])))
                  << "hd " << hd << " nh " << nh << " bias " << with_bias << " isa " << int(isa) << " threads "
                  << threads << " at " << i;
          }
      }
    }
  }
}

TEST(KernelAttention, LargeScoresDoNotOverflowAndSpreadWeightsExactly) {
  // Scores of +-1e4: only a softmax that subtracts the row's maximum stays
  // finite; a query equally close to two keys splits its weight between them.
  const int64_t nh = 1;
  const std::vector<int64_t> cu = {0, 3};
  for (int64_t hd : {8, 16}) {
    std::vector<float> qkv(3 * 3 * hd, 0.f);
    auto q = [&](int64_t t) { return &qkv[t * 3 * hd]; };
    for (int64_t t = 0; t < 3; ++t) {
      q(t)[0] = 100.f;                     // query
      q(t)[hd] = t == 2 ? -100.f : 100.f;  // keys: two equal, one opposite
      q(t)[2 * hd + 1] = float(t + 1);     // values 1, 2, 3 in column 1
    }
    for (cpu::Isa isa : kIsas) {
      std::vector<float> out(3 * hd, -1.f);
      cpu::attention(qkv.data(), nullptr, cu.data(), 1, nh, hd, 1.f, 1, out.data(), isa);
      for (int64_t t = 0; t < 3; ++t) {
        EXPECT_FLOAT_EQ(out[t * hd + 1], 1.5f) << "hd " << hd << " isa " << int(isa);
        EXPECT_EQ(out[t * hd + 0], 0.f);
      }
    }
  }
}

// The same, element by element, and back.
std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = to_bf16(x[i]);
  return out;
}
std::vector<float> widen(const std::vector<uint16_t>& x) {
  std::vector<float> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_float(x[i]);
  return out;
}

TEST(KernelBFloat16, AttentionMatchesTheOracleOnTheWidenedInputsWithinRounding) {
  std::mt19937 rng(12);
  std::normal_distribution<float> nd(0.f, 1.f);
  const std::vector<int64_t> lengths = {1, 5, 9, 16, 17, 40, 130};
  std::vector<int64_t> cu = {0};
  for (int64_t l : lengths) cu.push_back(cu.back() + l);
  const int64_t T = cu.back();
  for (int64_t hd : {8, 12, 16, 32, 48}) {
    const int64_t nh = 2, H3 = 3 * nh * hd;
    std::vector<float> qkv(T * H3), bias(H3);
    for (auto& v : qkv) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    const auto q16 = to_bf16(qkv), b16 = to_bf16(bias);
    const auto qw = widen(q16), bw = widen(b16);
    std::vector<float> biased(T * H3);
    for (int64_t i = 0; i < T * H3; ++i) biased[i] = qw[i] + bw[i % H3];
    const double scale = 1.0 / std::sqrt(double(hd));
    const auto want = naive_attention(biased, cu, nh, hd, scale);
    std::vector<float> rounded(T * H3);  // q, k, v with their bias, rounded as the AVX512-BF16 path stages them
    for (int64_t i = 0; i < T * H3; ++i) rounded[i] = bf16_to_float(to_bf16(double(qw[i]) + double(bw[i % H3])));
    const auto dp = oracle_attention(rounded, cu, nh, hd, scale, true);
    for (cpu::Isa isa : kIsas) {
      std::vector<uint16_t> out(T * nh * hd, 0xffff);
      cpu::attention(q16.data(), b16.data(), cu.data(), int64_t(lengths.size()), nh, hd, float(scale), 2, out.data(), isa);
#if defined(FASTSERVE_AVX512_EMULATED)
      const bool in_bf16 = false;  // the emulated build's AVX512-BF16 path is the AVX-512 one
#else
      const bool in_bf16 = cpu::isa_for(isa, hd) == cpu::Isa::kAvx512Bf16;
#endif
      for (int64_t i = 0; i < T * nh * hd; ++i) {
        const double got = bf16_to_float(out[i]);
        if (in_bf16)  // half an ulp, a weight's rounding, float32's error
          ASSERT_NEAR(got, dp.want[i], std::abs(dp.want[i]) * 0.00392 + dp.spread[i] * 0.00391 + 2e-6)
              << "hd " << hd << " isa " << int(isa) << " at " << i;
        else  // half a bfloat16 ulp (2^-8 relative) + float32's error
          ASSERT_NEAR(got, want[i], std::abs(want[i]) * 0.00392 + 2e-6) << "hd " << hd << " isa " << int(isa) << " at " << i;
      }
    }
  }
}

TEST(KernelBFloat16, OutputsRoundToNearestEvenAndKeepNaNAndInfinity) {
  // One token per sequence: its context is its value (+ bias) exactly, so
  // the stored bits are the rounding of that float32 sum.
  const int64_t n = 6;
  const uint16_t one = 0x3f80, one_odd = 0x3f81, half_ulp = to_bf16(std::ldexp(1.0, -8));
  std::vector<int64_t> cu(n + 1);
  for (int64_t t = 0; t <= n; ++t) cu[t] = t;
  for (int64_t hd : {8, 16}) {
    std::vector<uint16_t> qkv(n * 3 * hd, 0), bias(3 * hd, 0);
    const uint16_t values[n] = {one, one_odd, 0x7fc0 /* NaN */, 0x7f80 /* inf */, 0xff80 /* -inf */, 0xbf81};
    for (int64_t t = 0; t < n; ++t) qkv[t * 3 * hd + 2 * hd] = values[t];
    bias[2 * hd] = half_ulp;  // a tie for every finite value
    for (cpu::Isa isa : kIsas) {
      std::vector<uint16_t> out(n * hd, 0);
      cpu::attention(qkv.data(), bias.data(), cu.data(), n, 1, hd, 1.f, 1, out.data(), isa);
      EXPECT_EQ(out[0 * hd], 0x3f80) << int(isa);  // 1 + 2^-8: to the even 1
      EXPECT_EQ(out[1 * hd], 0x3f82) << int(isa);  // 1 + 3 2^-8: to the even 1 + 2^-6, not truncated
      EXPECT_EQ(out[2 * hd] & 0x7fc0, 0x7fc0) << int(isa);  // NaN stays a quiet NaN
      EXPECT_EQ(out[3 * hd], 0x7f80) << int(isa);
      EXPECT_EQ(out[4 * hd], 0xff80) << int(isa);
      EXPECT_EQ(out[5 * hd], 0xbf80) << int(isa);  // -(1 + 2^-7) + 2^-8 = -(1 + 2^-8): a tie, to the even -1
      EXPECT_EQ(out[0 * hd + 1], 0) << int(isa);
    }
  }
}

TEST(KernelBFloat16, SubnormalOutputsAreKeptAsTorchKeepsThem) {
  // vcvtneps2bf16 flushes float32 subnormals to zero; torch rounds them like
  // any value, and so does every path here (kAvx512Bf16 takes Vec16's
  // rounding for a vector that holds one). One token per sequence, as above:
  // the stored context is the value, in vectors with and without normals.
  const uint16_t values[] = {0x0001, 0x8005, 0x007f, 0x0080, 0x0000, 0x8080, 0x3f80, 0x0042};
  const int64_t n = 8;
  std::vector<int64_t> cu(n + 1);
  for (int64_t t = 0; t <= n; ++t) cu[t] = t;
  for (int64_t hd : {16, 32}) {
    std::vector<uint16_t> qkv(n * 3 * hd, 0), bias(3 * hd, 0);
    for (int64_t t = 0; t < n; ++t) {
      qkv[t * 3 * hd + 2 * hd] = values[t];
      qkv[t * 3 * hd + 2 * hd + hd - 1] = values[n - 1 - t];
    }
    for (cpu::Isa isa : kIsas) {
      std::vector<uint16_t> out(n * hd, 0xffff);
      cpu::attention(qkv.data(), bias.data(), cu.data(), n, 1, hd, 1.f, 1, out.data(), isa);
      for (int64_t t = 0; t < n; ++t) {
        EXPECT_EQ(out[t * hd], values[t]) << "hd " << hd << " isa " << int(isa) << " token " << t;
        EXPECT_EQ(out[t * hd + hd - 1], values[n - 1 - t]) << "hd " << hd << " isa " << int(isa) << " token " << t;
      }
    }
  }
}

TEST(KernelBFloat16, EpiloguesMatchDoublePrecisionOnTheWidenedInputsWithinRounding) {
  std::mt19937 rng(13);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t N : {8, 20, 384}) {
    const int64_t rows = 19;
    std::vector<float> x(rows * N), res(rows * N), bias(N), w(N), b(N);
    for (auto& v : x) v = 3.f * nd(rng) + 1.f;
    for (auto* p : {&res, &bias, &w, &b})
      for (auto& v : *p) v = nd(rng);
    const auto x16 = to_bf16(x), r16 = to_bf16(res), bias16 = to_bf16(bias), w16 = to_bf16(w), b16 = to_bf16(b);
    const auto xw = widen(x16), rw = widen(r16), biasw = widen(bias16), ww = widen(w16), bw = widen(b16);
    for (cpu::Isa isa : kIsas) {
      auto g = x16;
      cpu::bias_gelu(g.data(), bias16.data(), rows, N, 2, isa);
      for (int64_t i = 0; i < rows * N; ++i) {
        const double v = double(xw[i]) + biasw[i % N];
        const double want = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
        ASSERT_NEAR(bf16_to_float(g[i]), want, std::abs(want) * 0.00392 + 1e-6 * (1 + std::abs(v)))
            << "gelu N " << N << " isa " << int(isa) << " at " << i;
      }
      auto y = x16;
      cpu::add_layer_norm(y.data(), bias16.data(), r16.data(), w16.data(), b16.data(), 1e-12f, rows, N, 2, isa);
      for (int64_t r = 0; r < rows; ++r) {
        // The sum is rounded to bfloat16 before LayerNorm, as torch's add would.
        std::vector<double> v(N);
        double mean = 0, var = 0;
        for (int64_t i = 0; i < N; ++i)
          mean += (v[i] = bf16_to_float(to_bf16(double(xw[r * N + i]) + biasw[i] + rw[r * N + i])));
        mean /= double(N);
        for (int64_t i = 0; i < N; ++i) var += (v[i] - mean) * (v[i] - mean);
        const double rstd = 1.0 / std::sqrt(var / double(N) + 1e-12);
        for (int64_t i = 0; i < N; ++i) {
          const double want = (v[i] - mean) * rstd * ww[i] + bw[i];
          // Half an ulp of the output, and a sum one ulp off where float32 and
          // double round it differently (scaled by rstd |w|).
          ASSERT_NEAR(bf16_to_float(y[r * N + i]), want,
                      std::abs(want) * 0.00392 + 0.0079 * std::abs(v[i]) * rstd * std::abs(ww[i]) + 1e-5)
              << "layer norm N " << N << " isa " << int(isa) << " row " << r << " col " << i;
        }
      }
    }
  }
}

TEST(KernelDispatch, AttentionRejectsBadArgumentsBeforeWriting) {
  std::vector<float> qkv(5 * 3 * 2 * 8, 0.5f), out(5 * 2 * 8, -1.f);
  std::vector<int32_t> cu = {0, 2, 5};
  const auto Q = cpu_tensor(qkv.data(), {5, 3, 2, 8}, DType::kFloat32);
  const auto O = cpu_tensor(out.data(), {5, 2, 8}, DType::kFloat32);
  const auto C = cpu_tensor(cu.data(), {3}, DType::kInt32);
  attention(Q, C, O, nullptr, 0.25, 1);
  EXPECT_FLOAT_EQ(out[0], 0.5f);
  std::fill(out.begin(), out.end(), -1.f);
  auto bad = Q;
  bad.shape = {5, 2, 2, 8};
  EXPECT_THROW(attention(bad, C, O, nullptr, 0.25, 1), InvalidArgument);  // not [T, 3, nh, hd]
  bad = Q;
  bad.dtype = DType::kBFloat16;
  EXPECT_THROW(attention(bad, C, O, nullptr, 0.25, 1), InvalidArgument);  // out's dtype differs
  bad = Q;
  bad.dtype = DType::kFloat16;
  auto half_out = O;
  half_out.dtype = DType::kFloat16;
  EXPECT_THROW(attention(bad, C, half_out, nullptr, 0.25, 1), InvalidArgument);  // float32 or bfloat16 only
  bad = O;
  bad.shape = {5, 2, 4};
  EXPECT_THROW(attention(Q, C, bad, nullptr, 0.25, 1), InvalidArgument);  // out shape
  cu[2] = 4;
  EXPECT_THROW(attention(Q, C, O, nullptr, 0.25, 1), InvalidArgument);  // cu[-1] != T
  cu[2] = 5;
  cu[1] = 6;
  EXPECT_THROW(attention(Q, C, O, nullptr, 0.25, 1), InvalidArgument);  // decreasing
  cu[1] = 2;
  EXPECT_THROW(attention(Q, C, O, nullptr, 0.0, 1), InvalidArgument);
  EXPECT_THROW(attention(Q, C, O, nullptr, std::nan(""), 1), InvalidArgument);
  EXPECT_THROW(attention(Q, C, O, nullptr, 0.25, 0), InvalidArgument);
  bad = Q;
  bad.device = DeviceType::kCUDA;
  auto badc = C;
  badc.device = DeviceType::kCUDA;
  auto bado = O;
  bado.device = DeviceType::kCUDA;
  EXPECT_THROW(attention(bad, badc, bado, nullptr, 0.25, 1), InvalidArgument);  // CPU only (or no CUDA)
  EXPECT_EQ(out[0], -1.f);
}

TEST(KernelEpilogue, BiasGeluMatchesExactGeluForEveryPathAndWidth) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 3.f);
  for (int64_t N : {8, 12, 64, 1536}) {
    const int64_t rows = 37;
    std::vector<float> x(rows * N), bias(N);
    for (auto& v : x) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    x[0] = -40.f;  // far left tail: exactly -0
    x[1] = 40.f;   // far right: x itself
    for (cpu::Isa isa : kIsas)
      for (int threads : {1, 4}) {
        auto y = x;
        cpu::bias_gelu(y.data(), bias.data(), rows, N, threads, isa);
        for (int64_t i = 0; i < rows * N; ++i) {
          const double v = double(x[i]) + double(bias[i % N]);
          const double want = 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
          // erf's approximation is within 1.5e-7 absolute; times |v| / 2.
          ASSERT_NEAR(y[i], want, 2e-7 * (1 + std::abs(v))) << "N " << N << " isa " << int(isa) << " at " << i;
        }
      }
  }
}

TEST(KernelEpilogue, AddLayerNormMatchesDoublePrecisionForEveryPathAndWidth) {
  std::mt19937 rng(6);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t N : {8, 20, 384, 768}) {
    const int64_t rows = 29;
    std::vector<float> x(rows * N), res(rows * N), bias(N), w(N), b(N);
    for (auto& v : x) v = 4.f * nd(rng) + 3.f;  // an offset mean, as residual streams have
    for (auto& v : res) v = nd(rng);
    for (auto* p : {&bias, &w, &b})
      for (auto& v : *p) v = nd(rng);
    for (cpu::Isa isa : kIsas)
      for (int threads : {1, 4}) {
        auto y = x;
        cpu::add_layer_norm(y.data(), bias.data(), res.data(), w.data(), b.data(), 1e-12f, rows, N, threads, isa);
        for (int64_t r = 0; r < rows; ++r) {
          std::vector<double> v(N);
          double mean = 0, var = 0;
          for (int64_t i = 0; i < N; ++i) mean += (v[i] = double(x[r * N + i]) + bias[i] + res[r * N + i]);
          mean /= double(N);
          for (int64_t i = 0; i < N; ++i) var += (v[i] - mean) * (v[i] - mean);
          const double rstd = 1.0 / std::sqrt(var / double(N) + 1e-12);
          for (int64_t i = 0; i < N; ++i) {
            const double want = (v[i] - mean) * rstd * w[i] + b[i];
            ASSERT_NEAR(y[r * N + i], want, 2e-5 * (1 + std::abs(want)))
                << "N " << N << " isa " << int(isa) << " row " << r << " col " << i;
          }
        }
      }
  }
}

TEST(KernelDispatch, EpiloguesRejectBadArgumentsBeforeWriting) {
  std::vector<float> x(4 * 8, 1.f), res(4 * 8, 0.f), vec(8, 0.5f), shortv(7, 0.f);
  const auto X = cpu_tensor(x.data(), {4, 8}, DType::kFloat32);
  const auto R = cpu_tensor(res.data(), {4, 8}, DType::kFloat32);
  const auto V = cpu_tensor(vec.data(), {8}, DType::kFloat32);
  const auto S = cpu_tensor(shortv.data(), {7}, DType::kFloat32);
  auto half = X;
  half.dtype = DType::kFloat16;
  auto strided = X;
  strided.strides = {16, 1};
  auto gpu = X;
  gpu.device = DeviceType::kCUDA;
  EXPECT_THROW(bias_gelu(X, S, 1), InvalidArgument);        // bias width
  EXPECT_THROW(bias_gelu(half, V, 1), InvalidArgument);     // float32 only
  EXPECT_THROW(bias_gelu(strided, V, 1), InvalidArgument);  // contiguous only
  EXPECT_THROW(bias_gelu(gpu, V, 1), InvalidArgument);      // CPU only
  EXPECT_THROW(bias_gelu(X, V, 0), InvalidArgument);
  auto r3 = R;
  r3.shape = {3, 8};
  EXPECT_THROW(add_layer_norm(X, V, r3, V, V, 1e-5, 1), InvalidArgument);  // residual shape
  EXPECT_THROW(add_layer_norm(X, V, R, S, V, 1e-5, 1), InvalidArgument);   // weight width
  EXPECT_THROW(add_layer_norm(X, V, R, V, V, -1e-5, 1), InvalidArgument);  // eps < 0
  EXPECT_EQ(x[0], 1.f);
  bias_gelu(X, V, 1);
  EXPECT_NEAR(x[0], 1.5 * 0.5 * (1 + std::erf(1.5 / std::sqrt(2.0))), 1e-6);
}

}  // namespace
}  // namespace kernels
}  // namespace fastserve
