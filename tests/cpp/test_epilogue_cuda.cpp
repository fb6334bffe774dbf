// The CUDA epilogue kernels' per-thread functions (epilogue_threads.cuh),
// run on the CPU over every (block, thread) of the grid the CUDA launcher
// (epilogue.cu) would use, against the CPU epilogue kernels: the CPU
// reference test of bias + GELU and bias + residual + LayerNorm on CUDA, in
// float32, float16 and bfloat16, on the 16-byte vector path and the scalar
// one, for rows that fit a thread's registers and rows that do not. Also the
// float -> float16 / bfloat16 roundings the kernels store with, and the
// launch shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../../csrc/kernels/cpu/attention_cpu.h"  // cpu::put: the CPU kernels' bfloat16 rounding
#include "../../csrc/kernels/cuda/epilogue_threads.cuh"
#include "fastserve/kernels.h"

namespace fastserve {
namespace kernels {
namespace {

using namespace epilogue;

constexpr cpu::Isa kPortable = cpu::Isa::kPortable;

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ------------------------------------------------------------ conversions

TEST(EpilogueConversions, Fp16RoundingIsToNearestEvenEverywhere) {
  // Every finite float16 converts back to itself; the midpoint between two
  // neighbours (exact in float32) goes to the even one, and a float32 ulp
  // either side of it to the nearer.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const float f = fp16_to_float(uint16_t(h));
    ASSERT_EQ(float_to_fp16(f), h) << std::hex << h;
    ASSERT_EQ(float_to_fp16(-f), h | 0x8000u) << std::hex << h;
    if (h + 1 == 0x7c00) break;
    const float next = fp16_to_float(uint16_t(h + 1));
    const float mid = f + (next - f) / 2;
    ASSERT_EQ(float_to_fp16(mid), (h & 1u) ? h + 1 : h) << std::hex << h;
    ASSERT_EQ(float_to_fp16(std::nextafter(mid, 0.f)), h) << std::hex << h;
    ASSERT_EQ(float_to_fp16(std::nextafter(mid, INFINITY)), h + 1) << std::hex << h;
  }
  EXPECT_EQ(float_to_fp16(65504.f), 0x7bff);
  EXPECT_EQ(float_to_fp16(std::nextafter(65520.f, 0.f)), 0x7bff);
  EXPECT_EQ(float_to_fp16(65520.f), 0x7c00);  // the tie past the largest: to infinity
  EXPECT_EQ(float_to_fp16(1e30f), 0x7c00);
  EXPECT_EQ(float_to_fp16(-INFINITY), 0xfc00);
  EXPECT_EQ(float_to_fp16(std::ldexp(1.f, -25)), 0);  // half the smallest subnormal: a tie, to 0
  EXPECT_EQ(float_to_fp16(std::nextafter(std::ldexp(1.f, -25), 1.f)), 1);
  EXPECT_EQ(float_to_fp16(-1e-30f), 0x8000);
  EXPECT_EQ(float_to_fp16(std::nextafter(std::ldexp(1.f, -14), 0.f)), 0x0400);  // rounds up to the smallest normal
  const uint16_t nan = float_to_fp16(std::nanf(""));
  EXPECT_EQ(nan & 0x7e00, 0x7e00);  // a quiet NaN
  EXPECT_EQ(float_to_fp16(from_bits(0x7f800001u)) & 0x7e00, 0x7e00);  // a signalling one made quiet
#if defined(__FLT16_MAX__)
  // And random float32 bit patterns against the compiler's conversion.
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    const float f = from_bits(uint32_t(rng()));
    if (std::isnan(f)) continue;
    const _Float16 want = static_cast<_Float16>(f);
    uint16_t w;
    std::memcpy(&w, &want, 2);
    ASSERT_EQ(float_to_fp16(f), w) << f;
  }
#endif
}

TEST(EpilogueConversions, Bf16RoundingIsTheCpuKernels) {
  std::mt19937 rng(2);
  std::vector<float> values = {0.f, -0.f, 1.f, INFINITY, -INFINITY, std::nanf(""), from_bits(0x7f800001u),
                               from_bits(0x3f808000u), from_bits(0x3f818000u), from_bits(0x7f7fffffu),
                               from_bits(0x00000001u), from_bits(0x807fffffu)};
  for (int i = 0; i < 1000000; ++i) values.push_back(from_bits(uint32_t(rng())));
  for (float f : values) {
    uint16_t want;
    cpu::put(&want, f);
    ASSERT_EQ(float_to_bf16(f), want) << std::hex << float_bits(f);
  }
}

// ---------------------------------------------------------- launch shapes

TEST(EpilogueShapes, BlocksCoverEveryRowAndColumnGroup) {
  for (int64_t groups : {1, 31, 32, 33, 96, 192, 255, 256, 257, 384, 512, 768, 1000, 4097}) {
    for (int64_t rows : {1, 3, 4, 5, 5000, 100000}) {
      const BiasGeluShape g = bias_gelu_shape(rows, groups);
      EXPECT_EQ(g.bdx % 32, 0);
      EXPECT_LE(g.bdx * g.bdy, 256);
      EXPECT_GE(g.gx * g.bdx, groups);
      EXPECT_LT((g.gx - 1) * g.bdx, groups);  // no block without work
      EXPECT_LE(g.gy, 65535);
      EXPECT_TRUE(g.gy * g.bdy >= rows || g.gy == 65535);
      const LayerNormShape l = layer_norm_shape(rows, groups);
      EXPECT_EQ(l.bdx % 32, 0);
      EXPECT_LE(l.bdx * l.bdy, kMaxRowThreads);
      EXPECT_LE(l.bdy * (l.bdx / 32), kMaxRowThreads / 32);  // the kernel's warp_part slots
      EXPECT_TRUE(int64_t(l.bdx) * kCached >= groups || l.bdx == kMaxRowThreads);
      EXPECT_GE(l.blocks * l.bdy, rows);
      EXPECT_LT((l.blocks - 1) * l.bdy, rows);
    }
  }
  // BERT-base in 16-bit: a LayerNorm row (768 columns, 96 vectors) is one
  // warp, four rows a block; the intermediate (3072, 384 vectors) three
  // blocks of 128 threads across.
  const LayerNormShape l = layer_norm_shape(4096, 96);
  EXPECT_EQ(l.bdx, 32);
  EXPECT_EQ(l.bdy, 4);
  EXPECT_EQ(l.blocks, 1024);
  const BiasGeluShape g = bias_gelu_shape(4096, 384);
  EXPECT_EQ(g.bdx, 128);
  EXPECT_EQ(g.gx, 3);
  EXPECT_EQ(g.gy, 2048);
}

TEST(EpilogueShapes, VectorsOnlyWhereTheWidthAndEveryPointerAllowThem) {
  alignas(16) static float buf[64];
  EXPECT_EQ(vector_width(4, 768, {buf, buf + 16}), 4);
  EXPECT_EQ(vector_width(2, 768, {buf, buf + 16}), 8);
  EXPECT_EQ(vector_width(2, 764, {buf, buf + 16}), 1);  // 764 is not a multiple of 8
  EXPECT_EQ(vector_width(4, 764, {buf, buf + 16}), 4);
  EXPECT_EQ(vector_width(4, 768, {buf, buf + 1}), 1);  // one pointer 4 bytes off
  EXPECT_EQ(vector_width(4, 769, {buf}), 1);
}

// ------------------------------------------------------------ simulation

// Storage of n elements of E at a 64-byte boundary plus `skew` elements (1:
// misaligned for vectors, as a view into a larger tensor can be).
template <class E>
struct Buf {
  using S = typename E::Storage;
  std::vector<S> raw;
  S* p;
  Buf(int64_t n, int skew) : raw(size_t(n) + 64 / sizeof(S) + 1) {
    const uintptr_t a = (uintptr_t(raw.data()) + 63) / 64 * 64;
    p = reinterpret_cast<S*>(a) + skew;
  }
};

template <class E>
void fill_from(Buf<E>& b, const std::vector<float>& v) {
  for (size_t i = 0; i < v.size(); ++i) b.p[i] = E::store(v[i]);
}
template <class E>
std::vector<float> read(const Buf<E>& b, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = E::load(b.p[i]);
  return out;
}

// bias_gelu over every (block, thread) of the launch; max_gy < 65535 makes
// the threads walk rows in strides, as they do past 65535 blocks of rows.
template <class E, int V>
void bias_gelu_grid(void* x, const void* bias, int64_t rows, int64_t N, int64_t max_gy = 65535) {
  const BiasGeluParams p{x, bias, rows, N / V};
  const BiasGeluShape s = bias_gelu_shape(rows, p.groups, max_gy);
  for (int64_t bx = 0; bx < s.gx; ++bx)
    for (int64_t by = 0; by < s.gy; ++by)
      for (int ty = 0; ty < s.bdy; ++ty)
        for (int tx = 0; tx < s.bdx; ++tx) bias_gelu_thread<E, V>(p, bx, by, tx, ty, s.bdx, s.bdy, s.gy);
}

// add_layer_norm over every block, row and thread: each pass runs on every
// thread of a row before the next starts (the kernel's row sums order them),
// and a row's partials are summed across its threads.
template <class E, int V>
void add_layer_norm_grid(const LayerNormParams& in) {
  LayerNormParams p = in;
  p.groups = p.N / V;
  const LayerNormShape s = layer_norm_shape(p.rows, p.groups);
  std::vector<RowCache<V>> cache(s.bdx);
  for (int64_t blk = 0; blk < s.blocks; ++blk)
    for (int ty = 0; ty < s.bdy; ++ty) {
      const int64_t row = blk * s.bdy + ty;
      if (row >= p.rows) continue;
      float sum = 0.f, sq = 0.f;
      for (int tx = 0; tx < s.bdx; ++tx) sum += ln_sum_thread<E, V>(p, row, tx, s.bdx, cache[tx]);
      const float mean = ln_mean(sum, p.N);
      for (int tx = 0; tx < s.bdx; ++tx) sq += ln_sq_thread<E, V>(p, row, tx, s.bdx, mean, cache[tx]);
      const float rstd = ln_rstd(sq, p.N, p.eps);
      for (int tx = 0; tx < s.bdx; ++tx) ln_out_thread<E, V>(p, row, tx, s.bdx, mean, rstd, cache[tx]);
    }
}

std::vector<float> normal(std::mt19937& rng, int64_t n, float mean, float sd) {
  std::normal_distribution<float> nd(mean, sd);
  std::vector<float> v(n);
  for (auto& f : v) f = nd(rng);
  return v;
}

// What the CPU kernels give for E's inputs: float32 and bfloat16 run their
// own kernels (on the `isa` path); float16, which the CPU kernels do not
// take, runs the float32 kernel on the widened inputs (for LayerNorm on the
// sum already rounded to float16, as the CUDA kernel rounds it), its output
// rounded to float16 the way the CUDA kernel stores.
template <class E>
std::vector<float> cpu_bias_gelu(const std::vector<float>& x, const std::vector<float>& bias, int64_t rows,
                                 int64_t N, cpu::Isa isa) {
  if (std::is_same<E, BF16>::value) {
    std::vector<uint16_t> xb(x.size()), bb(N);
    for (size_t i = 0; i < x.size(); ++i) xb[i] = float_to_bf16(x[i]);
    for (int64_t i = 0; i < N; ++i) bb[i] = float_to_bf16(bias[i]);
    cpu::bias_gelu(xb.data(), bb.data(), rows, N, 2, isa);
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_float(xb[i]);
    return out;
  }
  std::vector<float> y(x.size()), b(N);
  for (size_t i = 0; i < x.size(); ++i) y[i] = E::load(E::store(x[i]));
  for (int64_t i = 0; i < N; ++i) b[i] = E::load(E::store(bias[i]));
  cpu::bias_gelu(y.data(), b.data(), rows, N, 2, isa);
  for (auto& f : y) f = E::load(E::store(f));
  return y;
}

template <class E>
std::vector<float> cpu_add_layer_norm(const std::vector<float>& x, const std::vector<float>& bias,
                                      const std::vector<float>& res, const std::vector<float>& w,
                                      const std::vector<float>& b, float eps, int64_t rows, int64_t N, cpu::Isa isa) {
  auto round = [](const std::vector<float>& v) {
    std::vector<float> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = E::load(E::store(v[i]));
    return o;
  };
  if (std::is_same<E, BF16>::value) {
    auto bits = [](const std::vector<float>& v) {
      std::vector<uint16_t> o(v.size());
      for (size_t i = 0; i < v.size(); ++i) o[i] = float_to_bf16(v[i]);
      return o;
    };
    auto xb = bits(x);
    const auto bb = bits(bias), rb = bits(res), wb = bits(w), betab = bits(b);
    cpu::add_layer_norm(xb.data(), bb.data(), rb.data(), wb.data(), betab.data(), eps, rows, N, 2, isa);
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = bf16_to_float(xb[i]);
    return out;
  }
  const auto xr = round(x), br = round(bias), rr = round(res), wr = round(w), betar = round(b);
  std::vector<float> y(x.size()), zero_bias(N, 0.f), zero_res(x.size(), 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < N; ++i) y[r * N + i] = E::load(E::store(xr[r * N + i] + br[i] + rr[r * N + i]));
  cpu::add_layer_norm(y.data(), zero_bias.data(), zero_res.data(), wr.data(), betar.data(), eps, rows, N, 2, isa);
  return round(y);
}

// One unit in the last place of E at |v| (float32's for F32): where two
// float32 results that differ in their last bits may round apart.
template <class E>
float ulp(float v) {
  const int bits = std::is_same<E, F32>::value ? 24 : std::is_same<E, F16>::value ? 11 : 8;
  const float a = std::fabs(v);
  return a == 0.f ? 0.f : std::ldexp(1.f, std::ilogb(a) - bits + 1);
}

// The widths: 16-byte vectors and the scalar path (odd widths), one warp
// and several, rows within the register cache (kCached groups a thread)
// and rows beyond it (more than kCached * kMaxRowThreads groups: the rest
// written back to x between the passes).
const int64_t kWidths[] = {1, 7, 8, 24, 383, 384, 768, 1000, 1024, 4096, 4097, 16392};

template <class E>
void check_bias_gelu(std::mt19937& rng) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  for (int64_t N : kWidths) {
    const int64_t rows = N > 4096 ? 3 : 37;
    auto x = normal(rng, rows * N, 0.f, 3.f);
    const auto bias = normal(rng, N, 0.f, 1.f);
    x[0] = -40.f;  // the far tails: -0 and x itself
    if (x.size() > 1) x[1] = 40.f;
    const auto ref = cpu_bias_gelu<E>(x, bias, rows, N, kPortable);
    const auto best = cpu_bias_gelu<E>(x, bias, rows, N, cpu::best_isa());
    for (int v : {1, V}) {
      if (N % v) continue;
      Buf<E> xb(rows * N, v == 1), bb(N, v == 1);
      fill_from(xb, x);
      fill_from(bb, bias);
      if (v == 1) bias_gelu_grid<E, 1>(xb.p, bb.p, rows, N);
      else bias_gelu_grid<E, V>(xb.p, bb.p, rows, N);
      const auto got = read(xb, rows * N);
      for (int64_t i = 0; i < rows * N; ++i) {
        // The portable CPU loop computes what a thread computes, in the same
        // order with the same erf: the same bits. The vector paths' erf is
        // within 1.5e-7 of it (times |v| / 2), then a rounding apart at most.
        ASSERT_EQ(got[i], ref[i]) << "N " << N << " V " << v << " at " << i;
        const float tol = 2e-7f * (1.f + std::fabs(x[i] + bias[i % N])) + ulp<E>(best[i]);
        ASSERT_NEAR(got[i], best[i], tol) << "N " << N << " V " << v << " at " << i;
      }
    }
  }
  // Rows walked in strides of the grid's y extent (as past 65535 blocks).
  const int64_t rows = 41, N = 16;
  const auto x = normal(rng, rows * N, 0.f, 3.f), bias = normal(rng, N, 0.f, 1.f);
  const auto ref = cpu_bias_gelu<E>(x, bias, rows, N, kPortable);
  Buf<E> xb(rows * N, 0), bb(N, 0);
  fill_from(xb, x);
  fill_from(bb, bias);
  bias_gelu_grid<E, 1>(xb.p, bb.p, rows, N, 3);
  EXPECT_EQ(read(xb, rows * N), ref);
}

