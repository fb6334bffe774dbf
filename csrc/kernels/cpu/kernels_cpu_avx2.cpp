// AVX2 + F16C + FMA pooling (x86-64 only), selected at run time by
// kernels_cpu.cpp. Every function that uses these instructions carries the
// target attribute instead of the file being built with -mavx2, so no AVX2
// code can leak into functions shared with the portable path.
//
// Why: built for baseline x86-64 (SSE2), the portable fp16 -> float
// conversion is ~10 scalar-ish instructions per element, which makes pooling
// compute-bound far below memory speed. vcvtph2ps converts 8 halves in one
// instruction; bf16 is a zero-extend and a shift (figures:
// benchmarks/README.md).
#include "simd.h"

#if defined(FASTSERVE_CPU_AVX2)

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "simd_avx2.h"

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {
namespace {

// Load 8 elements as floats (vector) or one (scalar tail): bit-exact with
// fp16_to_float / bf16_to_float.
struct F32 {
  using S = float;
  static FS_AVX2_INLINE __m256 v(const float* p) { return _mm256_loadu_ps(p); }
  static inline float s(float x) { return x; }
};
struct F16 {
  using S = uint16_t;
  static FS_AVX2_INLINE __m256 v(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline float s(uint16_t x) { return fp16_to_float(x); }
};
struct BF16 {
  using S = uint16_t;
  static FS_AVX2_INLINE __m256 v(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline float s(uint16_t x) { return bf16_to_float(x); }
};

// pool_max(acc, v) as the portable path has it: maxps(v, acc) is
// v > acc ? v : acc (it returns its second operand when either is NaN or
// both are equal), and a NaN v is blended in, so a NaN row wins and stays.
template <bool kMax>
FS_AVX2_INLINE __m256 combine(__m256 acc, __m256 v) {
  if (!kMax) return _mm256_add_ps(acc, v);
  return _mm256_blendv_ps(_mm256_max_ps(v, acc), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// Columns per register block: 8 accumulators of 8 floats stay in registers
// across all of a block's rows (16 ymm registers: 8 accumulators + loads).
constexpr int kRegs = 8;

// A block of rows' 8 columns `a` into o: the first block of a segment stores
// its sum, later ones add theirs to o (mean_block_rows); the last scales.
FS_AVX2_INLINE void put(__m256 a, float* o, bool first, bool last, __m256 vs) {
  if (!first) a = _mm256_add_ps(_mm256_loadu_ps(o), a);
  _mm256_storeu_ps(o, last ? _mm256_mul_ps(a, vs) : a);
}

// Full blocks of 64 columns, rows [begin, end): accumulators in registers.
template <class Ld, bool kMax>
FS_AVX2_INLINE void pool_block(const typename Ld::S* p, int64_t rows, int64_t H, __m256 vs, float* o, bool first,
                               bool last) {
  __m256 a[kRegs];
#pragma GCC unroll 8
  for (int k = 0; k < kRegs; ++k) a[k] = Ld::v(p + 8 * k);
  for (int64_t r = 1; r < rows; ++r) {
    p += H;
#pragma GCC unroll 8
    for (int k = 0; k < kRegs; ++k) a[k] = combine<kMax>(a[k], Ld::v(p + 8 * k));
  }
#pragma GCC unroll 8
  for (int k = 0; k < kRegs; ++k) put(a[k], o + 8 * k, first, last, vs);
}

// bf16 blocks without a widening shuffle: one 32-byte load holds 16 bf16;
// w << 16 is the even columns as floats, w & 0xffff0000 the odd ones, so the
// accumulators hold even and odd columns apart and are interleaved once at
// the end. Two plain ALU ops per 16 columns instead of vpmovzxwd, which
// issues one per cycle and so limits the loop (figures: benchmarks/README.md).
template <bool kMax>
FS_AVX2_INLINE void pool_block_bf16(const uint16_t* p, int64_t rows, int64_t H, __m256 vs, float* o, bool first,
                                    bool last) {
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  __m256 a[kRegs];
#pragma GCC unroll 4
  for (int k = 0; k < kRegs / 2; ++k) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * k));
    a[2 * k] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    a[2 * k + 1] = _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask));
  }
  for (int64_t r = 1; r < rows; ++r) {
    p += H;
#pragma GCC unroll 4
    for (int k = 0; k < kRegs / 2; ++k) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * k));
      a[2 * k] = combine<kMax>(a[2 * k], _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
      a[2 * k + 1] = combine<kMax>(a[2 * k + 1], _mm256_castsi256_ps(_mm256_and_si256(w, hi_mask)));
    }
  }
#pragma GCC unroll 4
  for (int k = 0; k < kRegs / 2; ++k) {
    // even = columns 0 2 4 .. 14, odd = 1 3 .. 15 (each 128-bit lane in order).
    const __m256 lo = _mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]);  // 0-3 | 8-11
    const __m256 hi = _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]);  // 4-7 | 12-15
    put(_mm256_permute2f128_ps(lo, hi, 0x20), o + 16 * k, first, last, vs);
    put(_mm256_permute2f128_ps(lo, hi, 0x31), o + 16 * k + 8, first, last, vs);
  }
}

