// CPU packing kernels: the reference implementation and the oracle the CUDA
// per-thread functions are tested against. Rows are moved with memcpy; pooling
// converts and accumulates in float32, through AVX2/F16C where the CPU has it
// (kernels_cpu_avx2.cpp) and otherwise with loops over H that the compiler
// vectorises. Large inputs are split over rows across a persistent pool.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "attention_cpu.h"
#include "fastserve/kernels.h"
#include "pool.h"
#include "simd.h"

namespace fastserve {
namespace kernels {
namespace cpu {
namespace {

constexpr size_t kDefaultMinBytesPerThread = size_t(4) << 20;

// Bytes of traffic each thread must have before a kernel uses another one.
// Threads pay only when each has enough bytes to amortise waking a pooled
// worker (a futex wake) and another core is actually free; on a busy machine
// the OS rarely runs the second thread at once and the caller takes its
// chunks anyway. The default comes from bench_kernels.py (figures:
// benchmarks/README.md); FASTSERVE_KERNEL_THREAD_BYTES overrides it, for
// measuring.
size_t min_bytes_per_thread() {
  static const size_t v = [] {
    const char* e = std::getenv("FASTSERVE_KERNEL_THREAD_BYTES");
    return e ? size_t(std::strtoull(e, nullptr, 10)) : size_t(kDefaultMinBytesPerThread);
  }();
  return v ? v : 1;
}

int hardware_threads() {
  static const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
  return hw;
}

// The process's pool of hardware_concurrency - 1 workers, or null in a
// forked child (the workers stayed in the parent). Never destroyed: workers
// may still wait on it at exit.
Pool* pool() {
  static const pid_t owner = getpid();
  static Pool* const p = new Pool(hardware_threads() - 1);
  return getpid() == owner ? p : nullptr;
}

// One call at a time uses the pool; a concurrent call runs on its caller.
std::mutex& pool_user() {
  static std::mutex m;
  return m;
}

// Run fn(begin, end) over [0, n) in contiguous chunks on up to `threads`
// threads (the caller and threads - 1 of the pool's workers); more chunks
// than threads so a slow thread leaves its share to the others.
template <class Fn>
void parallel_for(int64_t n, int threads, Fn fn) {
  Pool* p = threads > 1 && n >= 2 ? pool() : nullptr;
  std::unique_lock<std::mutex> lk(pool_user(), std::defer_lock);
  if (p == nullptr || !lk.try_lock()) {
    fn(int64_t(0), n);
    return;
  }
  const int chunks = int(std::min<int64_t>(n, 4 * int64_t(threads)));
  struct Ctx {
    Fn* fn;
    int64_t n;
    int chunks;
  } ctx{&fn, n, chunks};
  p->run(
      chunks, threads - 1,
      [](void* c, int i) {
        const Ctx& x = *static_cast<Ctx*>(c);
        (*x.fn)(x.n * i / x.chunks, x.n * (i + 1) / x.chunks);
      },
      &ctx);
}

// Columns pooled at a time: a chunk's float32 accumulators stay in vector
// registers across all of a segment's rows instead of being loaded and stored
// once per row.
constexpr int64_t kChunk = 64;

template <class Load, class S>
inline void pool_chunk(const S* x, int64_t begin, int64_t end, int64_t H, int64_t c, int64_t w, PoolMode mode,
                       float* o, Load load) {
  // Mean sums blocks of rows (mean_block_rows) into the total; max and cls
  // take the segment as one block.
  const int64_t step = mode == PoolMode::kMean ? mean_block_rows(end - begin) : end - begin;
  float total[kChunk];
  for (int64_t b0 = begin; b0 < end; b0 += step) {
    const int64_t b1 = std::min(end, b0 + step);
    float acc[kChunk];
    const S* row = x + b0 * H + c;
    for (int64_t i = 0; i < kChunk; ++i) acc[i] = i < w ? load(row[i]) : 0.f;
    if (mode == PoolMode::kCls) {
    } else if (w == kChunk) {  // full chunk: fixed trip count, vectorised
      for (int64_t r = b0 + 1; r < b1; ++r) {
        row = x + r * H + c;
        if (mode == PoolMode::kMax) {
          for (int64_t i = 0; i < kChunk; ++i) {
            const float v = load(row[i]);
            acc[i] = pool_max(acc[i], v);
          }
        } else {
          for (int64_t i = 0; i < kChunk; ++i) acc[i] += load(row[i]);
        }
      }
    } else {  // the tail of H
      for (int64_t r = b0 + 1; r < b1; ++r) {
        row = x + r * H + c;
        for (int64_t i = 0; i < w; ++i) {
          const float v = load(row[i]);
          acc[i] = mode == PoolMode::kMax ? pool_max(acc[i], v) : acc[i] + v;
        }
      }
    }
    for (int64_t i = 0; i < kChunk; ++i) total[i] = b0 == begin ? acc[i] : total[i] + acc[i];
  }
  const float scale = mode == PoolMode::kMean ? 1.f / float(end - begin) : 1.f;
  for (int64_t i = 0; i < w; ++i) o[c + i] = total[i] * scale;
}

template <class Load>
void pool_rows(const void* x, const int64_t* cu, int64_t b0, int64_t b1, int64_t H, PoolMode mode,
               bool normalize, float* out, Load load) {
  using S = decltype(load.storage());
  const S* base = static_cast<const S*>(x);
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * H;
    const int64_t begin = cu[b], end = cu[b + 1];
    if (end == begin) {
      std::fill(o, o + H, 0.f);
      continue;
    }
    for (int64_t c = 0; c < H; c += kChunk)
      pool_chunk(base, begin, end, H, c, std::min(kChunk, H - c), mode, o, load);
    if (normalize) {
      float sq = 0.f;
      for (int64_t h = 0; h < H; ++h) sq += o[h] * o[h];
      const float n = std::sqrt(sq);
      // max(n, 1e-12) as F.normalize takes it, keeping a NaN norm NaN: a
      // broken model's row stays NaN (`n > eps ? n : eps` picked eps for NaN
      // and scaled the row's other values by 1e12).
      const float scale = 1.f / (n < 1e-12f ? 1e-12f : n);
      for (int64_t h = 0; h < H; ++h) o[h] *= scale;
    }
  }
}

struct LoadF32 {
  static float storage();
  float operator()(float v) const { return v; }
};
struct LoadF16 {
  static uint16_t storage();
  float operator()(uint16_t v) const { return fp16_to_float(v); }
};
struct LoadBF16 {
  static uint16_t storage();
  float operator()(uint16_t v) const { return bf16_to_float(v); }
};

// A switch from the environment: unset, empty and "0" mean off, anything
// else on.
bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return e && *e && !(e[0] == '0' && e[1] == '\0');
}

// The AVX2 pooling path where the CPU has it; FASTSERVE_KERNEL_NO_SIMD set
// forces the portable one, for measuring.
bool use_avx2() {
  static const bool v = simd::have_avx2() && !env_on("FASTSERVE_KERNEL_NO_SIMD");
  return v;
}

bool use_avx512() {
  static const bool v = use_avx2() && simd::have_avx512() && !env_on("FASTSERVE_KERNEL_NO_AVX512");
  return v;
}

bool use_avx512_bf16() {
  static const bool v = use_avx512() && simd::have_avx512_bf16();
  return v;
}

std::atomic<int> g_isa_cap{int(Isa::kAvx512Bf16)};  // set_isa_cap's

}  // namespace

bool vector_paths() { return use_avx2(); }

Isa set_isa_cap(Isa cap) { return Isa(g_isa_cap.exchange(int(cap))); }

Isa isa_for(Isa cap, int64_t width) {
  cap = std::min(cap, Isa(g_isa_cap.load(std::memory_order_relaxed)));
  if (cap >= Isa::kAvx512Bf16 && use_avx512_bf16() && width % 16 == 0) return Isa::kAvx512Bf16;
  if (cap >= Isa::kAvx512 && use_avx512() && width % 16 == 0) return Isa::kAvx512;
  if (cap >= Isa::kAvx2 && use_avx2() && width % 8 == 0) return Isa::kAvx2;
  return Isa::kPortable;
}

Isa best_isa() { return isa_for(Isa::kAvx512Bf16, 16); }

void run_chunks(int64_t n, int threads, void (*fn)(void*, int64_t, int64_t), void* ctx) {
  parallel_for(n, threads, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}

int threads_for(size_t bytes) {
  return int(std::max<size_t>(1, std::min<size_t>(hardware_threads(), bytes / min_bytes_per_thread())));
}

void pack(const void* x, int64_t B, int64_t L, const int64_t* cu, size_t row_bytes, void* out) {
  const auto* src = static_cast<const char*>(x);
  auto* dst = static_cast<char*>(out);
  // A sequence's rows are contiguous in both layouts: one memcpy each.
  parallel_for(B, threads_for(2 * size_t(cu[B]) * row_bytes), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      if (cu[b + 1] > cu[b])
        std::memcpy(dst + cu[b] * row_bytes, src + b * L * row_bytes, (cu[b + 1] - cu[b]) * row_bytes);
  });
}

void unpack(const void* x, const int64_t* cu, int64_t B, int64_t L, size_t row_bytes, void* out) {
  const auto* src = static_cast<const char*>(x);
  auto* dst = static_cast<char*>(out);
  parallel_for(B, threads_for(size_t(cu[B] + B * L) * row_bytes), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = cu[b + 1] - cu[b];
      char* d = dst + b * L * row_bytes;
      if (n > 0) std::memcpy(d, src + cu[b] * row_bytes, n * row_bytes);
      if (n < L) std::memset(d + n * row_bytes, 0, (L - n) * row_bytes);
    }
  });
}

