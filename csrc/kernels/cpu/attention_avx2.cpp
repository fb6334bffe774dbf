// The AVX2 + FMA path of the CPU attention kernel (attention_cpu.cpp), built
// with per-function target attributes like kernels_cpu_avx2.cpp so that the
// library still runs on any x86-64.
//
// A group of heads of one sequence is staged (attention_group_avx2), then
// each head runs from the staged keys [hd, Lp] and queries and values
// [L, hd], all contiguous. Queries go four at a time: each loaded
// key vector serves four rows' scores (one broadcast per row serves two key
// vectors: eight independent FMA chains), and each loaded value vector four
// rows' outputs, so the loops issue under one load per FMA rather than two. The softmax is in float32 with the row's
// maximum subtracted; exp is the Cephes polynomial (about 1 ulp over the
// range it is used on, [-87, 0]). bfloat16 rows are widened as they are
// staged and the context rounded once as it is stored.
#include "attention_cpu.h"
#include "simd.h"

#if defined(FASTSERVE_CPU_AVX2)

#include <algorithm>
#include <limits>

#include "simd_avx2.h"


namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {
namespace {

// Output columns [c, c + 8 W) of four query rows: sum_j p[r][j] v[j].
template <int W, typename T>
FS_AVX2_INLINE void weighted_values(const float* p, int64_t Lp, const float* v, int64_t L, int64_t hd, int64_t c,
                                    const float* inv, T* const* o, int64_t rows) {
  __m256 acc[4][W];
  for (int r = 0; r < 4; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    __m256 vj[W];
    for (int w = 0; w < W; ++w) vj[w] = _mm256_loadu_ps(v + j * hd + c + 8 * w);
    for (int r = 0; r < 4; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * Lp + j);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(pr, vj[w], acc[r][w]);
    }
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int w = 0; w < W; ++w)
      store8(o[r] + c + 8 * w, _mm256_mul_ps(acc[r][w], _mm256_set1_ps(inv[r])));
}

}  // namespace

// 8 x 8 floats: rows r[i] (8 columns each) -> columns stored at o + i * ld.
FS_AVX2_INLINE void transpose8(const __m256* r, float* o, int64_t ld) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(o + 0 * ld, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(o + 1 * ld, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(o + 2 * ld, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(o + 3 * ld, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(o + 4 * ld, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(o + 5 * ld, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(o + 6 * ld, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(o + 7 * ld, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// The context of one head from its staged keys kt [hd, Lp], values v [L, hd]
// and queries q [L, hd] (biases added), into out rows at stride H; s holds
// [4, Lp] scores.
template <typename T>
FS_AVX2_INLINE void one_head(const float* kt, const float* v, const float* qh, float* s, int64_t L, int64_t Lp,
                             int64_t hd, float scale, T* out, int64_t H) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t i0 = 0; i0 < L; i0 += 4) {
    const int64_t rows = std::min<int64_t>(4, L - i0);
    const float* q[4];
    T* o[4];
    for (int64_t r = 0; r < 4; ++r) {
      const int64_t i = i0 + std::min<int64_t>(r, rows - 1);  // spare rows repeat the last
      q[r] = qh + i * hd;
      o[r] = out + i * H;
    }
    // Scores, scaled: sixteen keys at a time (eight independent FMA chains,
    // enough to cover the FMA latency), then eight.
    int64_t j0 = 0;
    for (; j0 + 16 <= Lp; j0 += 16) {
      __m256 a[4][2];
      for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; ++d) {
        const __m256 k0 = _mm256_loadu_ps(kt + d * Lp + j0), k1 = _mm256_loadu_ps(kt + d * Lp + j0 + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 qr = _mm256_broadcast_ss(q[r] + d);
          a[r][0] = _mm256_fmadd_ps(qr, k0, a[r][0]);
          a[r][1] = _mm256_fmadd_ps(qr, k1, a[r][1]);
        }
      }
      for (int r = 0; r < 4; ++r) {
        _mm256_storeu_ps(s + r * Lp + j0, _mm256_mul_ps(a[r][0], vscale));
        _mm256_storeu_ps(s + r * Lp + j0 + 8, _mm256_mul_ps(a[r][1], vscale));
      }
    }
    for (; j0 < Lp; j0 += 8) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
      for (int64_t d = 0; d < hd; ++d) {
        const __m256 k = _mm256_loadu_ps(kt + d * Lp + j0);
        acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[0] + d), k, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[1] + d), k, acc1);
        acc2 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[2] + d), k, acc2);
        acc3 = _mm256_fmadd_ps(_mm256_broadcast_ss(q[3] + d), k, acc3);
      }
      _mm256_storeu_ps(s + 0 * Lp + j0, _mm256_mul_ps(acc0, vscale));
      _mm256_storeu_ps(s + 1 * Lp + j0, _mm256_mul_ps(acc1, vscale));
      _mm256_storeu_ps(s + 2 * Lp + j0, _mm256_mul_ps(acc2, vscale));
      _mm256_storeu_ps(s + 3 * Lp + j0, _mm256_mul_ps(acc3, vscale));
    }
    // Softmax weights (unnormalised) and their sums.
    float inv[4];
    for (int r = 0; r < 4; ++r) {
      float* sr = s + r * Lp;
      for (int64_t j = L; j < Lp; ++j) sr[j] = ninf;
      __m256 mv = _mm256_set1_ps(ninf);
      for (int64_t j0 = 0; j0 < Lp; j0 += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sr + j0));
      const __m256 m = _mm256_set1_ps(hmax(mv));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j0 = 0; j0 < Lp; j0 += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sr + j0), m));
        _mm256_storeu_ps(sr + j0, e);
        sum = _mm256_add_ps(sum, e);
      }
      inv[r] = 1.f / hsum(sum);
    }
    int64_t c = 0;
    for (; c + 16 <= hd; c += 16) weighted_values<2>(s, Lp, v, L, hd, c, inv, o, rows);
    for (; c < hd; c += 8) weighted_values<1>(s, Lp, v, L, hd, c, inv, o, rows);
  }
}