// One block of a segment's rows [begin, end) of x [T, H] pooled into o [H]
// (put: first stores, later blocks add, last scales).
template <class Ld, bool kMax>
FS_AVX2 void pool_rows_block(const typename Ld::S* x, int64_t begin, int64_t end, int64_t H, __m256 vs, float* o,
                             bool first, bool last) {
  using S = typename Ld::S;
  int64_t c = 0;
  for (; c + 8 * kRegs <= H; c += 8 * kRegs) {
    if constexpr (std::is_same_v<Ld, BF16>)
      pool_block_bf16<kMax>(x + begin * H + c, end - begin, H, vs, o + c, first, last);
    else
      pool_block<Ld, kMax>(x + begin * H + c, end - begin, H, vs, o + c, first, last);
  }
  for (; c + 8 <= H; c += 8) {
    const S* p = x + begin * H + c;
    __m256 a = Ld::v(p);
    for (int64_t r = begin + 1; r < end; ++r) a = combine<kMax>(a, Ld::v(p += H));
    put(a, o + c, first, last, vs);
  }
  const float scale = _mm256_cvtss_f32(vs);
  for (; c < H; ++c) {
    const S* p = x + begin * H + c;
    float a = Ld::s(*p);
    for (int64_t r = begin + 1; r < end; ++r) {
      const float v = Ld::s(*(p += H));
      a = kMax ? pool_max(a, v) : a + v;
    }
    if (!first) a += o[c];
    o[c] = last ? a * scale : a;
  }
}

// One segment's rows [begin, end) of x [T, H] pooled into o [H] (before
// normalisation). cls passes end = begin + 1; mean sums blocks of
// mean_block_rows rows into o.
template <class Ld, bool kMax>
FS_AVX2 void pool_segment(const typename Ld::S* x, int64_t begin, int64_t end, int64_t H, float scale, float* o) {
  const __m256 vs = _mm256_set1_ps(scale);
  const int64_t step = kMax ? end - begin : mean_block_rows(end - begin);
  for (int64_t b0 = begin; b0 < end; b0 += step) {
    const int64_t b1 = std::min(end, b0 + step);
    pool_rows_block<Ld, kMax>(x, b0, b1, H, vs, o, b0 == begin, b1 == end);
  }
}

FS_AVX2 void normalize_row(float* o, int64_t H) {
  __m256 s = _mm256_setzero_ps();
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    const __m256 v = _mm256_loadu_ps(o + h);
    s = _mm256_fmadd_ps(v, v, s);
  }
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  float sq = _mm_cvtss_f32(q);
  for (; h < H; ++h) sq += o[h] * o[h];
  const float n = std::sqrt(sq);
  const float scale = 1.f / (n < 1e-12f ? 1e-12f : n);  // a NaN norm stays NaN
  const __m256 vs = _mm256_set1_ps(scale);
  for (h = 0; h + 8 <= H; h += 8) _mm256_storeu_ps(o + h, _mm256_mul_ps(_mm256_loadu_ps(o + h), vs));
  for (; h < H; ++h) o[h] *= scale;
}

template <class Ld>
FS_AVX2 void pool_rows(const void* xv, const int64_t* cu, int64_t b0, int64_t b1, int64_t H, PoolMode mode,
                       bool normalize, float* out) {
  const auto* x = static_cast<const typename Ld::S*>(xv);
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * H;
    const int64_t begin = cu[b], end = cu[b + 1];
    if (end == begin) {
      std::fill(o, o + H, 0.f);
      continue;
    }
    switch (mode) {
      case PoolMode::kMean: pool_segment<Ld, false>(x, begin, end, H, 1.f / float(end - begin), o); break;
      case PoolMode::kCls: pool_segment<Ld, false>(x, begin, begin + 1, H, 1.f, o); break;
      case PoolMode::kMax: pool_segment<Ld, true>(x, begin, end, H, 1.f, o); break;
    }
    if (normalize) normalize_row(o, H);
  }
}

}  // namespace

bool have_avx2() {
  static const bool v = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  }();
  return v;
}

bool have_avx512() {
#if defined(FASTSERVE_AVX512_EMULATED)
  return have_avx2();
#else
  // libgcc counts AVX-512F only where the OS saves the zmm and mask registers.
  static const bool v = have_avx2() && __builtin_cpu_supports("avx512f");
  return v;
#endif
}

bool have_avx512_bf16() {
#if defined(FASTSERVE_AVX512_EMULATED)
  return have_avx512();
#else
  static const bool v = have_avx512() && __builtin_cpu_supports("avx512bf16");
  return v;
#endif
}

void pool_rows_avx2(const void* x, DType dtype, const int64_t* cu, int64_t b0, int64_t b1, int64_t H,
                    PoolMode mode, bool normalize, float* out) {
  switch (dtype) {
    case DType::kFloat32: pool_rows<F32>(x, cu, b0, b1, H, mode, normalize, out); break;
    case DType::kFloat16: pool_rows<F16>(x, cu, b0, b1, H, mode, normalize, out); break;
    case DType::kBFloat16: pool_rows<BF16>(x, cu, b0, b1, H, mode, normalize, out); break;
    default: break;  // rejected by validation
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve

#endif  // FASTSERVE_CPU_AVX2