TEST(EpilogueThreads, BiasGeluGridsMatchTheCpuKernelsInEveryDtypeAndWidth) {
  std::mt19937 rng(21);
  check_bias_gelu<F32>(rng);
  check_bias_gelu<F16>(rng);
  check_bias_gelu<BF16>(rng);
}

TEST(EpilogueShapes, StridedRowsCoverEveryRowOnce) {
  const BiasGeluShape s = bias_gelu_shape(41, 16, 3);
  EXPECT_EQ(s.gy, 3);
  EXPECT_EQ(s.bdy, 8);
}

template <class E>
void check_add_layer_norm(std::mt19937& rng) {
  constexpr int V = 16 / sizeof(typename E::Storage);
  for (int64_t N : kWidths) {
    const float eps = N % 2 ? 1e-5f : 1e-12f;  // torch's default, and a row's variance alone
    const int64_t rows = N > 4096 ? 3 : 29;
    const auto x = normal(rng, rows * N, 3.f, 4.f);  // an offset mean, as residual streams have
    const auto res = normal(rng, rows * N, 0.f, 1.f);
    const auto bias = normal(rng, N, 0.f, 1.f), w = normal(rng, N, 1.f, 0.5f), b = normal(rng, N, 0.f, 1.f);
    // The sums rounded to E, as the CUDA kernel and the portable CPU loop
    // round them, and each row's rstd, for the bound below.
    std::vector<float> s(rows * N);
    std::vector<double> rstd(rows);
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < N; ++i) {
        const float xs = E::load(E::store(x[r * N + i])), bs = E::load(E::store(bias[i]));
        mean += s[r * N + i] = E::load(E::store(xs + bs + E::load(E::store(res[r * N + i]))));
      }
      mean /= double(N);
      for (int64_t i = 0; i < N; ++i) var += (s[r * N + i] - mean) * (s[r * N + i] - mean);
      rstd[r] = 1.0 / std::sqrt(var / double(N) + eps);
    }
    for (int v : {1, V}) {
      if (N % v) continue;
      Buf<E> xb(rows * N, v == 1), bb(N, v == 1), rb(rows * N, v == 1), wb(N, v == 1), betab(N, v == 1);
      fill_from(xb, x);
      fill_from(bb, bias);
      fill_from(rb, res);
      fill_from(wb, w);
      fill_from(betab, b);
      const LayerNormParams p{xb.p, bb.p, rb.p, wb.p, betab.p, eps, rows, N, 0};
      if (v == 1) add_layer_norm_grid<E, 1>(p);
      else add_layer_norm_grid<E, V>(p);
      const auto got = read(xb, rows * N);
      for (cpu::Isa isa : {kPortable, cpu::best_isa()}) {
        const auto want = cpu_add_layer_norm<E>(x, bias, res, w, b, eps, rows, N, isa);
        for (int64_t k = 0; k < rows * N; ++k) {
          // float32 statistics summed in another order: 2e-5 relative, as
          // the CPU kernels against double precision; then one unit of E
          // where the two round apart; and, against a vector path that
          // adds x + bias + residual in another order, one unit of E of
          // the sum, scaled by rstd |w|.
          const double tol = 2e-5 * (1 + std::fabs(want[k])) + ulp<E>(want[k]) +
                             (isa == kPortable ? 0.0 : ulp<E>(s[k]) * rstd[k / N] * std::fabs(w[k % N]));
          ASSERT_NEAR(got[k], want[k], tol) << "N " << N << " V " << v << " eps " << eps << " isa " << int(isa)
                                            << " row " << k / N << " col " << k % N;
        }
      }
    }
  }
}

