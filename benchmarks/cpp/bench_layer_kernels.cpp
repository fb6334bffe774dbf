// The CPU layer kernels on MiniLM's shapes (H = 384, 12 heads of 32, I =
// 1536), each path (isa: 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 with
// AVX512-BF16's narrowing; a path the CPU lacks runs the widest it has) on
// one thread: packed attention over 51 sequences of
// 39 tokens (a corpus batch of ~2,000 tokens) and over 8 of 256, bias + GELU
// on [2000, 1536], bias + residual + LayerNorm on [2000, 384]; and the vector
// paths on bfloat16 memory (the *BF16 cases).
// Figures: benchmarks/README.md, "CPU dtypes".
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace {

std::vector<float> randn(size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

// bfloat16 bits of each value, rounded to nearest even.
std::vector<uint16_t> bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t u;
    std::memcpy(&u, &x[i], 4);
    out[i] = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return out;
}

std::vector<float> as(const std::vector<float>& x, float) { return x; }
std::vector<uint16_t> as(const std::vector<float>& x, uint16_t) { return bf16(x); }

cpu::Isa isa_arg(const benchmark::State& state, int i) { return cpu::Isa(state.range(i)); }

// T: float, or uint16_t for bfloat16.
template <typename T>
void attention_bench(benchmark::State& state) {
  const int64_t B = state.range(0), L = state.range(1), nh = 12, hd = 32;
  std::vector<int64_t> cu(B + 1);
  for (int64_t b = 0; b <= B; ++b) cu[b] = b * L;
  const auto qkv = as(randn(size_t(B * L * 3 * nh * hd), 1), T());
  const auto bias = as(randn(size_t(3 * nh * hd), 2), T());
  std::vector<T> out(size_t(B * L * nh * hd));
  for (auto _ : state) {
    cpu::attention(qkv.data(), bias.data(), cu.data(), B, nh, hd, 0.17677669f, 1, out.data(), isa_arg(state, 2));
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(1e-9 * double(4 * B * L * L * nh * hd),
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Attention(benchmark::State& state) { attention_bench<float>(state); }
BENCHMARK(BM_Attention)->ArgsProduct({{51}, {39}, {0, 1, 2}})->ArgsProduct({{8}, {256}, {0, 1, 2}})
    ->ArgNames({"seqs", "len", "isa"})->Unit(benchmark::kMillisecond);

void BM_BiasGelu(benchmark::State& state) {
  const int64_t rows = 2000, N = 1536;
  const auto x0 = randn(size_t(rows * N), 3);
  const auto bias = randn(size_t(N), 4);
  std::vector<float> x(x0.size());
  for (auto _ : state) {
    state.PauseTiming();  // fresh input: GELU applied again and again would reach denormals
    x = x0;
    state.ResumeTiming();
    cpu::bias_gelu(x.data(), bias.data(), rows, N, 1, isa_arg(state, 0));
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * rows * N * 8);
}
BENCHMARK(BM_BiasGelu)->DenseRange(0, 2)->ArgName("isa")->Unit(benchmark::kMillisecond);

void BM_AddLayerNorm(benchmark::State& state) {
  const int64_t rows = 2000, N = 384;
  auto x = randn(size_t(rows * N), 5);
  const auto res = randn(size_t(rows * N), 6), w = randn(size_t(N), 7), b = randn(size_t(N), 8),
             bias = randn(size_t(N), 9);
  for (auto _ : state) {
    cpu::add_layer_norm(x.data(), bias.data(), res.data(), w.data(), b.data(), 1e-12f, rows, N, 1, isa_arg(state, 0));
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * rows * N * 12);
}
BENCHMARK(BM_AddLayerNorm)->DenseRange(0, 2)->ArgName("isa")->Unit(benchmark::kMillisecond);

void BM_AttentionBF16(benchmark::State& state) { attention_bench<uint16_t>(state); }
BENCHMARK(BM_AttentionBF16)->ArgsProduct({{51}, {39}, {1, 2, 3}})->ArgsProduct({{8}, {256}, {1, 2, 3}})
    ->ArgNames({"seqs", "len", "isa"})->Unit(benchmark::kMillisecond);

void BM_BiasGeluBF16(benchmark::State& state) {
  const int64_t rows = 2000, N = 1536;
  const auto x0 = bf16(randn(size_t(rows * N), 3));
  const auto bias = bf16(randn(size_t(N), 4));
  std::vector<uint16_t> x(x0.size());
  for (auto _ : state) {
    state.PauseTiming();
    x = x0;
    state.ResumeTiming();
    cpu::bias_gelu(x.data(), bias.data(), rows, N, 1, isa_arg(state, 0));
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * rows * N * 4);
}
BENCHMARK(BM_BiasGeluBF16)->DenseRange(1, 3)->ArgName("isa")->Unit(benchmark::kMillisecond);

void BM_AddLayerNormBF16(benchmark::State& state) {
  const int64_t rows = 2000, N = 384;
  auto x = bf16(randn(size_t(rows * N), 5));
  const auto res = bf16(randn(size_t(rows * N), 6)), w = bf16(randn(size_t(N), 7)), b = bf16(randn(size_t(N), 8)),
             bias = bf16(randn(size_t(N), 9));
  for (auto _ : state) {
    cpu::add_layer_norm(x.data(), bias.data(), res.data(), w.data(), b.data(), 1e-12f, rows, N, 1, isa_arg(state, 0));
    benchmark::DoNotOptimize(x.data());
  }
  state.SetBytesProcessed(int64_t(state.iterations()) * rows * N * 6);
}
BENCHMARK(BM_AddLayerNormBF16)->DenseRange(1, 3)->ArgName("isa")->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kernels
}  // namespace fastserve
