// Internal to the CPU epilogue kernels (epilogue_cpu.cpp, epilogue_avx2.cpp):
// the elementwise tails of a transformer layer's GEMMs, fused and in place.
#pragma once

#include <cstdint>

namespace fastserve {
namespace kernels {
namespace cpu {

// Rows [r0, r1) of x [rows, N]: x = gelu(x + bias), GELU exact (erf).
void bias_gelu_rows_portable(float* x, const float* bias, int64_t N, int64_t r0, int64_t r1);
// Rows [r0, r1) of x [rows, N]: x = LayerNorm(x + bias + residual) * w + b.
void add_layer_norm_rows_portable(float* x, const float* bias, const float* residual, const float* w, const float* b,
                                  float eps, int64_t N, int64_t r0, int64_t r1);

namespace simd {
void bias_gelu_rows_avx2(float* x, const float* bias, int64_t N, int64_t r0, int64_t r1);
void add_layer_norm_rows_avx2(float* x, const float* bias, const float* residual, const float* w, const float* b,
                              float eps, int64_t N, int64_t r0, int64_t r1);
}  // namespace simd

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
