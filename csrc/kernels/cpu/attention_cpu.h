// Internal to the CPU attention kernel (attention_cpu.cpp, attention_avx2.cpp):
// exact softmax attention of one (sequence, head) over packed rows.
#pragma once

#include <cstdint>

namespace fastserve {
namespace kernels {
namespace cpu {

// One (sequence, head) of packed self-attention. Rows [start, start + L) of
// qkv [T, 3, nh, hd] hold the sequence's queries, keys and values; the
// context goes to the same rows of out [T, nh, hd], head h. bias, when not
// null, is the [3, nh, hd] bias of the projection that made qkv, added here
// (the projection ran without it). scratch holds at least
// attention_scratch(L, hd) floats.
struct HeadArgs {
  const float* qkv;
  const float* bias;
  float* out;
  int64_t start, L, nh, hd, h;
  float scale;
  float* scratch;
};

// Keys transposed [hd, Lp], values [L, hd], scores or weights [4, Lp], four
// queries [4, hd] (Lp: L rounded up to 8).
inline int64_t attention_scratch(int64_t L, int64_t hd) {
  const int64_t Lp = (L + 7) / 8 * 8;
  return hd * Lp + L * hd + 4 * Lp + 4 * hd;
}

// The scratch of one (sequence, head) carved into those parts, and where its
// rows start in qkv.
struct HeadScratch {
  int64_t Lp, H, stride;
  float *kt, *v, *s, *qb;
  const float* base;  // the sequence's first row of qkv, at this head
};

inline HeadScratch carve(const HeadArgs& a) {
  HeadScratch w;
  w.Lp = (a.L + 7) / 8 * 8;
  w.H = a.nh * a.hd;
  w.stride = 3 * w.H;
  w.kt = a.scratch;
  w.v = w.kt + a.hd * w.Lp;
  w.s = w.v + a.L * a.hd;
  w.qb = w.s + 4 * w.Lp;
  w.base = a.qkv + a.start * w.stride + a.h * a.hd;
  return w;
}

void attention_head_portable(const HeadArgs& a);

namespace simd {
// The AVX2 + FMA path; hd must be a multiple of 8. Only where have_avx2().
void attention_head_avx2(const HeadArgs& a);
}  // namespace simd

// Run fn(ctx, begin, end) over [0, n) in chunks on up to `threads` threads
// (the packing kernels' pool, kernels_cpu.cpp).
void run_chunks(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx);

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
