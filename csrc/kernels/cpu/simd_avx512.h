// Internal to layer_avx512.cpp: Vec16, the layer kernels' sixteen-lane
// operations on AVX-512F (the shared bodies are layer_simd.inc's).
//
// Built natively with per-function target attributes, like the AVX2 files.
// A test build (CMake's FASTSERVE_EMULATE_AVX512, which defines
// FASTSERVE_AVX512_EMULATED and builds this file with -mavx2) runs the same
// code through SIMDe's AVX-512 on an AVX2 machine, so that the path is tested
// where no AVX-512 CPU is at hand. Only the bfloat16 widening and narrowing
// differ between the two (SIMDe lacks vpmovzxwd and vpmovdw on 512 bits); the
// emulated build does those on the two 256-bit halves.
//
// Vec16Bf16 is Vec16 with AVX512-BF16's narrowing (vcvtneps2bf16): one
// instruction where Vec16 takes nine. SIMDe has no such instruction, so the
// emulated build's Vec16Bf16 is Vec16 itself.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd_avx2.h"

#if defined(FASTSERVE_AVX512_EMULATED)
#include <simde/x86/avx512.h>
#define FS512(name) simde_mm512_##name
using fs_m512 = simde__m512;
using fs_m512i = simde__m512i;
using fs_mask16 = simde__mmask16;
#define FS_AVX512 __attribute__((target("avx2,f16c,fma")))
#define FS_AVX512_INLINE __attribute__((target("avx2,f16c,fma"), always_inline)) inline
#else
#define FS512(name) _mm512_##name
using fs_m512 = __m512;
using fs_m512i = __m512i;
using fs_mask16 = __mmask16;
#define FS_AVX512 __attribute__((target("avx512f,avx2,f16c,fma")))
#define FS_AVX512_INLINE __attribute__((target("avx512f,avx2,f16c,fma"), always_inline)) inline
#endif
#if defined(FASTSERVE_AVX512_EMULATED)
#define FS_AVX512BF16 FS_AVX512
#define FS_AVX512BF16_INLINE FS_AVX512_INLINE
#else
#define FS_AVX512BF16 __attribute__((target("avx512f,avx512bf16,avx2,f16c,fma")))
#define FS_AVX512BF16_INLINE __attribute__((target("avx512f,avx512bf16,avx2,f16c,fma"), always_inline)) inline
#endif

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {

struct Vec16 {
  using V = fs_m512;
  static constexpr int W = 16;

  static FS_AVX512_INLINE V load(const float* p) { return FS512(loadu_ps)(p); }
  // bfloat16 bits widened: a zero extension and a shift.
  static FS_AVX512_INLINE V load(const uint16_t* p) {
#if defined(FASTSERVE_AVX512_EMULATED)
    const V lo = FS512(castps256_ps512)(load8(p));
    return FS512(castpd_ps)(FS512(insertf64x4)(FS512(castps_pd)(lo), _mm256_castps_pd(load8(p + 8)), 1));
#else
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#endif
  }
  static FS_AVX512_INLINE void store(float* p, V v) { FS512(storeu_ps)(p, v); }
  // To bfloat16, rounding to nearest even, NaN kept quiet (what torch does).
  static FS_AVX512_INLINE void store(uint16_t* p, V v) {
    const fs_m512i x = FS512(castps_si512)(v);
    const fs_m512i lsb = FS512(and_si512)(FS512(srli_epi32)(x, 16), FS512(set1_epi32)(1));
    fs_m512i r = FS512(add_epi32)(x, FS512(add_epi32)(FS512(set1_epi32)(0x7fff), lsb));
    const fs_mask16 nan = FS512(cmp_ps_mask)(v, v, _CMP_UNORD_Q);
    r = FS512(mask_mov_epi32)(r, nan, FS512(or_si512)(x, FS512(set1_epi32)(0x400000)));
    r = FS512(srli_epi32)(r, 16);
#if defined(FASTSERVE_AVX512_EMULATED)
    for (int h = 0; h < 2; ++h) {  // each half's eight lanes (all < 2^16) packed into 128 bits
      const __m256i half = h ? FS512(extracti64x4_epi64)(r, 1) : FS512(castsi512_si256)(r);
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(half, half), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8 * h), _mm256_castsi256_si128(packed));
    }
#else
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
#endif
  }

  static FS_AVX512_INLINE V zero() { return FS512(setzero_ps)(); }
  static FS_AVX512_INLINE V set1(float x) { return FS512(set1_ps)(x); }
  static FS_AVX512_INLINE V add(V a, V b) { return FS512(add_ps)(a, b); }
  static FS_AVX512_INLINE V sub(V a, V b) { return FS512(sub_ps)(a, b); }
  static FS_AVX512_INLINE V mul(V a, V b) { return FS512(mul_ps)(a, b); }
  static FS_AVX512_INLINE V div(V a, V b) { return FS512(div_ps)(a, b); }
  static FS_AVX512_INLINE V max(V a, V b) { return FS512(max_ps)(a, b); }
  static FS_AVX512_INLINE V fmadd(V a, V b, V c) { return FS512(fmadd_ps)(a, b, c); }    // a b + c
  static FS_AVX512_INLINE V fnmadd(V a, V b, V c) { return FS512(fnmadd_ps)(a, b, c); }  // c - a b
  // (and_ps and xor_ps on 512 bits are AVX512DQ: through the integer forms.)
  static FS_AVX512_INLINE V sign(V a) {
    return FS512(castsi512_ps)(FS512(and_si512)(FS512(castps_si512)(a), FS512(set1_epi32)(int(0x80000000u))));
  }
  static FS_AVX512_INLINE V flip(V a, V s) {
    return FS512(castsi512_ps)(FS512(xor_si512)(FS512(castps_si512)(a), FS512(castps_si512)(s)));
  }

  static FS_AVX512_INLINE V round(V a) {
    return FS512(roundscale_ps)(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  // 2^n for integral n in [-126, 127], through the exponent bits: n + 1.5 2^23
  // holds n in its low mantissa bits, so its bits less those of 1.5 2^23 are n
  // (no float-to-int conversion, which SIMDe lacks on 512 bits).
  static FS_AVX512_INLINE V pow2(V n) {
    const fs_m512i bits = FS512(castps_si512)(add(n, set1(12582912.f)));
    return FS512(castsi512_ps)(FS512(slli_epi32)(FS512(sub_epi32)(bits, FS512(set1_epi32)(0x4B400000 - 127)), 23));
  }
  // v, with 0 in the lanes where x < lo.
  static FS_AVX512_INLINE V zero_below(V v, V x, V lo) {
    return FS512(mask_mov_ps)(v, FS512(cmp_ps_mask)(x, lo, _CMP_LT_OQ), zero());
  }

  static FS_AVX512_INLINE float hsum(V v) {
    const __m256 lo = FS512(castps512_ps256)(v);
    const __m256 hi = _mm256_castpd_ps(FS512(extractf64x4_pd)(FS512(castps_pd)(v), 1));
    return simd::hsum(_mm256_add_ps(lo, hi));
  }
  static FS_AVX512_INLINE float hmax(V v) {
    const __m256 lo = FS512(castps512_ps256)(v);
    const __m256 hi = _mm256_castpd_ps(FS512(extractf64x4_pd)(FS512(castps_pd)(v), 1));
    return simd::hmax(_mm256_max_ps(lo, hi));
  }
};

#if defined(FASTSERVE_AVX512_EMULATED)
using Vec16Bf16 = Vec16;
#else
struct Vec16Bf16 : Vec16 {
  using Vec16::store;
  // To bfloat16 by vcvtneps2bf16, which rounds to nearest even and keeps NaN
  // quiet as Vec16::store does, but flushes float32 subnormals (exponent
  // bits zero, mantissa not) to zero where torch rounds them: a vector that
  // holds one takes Vec16's rounding, so the two paths agree bit for bit.
  static FS_AVX512BF16_INLINE void store(uint16_t* p, V v) {
    const __m512i x = _mm512_castps_si512(v);
    const __mmask16 tiny = _mm512_testn_epi32_mask(x, _mm512_set1_epi32(0x7f800000));
    if (_mm512_mask_test_epi32_mask(tiny, x, _mm512_set1_epi32(0x007fffff))) return Vec16::store(p, v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
  }
};
#endif

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
