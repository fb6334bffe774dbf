// Deadlines, admission from a prediction, shedding, bursts and priority
// classes, on simulated time: a discrete-event simulation drives the real
// Scheduler (ManualClock) with open-loop arrivals and one worker whose batch
// compute time follows a cost model
//     L = a + b * sum(len) + c * sum(len^2)   (x log-normal noise),
// so every figure below is deterministic and independent of the machine.
// The engine's settings are used: the controller aims a batch's compute at
// half the request target, and each request's deadline is the target.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "fastserve/errors.h"
#include "fastserve/scheduler.h"

namespace fastserve {
namespace {

constexpr double kTarget = 0.05;  // request latency target (p99), and each request's timeout

struct CostModel {
  double a = 0.002, b = 20e-6, c = 0.0;
};

std::vector<int32_t> toks(int n) { return std::vector<int32_t>(static_cast<size_t>(n), 7); }

// The long-tail length mix of short texts: mostly 8-48 tokens, a few long.
int draw_len(std::mt19937& rng) {
  std::lognormal_distribution<double> d(std::log(24.0), 0.6);
  return std::clamp(static_cast<int>(d(rng)), 4, 256);
}

struct Arrival {
  double t;
  int len;
  int priority = 0;
};

// Poisson arrivals whose rate is piecewise constant: {rate, seconds} phases.
std::vector<Arrival> arrivals(const std::vector<std::pair<double, double>>& phases, unsigned seed,
                              double high_share = 0) {
  std::mt19937 rng(seed);
  std::vector<Arrival> out;
  double start = 0;
  for (auto [rate, dur] : phases) {
    std::exponential_distribution<double> gap(rate);
    for (double t = start + gap(rng); t < start + dur; t += gap(rng)) {
      const int len = draw_len(rng);
      const int prio = std::uniform_real_distribution<double>(0, 1)(rng) < high_share ? 1 : 0;
      out.push_back({t, len, prio});
    }
    start += dur;
  }
  return out;
}

enum class Outcome { Pending, Done, Refused, Shed, Expired };

struct Record {
  double arrival = 0, latency = INFINITY;
  int priority = 0, len = 0;
  Outcome outcome = Outcome::Pending;
};

ControllerConfig engine_controller(const std::string& policy = "model") {
  ControllerConfig c;
  c.policy = policy;
  c.target_latency_s = kTarget / 2;  // Engine: compute target = request target / 2
  c.min_tokens = 32;
  c.max_tokens = 2048;
  if (policy == "static") c.initial_tokens = 2048;
  return c;
}

SchedulerConfig engine_scheduler(bool admission = true) {
  SchedulerConfig s;
  s.cost = Cost::Packed;
  s.admission = admission;
  return s;
}

struct Sim {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(0.0);
  Scheduler s;
  std::mt19937 rng{99};
  std::lognormal_distribution<double> noise{-0.05 * 0.05 / 2, 0.05};
  std::vector<Record> rec;
  std::map<uint64_t, size_t> index;  // request id -> record
  std::vector<std::pair<double, int64_t>> budgets;  // (time, budget) after each batch
  double timeout = kTarget;
  // Heavier noise for the spiral tests: with probability outlier_share(t) a
  // batch runs 3-4x its model time (a preempted thread on a shared machine),
  // and every batch is scaled by slowdown(t) (contention from the callers).
  std::function<double(double)> outlier_share = [](double) { return 0.0; };
  std::function<double(double)> slowdown = [](double) { return 1.0; };
  // and with probability stall_share(t) it stalls 0.5-1.5 stall_s more (the
  // thread preempted for a time slice, whatever the batch's size).
  std::function<double(double)> stall_share = [](double) { return 0.0; };
  double stall_s = 0.01;
  std::uniform_real_distribution<double> unit{0, 1};
  // With layers > 0 (and the scheduler's preempt_layers), the worker offers
  // its batch to be paused after each of its first layers - 1 layers, each
  // an equal share of the batch's time, and runs an urgent batch at once.
  int layers = 0;

  explicit Sim(ControllerConfig cc = engine_controller(), SchedulerConfig sc = engine_scheduler())
      : s(sc, cc, clock) {}

  void submit(const Arrival& a) {
    clock->set(a.t);
    Record r;
    r.arrival = a.t;
    r.priority = a.priority;
    r.len = a.len;
    try {
      const uint64_t id = s.submit(toks(a.len), a.priority, a.t + timeout);
      index[id] = rec.size();
    } catch (const Overloaded&) {
      r.outcome = Outcome::Refused;
    }
    rec.push_back(r);
  }

  void mark(const std::vector<uint64_t>& ids, Outcome o) {
    for (uint64_t id : ids) rec[index.at(id)].outcome = o;
  }

  // Run every arrival; `cost(t)` gives the cost model in force at time t.
  template <class CostAt>
  void run(const std::vector<Arrival>& arr, CostAt cost) {
    size_t i = 0;
    double t = 0;  // the worker is free from t
    while (true) {
      while (i < arr.size() && arr[i].t <= t) submit(arr[i++]);
      clock->set(t);
      auto got = s.next_batch(0);
      if (!got) {
        if (i >= arr.size()) break;
        t = arr[i].t;
        continue;
      }
      Batch& b = **got;
      mark(b.expired, Outcome::Expired);
      mark(b.shed, Outcome::Shed);
      mark(s.start(b), Outcome::Expired);
      if (b.size() == 0) continue;
      // The model time of a batch's rows (all, or those not abandoned).
      auto model_time = [&](const Batch& x, double at) {
        const CostModel m = cost(at);
        double sq = 0, tokens = 0;
        int64_t rows = 0;
        for (size_t j = 0; j < x.lengths().size(); ++j) {
          const auto& gone = x.abandoned;
          if (std::find(gone.begin(), gone.end(), x.ids()[j]) != gone.end()) continue;
          const double len = x.lengths()[j];
          sq += len * len, tokens += len, ++rows;
        }
        return rows ? m.a + m.b * tokens + m.c * sq : 0.0;
      };
      auto duration = [&](const Batch& x, double at) {
        double d = model_time(x, at) * noise(rng) * slowdown(at);
        if (unit(rng) < outlier_share(at)) d *= 3 + unit(rng);
        if (unit(rng) < stall_share(at)) d += stall_s * (0.5 + unit(rng));
        return d;
      };
      // Run until `end`, taking arrivals on the way; record what finished.
      auto finish = [&](Batch& x, double start, double d) {
        while (i < arr.size() && arr[i].t < start + d) submit(arr[i++]);
        clock->set(start + d);
        s.complete(x, d);
        for (uint64_t id : x.ids()) {
          if (std::find(x.abandoned.begin(), x.abandoned.end(), id) != x.abandoned.end()) continue;
          Record& r = rec[index.at(id)];
          r.outcome = Outcome::Done;
          r.latency = start + d - r.arrival;
        }
        budgets.emplace_back(start + d, s.budget());
      };
      // With layers, the batch runs layer by layer; rows dropped at a pause
      // shrink the layers left (none left: the batch ends there).
      const double dur = duration(b, t);
      double paused = 0, ran = 0, per_layer = layers > 0 ? dur / layers : dur;
      for (int k = 1; k < layers; ++k) {
        ran += per_layer;
        const double at = t + paused + ran;
        while (i < arr.size() && arr[i].t <= at) submit(arr[i++]);
        clock->set(at);
        const double cost_before = model_time(b, t);
        if (cost_before <= 0) break;
        auto urgent = s.preempt(b, double(k) / layers);
        if (!urgent) continue;
        Batch& u = **urgent;
        mark(u.shed, Outcome::Shed);  // b's rows the pause would make late
        per_layer *= model_time(b, t) / cost_before;
        mark(s.start(u), Outcome::Expired);
        if (u.size() == 0) continue;
        const double ud = duration(u, at);
        finish(u, at, ud);
        paused += ud;
      }
      const double total = ran + per_layer;  // and the last layer
      finish(b, t + paused, total);
      t += paused + total;
    }
  }
  void run(const std::vector<Arrival>& arr, CostModel m = {}) {
    run(arr, [m](double) { return m; });
  }

