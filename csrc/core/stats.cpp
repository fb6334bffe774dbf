#include "fastserve/stats.h"

#include <algorithm>
#include <cmath>

namespace fastserve {

LogHistogram::LogHistogram(double lo, double hi, double ratio)
    : lo_(lo), log_ratio_(std::log(ratio)) {
  const auto n = static_cast<size_t>(std::ceil(std::log(hi / lo) / log_ratio_)) + 2;
  buckets_.assign(n, 0);  // [0]: below lo; [n-1]: at or above hi
}

void LogHistogram::add(double x) {
  if (std::isnan(x)) return;  // it would poison the sum (the callers refuse NaN before here)
  size_t i = 0;
  if (x >= lo_) {
    // Compared as a double before the cast: x / lo_ overflows to inf for
    // huge x, and casting inf (or anything past size_t) is undefined.
    const double k = std::floor(std::log(x / lo_) / log_ratio_) + 1;
    const auto last = buckets_.size() - 1;
    i = k < static_cast<double>(last) ? static_cast<size_t>(k) : last;
  }
  ++buckets_[i];
  ++count_;
  sum_ += x;
  max_ = std::max(max_, x);
}

double LogHistogram::percentile(double q) const {
  if (count_ == 0) return 0.0;
  const auto rank = static_cast<int64_t>(std::ceil(std::clamp(q, 0.0, 1.0) * count_));
  int64_t seen = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= std::max<int64_t>(rank, 1)) {
      if (i == 0) return std::min(lo_, max_);
      // Geometric middle of the bucket, never above the largest value seen.
      const double mid = lo_ * std::exp(log_ratio_ * (static_cast<double>(i - 1) + 0.5));
      return std::min(mid, max_);
    }
  }
  return max_;
}

std::vector<int64_t> LogHistogram::cumulative(const std::vector<double>& bounds) const {
  std::vector<int64_t> out;
  out.reserve(bounds.size());
  for (double le : bounds) {
    // Buckets whose upper edge is at or below `le`.
    int64_t c = 0;
    for (size_t i = 0; i < buckets_.size(); ++i) {
      const double upper = i + 1 == buckets_.size()
                               ? INFINITY
                               : lo_ * std::exp(log_ratio_ * static_cast<double>(i));
      if (upper > le * (1 + 1e-12)) break;
      c += buckets_[i];
    }
    out.push_back(c);
  }
  return out;
}

}  // namespace fastserve
