// Scheduler behaviour on a simulated clock: ordering, aging, deadlines,
// cancellation, capacity, closing, and length-grouped batch assembly.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "fastserve/errors.h"
#include "fastserve/scheduler.h"

namespace fastserve {
namespace {

std::vector<int32_t> toks(int n, int32_t first = 1) {
  std::vector<int32_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = first + i;
  return t;
}

ControllerConfig fixed_budget(int64_t tokens) {
  ControllerConfig c;
  c.policy = "static";
  c.min_tokens = 1;
  c.max_tokens = tokens;
  c.initial_tokens = tokens;
  return c;
}

// Most tests here are about ordering, budgets and bookkeeping, not about
// how much padding a batch may carry: they turn the min_fill floor off.
SchedulerConfig any_fill() {
  SchedulerConfig c;
  c.min_fill = 0;
  return c;
}

struct Fixture {
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(0.0);
  Scheduler s;
  explicit Fixture(SchedulerConfig sc = any_fill(), ControllerConfig cc = fixed_budget(4096))
      : s(sc, cc, clock) {}
  std::shared_ptr<Batch> next() {
    auto b = s.next_batch(0);
    return b ? *b : nullptr;
  }
  // Ids in the order one-request batches come out.
  std::vector<uint64_t> drain_one_by_one() {
    std::vector<uint64_t> out;
    while (auto b = next()) {
      for (uint64_t id : b->ids()) out.push_back(id);
      s.complete(*b, 0.001);
    }
    return out;
  }
};

SchedulerConfig one_per_batch() {
  SchedulerConfig c;
  c.max_batch_size = 1;
  return c;
}

TEST(SchedulerOrder, HigherPriorityGoesFirstThenOlder) {
  Fixture f(one_per_batch());
  const uint64_t low = f.s.submit(toks(3), 0);
  f.clock->advance(0.01);
  const uint64_t high_old = f.s.submit(toks(3), 2);
  f.clock->advance(0.01);
  const uint64_t mid = f.s.submit(toks(3), 1);
  f.clock->advance(0.01);
  const uint64_t high_new = f.s.submit(toks(3), 2);
  EXPECT_EQ(f.drain_one_by_one(), (std::vector<uint64_t>{high_old, high_new, mid, low}));
}

TEST(SchedulerOrder, SameTimeSamePriorityIsFirstComeFirstServed) {
  Fixture f(one_per_batch());
  std::vector<uint64_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(f.s.submit(toks(2)));
  EXPECT_EQ(f.drain_one_by_one(), ids);
}

// Effective priority is priority + wait / aging_s: a request of priority p
// arriving at t overtakes one of priority 0 that arrived at 0 exactly when
// t < p * aging_s; at t == p * aging_s they tie and the older goes first.
TEST(SchedulerAging, LowPriorityGoesBeforeHighPriorityThatArrivesMoreThanAgingLater) {
  SchedulerConfig sc = one_per_batch();
  sc.aging_s = 0.5;
  for (int p : {1, 2, 3}) {
    const double crossover = p * sc.aging_s;
    for (double dt : {-0.125, 0.0, 0.125}) {
      Fixture f(sc);
      const uint64_t low = f.s.submit(toks(4), 0);
      f.clock->set(crossover + dt);
      const uint64_t high = f.s.submit(toks(4), p);
      const auto order = f.drain_one_by_one();
      const std::vector<uint64_t> high_first{high, low}, low_first{low, high};
      EXPECT_EQ(order, dt < 0 ? high_first : low_first) << "p=" << p << " dt=" << dt;
    }
  }
}

TEST(SchedulerAging, AgedLowPriorityStillWaitsBehindOlderHighPriority) {
  SchedulerConfig sc = one_per_batch();
  sc.aging_s = 1.0;
  Fixture f(sc);
  const uint64_t high = f.s.submit(toks(2), 5);
  f.clock->set(0.5);
  const uint64_t low = f.s.submit(toks(2), 0);
  f.clock->set(100.0);  // both aged 100 levels: the gap never closes
  EXPECT_EQ(f.drain_one_by_one(), (std::vector<uint64_t>{high, low}));
}

TEST(SchedulerDeadlines, ExpiredRequestsComeBackInExpiredNeverInABatch) {
  Fixture f;
  const uint64_t soon = f.s.submit(toks(3), 0, 1.0);
  const uint64_t later = f.s.submit(toks(3), 0, 2.0);
  const uint64_t never = f.s.submit(toks(3));
  f.clock->set(1.0);  // a deadline equal to now has passed
  auto b = f.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->expired, std::vector<uint64_t>{soon});
  std::vector<uint64_t> ids = b->ids();
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<uint64_t>{later, never}));
  auto snap = f.s.snapshot();
  EXPECT_EQ(snap.stats.expired, 1);
  EXPECT_EQ(snap.depth, 0);
}

TEST(SchedulerDeadlines, OnlyExpiredWorkGivesAnEmptyBatchWithTheExpiredIds) {
  Fixture f;
  const uint64_t a = f.s.submit(toks(3), 0, 0.5);
  const uint64_t b = f.s.submit(toks(3), 0, 0.25);
  f.clock->set(3.0);
  auto batch = f.next();
  ASSERT_TRUE(batch);
  EXPECT_EQ(batch->size(), 0);
  EXPECT_EQ(batch->expired, (std::vector<uint64_t>{b, a}));  // deadline order
  EXPECT_FALSE(f.next());
  EXPECT_EQ(f.s.snapshot().stats.expired, 2);
  EXPECT_EQ(f.s.queued_tokens(), 0);
}

TEST(SchedulerDeadlines, RequestsBeforeTheirDeadlineAreServed) {
  Fixture f;
  const uint64_t id = f.s.submit(toks(3), 0, 1.0);
  f.clock->set(0.999);
  auto b = f.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->ids(), std::vector<uint64_t>{id});
  EXPECT_TRUE(b->expired.empty());
}

