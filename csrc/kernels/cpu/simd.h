// Internal to the CPU kernels: the x86-64 AVX2 + F16C + FMA paths, compiled
// with per-function target attributes (kernels_cpu_avx2.cpp) so the library
// keeps running on any x86-64; kernels_cpu.cpp picks them at run time.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace cpu {
namespace simd {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSERVE_CPU_AVX2 1
// True when this CPU has AVX2, F16C and FMA (checked once).
bool have_avx2();
// True when it also has AVX-512F (and the OS saves its registers); in a build
// with FASTSERVE_AVX512_EMULATED, whenever have_avx2() (SIMDe runs that path).
bool have_avx512();
// True when it also has AVX512-BF16; in the emulated build, as have_avx512()
// (its Vec16Bf16 is Vec16: simd_avx512.h).
bool have_avx512_bf16();
// segment_pool over segments [b0, b1), as cpu::segment_pool defines it.
void pool_rows_avx2(const void* x, DType dtype, const int64_t* cu, int64_t b0, int64_t b1, int64_t H,
                    PoolMode mode, bool normalize, float* out);
#else
inline bool have_avx2() { return false; }
inline bool have_avx512() { return false; }
inline bool have_avx512_bf16() { return false; }
#endif

}  // namespace simd
}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
