// Internal to the AVX2 + FMA kernel files (included inside their
// FASTSERVE_CPU_AVX2 blocks): bfloat16 loads and stores, reductions and a
// transpose shared by pooling and the layer kernels, and Vec8, the layer
// kernels' eight-lane operations.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#define FS_AVX2 __attribute__((target("avx2,f16c,fma")))
#define FS_AVX2_INLINE __attribute__((target("avx2,f16c,fma"), always_inline)) inline

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {

// Eight floats from float or bfloat16 (its bits, uint16_t) memory, and back;
// to bfloat16 rounding to nearest even, NaN kept quiet (what torch does).
FS_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FS_AVX2_INLINE __m256 load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
FS_AVX2_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
FS_AVX2_INLINE void store8(uint16_t* p, __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x400000)), nan);
  r = _mm256_srli_epi32(r, 16);
  // Pack the eight 32-bit lanes' low halves (all < 2^16) into 128 bits.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

FS_AVX2_INLINE float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

FS_AVX2_INLINE float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

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

// The vector operations the layer kernels' shared bodies (layer_simd.inc) use,
// eight lanes wide.
struct Vec8 {
  using V = __m256;
  static constexpr int W = 8;
  static FS_AVX2_INLINE V load(const float* p) { return load8(p); }
  static FS_AVX2_INLINE V load(const uint16_t* p) { return load8(p); }
  static FS_AVX2_INLINE void store(float* p, V v) { store8(p, v); }
  static FS_AVX2_INLINE void store(uint16_t* p, V v) { store8(p, v); }
  static FS_AVX2_INLINE V zero() { return _mm256_setzero_ps(); }
  static FS_AVX2_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  static FS_AVX2_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  static FS_AVX2_INLINE V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static FS_AVX2_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static FS_AVX2_INLINE V div(V a, V b) { return _mm256_div_ps(a, b); }
  static FS_AVX2_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  static FS_AVX2_INLINE V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
  static FS_AVX2_INLINE V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
  static FS_AVX2_INLINE V sign(V a) { return _mm256_and_ps(a, _mm256_set1_ps(-0.f)); }  // a's sign bit
  static FS_AVX2_INLINE V flip(V a, V s) { return _mm256_xor_ps(a, s); }  // a with s's sign bits flipped in
  static FS_AVX2_INLINE V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // 2^n for integral n in [-126, 127], through the exponent bits.
  static FS_AVX2_INLINE V pow2(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  // v, with 0 in the lanes where x < lo.
  static FS_AVX2_INLINE V zero_below(V v, V x, V lo) { return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), v); }
  static FS_AVX2_INLINE float hsum(V v) { return simd::hsum(v); }
  static FS_AVX2_INLINE float hmax(V v) { return simd::hmax(v); }
};

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