TEST(SchedulerCancel, CancelsQueuedRequestsOnlyAndTheyNeverAppearInABatch) {
  Fixture f;
  const uint64_t a = f.s.submit(toks(3));
  const uint64_t b = f.s.submit(toks(5));
  const uint64_t c = f.s.submit(toks(7));
  EXPECT_TRUE(f.s.cancel(b));
  EXPECT_FALSE(f.s.cancel(b));       // already cancelled
  EXPECT_FALSE(f.s.cancel(999999));  // unknown
  EXPECT_EQ(f.s.depth(), 2);
  EXPECT_EQ(f.s.queued_tokens(), 10);
  auto batch = f.next();
  ASSERT_TRUE(batch);
  std::vector<uint64_t> ids = batch->ids();
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<uint64_t>{a, c}));
  EXPECT_FALSE(f.s.cancel(a));  // batched
  f.s.complete(*batch, 0.01);
  EXPECT_FALSE(f.s.cancel(c));  // finished
  EXPECT_EQ(f.s.snapshot().stats.cancelled, 1);
}

TEST(SchedulerCapacity, RequestLimitRejectsAtOnceAndTheQueueStaysUsable) {
  SchedulerConfig sc;
  sc.max_queue_requests = 3;
  Fixture f(sc);
  for (int i = 0; i < 3; ++i) f.s.submit(toks(2));
  EXPECT_THROW(f.s.submit(toks(2)), QueueFull);
  EXPECT_THROW(f.s.submit(toks(2)), QueueFull);
  EXPECT_EQ(f.s.depth(), 3);
  EXPECT_EQ(f.s.snapshot().stats.rejected, 2);
  EXPECT_EQ(f.s.snapshot().stats.submitted, 3);
  auto b = f.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->size(), 3);
  EXPECT_NO_THROW(f.s.submit(toks(2)));
  EXPECT_EQ(f.s.depth(), 1);
}

TEST(SchedulerCapacity, TokenLimitRejectsAtOnceAndTheQueueStaysUsable) {
  SchedulerConfig sc;
  sc.max_queue_tokens = 10;
  Fixture f(sc);
  const uint64_t six = f.s.submit(toks(6));
  EXPECT_THROW(f.s.submit(toks(5)), QueueFull);
  EXPECT_EQ(f.s.snapshot().stats.rejected, 1);
  EXPECT_NO_THROW(f.s.submit(toks(4)));  // exactly at the limit
  EXPECT_EQ(f.s.queued_tokens(), 10);
  EXPECT_THROW(f.s.submit(toks(1)), QueueFull);
  EXPECT_TRUE(f.s.cancel(six));
  EXPECT_NO_THROW(f.s.submit(toks(5)));
  EXPECT_EQ(f.s.queued_tokens(), 9);
}

TEST(SchedulerSubmitMany, QueuesTheLongestPrefixThatFitsAndOneBatchSeesItWhole) {
  SchedulerConfig sc;
  sc.max_queue_requests = 5;
  Fixture f(sc);
  const std::vector<uint64_t> ids = f.s.submit_many({toks(3), toks(3), toks(3)});
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_LT(ids[0], ids[1]);
  EXPECT_LT(ids[1], ids[2]);
  // Four more offered, two fit: the accepted prefix, in order.
  const std::vector<uint64_t> more = f.s.submit_many({toks(3), toks(3), toks(3), toks(3)});
  ASSERT_EQ(more.size(), 2u);
  EXPECT_EQ(f.s.depth(), 5);
  EXPECT_EQ(f.s.queued_tokens(), 15);
  EXPECT_THROW(f.s.submit_many({toks(1)}), QueueFull);  // nothing fits: typed error
  EXPECT_EQ(f.s.snapshot().stats.rejected, 1);
  EXPECT_EQ(f.s.snapshot().stats.submitted, 5);
  auto b = f.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->size(), 5);
  EXPECT_TRUE(f.s.submit_many({}).empty());
}

TEST(SchedulerSubmitMany, StopsAtTheTokenLimit) {
  SchedulerConfig sc;
  sc.max_queue_tokens = 10;
  Fixture f(sc);
  EXPECT_EQ(f.s.submit_many({toks(4), toks(4), toks(4), toks(1)}).size(), 2u);  // a prefix: the 1 waits behind the 4
  EXPECT_EQ(f.s.queued_tokens(), 8);
}

TEST(SchedulerSubmitMany, AnInvalidRequestQueuesNothingAndNamesItsIndex) {
  SchedulerConfig sc;
  sc.max_request_tokens = 8;
  Fixture f(sc);
  try {
    f.s.submit_many({toks(2), toks(9), toks(2)});
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("request 1"), std::string::npos) << e.what();
  }
  EXPECT_THROW(f.s.submit_many({toks(2), toks(0)}), InvalidArgument);
  EXPECT_THROW(f.s.submit_many({toks(2)}, 0, std::nan("")), InvalidArgument);
  EXPECT_EQ(f.s.depth(), 0);
  f.s.close();
  EXPECT_THROW(f.s.submit_many({toks(2)}), SchedulerClosed);
}

TEST(SchedulerValidation, RejectsEmptyOverlongAndNanDeadlineRequests) {
  SchedulerConfig sc;
  sc.max_request_tokens = 8;
  Fixture f(sc);
  EXPECT_THROW(f.s.submit({}), InvalidArgument);
  EXPECT_THROW(f.s.submit(toks(9)), InvalidArgument);
  EXPECT_THROW(f.s.submit(toks(2), 0, std::nan("")), InvalidArgument);
  EXPECT_NO_THROW(f.s.submit(toks(8)));
  EXPECT_EQ(f.s.depth(), 1);
  EXPECT_EQ(f.s.snapshot().stats.rejected, 0);
}

TEST(SchedulerValidation, RejectsBadConfigs) {
  auto bad = [](auto mutate) {
    SchedulerConfig c;
    mutate(c);
    EXPECT_THROW(Scheduler(c, ControllerConfig{}), InvalidArgument);
  };
  bad([](SchedulerConfig& c) { c.max_queue_requests = 0; });
  bad([](SchedulerConfig& c) { c.max_queue_tokens = 0; });
  bad([](SchedulerConfig& c) { c.max_batch_size = 0; });
  bad([](SchedulerConfig& c) { c.max_request_tokens = 0; });
  bad([](SchedulerConfig& c) { c.max_request_tokens = (int64_t{1} << 30) + 1; });
  bad([](SchedulerConfig& c) { c.aging_s = 0; });
  bad([](SchedulerConfig& c) { c.aging_s = INFINITY; });
  bad([](SchedulerConfig& c) { c.aging_s = NAN; });
  bad([](SchedulerConfig& c) { c.lookahead = 0; });
  ControllerConfig cc;
  cc.policy = "nope";
  EXPECT_THROW(Scheduler(SchedulerConfig{}, cc), InvalidArgument);
  EXPECT_THROW(cost_from_string("dense"), InvalidArgument);
  EXPECT_EQ(cost_from_string("packed"), Cost::Packed);
  EXPECT_STREQ(to_string(Cost::Padded), "padded");
}

