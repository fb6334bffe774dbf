// The AVX2 + FMA path of the fused epilogues (epilogue_cpu.cpp); N, the row
// width, is a multiple of 8.
#include "epilogue_cpu.h"
#include "simd.h"

#if defined(FASTSERVE_CPU_AVX2)

#include "simd_avx2.h"

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {
namespace {

// 0.5 v (1 + erf(v / sqrt 2)), erf by Abramowitz-Stegun 7.1.26:
// erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^(-z^2), t = 1 / (1 + p |z|).
FS_AVX2_INLINE __m256 gelu(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 z = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
  const __m256 zs = _mm256_and_ps(z, sign);
  const __m256 za = _mm256_xor_ps(z, zs);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), za, one));
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp_nonpositive(_mm256_xor_ps(_mm256_mul_ps(z, z), sign));
  const __m256 erf_abs = _mm256_fnmadd_ps(_mm256_mul_ps(p, t), e, one);
  const __m256 erf = _mm256_xor_ps(erf_abs, zs);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, erf));
}

template <typename T>
FS_AVX2_INLINE void bias_gelu_rows(T* x, const T* bias, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = x + r * N;
    for (int64_t i = 0; i < N; i += 8) store8(row + i, gelu(_mm256_add_ps(load8(row + i), load8(bias + i))));
  }
}

// The sum is stored (rounded, in bfloat16) and LayerNorm reads it back.
template <typename T>
FS_AVX2_INLINE void add_layer_norm_rows(T* x, const T* bias, const T* residual, const T* w, const T* b, float eps,
                                        int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = x + r * N;
    const T* res = residual + r * N;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t i = 0; i < N; i += 8) {
      store8(row + i, _mm256_add_ps(_mm256_add_ps(load8(row + i), load8(bias + i)), load8(res + i)));
      sum = _mm256_add_ps(sum, load8(row + i));
    }
    const __m256 mean = _mm256_set1_ps(hsum(sum) / float(N));
    __m256 sq = _mm256_setzero_ps();
    for (int64_t i = 0; i < N; i += 8) {
      const __m256 d = _mm256_sub_ps(load8(row + i), mean);
      sq = _mm256_fmadd_ps(d, d, sq);
    }
    const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(hsum(sq) / float(N) + eps));
    for (int64_t i = 0; i < N; i += 8) {
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(load8(row + i), mean), rstd);
      store8(row + i, _mm256_fmadd_ps(d, load8(w + i), load8(b + i)));
    }
  }
}

}  // namespace

FS_AVX2 void bias_gelu_rows_avx2(float* x, const float* bias, int64_t N, int64_t r0, int64_t r1) {
  bias_gelu_rows(x, bias, N, r0, r1);
}
FS_AVX2 void bias_gelu_rows_avx2(bf16* x, const bf16* bias, int64_t N, int64_t r0, int64_t r1) {
  bias_gelu_rows(x, bias, N, r0, r1);
}
FS_AVX2 void add_layer_norm_rows_avx2(float* x, const float* bias, const float* residual, const float* w,
                                      const float* b, float eps, int64_t N, int64_t r0, int64_t r1) {
  add_layer_norm_rows(x, bias, residual, w, b, eps, N, r0, r1);
}
FS_AVX2 void add_layer_norm_rows_avx2(bf16* x, const bf16* bias, const bf16* residual, const bf16* w, const bf16* b,
                                      float eps, int64_t N, int64_t r0, int64_t r1) {
  add_layer_norm_rows(x, bias, residual, w, b, eps, N, r0, r1);
}

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve

#endif  // FASTSERVE_CPU_AVX2