  // Figures over the requests arriving in [from, to).
  struct Figures {
    int64_t n = 0, done = 0, good = 0, refused = 0, shed = 0, expired = 0, good_tokens = 0;
    double p99_done = 0, goodput_rps = 0;
    double good_fraction() const { return n ? double(good) / double(n) : 0; }
  };
  Figures figures(double from, double to, int priority = -1) const {
    Figures f;
    std::vector<double> lat;
    for (const Record& r : rec) {
      if (r.arrival < from || r.arrival >= to || (priority >= 0 && r.priority != priority)) continue;
      ++f.n;
      switch (r.outcome) {
        case Outcome::Done:
          ++f.done;
          lat.push_back(r.latency);
          if (r.latency <= kTarget) ++f.good, f.good_tokens += r.len;
          break;
        case Outcome::Refused: ++f.refused; break;
        case Outcome::Shed: ++f.shed; break;
        case Outcome::Expired: ++f.expired; break;
        case Outcome::Pending: break;
      }
    }
    if (!lat.empty()) {
      std::sort(lat.begin(), lat.end());
      f.p99_done = lat[std::min(lat.size() - 1, static_cast<size_t>(std::ceil(0.99 * lat.size())) - 1)];
    }
    f.goodput_rps = double(f.good) / (to - from);
    return f;
  }
};

// Requests per second the cost model serves at the engine's compute target
// (batches of the budget whose compute is kTarget / 2), for the length mix.
double capacity_rps(CostModel m = {}) {
  std::mt19937 rng(5);
  double mean_len = 0;
  for (int i = 0; i < 20000; ++i) mean_len += draw_len(rng);
  mean_len /= 20000;
  const double budget = (kTarget / 2 - m.a) / m.b;
  return budget / mean_len / (kTarget / 2);
}

// ----------------------------------------------------------------- item 1

TEST(Deadlines, ARequestWhoseDeadlinePassesAfterAssemblyIsRemovedAtStart) {
  auto clock = std::make_shared<ManualClock>(0.0);
  ControllerConfig cc = engine_controller("static");
  Scheduler s(engine_scheduler(), cc, clock);
  const uint64_t a = s.submit(toks(8), 0, 0.010);
  const uint64_t b = s.submit(toks(8), 0, 1.0);
  const uint64_t c = s.submit(toks(8));  // no deadline
  auto batch = *s.next_batch(0);
  ASSERT_EQ(batch->size(), 3);
  clock->set(0.010);  // a's deadline passes between assembly and start
  const auto removed = s.start(*batch);
  EXPECT_EQ(removed, std::vector<uint64_t>{a});
  ASSERT_EQ(batch->size(), 2);
  EXPECT_EQ(batch->total_tokens(), 16);
  std::vector<uint64_t> left(batch->ids().begin(), batch->ids().end());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<uint64_t>{b, c}));
  EXPECT_EQ(batch->packed().total_tokens, 16);
  s.complete(*batch, 0.001);
  const auto snap = s.snapshot();
  EXPECT_EQ(snap.stats.expired, 1);
  EXPECT_EQ(snap.stats.completed, 2);
}

TEST(Deadlines, RequestsCancelledAfterAssemblyLeaveTheBatchAtStartCountedCancelled) {
  // A caller's cancel() between next_batch and the worker taking the
  // futures: the scheduler no longer holds the request, so the worker
  // names it at start and it is never computed.
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(engine_scheduler(), engine_controller("static"), clock);
  const uint64_t a = s.submit(toks(8), 0, 0.010);
  const uint64_t b = s.submit(toks(5));
  const uint64_t c = s.submit(toks(3));
  auto batch = *s.next_batch(0);
  ASSERT_EQ(batch->size(), 3);
  EXPECT_FALSE(s.cancel(b));  // taken: the scheduler cannot cancel it any more
  clock->set(0.010);
  EXPECT_EQ(s.start(*batch, {b}), std::vector<uint64_t>{a});  // a expired, b dropped, c left
  EXPECT_EQ(batch->ids(), std::vector<uint64_t>{c});
  EXPECT_EQ(batch->total_tokens(), 3);
  s.complete(*batch, 0.001);
  const auto snap = s.snapshot();
  EXPECT_EQ(snap.stats.expired, 1);
  EXPECT_EQ(snap.stats.cancelled, 1);
  EXPECT_EQ(snap.stats.completed, 1);
  auto only = s.submit(toks(4));
  auto lone = *s.next_batch(0);
  EXPECT_TRUE(s.start(*lone, {only}).empty());
  EXPECT_EQ(lone->size(), 0);
  EXPECT_EQ(s.snapshot().stats.cancelled, 2);
}

TEST(Deadlines, ABatchWhoseRequestsAllExpiredIsEmptyAndNotRunning) {
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(engine_scheduler(), engine_controller("static"), clock);
  s.submit(toks(8), 0, 0.01);
  auto batch = *s.next_batch(0);
  clock->set(0.02);
  EXPECT_EQ(s.start(*batch).size(), 1u);
  EXPECT_EQ(batch->size(), 0);
  EXPECT_EQ(s.snapshot().stats.expired, 1);
}

TEST(Deadlines, RemovingRowsAfterALayoutWasBuiltIsALogicError) {
  Batch b(1, 0, 0.0, 100);
  b.add(1, toks(4), 0.0, 0.5);
  b.packed();
  EXPECT_THROW(b.remove_expired(1.0), std::logic_error);
}

// ----------------------------------------------------------------- item 2

// A scheduler that has measured batches of the cost model (a = 2 ms, b =
// 20 us per token), so admission predicts.
struct Measured {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(0.0);
  Scheduler s;
  explicit Measured(int64_t budget = 1000, int workers = 1, bool extend = false, int64_t layers = 0,
                    Cost cost = Cost::Packed, double target_s = kTarget, bool buckets = false)
      : s([extend, layers, cost, buckets] {
      SchedulerConfig sc = engine_scheduler();
      sc.extend_past_budget = extend;
      sc.preempt_layers = layers;
      sc.cost = cost;
      sc.token_buckets = buckets;
      return sc;
    }(), [budget, target_s] {
      ControllerConfig c = engine_controller("static");
      c.initial_tokens = budget;
      c.target_latency_s = target_s / 2;
      return c;
    }(), clock, workers) {
    for (int n : {100, 400, 800, 200, 600, 1000}) {
      s.submit(toks(n));
      auto b = *s.next_batch(0);
      s.start(*b);
      clock->advance(0.002 + 20e-6 * n);
      s.complete(*b, 0.002 + 20e-6 * n);
    }
  }
};

TEST(Admission, EachWorkersColdFirstBatchIsLeftOutOfTheFit) {
  // Every replica's first batch is cold (lazy initialisation on its own
  // thread: 50-100x a steady batch in the engine's tests). Fitted, the second
  // worker's would make a burst at start-up look like 30 s of work and shed
  // requests that finish in well under a second.
  auto clock = std::make_shared<ManualClock>(0.0);
  ControllerConfig c = engine_controller("static");
  c.initial_tokens = 1000;
  Scheduler s(engine_scheduler(), c, clock, 2);
  auto run = [&](int worker, int n, double seconds) {
    s.submit(toks(n));
    auto b = *s.next_batch(0, worker);
    s.start(*b);
    clock->advance(seconds);
    s.complete(*b, seconds);
  };
  run(0, 30, 0.3);  // cold
  run(1, 20, 0.3);  // cold
  for (int n : {100, 400, 800, 200, 600, 1000}) run(n % 200 == 0 ? 0 : 1, n, 0.002 + 20e-6 * n);
  const double now = clock->now();
  EXPECT_NEAR(s.predict_completion(50) - now, 0.003, 0.001);
  // 30,000 tokens: 30 batches of 22 ms on two workers, about 0.33 s.
  for (int i = 0; i < 300; ++i) EXPECT_NO_THROW(s.submit(toks(100), 0, now + 30.0));
  auto b = *s.next_batch(0, 0);
  EXPECT_TRUE(b->shed.empty());
  EXPECT_LT(s.predict_completion(50) - now, 1.0);
}

TEST(Admission, NothingIsRefusedBeforeAnyBatchIsMeasured) {
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(engine_scheduler(), engine_controller("static"), clock);
  EXPECT_TRUE(std::isinf(s.predict_completion(10)));
  for (int i = 0; i < 200; ++i) s.submit(toks(100), 0, 0.001);  // would all be late
  EXPECT_EQ(s.depth(), 200);
}

TEST(Admission, PredictsFromWorkAheadAndRefusesWhatWouldMissItsDeadline) {
  Measured m;
  const double now = m.clock->now();
  // Empty queue: 50 tokens alone, 2 ms + 1 ms.
  EXPECT_NEAR(m.s.predict_completion(50) - now, 0.003, 0.0005);
  // 4900 tokens queued ahead: with its own 50, five full batches of 1000
  // (22 ms each) = 110 ms, times the tail ratio of compute (>= 1, small on
  // this noiseless fit).
  for (int i = 0; i < 49; ++i) m.s.submit(toks(100));
  const double predicted = m.s.predict_completion(50) - now;
  EXPECT_GE(predicted, 0.110 * 0.99);
  EXPECT_LE(predicted, 0.110 * 1.25);
  // A timeout of 50 ms cannot be met: refused at once, with the wait that
  // would let it through.
  try {
    m.s.submit(toks(50), 0, now + 0.05);
    FAIL() << "expected Overloaded";
  } catch (const Overloaded& e) {
    EXPECT_NEAR(e.retry_after_s(), predicted - 0.05, 1e-9);
  }
  // Overloaded is a QueueFull; no deadline, no refusal.
  EXPECT_THROW(m.s.submit(toks(50), 0, now + 0.05), QueueFull);
  EXPECT_NO_THROW(m.s.submit(toks(50)));
  // Higher priority does not wait behind priority 0: admitted.
  EXPECT_NO_THROW(m.s.submit(toks(50), 1, now + 0.05));
  const auto st = m.s.snapshot().stats;
  EXPECT_EQ(st.refused, 2);
  EXPECT_EQ(st.rejected, 0);
}