TEST(SchedulerValidation, ANanWaitOrAComputeTimeNotFiniteIsRefusedAndChangesNothing) {
  Fixture f;
  f.s.submit(toks(4));
  EXPECT_THROW(f.s.next_batch(std::nan("")), InvalidArgument);  // it waited forever
  auto b = f.next();
  ASSERT_TRUE(b);
  for (double bad : {std::nan(""), double(INFINITY), -1.0}) EXPECT_THROW(f.s.complete(*b, bad), InvalidArgument);
  f.s.complete(*b, 0.001);
  const auto snap = f.s.snapshot();
  EXPECT_EQ(snap.stats.completed, 1);
  EXPECT_EQ(snap.stats.batches, 1);
}

TEST(SchedulerValidation, AVeryLargeAgingKeepsEveryRequestInTheQueue) {
  // aging_s = inf was accepted: a priority-0 rank was then 0 * inf = NaN, and
  // NaN keys dropped requests from the queue (never batched, nor returned by
  // close). The largest finite value keeps them all, in priority order.
  SchedulerConfig sc = one_per_batch();
  sc.aging_s = 1e300;
  Fixture f(sc);
  std::vector<uint64_t> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(f.s.submit(toks(2), i % 2));
  EXPECT_EQ(f.drain_one_by_one(), (std::vector<uint64_t>{ids[1], ids[3], ids[0], ids[2], ids[4]}));
}

TEST(SchedulerClose, WakesABlockedWorkerInAnotherThread) {
  Fixture f;
  std::promise<void> started;
  auto waiter = std::async(std::launch::async, [&] {
    started.set_value();
    return f.s.next_batch(3600.0);  // would block for an hour
  });
  started.get_future().wait();
  f.s.close();
  // Generous bound, not a timing assertion: without the wake-up it would
  // take an hour.
  ASSERT_EQ(waiter.wait_for(std::chrono::seconds(60)), std::future_status::ready);
  EXPECT_FALSE(waiter.get().has_value());
}

TEST(SchedulerClose, ReturnsQueuedIdsInQueueOrderAndRefusesNewWork) {
  Fixture f;
  const uint64_t low = f.s.submit(toks(2), 0);
  f.clock->advance(0.1);
  const uint64_t high = f.s.submit(toks(2), 3);
  f.clock->advance(0.1);
  const uint64_t mid = f.s.submit(toks(2), 1);
  EXPECT_EQ(f.s.close(), (std::vector<uint64_t>{high, mid, low}));
  EXPECT_TRUE(f.s.closed());
  EXPECT_TRUE(f.s.close().empty());  // idempotent
  EXPECT_THROW(f.s.submit(toks(2)), SchedulerClosed);
  EXPECT_FALSE(f.s.cancel(low));
  EXPECT_FALSE(f.s.next_batch(0).has_value());
  EXPECT_EQ(f.s.depth(), 0);
  EXPECT_EQ(f.s.snapshot().stats.closed_unserved, 3);
}

TEST(SchedulerBatches, TimeoutWithAnEmptyQueueGivesNothing) {
  Fixture f;
  EXPECT_FALSE(f.s.next_batch(0).has_value());
  EXPECT_FALSE(f.s.next_batch(0.001).has_value());
}

TEST(SchedulerBatches, CarryTheSubmittedTokensOfEachId) {
  Fixture f;
  std::map<uint64_t, std::vector<int32_t>> sent;
  std::mt19937 rng(4);
  for (int i = 0; i < 40; ++i) {
    auto t = toks(1 + int(rng() % 30), int32_t(rng() % 1000));
    sent[f.s.submit(t)] = t;
  }
  std::map<uint64_t, std::vector<int32_t>> got;
  while (auto b = f.next()) {
    for (int64_t i = 0; i < b->size(); ++i) got[b->ids()[i]] = b->tokens()[i];
    f.s.complete(*b, 0.001);
  }
  EXPECT_EQ(got, sent);
}

// Arrival order cut greedily into batches under the same padded budget and
// batch size: the baseline that length grouping has to beat.
int64_t arrival_order_padding(const std::vector<int>& lens, int64_t budget, int64_t max_bs) {
  int64_t padding = 0, count = 0, max_len = 0, sum = 0;
  auto flush = [&] { padding += count * max_len - sum; count = max_len = sum = 0; };
  for (int l : lens) {
    const int64_t m = std::max<int64_t>(max_len, l);
    if (count > 0 && ((count + 1) * m > budget || count + 1 > max_bs)) flush();
    ++count;
    max_len = std::max<int64_t>(max_len, l);
    sum += l;
  }
  flush();
  return padding;
}

TEST(SchedulerGrouping, MixedLengthsGiveLessPaddingThanArrivalOrder) {
  SchedulerConfig sc;
  sc.max_batch_size = 32;
  Fixture f(sc, fixed_budget(2048));
  std::mt19937 rng(5);
  const int mix[] = {4, 12, 30, 64, 120, 250};
  std::vector<int> lens;
  for (int i = 0; i < 600; ++i) {
    lens.push_back(mix[rng() % 6] + int(rng() % 5));
    f.s.submit(toks(lens.back()));
  }
  int64_t padding = 0, real = 0;
  while (auto b = f.next()) {
    padding += b->padded_tokens() - b->total_tokens();
    real += b->total_tokens();
    f.s.complete(*b, 0.001);
  }
  const int64_t baseline = arrival_order_padding(lens, 2048, 32);
  EXPECT_GT(real, 0);
  EXPECT_LT(padding * 4, baseline) << "grouped " << padding << " vs arrival order " << baseline;
  auto snap = f.s.snapshot();
  EXPECT_EQ(snap.stats.padded_tokens - snap.stats.real_tokens, padding);
}