TEST(EpilogueThreads, AddLayerNormGridsMatchTheCpuKernelsInEveryDtypeAndWidth) {
  std::mt19937 rng(22);
  check_add_layer_norm<F32>(rng);
  check_add_layer_norm<F16>(rng);
  check_add_layer_norm<BF16>(rng);
}

// The rows a block shares are independent: a row of large values beside rows
// of small ones (one warp each, four a block) normalises each on its own.
TEST(EpilogueThreads, RowsSharingABlockNormaliseIndependently) {
  const int64_t rows = 6, N = 96;  // 24 float32 vectors: one warp a row, four rows a block
  ASSERT_EQ(layer_norm_shape(rows, N / 4).bdy, 4);
  std::vector<float> x(rows * N), zeros(rows * N, 0.f), ones(N, 1.f), zb(N, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < N; ++i) x[r * N + i] = float(i % 2 ? 1 : -1) * std::pow(10.f, float(r));
  Buf<F32> xb(rows * N, 0), rb(rows * N, 0), wb(N, 0), bb(N, 0);
  fill_from(xb, x);
  fill_from(rb, zeros);
  fill_from(wb, ones);
  fill_from(bb, zb);
  add_layer_norm_grid<F32, 4>(LayerNormParams{xb.p, bb.p, rb.p, wb.p, bb.p, 0.f, rows, N, 0});
  for (int64_t k = 0; k < rows * N; ++k) ASSERT_NEAR(xb.p[k], (k % 2) ? 1.f : -1.f, 1e-6f) << k;
}

}  // namespace
}  // namespace kernels
}  // namespace fastserve
