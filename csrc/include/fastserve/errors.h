// Typed errors of the core. The Python bindings map each to a Python
// exception class (fastserve.QueueFullError, fastserve.EngineClosedError,
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