void segment_pool(const void* x, DType dtype, const int64_t* cu, int64_t B, int64_t H, PoolMode mode,
                  bool normalize, float* out) {
  const size_t bytes = size_t(cu[B]) * H * element_size(dtype) + size_t(B) * H * sizeof(float);
  parallel_for(B, threads_for(bytes), [&](int64_t b0, int64_t b1) {
#if defined(FASTSERVE_CPU_AVX2)
    // The portable path under a process-wide cap of kPortable (set_isa_cap),
    // so tests and benchmarks reach it in one process.
    if (use_avx2() && Isa(g_isa_cap.load(std::memory_order_relaxed)) >= Isa::kAvx2)
      return simd::pool_rows_avx2(x, dtype, cu, b0, b1, H, mode, normalize, out);
#endif
    switch (dtype) {
      case DType::kFloat32: pool_rows(x, cu, b0, b1, H, mode, normalize, out, LoadF32{}); break;
      case DType::kFloat16: pool_rows(x, cu, b0, b1, H, mode, normalize, out, LoadF16{}); break;
      case DType::kBFloat16: pool_rows(x, cu, b0, b1, H, mode, normalize, out, LoadBF16{}); break;
      default: break;  // rejected by validation
    }
  });
}

void gather(const void* x, const int64_t* index, int64_t M, size_t row_bytes, void* out) {
  const auto* src = static_cast<const char*>(x);
  auto* dst = static_cast<char*>(out);
  parallel_for(M, threads_for(2 * size_t(M) * row_bytes), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(dst + i * row_bytes, src + index[i] * row_bytes, row_bytes);
  });
}

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
