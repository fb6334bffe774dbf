// Packed self-attention on the CPU: softmax(q k^T * scale) v for every
// (sequence, head) of a packed batch in one call, no padding and no mask.
// Each (sequence, head) is one work item on the packing kernels' pool; the
// vector paths (layer_simd.inc) run where the CPU has them and the head
// width is a multiple of their width (AVX-512: 16, AVX2: 8), the portable
// loops below elsewhere.
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
// sum of values (in float32, stored once).
template <typename T>
void attention_head_portable(const HeadArgs<T>& a) {
  const int64_t L = a.L, hd = a.hd, H = a.nh * hd, stride = 3 * H;
  const int64_t Lp = (L + 7) / 8 * 8;
  float* kt = a.scratch;  // [hd, Lp]
  float* v = kt + hd * Lp;  // [L, hd]
  float* s = v + L * hd;    // [Lp]: one query's scores
  float* qb = s + Lp;       // [hd]: the query
  float* o = qb + hd;       // [hd]: its context
  const T* base = a.qkv + a.start * stride + a.h * hd;
  auto bias = [&](int part, int64_t d) { return a.bias ? to_float(a.bias[part * H + a.h * hd + d]) : 0.f; };
  for (int64_t j = 0; j < L; ++j) {
    const T* k = base + j * stride + H;
    for (int64_t d = 0; d < hd; ++d) {
      kt[d * Lp + j] = to_float(k[d]) + bias(1, d);
      v[j * hd + d] = to_float(k[H + d]) + bias(2, d);
    }
  }
  for (int64_t i = 0; i < L; ++i) {
    const T* q = base + i * stride;
    for (int64_t d = 0; d < hd; ++d) qb[d] = to_float(q[d]) + bias(0, d);
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
    std::fill(o, o + hd, 0.f);
    for (int64_t j = 0; j < L; ++j) {
      const float p = sr[j];
      const float* vj = v + j * hd;
      for (int64_t d = 0; d < hd; ++d) o[d] += p * vj[d];
    }
    T* out = a.out + (a.start + i) * H + a.h * hd;
    for (int64_t d = 0; d < hd; ++d) put(out + d, o[d] * inv);
  }
}

namespace {

// Below this many FLOPs a batch's attention stays on the calling thread:
// waking a pooled worker costs more than it saves.
constexpr double kMinFlopsPerThread = 4e6;

// A group's staged queries, keys and values stay within about 256 KiB (L2).
constexpr int64_t kGroupScratchFloats = 64 << 10;

template <typename T>
void attention_impl(const T* qkv, const T* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
                    float scale, int threads, T* out, Isa cap) {
  const Isa isa = isa_for(cap, hd);
  double flops = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double L = double(cu[b + 1] - cu[b]);
    flops += 4.0 * L * L * double(hd * nh);
  }
  threads = int(std::max(1.0, std::min(double(threads), flops / kMinFlopsPerThread)));
  // Work items: groups of heads of one sequence. All of a sequence's heads in
  // one item where its staged rows fit the scratch bound and there are
  // enough sequences to share among the threads; fewer heads per item for
  // long sequences or a batch of few. The portable path goes a head at a time.
  const int64_t share = std::max<int64_t>(1, (4 * int64_t(threads) + B - 1) / std::max<int64_t>(B, 1));
  std::vector<int64_t> group(static_cast<size_t>(B)), first(static_cast<size_t>(B) + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = cu[b + 1] - cu[b];
    int64_t g = 1;
    if (isa != Isa::kPortable)
      g = std::min(nh, std::max<int64_t>(1, kGroupScratchFloats / std::max<int64_t>(1, 3 * L * hd)));
    g = std::max<int64_t>(1, std::min(g, (nh + share - 1) / share));
    group[b] = g;
    first[b + 1] = first[b] + (L > 0 ? (nh + g - 1) / g : 0);
  }
  struct Ctx {
    const T* qkv;
    const T* bias;
    const int64_t* cu;
    const int64_t* group;
    const int64_t* first;
    int64_t B, nh, hd;
    float scale;
    T* out;
    Isa isa;
  } ctx{qkv, bias, cu, group.data(), first.data(), B, nh, hd, scale, out, isa};
  run_chunks(first[B], threads, [](void* c, int64_t i0, int64_t i1) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    thread_local std::vector<float> scratch;
    int64_t b = std::upper_bound(x.first, x.first + x.B + 1, i0) - x.first - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (x.first[b + 1] <= i) ++b;
      const int64_t L = x.cu[b + 1] - x.cu[b], g = x.group[b], h = (i - x.first[b]) * g;
      HeadArgs<T> a{x.qkv, x.bias, x.out, x.cu[b], L, x.nh, x.hd, h, std::min(g, x.nh - h), x.scale, nullptr};
      const size_t need = size_t(attention_scratch(L, x.hd, a.g));
      if (scratch.size() < need) scratch.resize(need);
      a.scratch = scratch.data();
#if defined(FASTSERVE_CPU_AVX2)
      if (x.isa == Isa::kAvx512Bf16) {
        simd::avx512bf16::attention_group(a);
        continue;
      }
      if (x.isa == Isa::kAvx512) {
        simd::avx512::attention_group(a);
        continue;
      }
      if (x.isa == Isa::kAvx2) {
        simd::avx2::attention_group(a);
        continue;
      }
#endif
      for (int64_t k = 0; k < a.g; ++k, ++a.h) attention_head_portable(a);
    }
  }, &ctx);
}

}  // namespace

void attention(const float* qkv, const float* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
               float scale, int threads, float* out, Isa isa) {
  attention_impl(qkv, bias, cu, B, nh, hd, scale, threads, out, isa);
}

void attention(const bf16* qkv, const bf16* bias, const int64_t* cu, int64_t B, int64_t nh, int64_t hd,
               float scale, int threads, bf16* out, Isa isa) {
  attention_impl(qkv, bias, cu, B, nh, hd, scale, threads, out, isa);
}

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
