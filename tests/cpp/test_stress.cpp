// Many producers, several consumers, the real clock: every request comes out
// exactly once unless it was cancelled while queued, and nothing is lost.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "fastserve/scheduler.h"

namespace fastserve {
namespace {

int per_producer() {
  // Sanitizer builds set fewer (scripts/cpp_tests.sh).
  const char* env = std::getenv("FASTSERVE_STRESS_N");
  return env ? std::max(1, std::atoi(env)) : 10000;
}

TEST(SchedulerStress, EightProducersTwoConsumersEveryIdExactlyOnce) {
  const int kProducers = 8, kConsumers = 2, n = per_producer();
  SchedulerConfig sc;
  sc.max_queue_requests = int64_t{kProducers} * n + 1;
  sc.max_batch_size = 64;
  ControllerConfig cc;
  cc.policy = "static";
  cc.initial_tokens = 2048;
  Scheduler s(sc, cc);  // steady clock

  const uint64_t max_id = uint64_t(kProducers) * n;
  std::vector<std::atomic<int>> seen(max_id + 1);
  std::vector<std::atomic<bool>> cancelled(max_id + 1);
  std::atomic<int> producers_left{kProducers};
  std::atomic<int64_t> cancels{0};

  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      std::vector<uint64_t> mine;
      for (int i = 0; i < n; ++i) {
        std::vector<int32_t> t(1 + (i * 7 + p) % 48, p);
        mine.push_back(s.submit(std::move(t), (i % 3) - 1));
        // Cancel an earlier one now and then: it may be queued (true) or
        // already batched (false), both legal.
        if (i % 10 == 9) {
          const uint64_t victim = mine[mine.size() - 1 - (i % 7)];
          if (s.cancel(victim)) {
            cancelled[victim] = true;
            ++cancels;
          }
        }
      }
      --producers_left;
    });
  }
  for (int c = 0; c < kConsumers; ++c) {
    threads.emplace_back([&] {
      while (true) {
        auto b = s.next_batch(0.01);
        if (b) {
          for (uint64_t id : (*b)->ids()) {
            ASSERT_GE(id, 1u);
            ASSERT_LE(id, max_id);
            seen[id].fetch_add(1);
          }
          s.complete(**b, 1e-4);
        } else if (producers_left.load() == 0 && s.depth() == 0) {
          return;
        }
      }
    });
  }
  for (auto& t : threads) t.join();

  int64_t out = 0;
  for (uint64_t id = 1; id <= max_id; ++id) {
    if (cancelled[id]) {
      ASSERT_EQ(seen[id].load(), 0) << "cancelled id " << id << " came out";
    } else {
      ASSERT_EQ(seen[id].load(), 1) << "id " << id;
      ++out;
    }
  }
  const auto snap = s.snapshot();
  EXPECT_EQ(snap.stats.submitted, int64_t(max_id));
  EXPECT_EQ(snap.stats.completed, out);
  EXPECT_EQ(snap.stats.cancelled, cancels.load());
  EXPECT_EQ(out + cancels.load(), int64_t(max_id));
  EXPECT_GT(cancels.load(), 0);
  EXPECT_EQ(snap.depth, 0);
  EXPECT_EQ(snap.queued_tokens, 0);
}

}  // namespace
}  // namespace fastserve
