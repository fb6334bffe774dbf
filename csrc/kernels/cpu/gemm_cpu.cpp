// Float32 products x [M, K] @ W^T for a linear layer's weight W [N, K], with W
// laid out once (gemm_pack) in panels of kGemmNR output columns, [P, K, NR]
// (P = N / NR rounded up, the columns past N zero): for each k, a panel's NR
// weights are contiguous, so the inner loop loads two vectors of B per k and
// broadcasts six values of x against them into twelve accumulators (a 6 x 16
// tile in AVX2's sixteen registers), the register blocking of BLIS's Haswell
// micro-kernel. Rows of x go in blocks of kGemmMcTiles tiles, each block packed
// once ([tiles, K, MR], rows past M zero) and swept against every panel while
// it stays in L2, each panel swept against the block's tiles while it stays
// in L1. K is not blocked: every output is sum over k in order of x[i, k] *
// W[j, k], one FMA chain per element, so a row's result does not depend on
// the other rows of x or on how the rows are split over threads (batch
// invariance: tests/python/test_batch_invariance.py).
//
// Why not MKL's sgemm (torch.mm): on an AVX2-only AMD EPYC (Zen 3) MKL ran
// MiniLM's products at 56-64 GFLOP/s per thread against a 96-99 GFLOP/s
// FMA peak, where this loop nest ran at 87-98 (benchmarks/README.md, "Own
// float32 GEMM"). The AVX2 path runs on any x86-64 with AVX2 + FMA; the
// portable loops elsewhere (tests, FASTSERVE_KERNEL_NO_SIMD).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_cpu.h"
#include "fastserve/kernels.h"
#include "simd.h"

#if defined(FASTSERVE_CPU_AVX2)
#include "simd_avx2.h"
#endif

namespace fastserve {
namespace kernels {
namespace cpu {
namespace {

constexpr int64_t MR = 6;
constexpr int64_t NR = kGemmNR;

// One tile: c [MR, NR] (row stride ldc) = a [K, MR] . b [K, NR] summed over k.
void tile_portable(int64_t K, const float* a, const float* b, float* c, int64_t ldc) {
  float acc[MR][NR] = {};
  for (int64_t k = 0; k < K; ++k, a += MR, b += NR)
    for (int64_t r = 0; r < MR; ++r)
      for (int64_t j = 0; j < NR; ++j) acc[r][j] = std::fma(a[r], b[j], acc[r][j]);
  for (int64_t r = 0; r < MR; ++r) std::memcpy(c + r * ldc, acc[r], sizeof acc[r]);
}

#if defined(FASTSERVE_CPU_AVX2)
FS_AVX2 void tile_avx2(int64_t K, const float* a, const float* b, float* c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t k = 0; k < K; ++k, a += MR, b += NR) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 x = _mm256_broadcast_ss(a);
    c00 = _mm256_fmadd_ps(x, b0, c00);
    c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(x, b0, c10);
    c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(x, b0, c20);
    c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(x, b0, c30);
    c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(x, b0, c40);
    c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(x, b0, c50);
    c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  const __m256 rows[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  for (int64_t r = 0; r < MR; ++r) {
    _mm256_storeu_ps(c + r * ldc, rows[r][0]);
    _mm256_storeu_ps(c + r * ldc + 8, rows[r][1]);
  }
}
#endif

using TileFn = void (*)(int64_t, const float*, const float*, float*, int64_t);

struct Args {
  const float* x;
  const float* w;
  float* out;
  int64_t M, N, K, tiles_per_block;
  TileFn tile;
};

// Packs rows [r0, r0 + rows) of x into tiles [tiles, K, MR], zero past M.
void pack_rows(const float* x, int64_t M, int64_t K, int64_t r0, int64_t rows, float* dst) {
  for (int64_t t = 0; t * MR < rows; ++t) {
    float* d = dst + t * K * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t row = r0 + t * MR + r;
      if (row < M && row < r0 + rows) {
        const float* s = x + row * K;
        for (int64_t k = 0; k < K; ++k) d[k * MR + r] = s[k];
      } else {
        for (int64_t k = 0; k < K; ++k) d[k * MR + r] = 0.f;
      }
    }
  }
}

// Blocks [b0, b1) of rows, each kGemmMcTiles tiles or fewer (the last).
void run_blocks(const Args& a, int64_t b0, int64_t b1) {
  thread_local std::vector<float> packed;
  const int64_t block_rows = a.tiles_per_block * MR;
  packed.resize(size_t(block_rows * a.K));
  float edge[MR * NR];
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t r0 = blk * block_rows;
    const int64_t rows = std::min(block_rows, a.M - r0);
    if (rows <= 0) break;
    pack_rows(a.x, a.M, a.K, r0, rows, packed.data());
    const int64_t tiles = (rows + MR - 1) / MR;
    for (int64_t p = 0; p * NR < a.N; ++p) {
      const float* b = a.w + p * a.K * NR;
      const int64_t cols = std::min(NR, a.N - p * NR);
      for (int64_t t = 0; t < tiles; ++t) {
        const float* at = packed.data() + t * a.K * MR;
        float* c = a.out + (r0 + t * MR) * a.N + p * NR;
        const int64_t tile_rows = std::min(MR, rows - t * MR);
        if (tile_rows == MR && cols == NR) {
          a.tile(a.K, at, b, c, a.N);
          continue;
        }
        a.tile(a.K, at, b, edge, NR);
        for (int64_t r = 0; r < tile_rows; ++r) std::memcpy(c + r * a.N, edge + r * NR, size_t(cols) * sizeof(float));
      }
    }
  }
}

}  // namespace

int64_t gemm_panels(int64_t N) { return (N + NR - 1) / NR; }

void gemm_pack(const float* w, int64_t N, int64_t K, float* out) {
  for (int64_t p = 0; p < gemm_panels(N); ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < NR; ++j) {
        const int64_t n = p * NR + j;
        out[(p * K + k) * NR + j] = n < N ? w[n * K + k] : 0.f;
      }
}

void gemm(const float* x, const float* packed, int64_t M, int64_t N, int64_t K, int threads, float* out, Isa cap) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    std::fill(out, out + M * N, 0.f);
    return;
  }
  const int64_t tiles = (M + MR - 1) / MR;
  // At least one block per thread, each at most kGemmMcTiles tiles.
  int64_t blocks = std::max<int64_t>((tiles + kGemmMcTiles - 1) / kGemmMcTiles, std::min<int64_t>(threads, tiles));
  const int64_t per = (tiles + blocks - 1) / blocks;
  blocks = (tiles + per - 1) / per;
  Args a{x, packed, out, M, N, K, per, tile_portable};
#if defined(FASTSERVE_CPU_AVX2)
  if (isa_for(cap, NR) >= Isa::kAvx2) a.tile = tile_avx2;
#endif
  run_chunks(blocks, std::max(1, threads), [](void* c, int64_t b0, int64_t b1) {
    run_blocks(*static_cast<const Args*>(c), b0, b1);
  }, &a);
}

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