class SchedulerBudget : public ::testing::TestWithParam<Cost> {};

TEST_P(SchedulerBudget, EveryMultiRequestBatchFitsTheTokenBudgetAndBatchSize) {
  SchedulerConfig sc = any_fill();
  sc.cost = GetParam();
  sc.max_batch_size = 16;
  const int64_t budget = 512;
  Fixture f(sc, fixed_budget(budget));
  std::mt19937 rng(6);
  int n = 0;
  // Short enough that 16 fit the budget even padded (assembly looks only
  // two budgets of tokens past the head).
  for (int i = 0; i < 500; ++i) {
    f.s.submit(toks(1 + int(rng() % 30)));
    ++n;
  }
  int seen = 0, full_size = 0;
  while (auto b = f.next()) {
    ASSERT_GE(b->size(), 1);
    ASSERT_LE(b->size(), sc.max_batch_size);
    full_size += b->size() == sc.max_batch_size;
    const int64_t cost = GetParam() == Cost::Padded ? b->padded_tokens() : b->total_tokens();
    if (b->size() > 1) ASSERT_LE(cost, budget);
    EXPECT_EQ(b->budget(), budget);
    seen += int(b->size());
    f.s.complete(*b, 0.001);
  }
  EXPECT_EQ(seen, n);
  EXPECT_GT(full_size, 0);  // the size limit was actually reached
}

TEST_P(SchedulerBudget, ARequestLongerThanTheBudgetRunsAlone) {
  SchedulerConfig sc;
  sc.cost = GetParam();
  Fixture f(sc, fixed_budget(64));
  const uint64_t big = f.s.submit(toks(100));
  const uint64_t s1 = f.s.submit(toks(3));
  const uint64_t s2 = f.s.submit(toks(3));
  auto b = f.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->ids(), std::vector<uint64_t>{big});
  auto rest = f.next();
  ASSERT_TRUE(rest);
  EXPECT_EQ(rest->ids(), (std::vector<uint64_t>{s1, s2}));
}

TEST(SchedulerBatches, MinFillKeepsPaddingUnderItsFloorAndPackedCostIgnoresIt) {
  // One 64-token request and twenty 8-token ones, budget 4096.
  for (double min_fill : {0.0, 0.5, 0.8}) {
    SchedulerConfig sc;
    sc.min_fill = min_fill;
    Fixture f(sc, fixed_budget(4096));
    f.s.submit(toks(64));  // the head
    for (int i = 0; i < 20; ++i) f.s.submit(toks(8));
    auto b = f.next();
    ASSERT_TRUE(b);
    if (min_fill == 0.0) {
      EXPECT_EQ(b->size(), 21);  // fills the budget whatever the padding
    } else {
      // An 8-token row in a 64-wide batch adds 8 real tokens per 64 of cost.
      EXPECT_EQ(b->size(), 1);
      auto rest = f.next();
      ASSERT_TRUE(rest);
      EXPECT_EQ(rest->size(), 20);
      EXPECT_EQ(rest->padding_ratio(), 0.0);
    }
  }
  SchedulerConfig packed;
  packed.cost = Cost::Packed;
  Fixture p(packed, fixed_budget(4096));
  p.s.submit(toks(64));
  for (int i = 0; i < 20; ++i) p.s.submit(toks(8));
  EXPECT_EQ(p.next()->size(), 21);  // no padding in packed execution: the floor never binds
}

TEST(SchedulerBatches, EveryBatchRespectsTheFillFloor) {
  SchedulerConfig sc;  // default min_fill
  Fixture f(sc, fixed_budget(2048));
  std::mt19937 rng(11);
  for (int i = 0; i < 400; ++i) f.s.submit(toks(1 + int(rng() % 120)));
  while (auto b = f.next()) {
    if (b->size() > 1) EXPECT_LE(b->padding_ratio(), 1.0 - sc.min_fill + 1e-9);
    f.s.complete(*b, 0.001);
  }
}

