// Packed self-attention on the CPU: softmax(q k^T * scale) v for every
// (sequence, head) of a packed batch in one call, no padding and no mask.
// Each (sequence, head) is one work item on the packing kernels' pool; the
// AVX2 path (attention_avx2.cpp) runs where the CPU has it and the head
// width is a multiple of 8, the portable loops below elsewhere.
//
// Why a kernel of our own: torch's CPU flash attention is one call per run of
// equal lengths (or per group of similar lengths, padded), and at MiniLM's
// head width of 32 on sequences of tens of tokens its per-call work and the
// copies around it took 12-16% of a float32 batch for about 2% of its FLOPs
// (benchmarks/README.md, "CPU dtypes").
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention_cpu.h"
#include "fastserve/kernels.h"
#include "simd.h"

namespace fastserve {
namespace kernels {
namespace cpu {

// Plain loops, a query at a time against keys transposed to [hd, Lp]:
// softmax in float32 with the row's maximum subtracted, then the weighted
// sum of values.
void attention_head_portable(const HeadArgs& a) {
  const HeadScratch w = carve(a);
  const int64_t L = a.L, hd = a.hd, Lp = w.Lp, H = w.H, stride = w.stride;
  float *kt = w.kt, *v = w.v, *s = w.s, *qb = w.qb;
  const float* base = w.base;
  auto bias = [&](int part, int64_t d) { return a.bias ? a.bias[part * H + a.h * hd + d] : 0.f; };
  for (int64_t j = 0; j < L; ++j) {
    const float* k = base + j * stride + H;
    for (int64_t d = 0; d < hd; ++d) {
      kt[d * Lp + j] = k[d] + bias(1, d);
      v[j * hd + d] = k[H + d] + bias(2, d);
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    const float* q = base + i * stride;
    for (int64_t d = 0; d < hd; ++d) qb[d] = q[d] + bias(0, d);
    float* sr = s;
    std::fill(sr, sr + L, 0.f);
    for (int64_t d = 0; d < hd; ++d) {
      const float qd = qb[d];
      const float* kd = kt + d * Lp;
      for (int64_t j = 0; j < L; ++j) sr[j] += qd * kd[j];
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < L; ++j) m = std::max(m, sr[j] * a.scale);
    float sum = 0.f;
    for (int64_t j = 0; j < L; ++j) {
      sr[j] = std::exp(sr[j] * a.scale - m);
      sum += sr[j];
    }
    const float inv = 1.f / sum;
    float* o = a.out + (a.start + i) * H + a.h * hd;
    std::fill(o, o + hd, 0.f);
    for (int64_t j = 0; j < L; ++j) {
      const float p = sr[j];
      const float* vj = v + j * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
    }
    for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
  }
}

namespace {

// Ask for the next item's queries, keys and values (rows of the packed
// batch a whole [3, nh, hd] apart, so the hardware prefetcher does not follow
// them) while this one computes: without it the first touch of each row
// waited on L3 or memory, a third of the kernel's time on short sequences.
void prefetch_item(const float* qkv, const int64_t* cu, int64_t nh, int64_t hd, int64_t i) {
  const int64_t b = i / nh, h = i % nh, H = nh * hd, stride = 3 * H;
  const int64_t bytes = hd * int64_t(sizeof(float));
  for (int64_t t = cu[b]; t < cu[b + 1]; ++t)
    for (int part = 0; part < 3; ++part) {
      const char* p = reinterpret_cast<const char*>(qkv + t * stride + part * H + h * hd);
      for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
    }
}

// Below this many FLOPs a batch's attention stays on the calling thread:
// waking a pooled worker costs more than it saves.
constexpr double kMinFlopsPerThread = 4e6;

}  // namespace

void attention(const float* qkv, const float* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
               float scale, int threads, float* out, bool portable) {
  const bool avx2 = !portable && vector_paths() && hd % 8 == 0;
  double flops = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double L = double(cu[b + 1] - cu[b]);
    flops += 4.0 * L * L * double(hd * nh);
  }
  threads = int(std::max(1.0, std::min(double(threads), flops / kMinFlopsPerThread)));
  struct Ctx {
    const float* qkv;
    const float* bias;
    const int64_t* cu;
    int64_t nh, hd;
    float scale;
    float* out;
    bool avx2;
  } ctx{qkv, bias, cu, nh, hd, scale, out, avx2};
  run_chunks(B * nh, threads, [](void* c, int64_t i0, int64_t i1) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    thread_local std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / x.nh, L = x.cu[b + 1] - x.cu[b];
      if (i + 1 < i1) prefetch_item(x.qkv, x.cu, x.nh, x.hd, i + 1);
      if (L == 0) continue;
      const size_t need = size_t(attention_scratch(L, x.hd));
      if (scratch.size() < need) scratch.resize(need);
      const HeadArgs a{x.qkv, x.bias, x.out, x.cu[b], L, x.nh, x.hd, i % x.nh, x.scale, scratch.data()};
#if defined(FASTSERVE_CPU_AVX2)
      if (x.avx2) {
        simd::attention_head_avx2(a);
        continue;
      }
#endif
      attention_head_portable(a);
    }
  }, &ctx);
}

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
