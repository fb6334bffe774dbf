#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "fastserve/stats.h"

namespace fastserve {
namespace {

// Nearest-rank percentile, the definition LogHistogram approximates.
double exact_percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  const auto rank = std::max<size_t>(1, size_t(std::ceil(q * v.size())));
  return v[rank - 1];
}

TEST(LogHistogram, PercentilesAreWithinTwoAndAHalfPercentOfExact) {
  std::mt19937 rng(42);
  std::lognormal_distribution<double> lognormal(std::log(0.02), 0.8);
  std::uniform_real_distribution<double> uniform(1e-4, 2.0);
  for (int dist = 0; dist < 2; ++dist) {
    LogHistogram h;
    std::vector<double> xs;
    for (int i = 0; i < 20000; ++i) {
      const double x = dist ? uniform(rng) : lognormal(rng);
      xs.push_back(x);
      h.add(x);
    }
    ASSERT_EQ(h.count(), 20000);
    for (double q : {0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0}) {
      const double exact = exact_percentile(xs, q), est = h.percentile(q);
      // r = 1.04 buckets and the geometric middle: |error| <= sqrt(1.04) - 1.
      EXPECT_NEAR(est / exact, 1.0, 0.025) << "dist " << dist << " q " << q;
    }
    EXPECT_DOUBLE_EQ(h.max(), *std::max_element(xs.begin(), xs.end()));
    double sum = 0;
    for (double x : xs) sum += x;
    EXPECT_NEAR(h.sum(), sum, 1e-9 * sum);
    EXPECT_NEAR(h.mean(), sum / xs.size(), 1e-9);
  }
}

TEST(LogHistogram, EmptyAndOutOfRangeValues) {
  LogHistogram h(1e-3, 1.0);
  EXPECT_EQ(h.percentile(0.5), 0.0);
  EXPECT_EQ(h.mean(), 0.0);
  h.add(1e-6);  // below lo: reported as at most lo
  EXPECT_LE(h.percentile(0.5), 1e-3);
  h.add(50.0);  // above hi: the top bucket, capped at the max seen
  EXPECT_LE(h.percentile(1.0), 50.0);
  EXPECT_GT(h.percentile(1.0), 1.0);
  LogHistogram one;
  one.add(0.25);
  EXPECT_NEAR(one.percentile(0.5), 0.25, 0.25 * 0.02);
  EXPECT_LE(one.percentile(0.99), 0.25);
}

TEST(LogHistogram, HugeValuesLandInTheTopBucketAndNaNIsDropped) {
  // x / lo overflowed to inf, and the cast of inf to a bucket index was
  // undefined: 1e305 landed in bucket 1.
  LogHistogram h(1e-6, 1e3);
  h.add(1e305);
  h.add(INFINITY);
  h.add(std::nan(""));
  EXPECT_EQ(h.count(), 2);
  EXPECT_GT(h.percentile(0.5), 1e3);
  h.add(std::numeric_limits<double>::max());
  EXPECT_EQ(h.count(), 3);
}

TEST(LogHistogram, CumulativeCountsBracketTheExactCounts) {
  std::mt19937 rng(3);
  std::lognormal_distribution<double> d(std::log(0.01), 1.0);
  LogHistogram h;
  std::vector<double> xs;
  for (int i = 0; i < 5000; ++i) {
    xs.push_back(d(rng));
    h.add(xs.back());
  }
  const std::vector<double> bounds{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, INFINITY};
  const auto cum = h.cumulative(bounds);
  ASSERT_EQ(cum.size(), bounds.size());
  for (size_t i = 0; i < bounds.size(); ++i) {
    // Whole buckets below `le` only: never more than the exact count, and
    // at least every value one bucket width (4%) below it.
    const auto le_exact = std::count_if(xs.begin(), xs.end(), [&](double x) { return x <= bounds[i]; });
    const auto below = std::count_if(xs.begin(), xs.end(), [&](double x) { return x < bounds[i] / 1.04; });
    EXPECT_LE(cum[i], le_exact) << bounds[i];
    EXPECT_GE(cum[i], below) << bounds[i];
    if (i) EXPECT_GE(cum[i], cum[i - 1]);
  }
  EXPECT_EQ(cum.back(), 5000);
}

}  // namespace
}  // namespace fastserve