INSTANTIATE_TEST_SUITE_P(Costs, SchedulerBudget, ::testing::Values(Cost::Padded, Cost::Packed),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(SchedulerBatches, PackedCostFitsMoreRequestsThanPaddedForSkewedLengths) {
  SchedulerConfig padded_cfg = any_fill(), packed_cfg = any_fill();
  packed_cfg.cost = Cost::Packed;
  Fixture padded(padded_cfg, fixed_budget(256)), packed(packed_cfg, fixed_budget(256));
  for (Fixture* f : {&padded, &packed}) {
    f->s.submit(toks(64));
    for (int i = 0; i < 20; ++i) f->s.submit(toks(8));
  }
  // Padded: 4 x 64 = 256 at most. Packed: 64 + 24 x 8 fits all 21.
  EXPECT_EQ(padded.next()->size(), 4);
  EXPECT_EQ(packed.next()->size(), 21);
}

TEST(SchedulerBuckets, BucketFloorIsTheLadderOfShapesPy) {
  // Steps of 16 below 128, then eight buckets per doubling.
  EXPECT_EQ(bucket_floor(5), 5);  // below the first bucket: unchanged
  EXPECT_EQ(bucket_floor(16), 16);
  EXPECT_EQ(bucket_floor(127), 112);
  EXPECT_EQ(bucket_floor(128), 128);
  EXPECT_EQ(bucket_floor(1040), 1024);
  EXPECT_EQ(bucket_floor(1151), 1024);
  EXPECT_EQ(bucket_floor(1152), 1152);
  EXPECT_EQ(bucket_floor(8191), 7680);
  for (int64_t t = 16; t < 70000; ++t) {
    const int64_t f = bucket_floor(t);
    ASSERT_LE(f, t);
    ASSERT_GT(f, t - std::max<int64_t>(16, t / 8) - 1) << t;  // within one step
    ASSERT_EQ(bucket_floor(f), f) << t;  // a bucket
  }
}

TEST(SchedulerBuckets, ABatchFillsTheBucketAtOrBelowItsBudgetRatherThanSpillingPastIt) {
  // Budget 1,040 tokens; requests of 104. Without buckets ten join (1,040
  // tokens, run at the bucket 1,152); with them nine (936, run at 1,024).
  for (bool buckets : {false, true}) {
    SchedulerConfig c = any_fill();
    c.cost = Cost::Packed;
    c.token_buckets = buckets;
    Fixture f(c, fixed_budget(1040));
    for (int i = 0; i < 30; ++i) f.s.submit(toks(104));
    auto b = f.next();
    EXPECT_EQ(b->total_tokens(), buckets ? 936 : 1040);
    EXPECT_LE(b->total_tokens(), buckets ? 1024 : 1040);
  }
  // A request longer than the floored budget still runs (alone).
  SchedulerConfig c = any_fill();
  c.cost = Cost::Packed;
  c.token_buckets = true;
  Fixture f(c, fixed_budget(1040));
  f.s.submit(toks(1030));
  EXPECT_EQ(f.next()->total_tokens(), 1030);
}

TEST(SchedulerArrivals, AClassThatStoppedArrivingIsForgottenSoDistinctPrioritiesDoNotAccumulate) {
  // Every batch walks the per-class arrival rates: with a new priority per
  // request the map grew without bound (20,000 requests: 83 s of CPU).
  Fixture f(one_per_batch());
  for (int p = 0; p < 2000; ++p) {
    f.s.submit(toks(4), p);
    auto b = f.next();
    ASSERT_TRUE(b);
    f.clock->advance(0.01);
    f.s.complete(*b, 0.01);
  }
  // A class's rate decays by e^(-dt/0.5) per completion: gone within a few seconds.
  EXPECT_LT(f.s.tracked_priorities(), 700);
  for (int i = 0; i < 100; ++i) {  // one class keeps arriving, the others stop
    f.s.submit(toks(4), 7);
    auto b = f.next();
    f.clock->advance(0.1);
    f.s.complete(*b, 0.01);
  }
  EXPECT_EQ(f.s.tracked_priorities(), 1);
  f.clock->advance(10);  // and it too, once it stops
  f.s.submit(toks(4), 8);
  auto b = f.next();
  f.clock->advance(0.1);
  f.s.complete(*b, 0.01);
  EXPECT_EQ(f.s.tracked_priorities(), 1);  // 7 forgotten; 8 just arrived
}

TEST(SchedulerStats, ExtraTokensARunnerComputedCountAsPaddingNotAsCost) {
  // Ghost sequences (a batch rounded up to a bucket of tokens) are computed
  // tokens: padded_tokens counts them; real tokens and the batch's cost do not.
  SchedulerConfig sc;
  sc.cost = Cost::Packed;
  Fixture f(sc);
  f.s.submit(toks(3));
  f.s.submit(toks(4));
  auto b = f.next();
  ASSERT_TRUE(b);
  ASSERT_EQ(b->total_tokens(), 7);
  f.s.complete(*b, 0.01, /*extra_tokens=*/9);
  const Stats& s = f.s.snapshot().stats;
  EXPECT_EQ(s.real_tokens, 7);
  EXPECT_EQ(s.padded_tokens, 16);
  EXPECT_NEAR(s.batch_tokens.percentile(0.5), 7, 7 * 0.05);
  f.s.submit(toks(2));
  auto b2 = f.next();
  EXPECT_THROW(f.s.complete(*b2, 0.01, -1), InvalidArgument);
}

TEST(SchedulerStats, CountsOutcomesTokensAndLatencies) {
  Fixture f;
  for (int i = 0; i < 4; ++i) f.s.submit(toks(i + 1));  // 1+2+3+4 = 10 tokens
  const uint64_t gone = f.s.submit(toks(2));
  f.s.cancel(gone);
  f.clock->advance(0.25);
  auto b = f.next();
  ASSERT_TRUE(b);
  ASSERT_EQ(b->size(), 4);
  f.clock->advance(0.5);
  f.s.complete(*b, 0.5);
  f.s.submit(toks(3));
  auto b2 = f.next();
  f.s.fail(*b2);
  const auto snap = f.s.snapshot();
  const Stats& s = snap.stats;
  EXPECT_EQ(s.submitted, 6);
  EXPECT_EQ(s.cancelled, 1);
  EXPECT_EQ(s.completed, 4);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.failed_batches, 1);
  EXPECT_EQ(s.batches, 1);
  EXPECT_EQ(s.real_tokens, 10);
  EXPECT_EQ(s.padded_tokens, 16);
  EXPECT_EQ(s.latency_s.count(), 4);
  EXPECT_NEAR(s.latency_s.percentile(0.5), 0.75, 0.75 * 0.02);
  EXPECT_NEAR(s.queue_s.percentile(0.5), 0.25, 0.25 * 0.02);
  EXPECT_EQ(s.batch_compute_s.count(), 1);
  EXPECT_NEAR(s.batch_size.percentile(0.5), 4, 4 * 0.05);
  EXPECT_DOUBLE_EQ(s.first_submit_at, 0.0);
  EXPECT_DOUBLE_EQ(s.last_complete_at, 0.75);
  EXPECT_EQ(snap.policy, "static");
  EXPECT_EQ(snap.budget, 4096);
  EXPECT_DOUBLE_EQ(snap.now, 0.75);
}

TEST(SchedulerController, CompletedBatchesDriveTheAdaptiveBudget) {
  ControllerConfig cc;
  cc.policy = "aimd";
  cc.min_tokens = 16;
  cc.max_tokens = 4096;
  cc.initial_tokens = 64;
  cc.target_latency_s = 0.05;
  Fixture f(SchedulerConfig{}, cc);
  for (int i = 0; i < 64; ++i) f.s.submit(toks(8));
  auto b = f.next();
  ASSERT_EQ(b->padded_tokens(), 64);  // budget-bound
  f.s.complete(*b, 0.01);           // under target: additive increase
  EXPECT_EQ(f.s.budget(), 64 + cc.aimd_step_tokens);
  b = f.next();
  f.s.complete(*b, 0.2);  // a miss: multiplicative decrease
  EXPECT_LT(f.s.budget(), 64 + cc.aimd_step_tokens);
}

