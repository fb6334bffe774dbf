// The vector paths of the CPU layer kernels (attention_cpu.cpp,
// epilogue_cpu.cpp): layer_simd.inc's bodies on eight lanes (AVX2 + FMA,
// simd_avx2.h) and on sixteen (AVX-512F, and AVX-512F with AVX512-BF16's
// narrowing: simd_avx512.h), each built with
// per-function target attributes like kernels_cpu_avx2.cpp so that the
// library still runs on any x86-64; the callers pick one at run time.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's own AVX-512 intrinsics trip its -Wmaybe-uninitialized (their
// "undefined" source operands, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "attention_cpu.h"
#include "epilogue_cpu.h"
#include "simd.h"

#if defined(FASTSERVE_CPU_AVX2)

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd_avx2.h"
#include "simd_avx512.h"

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {

namespace avx2 {
using Vec = Vec8;
#define FS_VEC FS_AVX2
#define FS_VEC_INLINE FS_AVX2_INLINE
#include "layer_simd.inc"
#undef FS_VEC
#undef FS_VEC_INLINE
}  // namespace avx2

namespace avx512 {
using Vec = Vec16;
#define FS_VEC FS_AVX512
#define FS_VEC_INLINE FS_AVX512_INLINE
#include "layer_simd.inc"
#undef FS_VEC
#undef FS_VEC_INLINE
}  // namespace avx512

namespace avx512bf16 {
using Vec = Vec16Bf16;
#define FS_VEC FS_AVX512BF16
#define FS_VEC_INLINE FS_AVX512BF16_INLINE
#if !defined(FASTSERVE_AVX512_EMULATED)
#define FS_DPBF16  // bfloat16 attention through vdpbf16ps (attention_dpbf16.inc)
#endif
#include "layer_simd.inc"
#undef FS_DPBF16
#undef FS_VEC
#undef FS_VEC_INLINE
}  // namespace avx512bf16

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve

#endif  // FASTSERVE_CPU_AVX2
