// Typed errors of the core. The Python bindings map each to a Python
// exception class (fastserve.QueueFullError, fastserve.OverloadedError, fastserve.EngineClosedError,
// ValueError for InvalidArgument).
#pragma once

#include <stdexcept>
#include <string>

namespace fastserve {

// The queue is at its request or token capacity; the caller should back off.
class QueueFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The request would not finish before its deadline: the work queued ahead
// of it, at the measured throughput, takes too long. Retrying after
// retry_after_s (when that backlog has drained) may succeed.
class Overloaded : public QueueFull {
 public:
  Overloaded(const std::string& what, double retry_after_s) : QueueFull(what), retry_after_s_(retry_after_s) {}
  double retry_after_s() const { return retry_after_s_; }

 private:
  double retry_after_s_;
};

// The scheduler was closed; no new work is accepted.
class SchedulerClosed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A malformed argument (empty request, bad configuration, ...).
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace fastserve
