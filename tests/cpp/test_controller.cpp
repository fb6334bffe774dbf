// Controllers on a simulated GPU: batch latency = a + b * tokens + c * sum(len^2)
// with multiplicative log-normal noise, under saturated load (every batch fills
// its budget with requests drawn from a fixed length mix). B* is the largest
// budget whose mean latency meets the target; the adaptive policies must find
// it, hold it, follow a change of cost or load, and never leave their bounds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "fastserve/controller.h"
#include "fastserve/errors.h"

namespace fastserve {
namespace {

struct CostModel {
  double a, b, c;
};

constexpr double kTarget = 0.05;
constexpr double kNoise = 0.05;  // sigma of log(latency): 5% jitter per batch
const int kLens[] = {8, 16, 32, 64, 128, 256};
const double kWeights[] = {0.15, 0.25, 0.25, 0.2, 0.1, 0.05};

struct Fill {
  int64_t tokens = 0;
  double sum_sq = 0;
};

// Requests from the mix, taken while they fit in `budget` (at least one).
Fill fill(int64_t budget, std::mt19937& rng) {
  std::discrete_distribution<int> pick(std::begin(kWeights), std::end(kWeights));
  Fill f;
  while (true) {
    const int len = kLens[pick(rng)];
    if (f.tokens + len > budget) {
      if (f.tokens == 0) f = {len, double(len) * len};
      return f;
    }
    f.tokens += len;
    f.sum_sq += double(len) * len;
  }
}

double latency(const CostModel& m, const Fill& f) { return m.a + m.b * f.tokens + m.c * f.sum_sq; }

// Mean latency of a saturated batch with this budget, noiseless; common random
// numbers (one seed for every budget) keep it monotone in the budget.
double mean_latency(const CostModel& m, int64_t budget) {
  std::mt19937 rng(12345);
  double acc = 0;
  const int n = 200;
  for (int i = 0; i < n; ++i) acc += latency(m, fill(budget, rng));
  return acc / n;
}

int64_t best_budget(const CostModel& m, double target = kTarget) {
  int64_t lo = 1, hi = int64_t{1} << 16;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (mean_latency(m, mid) <= target) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct Plant {
  std::mt19937 rng;
  std::lognormal_distribution<double> noise{-kNoise * kNoise / 2, kNoise};
  explicit Plant(unsigned seed) : rng(seed) {}

  // One batch: `demand` caps the tokens on offer (light load); returns the
  // budget in force after the controller saw it.
  int64_t step(Controller& c, const CostModel& m, int64_t demand = INT64_MAX) {
    const int64_t budget = c.budget();
    const Fill f = fill(std::min(budget, demand), rng);
    Observation o;
    o.tokens = f.tokens;
    o.budget = budget;
    o.batch_size = std::max<int64_t>(1, f.tokens / 50);
    o.latency_s = latency(m, f) * noise(rng);
    o.queue_depth = demand == INT64_MAX ? 1000 : 0;
    c.observe(o);
    return c.budget();
  }
};

ControllerConfig config_for(const std::string& policy) {
  ControllerConfig c;
  c.policy = policy;
  c.target_latency_s = kTarget;
  c.min_tokens = 32;
  c.max_tokens = 65536;
  return c;
}

// Band around B* that every budget of the steady state must stay in.
// seed and model: +-10%. aimd: [0.80, 1.10]. AIMD backs off on any single
// miss, so it settles where P(miss) = step / (step + backoff share), a tail
// quantile of latency rather than the mean: with 5% noise and ~1% of
// jitter from the batch mix, misses come at 0.90-0.95 B*, and one backoff
// (5%) from there lands at 0.85-0.90 B*; two misses in a row reach ~0.82.
// No AIMD tuning removes this: a smaller backoff slows the reaction to a
// real step in cost, and the quantile bias comes from the noise itself.
// (Measured minimum over the seeds below: 0.82; bound 0.80.)
double lower_band(const std::string& policy) { return policy == "aimd" ? 0.80 : 0.90; }
constexpr double kUpperBand = 1.10;

class AdaptivePolicy : public ::testing::TestWithParam<std::string> {};

struct Trace {
  std::vector<int64_t> budgets;
  // First step whose budget is within 10% of B*, or -1.
  int converged_at(int64_t best, size_t from = 0) const {
    for (size_t i = from; i < budgets.size(); ++i)
      if (std::fabs(double(budgets[i]) / best - 1) <= 0.10) return int(i - from);
    return -1;
  }
};

void expect_in_band(const std::vector<int64_t>& budgets, size_t from, size_t to, int64_t best,
                    double lo, double hi, const std::string& what) {
  for (size_t i = from; i < to; ++i) {
    const double r = double(budgets[i]) / double(best);
    ASSERT_GE(r, lo) << what << ": step " << i << " budget " << budgets[i] << " B* " << best;
    ASSERT_LE(r, hi) << what << ": step " << i << " budget " << budgets[i] << " B* " << best;
  }
}

TEST_P(AdaptivePolicy, ConvergesToBestBudgetAndHoldsItUnderNoise) {
  const CostModel m{0.010, 5e-6, 2e-8};
  const int64_t best = best_budget(m);
  for (unsigned seed : {1u, 2u, 3u}) {
    auto c = make_controller(config_for(GetParam()));
    Plant plant(seed);
    Trace t;
    for (int i = 0; i < 500; ++i) t.budgets.push_back(plant.step(*c, m));
    const int conv = t.converged_at(best);
    ASSERT_GE(conv, 0) << "seed " << seed;
    // aimd climbs additively (64 tokens a step) from the initial 1448.
    EXPECT_LE(conv, GetParam() == "aimd" ? 120 : 40) << "seed " << seed;
    expect_in_band(t.budgets, 200, 500, best, lower_band(GetParam()), kUpperBand,
                   "steady state, seed " + std::to_string(seed));
  }
}

TEST_P(AdaptivePolicy, FollowsAStepChangeInCost) {
  const CostModel before{0.010, 5e-6, 2e-8}, after{0.010, 10e-6, 2e-8};
  const int64_t best_before = best_budget(before), best_after = best_budget(after);
  ASSERT_LT(best_after, 0.7 * best_before);  // a real step, well outside the band
  auto c = make_controller(config_for(GetParam()));
  Plant plant(7);
  Trace t;
  for (int i = 0; i < 300; ++i) t.budgets.push_back(plant.step(*c, before));
  for (int i = 0; i < 400; ++i) t.budgets.push_back(plant.step(*c, after));
  const int conv = t.converged_at(best_after, 300);
  ASSERT_GE(conv, 0);
  EXPECT_LE(conv, 30);
  expect_in_band(t.budgets, 450, 700, best_after, lower_band(GetParam()), kUpperBand,
                 "after b doubled");
  // And back: the cost drops again.
  for (int i = 0; i < 400; ++i) t.budgets.push_back(plant.step(*c, before));
  const int back = t.converged_at(best_before, 700);
  ASSERT_GE(back, 0);
  EXPECT_LE(back, GetParam() == "aimd" ? 120 : 40);
  expect_in_band(t.budgets, 900, 1100, best_before, lower_band(GetParam()), kUpperBand,
                 "after b halved");
}

TEST_P(AdaptivePolicy, LightLoadDoesNotMoveTheBudgetAndSaturationResumesTracking) {
  const CostModel m{0.010, 5e-6, 2e-8};
  const int64_t best = best_budget(m);
  auto c = make_controller(config_for(GetParam()));
  Plant plant(11);
  Trace t;
  for (int i = 0; i < 300; ++i) t.budgets.push_back(plant.step(*c, m));
  // Light load: only a fifth of B* is on offer, so every batch is far below
  // the budget and far below the target; that says nothing about larger
  // budgets, and the budget must not run away (up or down).
  for (int i = 0; i < 300; ++i) t.budgets.push_back(plant.step(*c, m, best / 5));
  expect_in_band(t.budgets, 300, 600, best, lower_band(GetParam()), kUpperBand, "light load");
  for (int i = 0; i < 300; ++i) t.budgets.push_back(plant.step(*c, m));
  expect_in_band(t.budgets, 600, 900, best, lower_band(GetParam()), kUpperBand,
                 "saturated again");
}

TEST_P(AdaptivePolicy, NeverLeavesItsTokenBounds) {
  // Far too cheap (B* above max_tokens), then far too expensive (B* below
  // min_tokens): the budget pins to each bound and never crosses it.
  ControllerConfig cfg = config_for(GetParam());
  cfg.min_tokens = 256;
  cfg.max_tokens = 4096;
  auto c = make_controller(cfg);
  Plant plant(5);
  const CostModel cheap{0.001, 1e-7, 0}, dear{0.040, 1e-4, 1e-7};
  std::vector<int64_t> budgets;
  for (int i = 0; i < 300; ++i) budgets.push_back(plant.step(*c, cheap));
  // (the fitted policies approach a bound half way in log space per step)
  EXPECT_GE(budgets.back(), 0.99 * cfg.max_tokens);
  for (int i = 0; i < 300; ++i) budgets.push_back(plant.step(*c, dear));
  if (std::string(GetParam()) == "model") {
    // Not even min_tokens meets the target here: model aims at the
    // throughput knee 4a/b instead (ModelPolicy.InfeasibleTarget... below).
    EXPECT_GE(budgets.back(), 2 * 0.040 / 1e-4);  // within a factor 2 of the knee, far above the floor
    EXPECT_LE(budgets.back(), 8 * 0.040 / 1e-4);
  } else {
    EXPECT_LE(budgets.back(), 1.01 * cfg.min_tokens);
  }
  for (int64_t b : budgets) {
    ASSERT_GE(b, cfg.min_tokens);
    ASSERT_LE(b, cfg.max_tokens);
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, AdaptivePolicy, ::testing::Values("aimd", "seed", "model"),
                         [](const auto& info) { return info.param; });

TEST(ModelPolicy, InfeasibleTargetAimsAtTheThroughputKneeNotTheFloor) {
  // a = 60 ms > D = 50 ms: no budget meets the target. Shrinking to the
  // floor would only cut throughput; the budget settles near 4a/b, where
  // throughput is 80% of its asymptote, and comes back down once the
  // target is feasible again.
  ControllerConfig cfg = config_for("model");
  cfg.target_latency_s = 0.050;
  cfg.min_tokens = 32;
  cfg.max_tokens = 16384;
  auto c = make_controller(cfg);
  Plant plant(21);
  const CostModel overloaded{0.060, 5e-5, 0}, normal{0.005, 5e-5, 0};
  int64_t b = 0;
  for (int i = 0; i < 300; ++i) b = plant.step(*c, overloaded);
  // Within a factor 2 of the knee (the intercept is fitted from batches near
  // one size, so it is only roughly identified): throughput 67-89% of 1/b.
  EXPECT_GE(b, 2 * 0.060 / 5e-5);
  EXPECT_LE(b, 8 * 0.060 / 5e-5);
  for (int i = 0; i < 300; ++i) b = plant.step(*c, normal);
  const double best = (cfg.model_headroom * 0.050 - 0.005) / 5e-5;
  EXPECT_NEAR(b, best, 0.15 * best);
}

TEST(ModelPolicy, GrowsPastTheLatencyBudgetWhenArrivalsNeedMoreThroughput) {
  // a = 5 ms, b = 0.15 ms/token, D = 25 ms: latency alone allows ~130 tokens,
  // whose throughput (~5,200 tokens/s) cannot carry 5,000 tokens/s with a
  // margin. The load term asks B = m r a / (1 - m r b) = 500 tokens; with no
  // arrivals reported the latency budget stands.
  const double a = 0.005, b = 1.5e-4;
  auto run = [&](double arrival, double queued = 0) {
    ControllerConfig cfg = config_for("model");
    cfg.target_latency_s = 0.025;
    auto c = make_controller(cfg);
    std::mt19937 rng(5);
    std::lognormal_distribution<double> noise(0.0, 0.02);
    for (int i = 0; i < 400; ++i) {
      Observation o;
      o.budget = c->budget();
      o.tokens = o.budget;
      o.latency_s = (a + b * o.tokens) * noise(rng);
      o.arrival_tokens_per_s = arrival;
      o.queued_tokens = queued;
      c->observe(o);
    }
    return static_cast<double>(c->budget());
  };
  const double latency_only = (0.98 * 0.025 - a) / b;
  EXPECT_NEAR(run(0), latency_only, 0.15 * latency_only);
  const double mr = 1.25 * 5000;
  const double load = mr * a / (1 - mr * b);
  const double got = run(5000);
  EXPECT_NEAR(got, load, 0.15 * load);
  EXPECT_GE(got / (a + b * got), 5000);  // its throughput carries the arrivals
  // A backlog counts as arrivals to drain within 2 D: 250 queued tokens with a
  // 25 ms target are 5,000 tokens/s, as above.
  EXPECT_NEAR(run(0, 250), load, 0.15 * load);
  // Arrivals no batch can carry (r b >= 1): take the most there is.
  EXPECT_GE(run(1e5), 0.99 * config_for("model").max_tokens);
}

TEST(StaticController, KeepsItsBudgetWhateverItObserves) {
  ControllerConfig cfg = config_for("static");
  cfg.initial_tokens = 1000;
  auto c = make_controller(cfg);
  Plant plant(3);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(plant.step(*c, {0.1, 1e-4, 0}), 1000);
  EXPECT_STREQ(c->name(), "static");
}

TEST(ControllerConfig, InitialBudgetIsClampedOrTheGeometricMeanOfTheBounds) {
  ControllerConfig cfg = config_for("model");
  cfg.min_tokens = 64;
  cfg.max_tokens = 4096;
  EXPECT_EQ(make_controller(cfg)->budget(), 512);
  cfg.initial_tokens = 100000;
  EXPECT_EQ(make_controller(cfg)->budget(), 4096);
  cfg.initial_tokens = 1;
  EXPECT_EQ(make_controller(cfg)->budget(), 64);
}

TEST(ControllerConfig, RejectsInvalidSettings) {
  auto bad = [](auto mutate) {
    ControllerConfig c;
    mutate(c);
    EXPECT_THROW(make_controller(c), InvalidArgument);
  };
  bad([](ControllerConfig& c) { c.policy = "pid"; });
  bad([](ControllerConfig& c) { c.target_latency_s = 0; });
  bad([](ControllerConfig& c) { c.target_latency_s = INFINITY; });
  bad([](ControllerConfig& c) { c.min_tokens = 0; });
  bad([](ControllerConfig& c) { c.max_tokens = c.min_tokens - 1; });
  bad([](ControllerConfig& c) { c.initial_tokens = -1; });
  bad([](ControllerConfig& c) { c.aimd_step_tokens = 0; });
  bad([](ControllerConfig& c) { c.aimd_backoff = 1.0; });
  bad([](ControllerConfig& c) { c.seed_lambda = 0; });
  bad([](ControllerConfig& c) { c.seed_smoothing = 0; });
  bad([](ControllerConfig& c) { c.max_step = 0; });
  bad([](ControllerConfig& c) { c.model_headroom = 1.5; });
  bad([](ControllerConfig& c) { c.fit_forgetting = 1.0; });
  bad([](ControllerConfig& c) { c.max_tokens = kMaxBudgetTokens + 1; });  // INT64_MIN once clamped
  bad([](ControllerConfig& c) { c.aimd_step_tokens = kMaxBudgetTokens + 1; });
  bad([](ControllerConfig& c) { c.max_step = INFINITY; });
  for (const char* p : {"static", "aimd", "seed", "model"}) {
    ControllerConfig c;
    c.policy = p;
    EXPECT_STREQ(make_controller(c)->name(), p);
  }
}

// The FastServe write-up's example: D = 100 ms, measured L = 120 ms,
// T = 800/s, T_max = 1000/s, lambda = 0.6. On L = a + b B, T = B / L and
// T_max = 1 / b: b = 1 ms per unit, B = T L = 96, a = L - b B = 24 ms.
TEST(SeedObjective, WorkedExampleAboveTargetHasPositiveGradientSoDescentShrinksB) {
  const SeedObjective J{0.6, 0.100, 0.02, 0.024, 0.001};
  const double B = 96;
  ASSERT_NEAR(J.a + J.b * B, 0.120, 1e-12);
  ASSERT_NEAR(B / (J.a + J.b * B), 800, 1e-9);
  ASSERT_NEAR(1 / J.b, 1000, 1e-9);
  EXPECT_GT(J.dJ_dB(B), 0);
  // The derivative is the derivative of J.
  const double h = 1e-4;
  EXPECT_NEAR(J.dJ_dB(B), (J.J(B + h) - J.J(B - h)) / (2 * h), 1e-6);
  // Well below the target (L <= 0.9 D, B <= 66) latency costs nothing and
  // throughput still grows with B: the gradient is negative.
  for (double b = 1; b <= 66; b += 1) EXPECT_LT(J.dJ_dB(b), 0) << "B=" << b;
  // The minimiser lies between, just under the target.
  const double Bmin = J.minimiser(1, 1e6);
  EXPECT_GT(Bmin, 66);
  EXPECT_LT(Bmin, 76);  // L(76) = D
  EXPECT_NEAR(J.dJ_dB(Bmin), 0, 1e-6);
}

TEST(SeedObjective, MinimumLiesWithinTenPercentBelowTheTargetBudget) {
  // Holds while a < lambda / (2 (1 - lambda)) D = 0.75 D: beyond that the
  // throughput gain at L = D outweighs the hinge's slope there and the
  // minimum moves (slightly) above the target, by design of J.
  const double D = 0.05;
  for (double smoothing : {0.02, ControllerConfig{}.seed_smoothing}) {
    for (double a_frac : {0.05, 0.1, 0.24, 0.5}) {
      for (double b : {1e-6, 1e-5, 1e-3}) {
        const SeedObjective J{0.6, D, smoothing, a_frac * D, b};
        const double best = (D - J.a) / b;  // B*: L(B*) = D
        const double Bmin = J.minimiser(1e-3, 1e9);
        EXPECT_LE(Bmin, best) << "a/D=" << a_frac << " b=" << b << " s=" << smoothing;
        EXPECT_GE(Bmin, 0.9 * best) << "a/D=" << a_frac << " b=" << b << " s=" << smoothing;
        EXPECT_LT(J.J(Bmin), J.J(0.9 * Bmin));
        EXPECT_LT(J.J(Bmin), J.J(1.1 * Bmin));
      }
    }
  }
}

TEST(LatencyModel, RecoversInterceptAndSlopeFromNoiselessData) {
  LatencyModel fit(0.9);
  EXPECT_FALSE(fit.ready());
  const double a = 0.012, b = 3.5e-6;
  for (int i = 0; i < 40; ++i) {
    const double x = 500 + 137 * (i % 11);
    fit.add(x, a + b * x);
  }
  ASSERT_TRUE(fit.ready());
  EXPECT_NEAR(fit.intercept(), a, 1e-9);
  EXPECT_NEAR(fit.slope(), b, 1e-12);
  EXPECT_NEAR(fit.predict(4000), a + b * 4000, 1e-9);
  EXPECT_EQ(fit.count(), 40);
  // The largest recent x, decaying towards the latest ones.
  EXPECT_GE(fit.recent_max_tokens(), 500 + 137 * 6);
  EXPECT_LE(fit.recent_max_tokens(), 500 + 137 * 10);
}

TEST(LatencyModel, ConstantTokensKeepTheInterceptAndPassThroughTheMean) {
  // Without a spread of tokens the slope is not identifiable: the model
  // keeps the last intercept and matches the latency at the one x seen.
  LatencyModel fresh(0.9);
  for (int i = 0; i < 20; ++i) fresh.add(2048, 0.03);
  EXPECT_TRUE(std::isfinite(fresh.intercept()) && std::isfinite(fresh.slope()));
  EXPECT_GE(fresh.intercept(), 0);
  EXPECT_GE(fresh.slope(), 0);
  EXPECT_NEAR(fresh.predict(2048), 0.03, 1e-12);

  LatencyModel fit(0.9);
  for (int i = 0; i < 30; ++i) {
    const double x = 1000 + 100 * (i % 7);
    fit.add(x, 0.01 + 1e-5 * x);
  }
  ASSERT_NEAR(fit.intercept(), 0.01, 1e-9);
  // The cost doubles while the budget stays put.
  for (int i = 0; i < 60; ++i) fit.add(1300, 0.01 + 2e-5 * 1300);
  EXPECT_NEAR(fit.intercept(), 0.01, 1e-9);
  // (the forgotten old points still weigh 0.9^60: 0.2% of the fit)
  EXPECT_NEAR(fit.slope(), 2e-5, 2e-5 * 0.005);
  EXPECT_NEAR(fit.predict(1300), 0.01 + 2e-5 * 1300, 0.036 * 0.005);
}

TEST(LatencyModel, PointsNotFiniteAreIgnored) {
  // One NaN or infinite time would otherwise make every sum NaN for good.
  LatencyModel m(0.99);
  for (int i = 1; i <= 20; ++i) {
    m.add(100.0 * i, 0.002 + 1e-5 * 100.0 * i);
    if (i == 10) {
      m.add(500, std::nan(""));
      m.add(500, INFINITY);
      m.add(INFINITY, 0.01);
    }
  }
  ASSERT_TRUE(m.ready());
  EXPECT_NEAR(m.slope(), 1e-5, 1e-9);
  EXPECT_NEAR(m.intercept(), 0.002, 1e-7);
}

TEST(LatencyModel, PointsThatWouldOverflowTheSumsAreIgnored) {
  // y^2 past the largest double made the sum of squares inf for good: the
  // fit was then never identified again.
  LatencyModel m(0.9);
  m.add(100, 0.003);
  m.add(200, 1e200);
  for (int i = 1; i <= 200; ++i) m.add(100.0 * (i % 20 + 1), 0.002 + 1e-5 * 100.0 * (i % 20 + 1));
  ASSERT_TRUE(m.ready());
  EXPECT_NEAR(m.slope(), 1e-5, 1e-8);
  EXPECT_NEAR(m.intercept(), 0.002, 1e-6);
}

TEST(Controllers, TheSeedPolicyReportsNoObjectiveBeforeItHasASlope) {
  // With no fitted slope J is inf - inf: NaN in stats(), which strict JSON
  // cannot carry.
  ControllerConfig c;
  c.policy = "seed";
  auto ctl = make_controller(c);
  for (const auto& [key, value] : ctl->state()) EXPECT_TRUE(std::isfinite(value)) << key;
  Observation o;
  o.tokens = 100, o.budget = ctl->budget(), o.batch_size = 1, o.latency_s = 0, o.queue_depth = 1;
  for (int i = 0; i < 5; ++i) ctl->observe(o);  // batches of no measured time
  for (const auto& [key, value] : ctl->state()) EXPECT_TRUE(std::isfinite(value)) << key;
}

TEST(Controllers, TheLargestBudgetStaysPositiveInEveryPolicy) {
  for (const char* p : {"aimd", "seed", "model"}) {
    ControllerConfig c;
    c.policy = p;
    c.min_tokens = 1;
    c.max_tokens = kMaxBudgetTokens;
    c.initial_tokens = kMaxBudgetTokens;
    c.aimd_step_tokens = kMaxBudgetTokens;
    auto ctl = make_controller(c);
    for (int i = 0; i < 50; ++i) {
      Observation o;
      o.tokens = ctl->budget();
      o.budget = ctl->budget();
      o.batch_size = 1;
      o.latency_s = 1e-3;
      o.now = i;
      o.queued_tokens = 1e18;
      ctl->observe(o);
      ASSERT_GE(ctl->budget(), 1) << p;
      ASSERT_LE(ctl->budget(), kMaxBudgetTokens) << p;
    }
  }
}

TEST(LatencyModel, NoisySlopeNearZeroIsNotTrusted) {
  // A narrow spread of tokens with 5% latency noise: a regression there
  // can return a slope near 0 (or an intercept below 0); the model must
  // keep a positive slope consistent with the mean instead.
  LatencyModel fit(0.9);
  std::mt19937 rng(9);
  std::lognormal_distribution<double> noise(0, 0.05);
  for (int i = 0; i < 30; ++i) {
    const double x = 1000 + 500 * (i % 5);
    fit.add(x, (0.01 + 1e-5 * x) * noise(rng));
  }
  for (int i = 0; i < 2000; ++i) {
    const double x = 5000 + (i % 3) * 16;
    fit.add(x, (0.01 + 1e-5 * x) * noise(rng));
    ASSERT_GT(fit.slope(), 2e-6) << i;
    ASSERT_GE(fit.intercept(), 0) << i;
    ASSERT_LT(fit.intercept(), 0.03) << i;
  }
}

}  // namespace
}  // namespace fastserve