TEST(Admission, WithTokenBucketsPredictsTheBatchesFormationMakes) {
  // Budget 1,040 tokens; 970 queued ahead, then 60 more. Without buckets
  // the 60 join the first batch (1,030 tokens); with them the budget is
  // 1,024 (a bucket): the first batch stops at 970 and the 60 run in the
  // second, as admission now predicts.
  for (bool buckets : {false, true}) {
    Measured m(1040, 1, false, 0, Cost::Packed, kTarget, buckets);
    const double now = m.clock->now();
    for (int i = 0; i < 10; ++i) m.s.submit(toks(97));
    const double predicted = m.s.predict_completion(60) - now;
    if (buckets) {
      EXPECT_GE(predicted, 2 * (0.002 + 20e-6 * 1024) * 0.99);
    } else {
      EXPECT_LE(predicted, (0.002 + 20e-6 * 1040) * 1.25);
    }
    m.s.submit(toks(60));
    auto b = *m.s.next_batch(0);
    EXPECT_EQ(b->total_tokens(), buckets ? 970 : 1030);
  }
}

TEST(Admission, SubmitManyAdmitsThePrefixThatMakesItsDeadline) {
  Measured m;
  const double now = m.clock->now();
  // 1000 tokens per batch of 22 ms; 1000 queued ahead. With a 50 ms deadline
  // about 2000 tokens fit: the 1000 ahead and two of the list's 500 (alone,
  // its 2000 tokens take 44 ms: it could make it, behind the others it cannot).
  m.s.submit(toks(1000));
  std::vector<std::vector<int32_t>> reqs(4, toks(500));
  const auto ids = m.s.submit_many(reqs, 0, now + 0.05);
  EXPECT_GE(ids.size(), 1u);
  EXPECT_LE(ids.size(), 3u);
  EXPECT_THROW(m.s.submit_many(reqs, 0, now + 0.05), Overloaded);
}

