// Core microbenchmarks: scheduler overhead per request, batch assembly, and
// one controller step. Targets (benchmarks/README.md): <= 2 us of scheduler
// overhead per request at 4 producers; <= 20 us to assemble 64 x ~128 tokens.
#include <benchmark/benchmark.h>

#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "fastserve/batch.h"
#include "fastserve/controller.h"
#include "fastserve/scheduler.h"

namespace fastserve {
namespace {

// Producers submit `per_producer` requests each (8-64 tokens, copied in as a
// real caller's token vector would be); one consumer drains with next_batch
// and complete. Time per item = wall time of the whole exchange / requests.
void BM_SubmitToBatch(benchmark::State& state) {
  const int producers = static_cast<int>(state.range(0));
  const int per_producer = 20000;
  std::vector<std::vector<int32_t>> proto(64);
  for (int i = 0; i < 64; ++i) proto[i].assign(8 + (i * 37) % 57, 7);
  int64_t batches = 0;
  for (auto _ : state) {
    SchedulerConfig sc;
    sc.max_queue_requests = int64_t{producers} * per_producer + 1;
    sc.max_batch_size = 128;
    ControllerConfig cc;
    cc.policy = "static";
    cc.initial_tokens = 8192;
    Scheduler s(sc, cc);
    std::atomic<int> left{producers};
    std::vector<std::thread> threads;
    for (int p = 0; p < producers; ++p) {
      threads.emplace_back([&, p] {
        for (int i = 0; i < per_producer; ++i) s.submit(proto[(i + p) & 63], i % 2);
        --left;
      });
    }
    int64_t got = 0;
    const int64_t total = int64_t{producers} * per_producer;
    while (got < total) {
      auto b = s.next_batch(0.01);
      if (!b) continue;
      got += (*b)->size();
      ++batches;
      s.complete(**b, 1e-3);
    }
    for (auto& t : threads) t.join();
  }
  state.SetItemsProcessed(state.iterations() * int64_t{producers} * per_producer);
  state.counters["time_per_request"] = benchmark::Counter(
      double(state.iterations()) * producers * per_producer,
      benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  state.counters["requests_per_batch"] =
      double(state.iterations()) * producers * per_producer / double(batches);
}
BENCHMARK(BM_SubmitToBatch)->Arg(1)->Arg(4)->UseRealTime()->Unit(benchmark::kMillisecond);

std::vector<std::vector<int32_t>> rows_64x128() {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> len(96, 160), tok(1, 30000);
  std::vector<std::vector<int32_t>> rows(64);
  for (auto& r : rows) {
    r.resize(len(rng));
    for (auto& t : r) t = tok(rng);
  }
  return rows;
}

template <bool Packed>
void BM_Assemble(benchmark::State& state) {
  const auto rows = rows_64x128();
  for (auto _ : state) {
    state.PauseTiming();
    auto b = std::make_unique<Batch>(1, 0, 0.0, 1 << 20);
    for (size_t i = 0; i < rows.size(); ++i) {
      auto copy = rows[i];
      b->add(i + 1, std::move(copy), 0.0);
    }
    state.ResumeTiming();
    if (Packed) {
      benchmark::DoNotOptimize(b->packed().input_ids.data());
    } else {
      benchmark::DoNotOptimize(b->padded().input_ids.data());
    }
    state.PauseTiming();
    b.reset();
    state.ResumeTiming();
  }
}
BENCHMARK(BM_Assemble<false>)->Name("BM_AssemblePadded_64x128")->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Assemble<true>)->Name("BM_AssemblePacked_64x128")->Unit(benchmark::kMicrosecond);

void BM_ControllerObserve(benchmark::State& state, const char* policy) {
  ControllerConfig cc;
  cc.policy = policy;
  cc.target_latency_s = 0.05;
  auto c = make_controller(cc);
  std::mt19937 rng(2);
  std::lognormal_distribution<double> noise(0, 0.05);
  for (auto _ : state) {
    Observation o;
    o.budget = c->budget();
    o.tokens = o.budget;
    o.batch_size = o.budget / 64 + 1;
    o.latency_s = (0.01 + 8e-6 * double(o.tokens)) * noise(rng);
    c->observe(o);
    benchmark::DoNotOptimize(c->budget());
  }
}
BENCHMARK_CAPTURE(BM_ControllerObserve, static, "static");
BENCHMARK_CAPTURE(BM_ControllerObserve, aimd, "aimd");
BENCHMARK_CAPTURE(BM_ControllerObserve, seed, "seed");
BENCHMARK_CAPTURE(BM_ControllerObserve, model, "model");

}  // namespace
}  // namespace fastserve
