// Internal to the CPU attention kernel (attention_cpu.cpp, attention_avx2.cpp):
// exact softmax attention of one (sequence, head) over packed rows.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace cpu {

// The layer kernels (attention, epilogues) take float32 or bfloat16 memory,
// bfloat16 by its bits, and compute in float32.
using bf16 = uint16_t;
inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return bf16_to_float(x); }
inline void put(float* p, float v) { *p = v; }
// Rounded to nearest even, NaN kept quiet: as torch converts.
inline void put(bf16* p, float v) { *p = float_to_bf16(v); }

// Heads [h, h + g) of one sequence of packed self-attention. Rows [start,
// start + L) of qkv [T, 3, nh, hd] hold the sequence's queries, keys and
// values; the context goes to the same rows of out [T, nh, hd]. bias, when
// not null, is the [3, nh, hd] bias of the projection that made qkv, added
// here (the projection ran without it). scratch holds at least
// attention_scratch(L, hd, g) floats.
template <typename T>
struct HeadArgs {
  const T* qkv;
  const T* bias;
  T* out;
  int64_t start, L, nh, hd, h, g;
  float scale;
  float* scratch;
};

// The vector paths': per head keys transposed [hd, Lp], values and queries
// [L, hd], and scores or weights [4, Lp] (Lp: L rounded up to 16 at most); the
// portable path's, one head at a time, fits in that for g = 1, and so does the
// bfloat16 arithmetic's (attention_dpbf16.inc), whose staged rows take half.
inline int64_t attention_scratch(int64_t L, int64_t hd, int64_t g) {
  const int64_t Lp = (L + 15) / 16 * 16;
  return g * (hd * Lp + 2 * L * hd) + 4 * Lp + 4 * hd;
}

// Head a.h alone (a.g is ignored). T: float or bf16.
template <typename T>
void attention_head_portable(const HeadArgs<T>& a);

// The vector paths (layer_simd.cpp), heads [h, h + g); hd must be a multiple
// of the vector width (8 floats for AVX2, 16 for AVX-512). Only where the CPU
// has the instructions (kernels.h's Isa, isa_for).
namespace simd {
namespace avx2 {
void attention_group(const HeadArgs<float>& a);
void attention_group(const HeadArgs<bf16>& a);
}  // namespace avx2
namespace avx512 {
void attention_group(const HeadArgs<float>& a);
void attention_group(const HeadArgs<bf16>& a);
}  // namespace avx512
namespace avx512bf16 {
void attention_group(const HeadArgs<float>& a);
void attention_group(const HeadArgs<bf16>& a);
}  // namespace avx512bf16
}  // namespace simd

// Run fn(ctx, begin, end) over [0, n) in chunks on up to `threads` threads
// (the packing kernels' pool, kernels_cpu.cpp).
void run_chunks(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx);

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