// Replicas: one controller per worker. A worker's batches are sized by its
// own budget and only its controller learns from them.
TEST(SchedulerWorkers, EachWorkerHasItsOwnController) {
  auto clock = std::make_shared<ManualClock>(0.0);
  ControllerConfig cc;
  cc.policy = "aimd";
  cc.min_tokens = 1;
  cc.initial_tokens = 40;
  Scheduler s(any_fill(), cc, clock, 2);
  EXPECT_EQ(s.workers(), 2);
  for (int i = 0; i < 8; ++i) s.submit(toks(10));
  auto b = s.next_batch(0, 1);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ((*b)->worker, 1);
  EXPECT_EQ((*b)->total_tokens(), 40);
  clock->advance(0.001);
  s.complete(**b, 0.001);
  EXPECT_GT(s.budget(1), 40);
  EXPECT_EQ(s.budget(0), 40);
  auto a = s.next_batch(0, 0);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ((*a)->worker, 0);
  EXPECT_EQ((*a)->total_tokens(), 40);
  const auto snap = s.snapshot();
  ASSERT_EQ(snap.budgets.size(), 2u);
  EXPECT_EQ(snap.budgets[1], s.budget(1));
  EXPECT_THROW(s.next_batch(0, 2), InvalidArgument);
  EXPECT_THROW(Scheduler(any_fill(), cc, clock, 0), InvalidArgument);
}

// Two workers pull from one queue at once; every request is served once.
TEST(SchedulerWorkers, TwoConsumersShareOneQueue) {
  Scheduler s(any_fill(), fixed_budget(30), steady_clock(), 2);
  constexpr int kRequests = 2000;
  std::vector<std::future<std::vector<uint64_t>>> workers;
  for (int w = 0; w < 2; ++w) {
    workers.push_back(std::async(std::launch::async, [&s, w] {
      std::vector<uint64_t> got;
      while (true) {
        auto b = s.next_batch(0.05, w);
        if (!b) {
          if (s.closed()) return got;
          continue;
        }
        EXPECT_EQ((*b)->worker, w);
        for (uint64_t id : (*b)->ids()) got.push_back(id);
        s.complete(**b, 0.0001);
      }
    }));
  }
  for (int i = 0; i < kRequests; ++i) s.submit(toks(1 + i % 9));
  while (s.depth() > 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  s.close();
  std::vector<uint64_t> all;
  for (auto& f : workers) {
    auto got = f.get();
    all.insert(all.end(), got.begin(), got.end());
  }
  std::sort(all.begin(), all.end());
  ASSERT_EQ(all.size(), static_cast<size_t>(kRequests));
  EXPECT_EQ(std::unique(all.begin(), all.end()), all.end());
}

// ------------------------------------------------------------ sharing a short queue

// Two workers on a packed scheduler whose compute fit has measured batches of
// a = 2 ms + b = 20 us per token, each worker seen (it asked for work).
struct Pair {
  static constexpr double kA = 0.002, kB = 20e-6;
  std::shared_ptr<ManualClock> clock = std::make_shared<ManualClock>(0.0);
  Scheduler s;
  static SchedulerConfig packed(bool balance) {
    SchedulerConfig c = any_fill();
    c.cost = Cost::Packed;
    c.balance_workers = balance;
    return c;
  }
  explicit Pair(bool balance = true, int64_t budget = 1000) : Pair(packed(balance), fixed_budget(budget)) {}
  Pair(SchedulerConfig sc, ControllerConfig cc) : s(sc, cc, clock, 2) {
    int w = 0;
    for (int n : {100, 400, 800, 200, 600, 1000}) {
      s.submit(toks(n));
      run(*s.next_batch(0, w));
      w = 1 - w;
    }
  }
  static double compute(const Batch& b) { return kA + kB * static_cast<double>(b.total_tokens()); }
  void run(const std::shared_ptr<Batch>& b) {
    clock->advance(compute(*b));
    s.complete(*b, compute(*b));
  }
  std::shared_ptr<Batch> next(int worker) {
    auto b = s.next_batch(0, worker);
    return b ? *b : nullptr;
  }
  void queue(int requests, int tokens = 100) {
    for (int i = 0; i < requests; ++i) s.submit(toks(tokens));
  }
};

TEST(SchedulerBalance, IdleWorkersSplitAShortQueueEvenly) {
  Pair p;
  ASSERT_EQ(p.next(1), nullptr);  // worker 1 idle, asking for work
  p.queue(10);                    // 1000 tokens: one budget
  auto a = p.next(0);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->total_tokens(), 500);
  EXPECT_EQ(a->budget(), 1000);  // the controller's budget is unchanged
  auto b = p.next(1);
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->total_tokens(), 500);
  EXPECT_EQ(p.s.depth(), 0);
  EXPECT_EQ(p.s.snapshot().stats.balanced, 1);  // the second took what was left: not cut
}

TEST(SchedulerBalance, ABusyWorkerIsLeftTheShareThatEndsWithIt) {
  Pair p;
  p.queue(1, 300);
  auto running = p.next(1);  // 300 tokens: ends 2 + 6 = 8 ms from now
  ASSERT_EQ(running->total_tokens(), 300);
  p.queue(10);
  // Worker 0 ends at T with x tokens, worker 1 at 8 ms + 2 ms + 20 us (1000 - x):
  // equal at x = 700 (T = 16 ms).
  auto a = p.next(0);
  EXPECT_EQ(a->total_tokens(), 700);
  p.run(running);  // 8 ms later
  auto b = p.next(1);
  EXPECT_EQ(b->total_tokens(), 300);
  EXPECT_NEAR(Pair::compute(*b), Pair::compute(*a) - Pair::compute(*running), 1e-12);  // they end together
}

TEST(SchedulerBalance, AQueueLongerThanTheBudgetsGoesInFullBudgets) {
  Pair p;
  ASSERT_EQ(p.next(1), nullptr);
  p.queue(30);  // 3000 tokens: 1500 each would pass the budget
  EXPECT_EQ(p.next(0)->total_tokens(), 1000);
  EXPECT_EQ(p.next(1)->total_tokens(), 1000);
  EXPECT_EQ(p.s.snapshot().stats.balanced, 0);
}

TEST(SchedulerBalance, AWorkerBusyPastTheQueuesEndIsNotWaitedFor) {
  Pair p;
  p.queue(1, 1000);
  auto running = p.next(1);  // 1000 tokens: 22 ms
  ASSERT_EQ(running->total_tokens(), 1000);
  p.queue(4);  // 400 tokens: 10 ms on worker 0 alone, before worker 1 is free
  EXPECT_EQ(p.next(0)->total_tokens(), 400);
}