TEST(Admission, SubmitManyRefusesAListItsOwnWorkMakesLate) {
  // Ten requests of 500 tokens take 110 ms alone (5 batches of 22 ms): with a
  // 50 ms deadline no wait makes them fit, so not Overloaded (retry later)
  // after a prefix was queued, but the caller's to split: InvalidArgument,
  // naming the work, nothing queued or counted as refused.
  Measured m;
  const double now = m.clock->now();
  const std::vector<std::vector<int32_t>> reqs(10, toks(500));
  const auto before = m.s.snapshot().stats;
  for (bool whole : {false, true}) {
    for (bool waiting : {false, true}) {
      try {
        m.s.submit_many(reqs, 0, now + 0.05, whole, waiting);
        ADD_FAILURE() << "admitted";
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("10 requests of 5000 tokens"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("alone"), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_EQ(m.s.depth(), 0);
  EXPECT_EQ(m.s.snapshot().stats.refused, before.refused);
  // One request (it cannot be split), in time alone, or without a deadline: queued.
  EXPECT_EQ(m.s.submit_many({toks(5000)}, 0, now + 0.05).size(), 1u);  // (idle: it starts at once)
  EXPECT_EQ(m.s.submit_many(reqs, 0, now + 1.0).size(), 10u);
  EXPECT_EQ(m.s.submit_many(reqs).size(), 10u);
}

TEST(Admission, SubmitManyCountsEveryWorkerForAListAlone) {
  // Two workers run the list's full batches two at a time: 4 x 1000 tokens
  // take 2 x 22 ms, within 50 ms (one worker: 88 ms, refused).
  Measured two(1000, 2);
  Measured one(1000, 1);
  const std::vector<std::vector<int32_t>> reqs(4, toks(1000));
  EXPECT_NO_THROW(two.s.submit_many(reqs, 0, two.clock->now() + 0.05, false, true));
  EXPECT_THROW(one.s.submit_many(reqs, 0, one.clock->now() + 0.05, false, true), InvalidArgument);
}

TEST(Admission, SubmitManyWholeQueuesAllOrNoneWithTheReasonItRefused) {
  Measured m;
  const double now = m.clock->now();
  m.s.submit(toks(1000));  // a worker is busy-to-be: no request starts at once
  m.s.submit(toks(1000));
  const auto before = m.s.snapshot().stats;
  std::vector<std::vector<int32_t>> reqs(6, toks(500));  // 66 ms alone: in time but for the 2000 ahead
  double retry = 0;
  try {
    m.s.submit_many(reqs, 0, now + 0.07, /*whole=*/true);  // the prefix would fit
    ADD_FAILURE() << "admitted";
  } catch (const Overloaded& e) {
    retry = e.retry_after_s();
  }
  // Reported as the whole of it would end, its last request's completion: 5000 tokens in 5 batches
  // of 22 ms, 0.04 s late (the first one late, in the fourth batch, would say about 0.02 s).
  EXPECT_GT(retry, 0.03);
  EXPECT_EQ(m.s.depth(), 2);
  const auto after = m.s.snapshot().stats;
  EXPECT_EQ(after.refused, before.refused + 1);
  EXPECT_EQ(after.submitted, before.submitted);
  EXPECT_EQ(m.s.submit_many(reqs, 0, now + 10.0, true).size(), 6u);  // in time: all of them
  EXPECT_EQ(m.s.depth(), 8);
}

TEST(Admission, SubmitManyWholeIsQueueFullWhenTheQueueCannotHoldThemAll) {
  auto clock = std::make_shared<ManualClock>(0.0);
  SchedulerConfig sc = engine_scheduler();
  sc.max_queue_requests = 5;
  Scheduler s(sc, engine_controller("static"), clock);
  s.submit(toks(4));
  std::vector<std::vector<int32_t>> reqs(5, toks(4));
  EXPECT_THROW(s.submit_many(reqs, 0, Scheduler::kNoDeadline, true), QueueFull);
  EXPECT_EQ(s.depth(), 1);
  EXPECT_EQ(s.submit_many(reqs, 0).size(), 4u);  // without whole: the prefix that fits
}

TEST(Admission, SubmitManyWholeBeyondTheQueuesBoundsIsInvalidNotFull) {
  // More requests or tokens than the queue can ever hold: no wait helps, so
  // not QueueFull (retry later) but InvalidArgument, on an empty queue too.
  auto clock = std::make_shared<ManualClock>(0.0);
  SchedulerConfig sc = engine_scheduler();
  sc.max_queue_requests = 3;
  sc.max_queue_tokens = 100;
  Scheduler s(sc, engine_controller("static"), clock);
  EXPECT_THROW(s.submit_many(std::vector<std::vector<int32_t>>(4, toks(4)), 0, Scheduler::kNoDeadline, true),
               InvalidArgument);
  EXPECT_THROW(s.submit_many(std::vector<std::vector<int32_t>>(3, toks(34)), 0, Scheduler::kNoDeadline, true),
               InvalidArgument);
  EXPECT_EQ(s.snapshot().stats.rejected, 0);
  EXPECT_EQ(s.submit_many(std::vector<std::vector<int32_t>>(3, toks(33)), 0, Scheduler::kNoDeadline, true).size(),
            3u);  // at the bounds: fits
  // Without whole the same list is a prefix now and the rest later: valid.
  EXPECT_THROW(s.submit_many(std::vector<std::vector<int32_t>>(4, toks(4))), QueueFull);
}

TEST(Admission, SubmitManyWaitingReturnsNothingAndCountsNoRefusal) {
  // A caller with part of its list queued waits for room: each try that
  // finds none is not a refusal (stats stay as the callers saw them).
  auto clock = std::make_shared<ManualClock>(0.0);
  SchedulerConfig sc = engine_scheduler();
  sc.max_queue_requests = 2;
  Scheduler s(sc, engine_controller("static"), clock);
  EXPECT_EQ(s.submit_many({toks(4), toks(4), toks(4)}).size(), 2u);
  for (int i = 0; i < 5; ++i)
    EXPECT_TRUE(s.submit_many({toks(4)}, 0, Scheduler::kNoDeadline, false, /*waiting=*/true).empty());
  EXPECT_EQ(s.snapshot().stats.rejected, 0);
  EXPECT_EQ(s.snapshot().stats.refused, 0);
  EXPECT_THROW(s.submit_many({toks(4)}), QueueFull);  // a new caller is refused, and counted
  EXPECT_EQ(s.snapshot().stats.rejected, 1);
  EXPECT_EQ(s.depth(), 2);
}

TEST(Admission, SubmitManyWaitingIsNotRefusedForLatenessEither) {
  Measured m;
  const double now = m.clock->now();
  m.s.submit(toks(1000));  // a worker is busy-to-be: no request starts at once
  std::vector<std::vector<int32_t>> reqs(2, toks(100));  // 6 ms alone: late only behind the 1000
  const auto before = m.s.snapshot().stats;
  EXPECT_THROW(m.s.submit_many(reqs, 0, now + 0.01), Overloaded);
  EXPECT_TRUE(m.s.submit_many(reqs, 0, now + 0.01, false, /*waiting=*/true).empty());
  const auto after = m.s.snapshot().stats;
  EXPECT_EQ(after.refused, before.refused + 1);  // the first call only
  EXPECT_EQ(m.s.depth(), 1);
}

TEST(Admission, QueuedRequestsPushedPastTheirDeadlineAreShedNotComputed) {
  Measured m;
  const double now = m.clock->now();
  const uint64_t low = m.s.submit(toks(100), 0, now + 0.04);
  // High priority work arrives and jumps ahead: 3000 tokens, ~66 ms.
  for (int i = 0; i < 30; ++i) m.s.submit(toks(100), 1);
  auto b = *m.s.next_batch(0);
  ASSERT_EQ(b->shed, std::vector<uint64_t>{low});
  ASSERT_EQ(b->shed_retry_after_s.size(), 1u);
  EXPECT_GT(b->shed_retry_after_s[0], 0.0);
  for (uint64_t id : b->ids()) EXPECT_NE(id, low);
  const auto st = m.s.snapshot().stats;
  EXPECT_EQ(st.shed, 1);
  EXPECT_EQ(m.s.depth(), 30 - b->size());
}

TEST(Admission, AnIdleWorkerAdmitsWhatWouldStartAtOnceSoAStaleFitIsMeasuredAgain) {
  // The fit says a batch takes ~2-22 ms; a 1 ms timeout cannot be met, but
  // with nothing running or queued the request starts at once: admitted.
  Measured m;
  const double now = m.clock->now();
  const uint64_t first = m.s.submit(toks(50), 0, now + 0.001);
  EXPECT_THROW(m.s.submit(toks(50), 0, now + 0.001), Overloaded);  // now one is queued ahead
  // At formation all queued requests would be late: the least late one
  // still runs (its batch measures the prediction again), the rest is shed.
  m.s.submit(toks(50), 1, now + 0.002);
  auto b = *m.s.next_batch(0);
  ASSERT_EQ(b->size(), 1);
  EXPECT_NE(b->ids()[0], first);  // the priority-1 request, 2 ms of slack, was the least late
  EXPECT_EQ(b->shed, std::vector<uint64_t>{first});
}

// Replicas: several workers take full batches off the queue at once, and a
// request starts at once while any worker is idle.
TEST(Admission, SeveralWorkersDrainTheWorkAheadInParallel) {
  Measured one, two(1000, 2);
  for (auto* m : {&one, &two})
    for (int i = 0; i < 49; ++i) m->s.submit(toks(100));
  // 4950 tokens: five full batches of 22 ms in a row on one worker, three
  // rounds of two on two workers.
  const double t1 = one.s.predict_completion(50) - one.clock->now();
  const double t2 = two.s.predict_completion(50) - two.clock->now();
  EXPECT_NEAR(t2 / t1, 3.0 / 5.0, 0.01);
}

// A dead replica's worker is retired: the work ahead drains on the live
// ones, and a busy live worker is not mistaken for an idle dead one.
TEST(Admission, ARetiredWorkerIsNotCountedToDrainTheWorkAhead) {
  Measured one, two(1000, 2);
  two.s.retire(1);
  two.s.retire(1);  // idempotent
  EXPECT_EQ(two.s.live_workers(), 1);
  EXPECT_EQ(two.s.workers(), 2);
  for (auto* m : {&one, &two})
    for (int i = 0; i < 49; ++i) m->s.submit(toks(100));
  const double t1 = one.s.predict_completion(50) - one.clock->now();
  const double t2 = two.s.predict_completion(50) - two.clock->now();
  EXPECT_NEAR(t2, t1, 1e-12);  // five full batches in a row, as on one worker
  EXPECT_THROW(two.s.retire(2), InvalidArgument);
  EXPECT_THROW(two.s.retire(-1), InvalidArgument);
}

TEST(Admission, WithItsOnlyLiveWorkerBusyARetiredOnesIdlenessAdmitsNothing) {
  Measured m(1000, 2);
  m.s.retire(1);
  m.s.submit(toks(500));
  auto running = *m.s.next_batch(0, 0);  // the live worker runs 12 ms
  m.s.start(*running);
  const double now = m.clock->now();
  // Before: worker 1 counted idle, so this was predicted to start at once.
  EXPECT_THROW(m.s.submit(toks(50), 0, now + 0.001), Overloaded);
  EXPECT_GT(m.s.predict_completion(50) - now, 0.012);
}

TEST(Admission, WithWorker0RetiredTheWorkAheadDrainsOnTheOtherAlone) {
  Measured m(1000, 2);
  m.s.retire(0);
  const auto snap = m.s.snapshot();
  EXPECT_EQ(snap.budget, m.s.budget(1));  // the first live worker's
  for (int i = 0; i < 49; ++i) m.s.submit(toks(100));
  Measured one;  // one worker, same budget: the same prediction
  for (int i = 0; i < 49; ++i) one.s.submit(toks(100));
  EXPECT_NEAR(m.s.predict_completion(50) - m.clock->now(), one.s.predict_completion(50) - one.clock->now(), 1e-12);
}

// A higher class is predicted with the work it cannot be displaced by:
// what is queued at its priority or higher. Lower priority fills its batch
// only as far as its deadline allows (batch formation caps it).
TEST(Admission, AHigherClassIsPredictedWithoutTheLowerQueueItDisplaces) {
  Measured m;
  const double now = m.clock->now();
  for (int i = 0; i < 40; ++i) m.s.submit(toks(100), 0, now + 1.0);  // 4000 low tokens
  // Priority 0: behind 4000 tokens, five batches of 1000 (22 ms each).
  EXPECT_GE(m.s.predict_completion(100, 0) - now, 0.110 * 0.99);
  // Priority 1: nothing of its class queued, so its batch is predicted to
  // hold only itself (2 + 2 ms), not a budget filled with low work (22 ms).
  EXPECT_NEAR(m.s.predict_completion(100, 1) - now, 0.004, 0.001);
  EXPECT_NO_THROW(m.s.submit(toks(100), 1, now + 0.015));
}

TEST(Formation, LowerPriorityJoinsABatchOnlyAsFarAsAHigherMembersDeadlineAllows) {
  Measured m;
  const double now = m.clock->now();
  for (int i = 0; i < 40; ++i) m.s.submit(toks(100), 0, now + 1.0);
  const uint64_t high = m.s.submit(toks(100), 1, now + 0.015);
  // A full budget (1000 tokens) would take 22 ms and end past the high
  // request's deadline: the batch holds at most (15 - 2) ms / 20 us = 650.
  auto b = *m.s.next_batch(0);
  EXPECT_TRUE(b->shed.empty());
  EXPECT_NE(std::find(b->ids().begin(), b->ids().end(), high), b->ids().end());
  EXPECT_LE(b->total_tokens(), 650);
  EXPECT_GE(b->total_tokens(), 500);  // the rest of the room is filled with low work
  // Without a higher-class member the batch fills the budget as before.
  m.s.start(*b);
  m.clock->advance(0.002 + 20e-6 * double(b->total_tokens()));
  m.s.complete(*b, 0.002 + 20e-6 * double(b->total_tokens()));
  auto next = *m.s.next_batch(0);
  EXPECT_EQ(next->total_tokens(), 1000);
}

// A lower class's backlog grows the budget (the controller carries the
// queue), but a batch holding a higher class is not filled with lower work
// past the request latency target (2 D), whatever the higher
// member's deadline: a query (30 s deadline) queued behind a bulk job's
// backlog rode in a full batch of bulk texts (0.5 s p95 over HTTP on the
// 2-core machine).
TEST(Formation, LowerPriorityFillsAHigherClassesBatchOnlyUpToTheLatencyTarget) {
  for (Cost cost : {Cost::Packed, Cost::Padded}) {
    // A budget of 2000 tokens (42 ms) against a request target of 25 ms.
    Measured m(2000, 1, false, 0, cost, 0.025);
    const double now = m.clock->now();
    // The bulk job: without a deadline, or with one a later batch meets.
    for (int i = 0; i < 40; ++i) m.s.submit(toks(100), -100, i % 2 ? now + 30.0 : Scheduler::kNoDeadline);
    const uint64_t high = m.s.submit(toks(100), 0, now + 30.0);
    auto b = *m.s.next_batch(0);
    EXPECT_NE(std::find(b->ids().begin(), b->ids().end(), high), b->ids().end()) << to_string(cost);
    // (25 - 2) ms / 20 us = 1150 tokens at most: the query and ten bulk requests.
    EXPECT_EQ(b->total_tokens(), 1100) << to_string(cost);
    m.s.start(*b);
    m.clock->advance(0.002 + 20e-6 * double(b->total_tokens()));
    m.s.complete(*b, 0.002 + 20e-6 * double(b->total_tokens()));
    // The bulk job alone fills the budget as before.
    EXPECT_EQ((*m.s.next_batch(0))->total_tokens(), 2000) << to_string(cost);
  }
}

// Admission predicts a request in the batch of the work queued ahead of it
// at its priority or higher. The cap above keeps out what can wait, but a
// lower-class request a later batch would make late joins past the target
// (while the batch still ends by every higher member's deadline): admitted
// on that prediction (26 ms, its deadline 27 ms), it used to be left for
// the next batch and end at 28 ms (or, in the queue first, be kept by the
// shed walk and end late all the same).
TEST(Formation, ALowerClassRequestALaterBatchWouldMakeLateJoinsPastTheTarget) {
  for (Cost cost : {Cost::Packed, Cost::Padded}) {
    Measured m(2000, 1, false, 0, cost, 0.025);
    const double now = m.clock->now();
    for (int i = 0; i < 9; ++i) m.s.submit(toks(100), 0, now + 30.0);  // 900 tokens: 20 ms
    for (int i = 0; i < 2; ++i) m.s.submit(toks(100), -1);              // a bulk job, no deadline
    EXPECT_NEAR(m.s.predict_completion(100, -1) - now, 0.026, 1e-6) << to_string(cost);
    const uint64_t due = m.s.submit(toks(100), -1, now + 0.027);
    auto b = *m.s.next_batch(0);
    const auto& ids = b->ids();
    EXPECT_TRUE(b->shed.empty()) << to_string(cost);
    EXPECT_NE(std::find(ids.begin(), ids.end(), due), ids.end()) << to_string(cost);
    // 900 + 200 of the bulk job (24 ms, within the target), then the one
    // due: 1200 tokens, 26 ms.
    EXPECT_EQ(b->total_tokens(), 1200) << to_string(cost);
  }
}

// "Pressed" is judged against the batches after this one as the cap alone
// forms them, not a full budget after the batch grown so far: judged so,
// each pressed join made the next request look pressed too, and a bulk
// list due in 50 ms (whose every request the capped batches meet, the last
// at 44 ms) filled a query's batch to the whole budget (42 ms, not 10).
TEST(Formation, ABulkListTheBatchesAfterTheCapStillServeInTimeStaysOutOfAQuerysBatch) {
  for (Cost cost : {Cost::Packed, Cost::Padded}) {
    Measured m(2000, 1, false, 0, cost, 0.010);  // the cap: (10 - 2) ms / 20 us = 400 tokens
    const double now = m.clock->now();
    m.s.submit_many(std::vector<std::vector<int32_t>>(100, toks(20)), -100, now + 0.050, true, false);
    const uint64_t query = m.s.submit(toks(20), 0, now + 30.0);
    auto b = *m.s.next_batch(0);
    EXPECT_NE(std::find(b->ids().begin(), b->ids().end(), query), b->ids().end()) << to_string(cost);
    EXPECT_EQ(b->total_tokens(), 400) << to_string(cost);
  }
}

// Padded formation meets rows in length order, not queue order: what the
// batches after this one take ahead of a row is counted in queue order.
// Counted as met, a lower class's newer rows (passed first, nearer the
// query in length-and-id order) made an older list's rows look pressed,
// and they filled the query's batch though the next batch served them in
// time.
TEST(Formation, PaddedCountsWhatTheBatchesAfterTakeAheadOfARowInQueueOrder) {
  Measured m(2000, 1, false, 0, Cost::Padded, 0.010);  // the cap: 400 tokens
  const double now = m.clock->now();
  const auto older = m.s.submit_many(std::vector<std::vector<int32_t>>(20, toks(20)), -100, now + 0.025, true, false);
  m.s.submit_many(std::vector<std::vector<int32_t>>(60, toks(20)), -200, Scheduler::kNoDeadline, true, false);
  m.s.submit(toks(20), 0, now + 30.0);
  auto b = *m.s.next_batch(0);
  EXPECT_TRUE(b->shed.empty());
  EXPECT_EQ(b->total_tokens(), 400);
  m.s.start(*b);
  m.clock->advance(0.010);
  m.s.complete(*b, 0.010);
  // The older list runs next, whole, ending at 20 ms: within its 25 ms.
  auto next = *m.s.next_batch(0);
  EXPECT_TRUE(next->shed.empty());
  for (uint64_t id : older) EXPECT_NE(std::find(next->ids().begin(), next->ids().end(), id), next->ids().end());
  EXPECT_EQ(next->total_tokens(), 400);
}

TEST(Formation, ALowerClassRequestQueuedBeforeTheHigherWorkStillMakesItsDeadline) {
  Measured m(2000, 1, false, 0, Cost::Packed, 0.025);
  const double now = m.clock->now();
  // Admitted at once (an idle worker), then 900 tokens of a higher class
  // arrive: together 1200 tokens, 26 ms, past the 25 ms target; a batch
  // after theirs would end at 28 ms, past its 27 ms deadline.
  const uint64_t low = m.s.submit(toks(300), -1, now + 0.027);
  for (int i = 0; i < 9; ++i) m.s.submit(toks(100), 0, now + 30.0);
  auto b = *m.s.next_batch(0);
  EXPECT_TRUE(b->shed.empty());
  EXPECT_NE(std::find(b->ids().begin(), b->ids().end(), low), b->ids().end());
  EXPECT_EQ(b->total_tokens(), 1200);
}

// Padded cost grows the batch around the head in length order: a lower-class
// neighbour the class rule turns away is passed over, and requests of the
// head's class beyond it (same length, later ids) still join. It used to end
// that side, and 15 bulk requests ran while 4 of the head's class waited.
TEST(Formation, APaddedBatchPassesOverALowerClassNeighbourToTheHeadsClassBeyondIt) {
  Measured m(2000, 1, false, 0, Cost::Padded, 0.025);
  const double now = m.clock->now();
  const uint64_t head = m.s.submit(toks(70), 0, now + 30.0);
  for (int i = 0; i < 25; ++i) m.s.submit(toks(70), -100);
  std::vector<uint64_t> same;
  for (int i = 0; i < 4; ++i) same.push_back(m.s.submit(toks(70), 0, now + 30.0));
  auto b = *m.s.next_batch(0);
  const auto& ids = b->ids();
  EXPECT_NE(std::find(ids.begin(), ids.end(), head), ids.end());
  for (uint64_t id : same) EXPECT_NE(std::find(ids.begin(), ids.end(), id), ids.end()) << id;
  // The bulk requests joined while the batch ended within the 25 ms target:
  // (25 - 2) ms / 20 us = 1150 tokens, 16 rows of 70.
  EXPECT_EQ(b->size(), 16 + 4);
}

TEST(Formation, WithExtendPastBudgetARequestALaterBatchWouldMakeLateJoinsPastIt) {
  Measured m(200, 1, true);  // budget 200 tokens: 6 ms a batch
  const double now = m.clock->now();
  // Three requests of 100 tokens due in 9 ms: two batches (6 + 6 ms) would
  // make the third late; one batch of 300 (8 ms) meets every deadline.
  std::vector<uint64_t> ids;
  for (int i = 0; i < 3; ++i) ids.push_back(m.s.submit(toks(100), 0, now + 0.009));
  // Admission predicts the one batch past the budget while it leaves the
  // earliest deadline ahead a tail's margin: a fourth (400 tokens, 10 ms)
  // does not fit before 9 ms, two rounds (12 ms) neither: refused.
  EXPECT_NEAR(m.s.predict_completion(100, 0) - now, 0.012, 1e-6);
  auto b = *m.s.next_batch(0);
  EXPECT_TRUE(b->shed.empty());
  EXPECT_EQ(b->size(), 3);
  EXPECT_EQ(b->total_tokens(), 300);
  // With time to spare the third waits for the next batch: the budget holds.
  Measured n(200, 1, true);
  for (int i = 0; i < 3; ++i) n.s.submit(toks(100), 0, n.clock->now() + 0.020);
  EXPECT_EQ((*n.s.next_batch(0))->total_tokens(), 200);
}

TEST(Admission, WithExtendPastBudgetAPredictionCountsOneBatchWhenTheDeadlinesAheadAllowIt) {
  Measured m(200, 1, true);
  const double now = m.clock->now();
  for (int i = 0; i < 3; ++i) m.s.submit(toks(100), 0, now + 0.011);
  // 400 tokens: one batch of 10 ms fits the earliest deadline ahead (11 ms);
  // in rounds of the budget it would be two of 6 ms.
  EXPECT_NEAR(m.s.predict_completion(100, 0) - now, 0.010, 1e-6);
  // Off (the default): two rounds of the budget.
  Measured off(200);
  for (int i = 0; i < 3; ++i) off.s.submit(toks(100), 0, off.clock->now() + 0.1);
  EXPECT_NEAR(off.s.predict_completion(100, 0) - off.clock->now(), 0.012, 1e-6);
}

TEST(Admission, AnIdleReplicaAdmitsWhatWouldStartAtOnce) {
  Measured one, two(1000, 2);
  for (auto* m : {&one, &two}) {
    m->s.submit(toks(800));
    auto running = *m->s.next_batch(0, 0);  // worker 0 busy for ~18 ms
    m->s.start(*running);
  }
  // 1 ms of slack: only a free worker can start it in time.
  EXPECT_THROW(one.s.submit(toks(50), 0, one.clock->now() + 0.001), Overloaded);
  EXPECT_NO_THROW(two.s.submit(toks(50), 0, two.clock->now() + 0.001));
}

TEST(Admission, OffAdmitsAndShedsNothing) {
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(engine_scheduler(false), engine_controller("static"), clock);
  for (int n : {100, 800, 300}) {
    s.submit(toks(n));
    auto b = *s.next_batch(0);
    clock->advance(0.01);
    s.complete(*b, 0.002 + 20e-6 * n);
  }
  EXPECT_TRUE(std::isinf(s.predict_completion(10)));
  for (int i = 0; i < 100; ++i) s.submit(toks(100), 0, clock->now() + 0.01);
  auto b = *s.next_batch(0);
  EXPECT_TRUE(b->shed.empty());
}

// ------------------------------------------------- items 2-4: under load

TEST(UnderLoad, AcceptedRequestsKeepTheTargetAndGoodputHoldsPastCapacity) {
  const double cap = capacity_rps();
  double peak = 0;
  std::map<double, Sim::Figures> at;
  for (double x : {0.1, 0.5, 0.9, 1.0, 2.0, 4.0}) {
    Sim sim;
    sim.run(arrivals({{x * cap, 4.0}}, 11 + unsigned(x * 10)));
    const auto f = sim.figures(1.0, 4.0);
    at[x] = f;
    peak = std::max(peak, f.goodput_rps);
    // Accepted requests meet the target at the 99th percentile at every load.
    EXPECT_LE(f.p99_done, kTarget) << x << "x capacity";
    if (x <= 0.5) {  // light load: nothing refused or shed, all within target
      EXPECT_EQ(f.refused + f.shed + f.expired, 0) << x << "x";
      EXPECT_GE(f.good_fraction(), 0.99) << x << "x";
    }
  }
  for (double x : {2.0, 4.0}) {
    EXPECT_GE(at[x].goodput_rps, 0.9 * peak) << x << "x: goodput " << at[x].goodput_rps << " peak " << peak;
    EXPECT_GT(at[x].refused, 0) << x << "x: the excess is refused at the door";
  }
}

TEST(UnderLoad, WithoutAdmissionGoodputCollapsesPastCapacity) {
  // The same arrivals at 2x without admission: the queue grows and most
  // requests finish late (what admission prevents).
  const double cap = capacity_rps();
  SchedulerConfig sc = engine_scheduler(false);
  Sim with, without(engine_controller(), sc);
  const auto arr = arrivals({{2 * cap, 3.0}}, 3);
  with.run(arr);
  without.run(arr);
  EXPECT_LT(without.figures(1, 3).goodput_rps, 0.5 * with.figures(1, 3).goodput_rps);
}

TEST(UnderLoad, AStepInCostIsFollowedAndTheTargetHeld) {
  // At 0.8x capacity the per-token cost rises by half at t = 2 s (0.8x becomes
  // 1.2x of the new capacity) and falls back at t = 4 s.
  const double cap = capacity_rps();
  Sim sim;
  const CostModel cheap{}, dear{0.002, 30e-6, 0.0};
  sim.run(arrivals({{0.8 * cap, 6.0}}, 21), [&](double t) { return t >= 2 && t < 4 ? dear : cheap; });
  for (auto [from, to] : {std::pair{1.0, 2.0}, {2.5, 4.0}, {4.5, 6.0}}) {
    const auto f = sim.figures(from, to);
    EXPECT_LE(f.p99_done, kTarget) << "[" << from << ", " << to << ")";
  }
  EXPECT_GE(sim.figures(4.5, 6.0).good_fraction(), 0.97);
}

TEST(UnderLoad, PoissonAndBurstyArrivalsKeepTheP99OfAcceptedRequests) {
  const double cap = capacity_rps();
  // Bursts: 0.5x for 0.5 s, 1.5x for 0.5 s, repeated.
  std::vector<std::pair<double, double>> phases;
  for (int k = 0; k < 6; ++k) phases.push_back({(k % 2 ? 1.5 : 0.5) * cap, 0.5});
  Sim sim;
  sim.run(arrivals(phases, 31));
  EXPECT_LE(sim.figures(0.5, 3.0).p99_done, kTarget);
  for (int k = 1; k < 6; ++k) {
    const auto f = sim.figures(0.5 * k + 0.05, 0.5 * (k + 1));
    if (k % 2) {  // a burst: served at capacity, the rest refused or shed
      EXPECT_GE(f.goodput_rps, 0.9 * cap) << "burst " << k;
    } else {  // between bursts: no backlog left
      EXPECT_GE(f.good_fraction(), 0.98) << "lull " << k;
    }
  }
}

// Seconds after `step` until the budget stays within +-band of its mean over
// the last `tail` seconds of the run.
double settling_s(const std::vector<std::pair<double, int64_t>>& budgets, double step, double end, double tail,
                  double band) {
  double sum = 0;
  int n = 0;
  for (auto [t, b] : budgets)
    if (t >= end - tail && t < end) sum += double(b), ++n;
  const double final_mean = sum / n;
  double last_out = step;
  for (auto [t, b] : budgets)
    if (t >= step && t < end && std::fabs(double(b) / final_mean - 1) > band) last_out = t;
  return last_out - step;
}

TEST(Bursts, TheBudgetSettlesWithinOneSecondAfterAStepFrom03To09) {
  const double cap = capacity_rps();
  Sim sim;
  sim.run(arrivals({{0.3 * cap, 3.0}, {0.9 * cap, 3.0}}, 41));
  const double settle = settling_s(sim.budgets, 3.0, 6.0, 1.5, 0.2);
  EXPECT_LE(settle, 1.0);
  EXPECT_LE(sim.figures(4.0, 6.0).p99_done, kTarget);
}

TEST(Bursts, BeyondCapacityServesAtCapacityShedsTheRestAndRecoversWithoutBacklog) {
  const double cap = capacity_rps();
  Sim sim;
  sim.run(arrivals({{0.5 * cap, 2.0}, {3.0 * cap, 1.0}, {0.5 * cap, 2.0}}, 51));
  const auto burst = sim.figures(2.0, 3.0);
  // Served at capacity: the burst's goodput is at least 80% of capacity
  // (the first batches of the burst still run at the light-load budget).
  EXPECT_GE(burst.goodput_rps, 0.8 * cap);
  EXPECT_GT(burst.refused + burst.shed, 0);
  EXPECT_LE(burst.p99_done, kTarget);
  // After the burst: no backlog, everything within target again.
  const auto after = sim.figures(3.1, 5.0);
  EXPECT_EQ(after.refused + after.shed + after.expired, 0);
  EXPECT_GE(after.good_fraction(), 0.99);
}

// Noisy compute, as on a shared 2-core machine: log-normal noise of 25%;
// while overloaded (the callers compete for the cores) batches run 1.3x
// slower and one in ten runs 3-4x its model time, afterwards one in fifty.
// With stall_s > 0, a batch also stalls 0.5-1.5 stall_s (a preempted
// thread: its length does not depend on the batch) in one batch in five
// while overloaded, one in twenty afterwards.
void noisy(Sim& sim, double overload_end, double stall_s = 0) {
  sim.noise = std::lognormal_distribution<double>(-0.25 * 0.25 / 2, 0.25);
  sim.outlier_share = [overload_end](double t) { return t < overload_end ? 0.10 : 0.02; };
  sim.slowdown = [overload_end](double t) { return t < overload_end ? 1.3 : 1.0; };
  sim.stall_s = stall_s;
  sim.stall_share = [overload_end, stall_s](double t) { return stall_s <= 0 ? 0.0 : t < overload_end ? 0.2 : 0.05; };
}

double mean_budget(const Sim& sim, double from, double to) {
  double sum = 0;
  int n = 0;
  for (auto [t, b] : sim.budgets)
    if (t >= from && t < to) sum += double(b), ++n;
  return n ? sum / n : 0;
}

TEST(Noise, AfterOverloadWithOutliersTheBudgetRecovers) {
  // 4x capacity for 3 s, then 0.5x for 4 s. The budget in the last two
  // seconds must be that of a run that saw only the 0.5x phase (same noise),
  // and the 0.5x phase served as well as in that run: the overload leaves
  // no lasting trace. (On the real machine a q95 ratio of actual / predicted
  // compute, stuck near its cap of 4 after a 4x run, divided the budget:
  // 133 -> 42 tokens. The tail is now additive seconds over a window of
  // batches. With the ratio, this test ended at 66% of the fresh budget
  // without stalls, 95.2% vs 97.1% within target, and with 20 ms stalls the
  // fresh run itself served only 77%, against 91% now.)
  const double cap = capacity_rps();
  for (double stall : {0.0, 0.01, 0.02}) {
    Sim after_overload, fresh;
    noisy(after_overload, 3.0, stall);
    noisy(fresh, 0.0, stall);
    after_overload.run(arrivals({{4 * cap, 3.0}, {0.5 * cap, 4.0}}, 81));
    fresh.run(arrivals({{0.5 * cap, 4.0}}, 82));
    const double recovered = mean_budget(after_overload, 5.0, 7.0), reference = mean_budget(fresh, 2.0, 4.0);
    EXPECT_GE(recovered, 0.8 * reference) << "stall " << stall << ": recovered " << recovered << " fresh " << reference;
    const auto f = after_overload.figures(4.0, 7.0), g = fresh.figures(1.0, 4.0);
    EXPECT_GE(f.good_fraction(), std::min(0.97, g.good_fraction() - 0.01))
        << "stall " << stall << ": refused " << f.refused << " shed " << f.shed << "; fresh run " << g.good_fraction();
    if (stall == 0) EXPECT_GE(f.good_fraction(), 0.97);
    EXPECT_LE(f.p99_done, kTarget) << "stall " << stall;
  }
}

TEST(Noise, OutliersDoNotShrinkTheBudgetBelowWhatTheLoadNeeds) {
  // At 0.9x capacity with noisy compute the default policy's goodput is at
  // least 95% of the best static budget's on the same arrivals (the real
  // machine's first run: 80%), with and without stalls.
  const double cap = capacity_rps();
  const auto arr = arrivals({{0.9 * cap, 5.0}}, 83);
  for (double stall : {0.0, 0.01, 0.02}) {
    Sim model;
    noisy(model, 0.0, stall);
    model.run(arr);
    double best = 0;
    int64_t best_budget = 0;
    for (int64_t budget : {256, 512, 1024, 2048}) {
      ControllerConfig cc = engine_controller("static");
      cc.initial_tokens = budget;
      Sim st(cc);
      noisy(st, 0.0, stall);
      st.run(arr);
      if (st.figures(1.0, 5.0).goodput_rps > best) best = st.figures(1.0, 5.0).goodput_rps, best_budget = budget;
    }
    const auto f = model.figures(1.0, 5.0);
    EXPECT_GE(f.goodput_rps, 0.95 * best) << "stall " << stall << ": model " << f.goodput_rps << " best static "
                                          << best << " (budget " << best_budget << "), model refused " << f.refused
                                          << " shed " << f.shed << " of " << f.n << ", mean budget "
                                          << mean_budget(model, 1.0, 5.0);
  }
}

// ----------------------------------------------------------------- item 6

// Short requests' fraction within the target on a mix where one text in ten
// is ten times longer, attention counted in the cost model (c * sum(len^2),
// c / b = 1 / 500). The rate is 0.8x of the mix's capacity: the mix costs
// about 2.35x the plain one per request.
double short_good_fraction(int64_t attention_tokens, int64_t long_apart_tokens = 0, double* goodput = nullptr,
                           int layers = 0) {
  const CostModel m{0.002, 20e-6, 4e-8};
  auto arr = arrivals({{0.8 * capacity_rps() / 2.35, 5.0}}, 71);
  std::mt19937 rng(72);
  std::vector<bool> is_long;
  for (auto& a : arr) {
    const bool l = std::uniform_real_distribution<double>(0, 1)(rng) < 0.1;
    if (l) a.len = std::min(a.len * 10, 512);
    is_long.push_back(l);
  }
  SchedulerConfig sc = engine_scheduler();
  sc.attention_tokens = attention_tokens;
  sc.long_apart_tokens = long_apart_tokens;
  sc.preempt_layers = layers;
  Sim sim(engine_controller(), sc);
  sim.layers = layers;
  sim.run(arr, m);
  std::vector<double> lat;
  int64_t n = 0, good = 0;
  for (size_t i = 0; i < sim.rec.size(); ++i) {
    const Record& r = sim.rec[i];
    if (is_long[i] || r.arrival < 1.0) continue;
    ++n;
    if (r.outcome == Outcome::Done) lat.push_back(r.latency);
    good += r.outcome == Outcome::Done && r.latency <= kTarget;
  }
  std::sort(lat.begin(), lat.end());
  EXPECT_LE(lat[static_cast<size_t>(0.99 * double(lat.size()))], kTarget);  // accepted short requests
  if (goodput) *goodput = sim.figures(1.0, 5.0).goodput_rps;
  return double(good) / double(n);
}

TEST(LongInputs, CountingAttentionInTheCostKeepsShortRequestsWithinTheTarget) {
  // Charged by tokens alone, batches holding long inputs run past their
  // prediction: the fit's slope and the tail ratio grow, the budget shrinks
  // and short requests are refused. Charged with attention, the cost is
  // what the batch computes.
  const double tokens_only = short_good_fraction(0), with_attention = short_good_fraction(500);
  EXPECT_GE(with_attention, 0.98);
  EXPECT_GT(with_attention, tokens_only);
}

TEST(LongInputs, BatchingLongInputsApartAddsLittleOnceAttentionIsCounted) {
  // The second option of the issue, on the same mix: requests over 100
  // tokens (the long ones: 10x a median of 24) never share a batch with
  // short ones. Measured: short requests 98.6% within target with attention
  // counted, 98.9% with attention and apart, 95.0% apart by tokens alone;
  // the same goodput. Counting attention does the work; apart is off by
  // default (SchedulerConfig::long_apart_tokens).
  double good_attention = 0, good_apart = 0;
  const double with_attention = short_good_fraction(500, 0, &good_attention);
  const double apart = short_good_fraction(500, 100, &good_apart);
  const double apart_tokens_only = short_good_fraction(0, 100);
  EXPECT_GE(apart, 0.98);
  EXPECT_LT(apart - with_attention, 0.01);
  EXPECT_LT(apart_tokens_only, with_attention);
  EXPECT_NEAR(good_apart, good_attention, 0.02 * good_attention);
}

// ----------------------------------------------------------------- item 5

TEST(PriorityClasses, AtTwiceCapacityTheHighClassKeepsItsSloAndTheLowClassIsShedFirst) {
  const double cap = capacity_rps();
  Sim sim;
  // 2x capacity in all; a quarter of it (0.5x capacity) is high priority.
  sim.run(arrivals({{2 * cap, 4.0}}, 61, 0.25));
  const auto high = sim.figures(1.0, 4.0, 1), low = sim.figures(1.0, 4.0, 0);
  EXPECT_GE(high.good_fraction(), 0.99) << "refused " << high.refused << " shed " << high.shed;
  EXPECT_LE(high.p99_done, kTarget);
  EXPECT_LE(low.p99_done, kTarget);
  EXPECT_GT(low.refused + low.shed, low.n / 3);
}

TEST(PriorityClasses, WithNoisyComputeTheHighClassStillComesFirstButMissesItsSlo) {
  // The same 2x run with the noise of the Noise tests (25% log-normal, one
  // batch in fifty 3-4x long, 10-30 ms stalls in one in twenty). Not met:
  // with the tail J in every prediction, a high request whose wait ran long
  // is shed at batch formation, so the high class falls well short of 99%
  // (82% within target before a class was predicted and batched apart from
  // the lower one, 85.7% since: 176 shed, 47 refused; the low class 30%; the
  // real machine: 58-73%, docs/design.md). Shedding on the fitted compute alone (without
  // J) was tried: high rose to 86-90% but accepted requests' p99 passed the
  // target in three other tests. What holds is the order of the classes.
  const double cap = capacity_rps();
  Sim sim;
  noisy(sim, 0.0, 0.01);
  sim.run(arrivals({{2 * cap, 4.0}}, 61, 0.25));
  const auto high = sim.figures(1.0, 4.0, 1), low = sim.figures(1.0, 4.0, 0);
  EXPECT_GE(high.good_fraction(), 0.75);
  EXPECT_GT(high.good_fraction(), 2 * low.good_fraction());
  EXPECT_GT(low.refused + low.shed, 3 * (high.refused + high.shed));
}

}  // namespace
}  // namespace fastserve

namespace fastserve {
namespace {

// ------------------------------------------------- item 6, third option:
// pausing a running batch between layers for urgent requests.

// A low batch of 1000 tokens (22 ms) running; `done` of its 6 layers run.
struct Paused {
  Measured m;
  std::shared_ptr<Batch> low;
  double t0;
  explicit Paused(int low_priority = 0, double low_timeout = 1.0, int workers = 1, int64_t layers = 6)
      : m(1000, workers, false, layers) {
    t0 = m.clock->now();
    for (int i = 0; i < 10; ++i) m.s.submit(toks(100), low_priority, t0 + low_timeout);
    low = *m.s.next_batch(0);
    EXPECT_EQ(low->total_tokens(), 1000);
    m.s.start(*low);
  }
};

TEST(Preempt, AHigherClassBehindALowBatchRunsBetweenLayersAndTheBatchResumes) {
  Paused p;
  p.m.clock->advance(0.022 / 6);  // one layer of six run
  const double now = p.m.clock->now();
  // Waiting for the low batch (18 ms more) and its own batch (4 ms) would
  // miss a 15 ms deadline; admission predicts it a layer's wait (3.7 ms).
  EXPECT_NEAR(p.m.s.predict_completion(100, 1) - now, 0.022 / 6 + 0.004, 0.001);
  const uint64_t high = p.m.s.submit(toks(100), 1, now + 0.015);
  auto urgent = p.m.s.preempt(*p.low, 1.0 / 6);
  ASSERT_TRUE(urgent);
  EXPECT_EQ((*urgent)->ids(), std::vector<uint64_t>{high});
  EXPECT_EQ(p.m.s.snapshot().stats.preempted, 1);
  // Inside the urgent batch nothing pauses, and the paused batch's end now
  // includes it: a low request is predicted after both.
  p.m.s.submit(toks(100), 1, now + 0.015);
  EXPECT_FALSE(p.m.s.preempt(**urgent, 0.5));
  EXPECT_GE(p.m.s.predict_completion(100, 0) - now, 0.022 * 5 / 6 + 0.004);
  EXPECT_TRUE(p.m.s.start(**urgent).empty());
  p.m.clock->advance(0.004);
  p.m.s.complete(**urgent, 0.004);
  p.m.s.complete(*p.low, 0.022);
  EXPECT_EQ(p.m.s.snapshot().stats.completed, 6 + 10 + 1);
}

TEST(Preempt, OffByDefaultAndTheSameRequestIsRefused) {
  Paused p(0, 1.0, 1, 0);
  p.m.clock->advance(0.022 / 6);
  const double now = p.m.clock->now();
  EXPECT_THROW(p.m.s.submit(toks(100), 1, now + 0.015), Overloaded);
  p.m.s.submit(toks(100), 1, now + 1.0);
  EXPECT_FALSE(p.m.s.preempt(*p.low, 1.0 / 6));
}

TEST(Preempt, NeverForItsOwnClassOrALowerOneEvenWhenWaitingMakesItLate) {
  // A request of the running batch's class, admitted on time (18.3 + 4 ms
  // of a 25 ms deadline), is late once the batch stalls 10 ms; neither it
  // nor one of a lower class pauses the batch.
  Paused p(1);
  p.m.clock->advance(0.022 / 6);
  p.m.s.submit(toks(100), 1, p.m.clock->now() + 0.025);
  p.m.s.submit(toks(100), 0, p.m.clock->now() + 1.0);
  EXPECT_FALSE(p.m.s.preempt(*p.low, 1.0 / 6));
  p.m.clock->advance(0.022 / 6 + 0.010);
  EXPECT_FALSE(p.m.s.preempt(*p.low, 2.0 / 6));
  EXPECT_EQ(p.m.s.snapshot().stats.preempted, 0);
}

TEST(Preempt, LowerRowsThePauseMakesLateAreDroppedAndShedTheRestRun) {
  // The low batch's rows are due 24 ms (late once paused: 18.3 + 4 ms from
  // 3.7 ms) or 30 ms after it starts (still on time).
  for (const double member_timeout : {0.024, 0.030}) {
    Paused p(0, member_timeout);
    p.m.clock->advance(0.022 / 6);
    p.m.s.submit(toks(100), 1, p.m.clock->now() + 0.015);
    const auto before = p.m.s.snapshot();
    auto urgent = p.m.s.preempt(*p.low, 1.0 / 6);
    ASSERT_TRUE(urgent);
    const size_t dropped = member_timeout < 0.025 ? 10 : 0;
    EXPECT_EQ((*urgent)->shed.size(), dropped);
    EXPECT_EQ((*urgent)->shed_retry_after_s.size(), dropped);
    EXPECT_EQ(p.low->abandoned, (*urgent)->shed);
    for (double late : (*urgent)->shed_retry_after_s) EXPECT_GT(late, 0.0);
    p.m.s.start(**urgent);
    p.m.s.complete(**urgent, 0.004);
    p.m.s.complete(*p.low, 0.022);
    const auto after = p.m.s.snapshot();
    EXPECT_EQ(after.stats.shed - before.stats.shed, static_cast<int64_t>(dropped));
    EXPECT_EQ(after.stats.completed - before.stats.completed, 1 + 10 - static_cast<int64_t>(dropped));
  }
}

TEST(Preempt, NotWhileAnotherWorkerIsIdle) {
  Paused p(0, 1.0, 2);
  p.m.clock->advance(0.022 / 6);
  p.m.s.submit(toks(100), 1, p.m.clock->now() + 0.015);
  EXPECT_FALSE(p.m.s.preempt(*p.low, 1.0 / 6));  // worker 1 takes it
  auto b = p.m.s.next_batch(0, 1);
  ASSERT_TRUE(b);
  EXPECT_EQ((*b)->size(), 1);
}

TEST(Preempt, TheUrgentBatchTakesItsClassWhileEveryDeadlineHolds) {
  Paused p;
  p.m.clock->advance(0.022 / 6);
  const double now = p.m.clock->now();
  // Five high requests of 100 tokens, the first due in 8.5 ms: a batch of
  // k runs 2 + 2k ms (+ the small tail), so three fit; the low class is
  // never taken.
  p.m.s.submit(toks(100), 1, now + 0.0085);
  for (int i = 0; i < 4; ++i) p.m.s.submit(toks(100), 1, now + 1.0);
  p.m.s.submit(toks(100), 0, now + 1.0);
  auto urgent = p.m.s.preempt(*p.low, 1.0 / 6);
  ASSERT_TRUE(urgent);
  EXPECT_EQ((*urgent)->size(), 3);
  for (int prio : (*urgent)->priorities()) EXPECT_EQ(prio, 1);
  EXPECT_THROW(p.m.s.preempt(*p.low, 1.5), InvalidArgument);
}

// The simulated engine with pausing: six layers.
SchedulerConfig with_layers(SchedulerConfig sc, int64_t layers = 6) {
  sc.preempt_layers = layers;
  return sc;
}
struct PausingSim : Sim {
  explicit PausingSim(ControllerConfig cc = engine_controller(), SchedulerConfig sc = engine_scheduler())
      : Sim(cc, with_layers(sc)) {
    layers = 6;
  }
};

// The figures of a two-class run (high: priority 1), over [from, to).
struct ClassFigures {
  Sim::Figures high, low, all;
  int64_t pauses;
  ClassFigures(const Sim& sim, double from, double to)
      : high(sim.figures(from, to, 1)), low(sim.figures(from, to, 0)), all(sim.figures(from, to)),
        pauses(sim.s.snapshot().stats.preempted) {}
};

TEST(Preempt, InTheCpuRegimeTheHighClassGainsAndTheLowerClassIsShedNotServedLate) {
  // The 2-core CPU's regime (benchmarks/README.md, "Overload"): a request
  // alone costs 60% of the target (15 ms + 0.5 ms per token), so batches
  // hold one request and a high request that arrives as one starts waits
  // for all of it. Two classes at 2x, a quarter high. Measured: the high
  // class 62.6% within target unpaused, 80.8% paused (refusals 102 -> 51);
  // the low class, whose rows a pause would make late are dropped, keeps its
  // accepted p99 near where it was (52.4 -> 54.8 ms; without the drop it
  // was 114 ms); total goodput falls from 33.8 to 27.9 req/s (compute spent
  // on dropped rows, and high requests run alone).
  const CostModel cpu{0.015, 0.0005, 0.0};
  const auto arr = arrivals({{2.0 / (cpu.a + cpu.b * 29), 20.0}}, 62, 0.25);
  Sim plain;
  plain.run(arr, cpu);
  PausingSim paused;
  paused.run(arr, cpu);
  const ClassFigures before(plain, 2.0, 20.0), after(paused, 2.0, 20.0);
  EXPECT_GE(after.high.good_fraction(), before.high.good_fraction() + 0.1);
  EXPECT_GT(after.pauses, 50);
  EXPECT_LE(after.high.p99_done, kTarget);
  EXPECT_LE(after.low.p99_done, 1.1 * before.low.p99_done);
  EXPECT_GE(after.all.goodput_rps, 0.75 * before.all.goodput_rps);
}

TEST(Preempt, AtTwiceCapacityWithNoisyComputeBatchesHoldTheHighClassAndPauseNothing) {
  // PriorityClasses' noisy 2x run with pausing. Here a batch holds ~40
  // requests and nearly every one some of the high class, which its own
  // class does not pause: no pause in 3 s, the high class 85.7% -> 86.9%
  // within target (admission's class-aware wait), goodput 1439 -> 1432
  // req/s. Pausing within a class when waiting was predicted late (tried)
  // took the high class to 92.6% here, with 11 pauses, but on the real
  // machine it put the single-class 2x and 4x p99 at 89-115 ms against
  // 59-108 ms without (docs/design.md, "Pausing a batch").
  const double cap = capacity_rps();
  const auto arr = arrivals({{2 * cap, 4.0}}, 61, 0.25);
  Sim plain;
  noisy(plain, 0.0, 0.01);
  plain.run(arr);
  PausingSim paused;
  noisy(paused, 0.0, 0.01);
  paused.run(arr);
  const ClassFigures before(plain, 1.0, 4.0), after(paused, 1.0, 4.0);
  EXPECT_GE(after.high.good_fraction(), before.high.good_fraction() - 0.01);
  EXPECT_LE(after.low.p99_done, before.low.p99_done);
  EXPECT_NEAR(after.all.goodput_rps, before.all.goodput_rps, 0.02 * before.all.goodput_rps);
}

}  // namespace
}  // namespace fastserve
