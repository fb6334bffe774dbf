// Time source for the scheduler and controller. Production code uses the
// steady clock; tests substitute ManualClock so that deadlines, aging and
// controller dynamics run on simulated time without sleeps.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <memory>
#include <string>

#include "fastserve/errors.h"

namespace fastserve {

class Clock {
 public:
  virtual ~Clock() = default;
  // Seconds since an arbitrary, fixed origin. Monotonic.
  virtual double now() const = 0;
};

class SteadyClock final : public Clock {
 public:
  double now() const override {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
  }
};

// A clock that only moves when told to. Thread-safe. Its time is always
// finite (InvalidArgument otherwise): a NaN time ranks equal to every request,
// and the queue's order would drop them.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(double start = 0.0) : t_(finite(start)) {}
  double now() const override { return t_.load(std::memory_order_acquire); }
  void set(double t) { t_.store(finite(t), std::memory_order_release); }
  void advance(double dt) {
    double cur = t_.load(std::memory_order_relaxed);
    while (!t_.compare_exchange_weak(cur, finite(cur + dt), std::memory_order_acq_rel)) {
    }
  }

 private:
  static double finite(double t) {
    if (!std::isfinite(t)) throw InvalidArgument("the clock's time must be finite, got " + std::to_string(t));
    return t;
  }

  std::atomic<double> t_;
};

inline std::shared_ptr<Clock> steady_clock() {
  static auto clock = std::make_shared<SteadyClock>();
  return clock;
}

}  // namespace fastserve
