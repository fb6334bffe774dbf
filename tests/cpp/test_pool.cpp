// The CPU kernels' worker pool (csrc/kernels/cpu/pool.h): the caller's thread
// budget holds whatever the pool's size, and a task that throws reaches the
// caller after every task has run.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "../../csrc/kernels/cpu/pool.h"

namespace {

using fastserve::kernels::cpu::Pool;

struct Seen {
  std::mutex m;
  std::set<std::thread::id> threads;
  std::atomic<int> ran{0};
  int throw_at = -1;
};

void record(void* c, int i) {
  auto& s = *static_cast<Seen*>(c);
  {
    std::lock_guard<std::mutex> lk(s.m);
    s.threads.insert(std::this_thread::get_id());
  }
  // Long enough that idle workers would claim tasks if they were let in.
  volatile double x = 0;
  for (int k = 0; k < 20000; ++k) x = x + k;
  ++s.ran;
  if (i == s.throw_at) throw std::runtime_error("task failed");
}

TEST(KernelPool, ACallRunsOnAtMostItsHelpersAndTheCaller) {
  Pool pool(7);
  for (int helpers : {0, 1, 3}) {
    for (int round = 0; round < 20; ++round) {
      Seen seen;
      pool.run(64, helpers, record, &seen);
      EXPECT_EQ(seen.ran.load(), 64);
      EXPECT_LE(int(seen.threads.size()), helpers + 1) << "helpers " << helpers;
      if (helpers == 0) EXPECT_EQ(*seen.threads.begin(), std::this_thread::get_id());
    }
  }
}

TEST(KernelPool, AThrowingTaskReachesTheCallerAfterEveryTaskHasRun) {
  Pool pool(3);
  for (int at : {0, 5, 63}) {
    Seen seen;
    seen.throw_at = at;
    EXPECT_THROW(pool.run(64, 3, record, &seen), std::runtime_error);
    EXPECT_EQ(seen.ran.load(), 64);
  }
  Seen again;  // the pool is whole after a failure
  pool.run(16, 3, record, &again);
  EXPECT_EQ(again.ran.load(), 16);
}

}  // namespace
