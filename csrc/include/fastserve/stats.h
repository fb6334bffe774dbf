// Serving statistics: latency histogram with percentiles, batch shapes,
// padding, outcome counters. Not thread-safe by itself; the scheduler guards
// it with its lock.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fastserve {

// Log-bucketed histogram: bucket i covers [lo * r^i, lo * r^(i+1)), r = 1.04,
// so a percentile read from it is within 2% of the true value.
class LogHistogram {
 public:
  LogHistogram(double lo = 1e-6, double hi = 1e3, double ratio = 1.04);
  void add(double x);
  int64_t count() const { return count_; }
  double sum() const { return sum_; }
  double max() const { return max_; }
  double mean() const { return count_ ? sum_ / count_ : 0.0; }
  // q in [0, 1]; 0 when empty.
  double percentile(double q) const;
  // Cumulative counts at the given upper bounds (Prometheus-style "le").
  std::vector<int64_t> cumulative(const std::vector<double>& bounds) const;

 private:
  double lo_, log_ratio_;
  std::vector<int64_t> buckets_;
  int64_t count_ = 0;
  double sum_ = 0, max_ = 0;
};

struct Stats {
  LogHistogram latency_s;        // arrival to completion, per request
  LogHistogram queue_s;          // arrival to batch assembly, per request
  LogHistogram batch_compute_s;  // per batch
  LogHistogram batch_size{1, 1 << 20, 1.0905};     // requests per batch (~8 buckets/octave)
  LogHistogram batch_tokens{1, 1 << 24, 1.0905};   // real tokens per batch
  // submitted: admitted to the queue; rejected: queue at capacity; refused:
  // predicted at submit to miss the deadline; shed: dropped at batch
  // formation, predicted to miss it; expired: deadline passed before compute;
  // preempted: running batches paused between layers for an urgent batch;
  // balanced: batches that took only their worker's share of a short queue.
  int64_t submitted = 0, rejected = 0, refused = 0, shed = 0, completed = 0, failed = 0, expired = 0,
          cancelled = 0, batches = 0, failed_batches = 0, closed_unserved = 0, preempted = 0,
          balanced = 0;
  int64_t real_tokens = 0, padded_tokens = 0;  // completed batches: real, and computed (with padding)
  double first_submit_at = -1, last_complete_at = -1;
};

}  // namespace fastserve
