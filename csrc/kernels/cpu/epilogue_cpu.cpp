// The elementwise tails of a transformer layer, fused and in place on the
// output of a GEMM run without its bias (torch.mm): x = gelu(x + bias) after
// the intermediate projection, x = LayerNorm(x + bias + residual) after the
// attention output and the feed-forward output. Through torch these are an
// addmm that first copies the broadcast bias into its output, then GELU into
// a fresh tensor, then an add and a LayerNorm, each a pass over the
// activations (together about 10% of a float32 MiniLM batch on the CPU:
// benchmarks/README.md, "CPU dtypes"). Rows are split over the packing
// kernels' pool; AVX-512F or AVX2 + FMA where the CPU has them
// (layer_simd.inc), else the loops below.
//
// GELU is erf's Abramowitz-Stegun 7.1.26 form (absolute error below 1.5e-7),
// the approximation ATen's vectorised CPU GELU uses; LayerNorm takes the
// biased variance in float32 like torch's CPU kernel.
#include <algorithm>
#include <cmath>

#include "attention_cpu.h"
#include "epilogue_cpu.h"
#include "fastserve/kernels.h"
#include "simd.h"

namespace fastserve {
namespace kernels {
namespace cpu {

template <typename T>
void bias_gelu_rows_portable(T* x, const T* bias, int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = x + r * N;
    for (int64_t i = 0; i < N; ++i) {
      const float v = to_float(row[i]) + to_float(bias[i]);
      put(row + i, 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)));
    }
  }
}

template <typename T>
void add_layer_norm_rows_portable(T* x, const T* bias, const T* residual, const T* w, const T* b, float eps,
                                  int64_t N, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* row = x + r * N;
    const T* res = residual + r * N;
    float sum = 0.f;
    for (int64_t i = 0; i < N; ++i) {
      put(row + i, to_float(row[i]) + to_float(bias[i]) + to_float(res[i]));
      sum += to_float(row[i]);
    }
    const float mean = sum / float(N);
    float sq = 0.f;
    for (int64_t i = 0; i < N; ++i) sq += (to_float(row[i]) - mean) * (to_float(row[i]) - mean);
    const float rstd = 1.f / std::sqrt(sq / float(N) + eps);
    for (int64_t i = 0; i < N; ++i) put(row + i, (to_float(row[i]) - mean) * rstd * to_float(w[i]) + to_float(b[i]));
  }
}

namespace {

// Rows per thread before another thread joins: about 64 KiB of each row set.
int rows_threads(int threads, int64_t rows, int64_t N) {
  const int64_t per = std::max<int64_t>(1, (int64_t(16) << 10) / std::max<int64_t>(N, 1));
  return int(std::max<int64_t>(1, std::min<int64_t>(threads, rows / per)));
}

template <typename T>
void bias_gelu_impl(T* x, const T* bias, int64_t rows, int64_t N, int threads, Isa cap) {
  struct Ctx {
    T* x;
    const T* bias;
    int64_t N;
    Isa isa;
  } ctx{x, bias, N, isa_for(cap, N)};
  run_chunks(rows, rows_threads(threads, rows, N), [](void* c, int64_t r0, int64_t r1) {
    const Ctx& a = *static_cast<const Ctx*>(c);
#if defined(FASTSERVE_CPU_AVX2)
    if (a.isa == Isa::kAvx512Bf16) return simd::avx512bf16::bias_gelu_rows(a.x, a.bias, a.N, r0, r1);
    if (a.isa == Isa::kAvx512) return simd::avx512::bias_gelu_rows(a.x, a.bias, a.N, r0, r1);
    if (a.isa == Isa::kAvx2) return simd::avx2::bias_gelu_rows(a.x, a.bias, a.N, r0, r1);
#endif
    bias_gelu_rows_portable(a.x, a.bias, a.N, r0, r1);
  }, &ctx);
}

template <typename T>
void add_layer_norm_impl(T* x, const T* bias, const T* residual, const T* w, const T* b, float eps, int64_t rows,
                         int64_t N, int threads, Isa cap) {
  struct Ctx {
    T* x;
    const T *bias, *residual, *w, *b;
    float eps;
    int64_t N;
    Isa isa;
  } ctx{x, bias, residual, w, b, eps, N, isa_for(cap, N)};
  run_chunks(rows, rows_threads(threads, rows, N), [](void* c, int64_t r0, int64_t r1) {
    const Ctx& a = *static_cast<const Ctx*>(c);
#if defined(FASTSERVE_CPU_AVX2)
    if (a.isa == Isa::kAvx512Bf16)
      return simd::avx512bf16::add_layer_norm_rows(a.x, a.bias, a.residual, a.w, a.b, a.eps, a.N, r0, r1);
    if (a.isa == Isa::kAvx512)
      return simd::avx512::add_layer_norm_rows(a.x, a.bias, a.residual, a.w, a.b, a.eps, a.N, r0, r1);
    if (a.isa == Isa::kAvx2)
      return simd::avx2::add_layer_norm_rows(a.x, a.bias, a.residual, a.w, a.b, a.eps, a.N, r0, r1);
#endif
    add_layer_norm_rows_portable(a.x, a.bias, a.residual, a.w, a.b, a.eps, a.N, r0, r1);
  }, &ctx);
}

}  // namespace

void bias_gelu(float* x, const float* bias, int64_t rows, int64_t N, int threads, Isa isa) {
  bias_gelu_impl(x, bias, rows, N, threads, isa);
}
void bias_gelu(bf16* x, const bf16* bias, int64_t rows, int64_t N, int threads, Isa isa) {
  bias_gelu_impl(x, bias, rows, N, threads, isa);
}
void add_layer_norm(float* x, const float* bias, const float* residual, const float* w, const float* b, float eps,
                    int64_t rows, int64_t N, int threads, Isa isa) {
  add_layer_norm_impl(x, bias, residual, w, b, eps, rows, N, threads, isa);
}
void add_layer_norm(bf16* x, const bf16* bias, const bf16* residual, const bf16* w, const bf16* b, float eps,
                    int64_t rows, int64_t N, int threads, Isa isa) {
  add_layer_norm_impl(x, bias, residual, w, b, eps, rows, N, threads, isa);
}

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