// bias[off .. off + 8), or zeros without a bias.
template <typename T>
FS_AVX2_INLINE __m256 bias_or_zero(const T* bias, int64_t off) {
  return bias ? load8(bias + off) : _mm256_setzero_ps();
}

// Heads [h, h + g) of one sequence. The sequence's rows are read once, eight
// at a time and front to back (a stream the hardware prefetcher follows):
// each head's keys transposed into [hd, Lp] by 8 x 8 register transposes,
// its queries and values copied into [L, hd], biases added on the way. Then
// each head runs from that scratch. Reading one head at a time instead took
// 128 bytes from rows 4.6 KB apart, which no prefetcher follows: half the
// kernel's time on a batch out of cache.
template <typename T>
FS_AVX2_INLINE void group(const HeadArgs<T>& a) {
  const int64_t L = a.L, hd = a.hd, g = a.g, H = a.nh * hd, stride = 3 * H;
  const int64_t Lp = (L + 7) / 8 * 8;
  float* kt = a.scratch;      // [g, hd, Lp]
  float* v = kt + g * hd * Lp;  // [g, L, hd]
  float* q = v + g * L * hd;    // [g, L, hd]
  float* s = q + g * L * hd;    // [4, Lp]
  const T* base = a.qkv + a.start * stride + a.h * hd;
  const T* bias = a.bias ? a.bias + a.h * hd : nullptr;  // + part * H
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < L; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, L - j0);
    for (int64_t i = 0; i < n; ++i) {
      const T* row = base + (j0 + i) * stride;
      for (int64_t k = 0; k < g; ++k)
        for (int64_t d = 0; d < hd; d += 8) {
          const int64_t col = k * hd + d;
          _mm256_storeu_ps(q + (k * L + j0 + i) * hd + d, _mm256_add_ps(load8(row + col), bias_or_zero(bias, col)));
          _mm256_storeu_ps(v + (k * L + j0 + i) * hd + d,
                           _mm256_add_ps(load8(row + 2 * H + col), bias_or_zero(bias, 2 * H + col)));
        }
    }
    for (int64_t col = 0; col < g * hd; col += 8) {
      const __m256 bk = bias_or_zero(bias, H + col);
      __m256 r[8];
      for (int64_t i = 0; i < 8; ++i)
        r[i] = i < n ? _mm256_add_ps(load8(base + (j0 + i) * stride + H + col), bk) : zero;
      const int64_t k = col / hd, d = col % hd;
      transpose8(r, kt + (k * hd + d) * Lp + j0, Lp);
    }
  }
  T* out = a.out + a.start * H + a.h * hd;
  for (int64_t k = 0; k < g; ++k)
    one_head(kt + k * hd * Lp, v + k * L * hd, q + k * L * hd, s, L, Lp, hd, a.scale, out + k * hd, H);
}

FS_AVX2 void attention_group_avx2(const HeadArgs<float>& a) { group(a); }
FS_AVX2 void attention_group_avx2(const HeadArgs<bf16>& a) { group(a); }

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve

#endif  // FASTSERVE_CPU_AVX2