TEST(SchedulerBalance, AWorkerFarPastItsBatchsPredictedEndIsNotWaitedFor) {
  Pair p;
  p.queue(1, 300);
  auto late = p.next(1);  // predicted to end 8 ms from now
  p.clock->advance(0.010);  // 2 ms late: within its own predicted compute, about to free
  p.queue(10);
  auto a = p.next(0);
  EXPECT_EQ(a->total_tokens(), 500);
  Pair q;
  q.queue(1, 300);
  auto stalled = q.next(1);
  q.clock->advance(0.017);  // 9 ms late, past its 8 ms compute: a stall or a hung replica
  q.queue(10);
  EXPECT_EQ(q.next(0)->total_tokens(), 1000);  // when worker 1 frees is unknown: nothing left for it
  q.run(stalled);
}

TEST(SchedulerBalance, AnotherWorkerIsLeftNoMoreThanItsOwnBudget) {
  // Per-worker controllers: worker 1's budget backed off to half after a
  // batch over the latency target, worker 0's did not.
  SchedulerConfig sc = Pair::packed(true);
  ControllerConfig cc;
  cc.policy = "aimd";
  cc.min_tokens = 1;
  cc.max_tokens = 1000;
  cc.initial_tokens = 1000;
  cc.target_latency_s = 0.0215;  // a 1000-token batch (22 ms) misses it
  cc.aimd_step_tokens = 1;
  cc.aimd_backoff = 0.5;
  Pair p(sc, cc);  // the warm-up's last batch, 1000 tokens, ran on worker 1
  const int64_t b0 = p.s.budget(0), b1 = p.s.budget(1);
  ASSERT_EQ(b1, 500);
  ASSERT_EQ(b0, 1000);
  ASSERT_EQ(p.next(1), nullptr);
  p.queue(14);  // 1400 tokens: 700 each would pass worker 1's budget
  EXPECT_EQ(p.next(0)->total_tokens(), 900);  // 1400 - 500
  EXPECT_EQ(p.next(1)->total_tokens(), 500);
  EXPECT_EQ(p.s.depth(), 0);
}

TEST(SchedulerBalance, PaddedCostSharesTheSameWay) {
  SchedulerConfig sc = Pair::packed(true);
  sc.cost = Cost::Padded;
  Pair p(sc, fixed_budget(1000));
  ASSERT_EQ(p.next(1), nullptr);
  p.queue(10);  // equal lengths: no padding
  EXPECT_EQ(p.next(0)->total_tokens(), 500);
  EXPECT_EQ(p.next(1)->total_tokens(), 500);
  EXPECT_EQ(p.s.snapshot().stats.balanced, 1);
}

TEST(SchedulerBalance, ABatchCountsAsBalancedOnlyWhenItsShareLeftARequestOut) {
  SchedulerConfig sc = Pair::packed(true);
  sc.max_batch_size = 3;  // three requests (300 tokens) are under the share of 500
  Pair p(sc, fixed_budget(1000));
  ASSERT_EQ(p.next(1), nullptr);
  p.queue(10);
  EXPECT_EQ(p.next(0)->total_tokens(), 300);
  EXPECT_EQ(p.s.snapshot().stats.balanced, 0);
}

TEST(SchedulerBalance, AWorkerNotSeenForASecondIsNotWaitedFor) {
  Pair p;  // worker 1 last asked during warm-up
  p.clock->advance(1.5);
  ASSERT_EQ(p.next(0), nullptr);
  p.queue(10);
  EXPECT_EQ(p.next(0)->total_tokens(), 1000);  // a dead replica never takes its share
}

TEST(SchedulerBalance, OffByConfigAWorkerTakesItsBudget) {
  Pair p(false);
  ASSERT_EQ(p.next(1), nullptr);
  p.queue(10);
  EXPECT_EQ(p.next(0)->total_tokens(), 1000);
}

TEST(SchedulerBalance, NotBeforeTheComputeFitIsMeasured) {
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(Pair::packed(true), fixed_budget(1000), clock, 2);
  ASSERT_FALSE(s.next_batch(0, 1).has_value());
  for (int i = 0; i < 10; ++i) s.submit(toks(100));
  EXPECT_EQ((*s.next_batch(0, 0))->total_tokens(), 1000);
}

// A list of requests on two workers, each taking a batch whenever it is
// free (event-driven on the simulated clock): the end of the last batch
// (makespan) and how long the first worker to finish then idles.
std::pair<double, double> drain(Pair& p) {
  std::vector<std::pair<double, std::shared_ptr<Batch>>> at(2);  // per worker: end of its batch
  const double start = p.clock->now();
  double end[2] = {start, start};
  for (int w = 0; w < 2; ++w)
    if (auto b = p.next(w)) at[w] = {start + Pair::compute(*b), b};
  while (at[0].second || at[1].second) {
    const int w = !at[1].second || (at[0].second && at[0].first <= at[1].first) ? 0 : 1;
    p.clock->set(at[w].first);
    p.s.complete(*at[w].second, Pair::compute(*at[w].second));
    end[w] = at[w].first;
    at[w] = {};
    if (auto b = p.next(w)) at[w] = {p.clock->now() + Pair::compute(*b), b};
    const int o = 1 - w;  // the other worker, idle, may have been left a share
    if (!at[o].second)
      if (auto b = p.next(o)) at[o] = {p.clock->now() + Pair::compute(*b), b};
  }
  return {std::max(end[0], end[1]) - start, std::abs(end[0] - end[1])};
}

TEST(SchedulerBalance, TheLastBatchesOfAListEndTogether) {
  // 4600 tokens, budget 1000: two rounds of full batches, then 600 tokens.
  // Without sharing one worker runs them alone (14 ms) while the other idles.
  Pair on, off(false);
  on.queue(46), off.queue(46);
  const auto [span_on, idle_on] = drain(on);
  const auto [span_off, idle_off] = drain(off);
  EXPECT_NEAR(span_off, 2 * 0.022 + 0.014, 1e-9);
  EXPECT_NEAR(idle_off, 0.014, 1e-9);
  EXPECT_NEAR(span_on, 2 * 0.022 + 0.008, 1e-9);  // 300 tokens each
  EXPECT_NEAR(idle_on, 0.0, 1e-9);
  EXPECT_EQ(on.s.snapshot().stats.completed, off.s.snapshot().stats.completed);
}

}  // namespace
}  // namespace fastserve

