// Internal to the CPU kernels: the worker pool that parallel_for runs on
// (kernels_cpu.cpp), in a header of its own for its tests.
#pragma once

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace fastserve {
namespace kernels {
namespace cpu {

// A pool of workers, started once and kept: starting a std::thread per call
// costs a large share of a typical batch's pack (figures:
// benchmarks/README.md). The caller runs tasks too and takes any task no
// worker has started, so a worker that the OS does not schedule (a busy
// machine) delays nothing.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Runs task(ctx, i) for every i in [0, n) on the caller and at most
  // `helpers` workers (so on at most helpers + 1 threads: the caller's
  // thread budget, whatever the pool's size). Returns once every task has
  // run, also when some throw (a worker's exception would end the process,
  // and returning early would leave workers on the caller's stack): the
  // first exception is rethrown then. One call at a time.
  void run(int n, int helpers, void (*task)(void*, int), void* ctx) {
    {
      std::lock_guard<std::mutex> lk(m_);
      task_ = task;
      ctx_ = ctx;
      n_ = n;
      next_ = 0;
      left_ = n;
      seats_ = helpers;
      error_ = nullptr;
      ++gen_;
    }
    if (helpers > 0) wake_.notify_all();
    std::unique_lock<std::mutex> lk(m_);
    take(lk);
    done_.wait(lk, [this] { return left_ == 0; });
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Tasks for this thread until none is left unclaimed (lk held on entry and
  // on return).
  void take(std::unique_lock<std::mutex>& lk) {
    while (next_ < n_) {
      const int i = next_++;
      lk.unlock();
      std::exception_ptr error;
      try {
        task_(ctx_, i);
      } catch (...) {
        error = std::current_exception();
      }
      lk.lock();
      if (error && !error_) error_ = error;
      if (--left_ == 0) done_.notify_all();
    }
  }

  void work() {
    std::unique_lock<std::mutex> lk(m_);
    uint64_t seen = 0;
    for (;;) {
      wake_.wait(lk, [&] { return gen_ != seen || stop_; });
      if (stop_) return;
      seen = gen_;
      if (seats_ == 0) continue;  // the call's threads are all at work
      --seats_;
      take(lk);
    }
  }

  std::mutex m_;
  std::condition_variable wake_, done_;
  void (*task_)(void*, int) = nullptr;
  void* ctx_ = nullptr;
  int n_ = 0, next_ = 0, left_ = 0, seats_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  uint64_t gen_ = 0;
  std::vector<std::thread> threads_;
};

}  // namespace cpu
}  // namespace kernels
}  // namespace fastserve
