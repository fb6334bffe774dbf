// Internal to the CPU epilogue kernels (epilogue_cpu.cpp, epilogue_avx2.cpp):
// the elementwise tails of a transformer layer's GEMMs, fused and in place.
#pragma once

#include <cstdint>

#include "attention_cpu.h"

namespace fastserve {
namespace kernels {
namespace cpu {

// T: float or bf16 (attention_cpu.h), computed in float32. In bfloat16 the
// sum x + bias + residual is rounded to bfloat16 before LayerNorm reads it,
// as torch's bfloat16 add then LayerNorm would.
// Rows [r0, r1) of x [rows, N]: x = gelu(x + bias), GELU exact (erf).
template <typename T>
void bias_gelu_rows_portable(T* x, const T* bias, int64_t N, int64_t r0, int64_t r1);
// Rows [r0, r1) of x [rows, N]: x = LayerNorm(x + bias + residual) * w + b.
template <typename T>
void add_layer_norm_rows_portable(T* x, const T* bias, const T* residual, const T* w, const T* b, float eps,
                                  int64_t N, int64_t r0, int64_t r1);

// The vector paths (layer_simd.cpp); N a multiple of the vector width.
namespace simd {
#define FS_EPILOGUE_DECLS                                                                                     \
  void bias_gelu_rows(float* x, const float* bias, int64_t N, int64_t r0, int64_t r1);                        \
  void bias_gelu_rows(bf16* x, const bf16* bias, int64_t N, int64_t r0, int64_t r1);                          \
  void add_layer_norm_rows(float* x, const float* bias, const float* residual, const float* w, const float* b, \
                           float eps, int64_t N, int64_t r0, int64_t r1);                                     \
  void add_layer_norm_rows(bf16* x, const bf16* bias, const bf16* residual, const bf16* w, const bf16* b,     \
                           float eps, int64_t N, int64_t r0, int64_t r1);
namespace avx2 {
FS_EPILOGUE_DECLS
}  // namespace avx2
namespace avx512 {
FS_EPILOGUE_DECLS
}  // namespace avx512
namespace avx512bf16 {
FS_EPILOGUE_DECLS
}  // namespace avx512bf16
#undef FS_EPILOGUE_DECLS
}  // namespace simd

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