namespace fastserve {
namespace {

// Bad input from a caller is a typed error, never a lost request, a crash
// or a fit gone wild.
TEST(SchedulerInput, AManualClockRefusesTimesThatAreNotFinite) {
  ManualClock c(1.0);
  EXPECT_THROW(c.set(std::nan("")), InvalidArgument);
  EXPECT_THROW(c.set(INFINITY), InvalidArgument);
  EXPECT_THROW(c.advance(INFINITY), InvalidArgument);
  EXPECT_THROW(ManualClock(-INFINITY), InvalidArgument);
  EXPECT_EQ(c.now(), 1.0);  // unchanged by the refusals
  c.advance(0.5);
  EXPECT_EQ(c.now(), 1.5);
}

TEST(SchedulerInput, MinusInfinityIsNoDeadline) {
  Fixture f;
  EXPECT_THROW(f.s.submit(toks(4), 0, -INFINITY), InvalidArgument);
  EXPECT_THROW(f.s.submit_many({toks(4)}, 0, -INFINITY, false, false), InvalidArgument);
  EXPECT_THROW(f.s.submit(toks(4), 0, std::nan("")), InvalidArgument);
  EXPECT_EQ(f.s.depth(), 0);
  f.s.submit(toks(4), 0, INFINITY);  // +inf: none
  EXPECT_EQ(f.s.depth(), 1);
}

TEST(SchedulerInput, AnotherSchedulersBatchIsRefusedByEveryCall) {
  SchedulerConfig sc = any_fill();
  sc.preempt_layers = 4;
  Fixture a(sc), b(sc);
  a.s.submit(toks(4));
  b.s.submit(toks(4));
  auto mine = b.next();
  auto theirs = a.next();
  ASSERT_TRUE(mine && theirs);
  ASSERT_EQ(mine->seq(), theirs->seq());  // seqs are per scheduler: the same numbers
  theirs->worker = 3;                     // an index b has no controller for
  EXPECT_THROW(b.s.start(*theirs, {}), InvalidArgument);
  EXPECT_THROW(b.s.preempt(*theirs, 0.5), InvalidArgument);
  EXPECT_THROW(b.s.complete(*theirs, 0.001), InvalidArgument);
  EXPECT_THROW(b.s.fail(*theirs), InvalidArgument);
  b.s.start(*mine, {});
  b.s.complete(*mine, 0.001);
  EXPECT_EQ(b.s.snapshot().stats.completed, 1);
}

TEST(SchedulerInput, ComputeTimesAndExtraTokensPastTheirBoundsAreRefused) {
  Fixture f;
  f.s.submit(toks(4));
  auto batch = f.next();
  EXPECT_THROW(f.s.complete(*batch, 1e200), InvalidArgument);
  EXPECT_THROW(f.s.complete(*batch, Scheduler::kMaxComputeS * 1.01), InvalidArgument);
  EXPECT_THROW(f.s.complete(*batch, 0.001, INT64_MAX), InvalidArgument);
  f.s.complete(*batch, 0.001, 3);
  EXPECT_EQ(f.s.snapshot().stats.padded_tokens, 4 + 3);
}

TEST(SchedulerInput, ATimeoutPastTheClocksRangeWaitsAsNoTimeout) {
  // 9.3e9 s overflowed steady_clock's ticks: next_batch returned at once.
  Fixture f;
  auto waiter = std::async(std::launch::async, [&] { return f.s.next_batch(9.3e9); });
  EXPECT_EQ(waiter.wait_for(std::chrono::milliseconds(50)), std::future_status::timeout);
  f.s.submit(toks(4));
  auto got = waiter.get();
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ((*got)->size(), 1);
}

TEST(SchedulerInput, WithNoLiveWorkerARefusalCarriesAFiniteRetryAfter) {
  ControllerConfig cc;
  cc.policy = "static";
  auto clock = std::make_shared<ManualClock>(0.0);
  Scheduler s(SchedulerConfig(), cc, clock, 2);
  for (int i = 0; i < 6; ++i) {
    s.submit(toks(10 + 5 * i));
    auto b = *s.next_batch(0, i % 2);
    s.start(*b, {});
    clock->advance(0.01);
    s.complete(*b, 0.001 + 1e-4 * static_cast<double>(b->total_tokens()));
  }
  s.retire(0);
  s.retire(1);
  try {
    s.submit(toks(10), 0, clock->now() + 1.0);
    FAIL() << "expected Overloaded";
  } catch (const Overloaded& e) {
    EXPECT_TRUE(std::isfinite(e.retry_after_s()));
    EXPECT_EQ(e.retry_after_s(), Scheduler::kMaxRetryAfterS);
  }
}

TEST(SchedulerInput, ArrivalsBetweenTwoCompletionsAtOneInstantCountInTheRate) {
  // Two workers completing at the same simulated time: what arrived
  // between them was dropped from the arrival rate (20,000 of 30,000 tokens/s).
  auto clock = std::make_shared<ManualClock>(0.0);
  ControllerConfig cc;
  cc.policy = "static";
  Scheduler s(any_fill(), cc, clock, 2);
  for (int step = 0; step < 400; ++step) {  // every 10 ms: 300 tokens
    s.submit(toks(100));
    auto b0 = *s.next_batch(0, 0);
    s.start(*b0, {});
    s.submit(toks(100));
    auto b1 = *s.next_batch(0, 1);
    s.start(*b1, {});
    clock->advance(0.01);
    s.complete(*b0, 0.005);
    s.submit(toks(100));  // between the two completions, at the same instant
    auto b2 = *s.next_batch(0, 0);
    s.start(*b2, {});
    s.complete(*b1, 0.005);
    s.complete(*b2, 0.0);
  }
  EXPECT_NEAR(s.snapshot().controller.at("admission_arrival_tokens_per_s"), 30000, 300);
}

}  // namespace
}  // namespace fastserve
