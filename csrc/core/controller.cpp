#include "fastserve/controller.h"

#include <algorithm>
#include <cmath>

#include "fastserve/errors.h"

namespace fastserve {

namespace {

double clampd(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

int64_t initial_budget(const ControllerConfig& c) {
  if (c.initial_tokens > 0) return std::clamp(c.initial_tokens, c.min_tokens, c.max_tokens);
  return static_cast<int64_t>(std::sqrt(static_cast<double>(c.min_tokens) * c.max_tokens));
}

class StaticController final : public Controller {
 public:
  explicit StaticController(const ControllerConfig& c) : budget_(initial_budget(c)) {}
  const char* name() const override { return "static"; }
  int64_t budget() const override { return budget_; }
  void observe(const Observation&) override {}
  std::map<std::string, double> state() const override { return {}; }

 private:
  int64_t budget_;
};

// A batch is budget-bound when it used most of its budget: only then does
// its latency say anything about a larger budget. Below this, the queue and
// not the budget limited the batch.
constexpr double kBoundFraction = 0.8;

bool budget_bound(const Observation& o) {
  return static_cast<double>(o.tokens) >= kBoundFraction * static_cast<double>(o.budget);
}

class AimdController final : public Controller {
 public:
  explicit AimdController(const ControllerConfig& c) : c_(c), budget_(initial_budget(c)) {}
  const char* name() const override { return "aimd"; }
  int64_t budget() const override { return budget_; }

  void observe(const Observation& o) override {
    if (o.latency_s > c_.target_latency_s) {
      // Back off from what actually ran: a small batch that still missed
      // means the budget is far too large.
      double base = std::min<double>(budget_, std::max<int64_t>(o.tokens, c_.min_tokens));
      set(base * c_.aimd_backoff);
      ++decreases_;
    } else if (budget_bound(o)) {
      set(static_cast<double>(budget_ + c_.aimd_step_tokens));
      ++increases_;
    }
  }

  std::map<std::string, double> state() const override {
    return {{"increases", static_cast<double>(increases_)},
            {"decreases", static_cast<double>(decreases_)}};
  }

 private:
  void set(double b) {
    budget_ = static_cast<int64_t>(clampd(std::round(b), c_.min_tokens, c_.max_tokens));
  }
  ControllerConfig c_;
  int64_t budget_;
  int64_t increases_ = 0, decreases_ = 0;
};

// Shared by the model-based policies: never move the budget far beyond what
// has been measured, so a poorly identified fit cannot jump to max_tokens.
class FittedController : public Controller {
 public:
  explicit FittedController(const ControllerConfig& c)
      : c_(c), budget_(initial_budget(c)), fit_(c.fit_forgetting) {}
  int64_t budget() const override { return budget_; }

  void observe(const Observation& o) override {
    fit_.add(static_cast<double>(o.tokens), o.latency_s);
    if (!fit_.ready()) return;
    // Under target with a batch the queue limited says nothing about larger
    // budgets; over target always counts.
    if (!budget_bound(o) && o.latency_s <= c_.target_latency_s) return;
    double cur = static_cast<double>(budget_);
    // Until latency is seen to grow with tokens the model has nothing to say
    // about B: explore up while under target, back off on a miss.
    double step = fit_.slope() > 0 ? clampd(log_step(cur), -c_.max_step, c_.max_step)
                  : o.latency_s > c_.target_latency_s ? -c_.max_step
                                                      : c_.max_step;
    double next = cur * std::exp(step);
    // Explore at most one trust step past the largest batch measured.
    double ceiling = std::max(fit_.recent_max_tokens(), static_cast<double>(c_.min_tokens)) *
                     std::exp(c_.max_step);
    if (next > cur) next = std::min(next, std::max(cur, ceiling));
    budget_ = static_cast<int64_t>(clampd(std::round(next), c_.min_tokens, c_.max_tokens));
    ++steps_;
  }

  std::map<std::string, double> state() const override {
    auto s = extra_state();
    s["fit_intercept_s"] = fit_.intercept();
    s["fit_slope_s_per_token"] = fit_.slope();
    s["steps"] = static_cast<double>(steps_);
    return s;
  }

 protected:
  // The desired change of log(budget), before the trust region.
  virtual double log_step(double budget) const = 0;
  virtual std::map<std::string, double> extra_state() const { return {}; }
  ControllerConfig c_;
  int64_t budget_;
  LatencyModel fit_;
  int64_t steps_ = 0;
};

class ModelController final : public FittedController {
 public:
  using FittedController::FittedController;
  const char* name() const override { return "model"; }

 protected:
  double log_step(double budget) const override {
    double want = clampd(goal_tokens(), c_.min_tokens, c_.max_tokens);
    // Move half way (in log space) each step: damps the fit's noise.
    return 0.5 * std::log(want / budget);
  }
  void observe(const Observation& o) override {
    // A backlog is work that must also be carried: drain it within one
    // request-latency target (2 D), on top of the arrivals.
    arrival_ = o.arrival_tokens_per_s + o.queued_tokens / (2 * c_.target_latency_s);
    timeout_ = o.request_timeout_s;
    tail_ = std::max(0.0, o.compute_tail_s);
    FittedController::observe(o);
  }
  // The larger of two budgets:
  // - latency: the largest B whose predicted latency meets the target. When
  //   not even the smallest batch can (an overloaded or slower machine),
  //   shrinking would only cut throughput, grow the queue and miss by more:
  //   aim instead at 4a/b, where throughput B / (a + bB) reaches 80% of its
  //   asymptote 1/b.
  // - load: the smallest B whose throughput B / (a + bB) carries the arrival
  //   rate r (plus the queued backlog, drained within 2 D) with a margin m:
  //   B = m r a / (1 - m r b); max_tokens when no batch can. Batches sized
  //   for latency alone let a queue grow without bound once arrivals outrun
  //   them (docs/design.md, "Controllers").
  double goal_tokens() const {
    const double b = fit_.slope(), a = fit_.intercept();
    // A request waits for the running batch (<= L), runs in its own (L) and
    // meets at most one stall J (q95 of a batch's excess over the fit), so
    // 2 L + J <= 2 D: aim the fit at D - J / 2. Never below D / 2: a stall
    // does not shrink with the batch, so smaller batches would only cut
    // throughput (at most by 2a / D at this floor) and refuse more
    // (docs/design.md, "Target = tail latency").
    const double D = c_.model_headroom * c_.target_latency_s;
    const double goal = std::max(D - tail_ / 2, D / 2);
    if (b <= 0) return static_cast<double>(c_.max_tokens);
    const double latency = goal <= a + b * static_cast<double>(c_.min_tokens) ? 4 * a / b : (goal - a) / b;
    const double mr = c_.model_load_margin * arrival_;
    double load = mr * b >= 1 ? static_cast<double>(c_.max_tokens) : mr * a / (1 - mr * b);
    // Carrying the load never justifies a batch its requests cannot wait
    // for: a request waits for the running batch, then runs in its own, so
    // a batch may take half the tightest timeout. With timeouts at the
    // target (2 D) this cap is the latency budget itself, and overload is
    // left to admission and shedding rather than to ever larger batches.
    if (std::isfinite(timeout_)) load = std::min(load, ((c_.model_headroom * timeout_ - tail_) / 2 - a) / b);
    return std::max(latency, load);
  }
  std::map<std::string, double> extra_state() const override {
    return {{"model_goal_tokens", goal_tokens()}, {"arrival_tokens_per_s", arrival_}, {"tail_s", tail_}};
  }

 private:
  double arrival_ = 0, timeout_ = INFINITY, tail_ = 0;
};

class SeedController final : public FittedController {
 public:
  using FittedController::FittedController;
  const char* name() const override { return "seed"; }

 protected:
  SeedObjective objective() const {
    return {c_.seed_lambda, c_.target_latency_s, c_.seed_smoothing, fit_.intercept(),
            fit_.slope()};
  }
  // J is convex in B on the linear model (dJ/dB rises with B: the hinge's
  // slope grows and the throughput gain a b / L^2 shrinks), so its minimiser
  // is the root of dJ/dB, found by bisection on log B. The step then goes half
  // way there in log space, like the model policy, which damps the fit's
  // noise. A plain Newton step on J does not work here: away from the hinge
  // (|L - D| > s D) the curvature is nearly zero, so -grad / curv is huge and
  // the budget swings between +-max_step even without noise.
  double log_step(double budget) const override {
    SeedObjective J = objective();
    return 0.5 * std::log(J.minimiser(c_.min_tokens, c_.max_tokens) / budget);
  }
  std::map<std::string, double> extra_state() const override {
    // Only once the fit has a slope: with b = 0 (no fit yet, or batches of
    // no measured time) Tmax = 1 / b is infinite and J is NaN, which strict
    // JSON cannot carry.
    SeedObjective J = objective();
    double B = static_cast<double>(budget_);
    const double j = J.J(B), g = J.dJ_dB(B);
    if (!std::isfinite(j) || !std::isfinite(g)) return {};
    return {{"objective", j}, {"gradient", g}};
  }
};

}  // namespace

void ControllerConfig::validate() const {
  auto fail = [](const std::string& m) { throw InvalidArgument("controller: " + m); };
  if (policy != "static" && policy != "aimd" && policy != "seed" && policy != "model")
    fail("unknown policy '" + policy + "' (expected static, aimd, seed or model)");
  if (!(target_latency_s > 0) || !std::isfinite(target_latency_s))
    fail("target_latency_s must be positive");
  if (min_tokens < 1) fail("min_tokens must be >= 1");
  if (max_tokens < min_tokens) fail("max_tokens must be >= min_tokens");
  // Budgets are clamped in double and stepped in int64: bounded far below
  // where either loses exactness or overflows.
  if (max_tokens > kMaxBudgetTokens) fail("max_tokens must be <= 2^48");
  if (initial_tokens < 0) fail("initial_tokens must be >= 0");
  if (aimd_step_tokens < 1 || aimd_step_tokens > kMaxBudgetTokens) fail("aimd_step_tokens must be in [1, 2^48]");
  if (!(aimd_backoff > 0 && aimd_backoff < 1)) fail("aimd_backoff must be in (0, 1)");
  if (!(seed_lambda > 0 && seed_lambda < 1)) fail("seed_lambda must be in (0, 1)");
  if (!(seed_smoothing > 0)) fail("seed_smoothing must be positive");
  if (!(max_step > 0) || !std::isfinite(max_step)) fail("max_step must be positive and finite");
  if (!(model_headroom > 0 && model_headroom <= 1)) fail("model_headroom must be in (0, 1]");
  if (!(fit_forgetting > 0 && fit_forgetting < 1)) fail("fit_forgetting must be in (0, 1)");
  if (!(model_load_margin >= 1)) fail("model_load_margin must be >= 1");
}

void LatencyModel::add(double x, double y) {
  // A point that would make any sum infinite (or NaN) is dropped: it would
  // poison every sum, and the fit, for good.
  const double sx = f_ * sx_ + x, sy = f_ * sy_ + y, sxx = f_ * sxx_ + x * x, sxy = f_ * sxy_ + x * y,
               syy = f_ * syy_ + y * y;
  if (!std::isfinite(sx + sy + sxx + sxy + syy)) return;
  sw_ = f_ * sw_ + 1;
  sww_ = f_ * f_ * sww_ + 1;
  sx_ = sx;
  sy_ = sy;
  sxx_ = sxx;
  sxy_ = sxy;
  syy_ = syy;
  xmax_ = std::max(x, xmax_ * f_ + (1 - f_) * x);
  ++n_;
  const double mx = sx_ / sw_, my = sy_ / sw_;
  const double vx = sxx_ / sw_ - mx * mx, vy = std::max(0.0, syy_ / sw_ - my * my);
  const double cov = sxy_ / sw_ - mx * my;
  // Trust the regression only when its slope is clearly positive: its
  // standard error (residual variance over the weighted spread of x, with
  // the effective sample size of the forgetting weights) under a quarter of
  // the slope. A steady budget gives a narrow x range, and a slope fitted to
  // noise there swings to 0 or to huge values; the model policy's goal
  // divides by the slope, so trusting such a fit can move the budget by a
  // whole trust-region step (figures: benchmarks/README.md).
  bool identified = false;
  if (n_ >= 2 && vx > 1e-9 * mx * mx) {
    const double b = cov / vx;
    const double n_eff = sw_ * sw_ / sww_;
    const double resid = std::max(0.0, vy - b * cov);
    const double se2 = n_eff > 2 ? resid / (vx * (n_eff - 2)) : INFINITY;
    const double a = my - b * mx;
    // Latency cannot be negative at zero tokens: a negative intercept is a
    // fit to curvature or noise, not a measurement of a. It is rejected
    // rather than clamped to 0: with a = 0 the seed objective sees no
    // throughput gain from batching and drives the budget down.
    if (b > 0 && a >= 0 && se2 <= 0.0625 * b * b) {
      a_ = a;
      b_ = b;
      identified = true;
    }
  }
  if (!identified) {
    // Not identifiable: keep the intercept, fit the slope through the mean.
    // Before any identified fit the intercept is the lowest mean seen, not 0:
    // a zero intercept claims batching gains no throughput, and the seed
    // objective then drives the budget to min_tokens (as on a cheap model
    // whose slope stays inside the noise).
    a_ = n_ == 1 ? my : std::min(a_, my);
    b_ = mx > 0 ? (my - a_) / mx : 0;
  }
}

double SeedObjective::J(double B) const {
  double L = a + b * B;
  double z = (L - target) / target;
  // softplus_s(z) = s * log(1 + exp(z / s)), computed without overflow.
  double t = z / smoothing;
  double soft = smoothing * (t > 30 ? t : std::log1p(std::exp(t)));
  double T = B / L, Tmax = 1 / b;
  return lambda * soft + (1 - lambda) * (Tmax - T) / Tmax;
}

double SeedObjective::dJ_dB(double B) const {
  double L = a + b * B;
  double t = (L - target) / (target * smoothing);
  double sigma = 1 / (1 + std::exp(-t));
  // dT/dB = a / L^2 and Tmax = 1 / b, so dT/dB / Tmax = a b / L^2.
  return lambda * sigma * b / target - (1 - lambda) * a * b / (L * L);
}

double SeedObjective::minimiser(double lo, double hi) const {
  if (dJ_dB(lo) >= 0) return lo;
  if (dJ_dB(hi) <= 0) return hi;
  double ulo = std::log(lo), uhi = std::log(hi);
  for (int i = 0; i < 60 && uhi - ulo > 1e-6; ++i) {
    const double mid = 0.5 * (ulo + uhi);
    (dJ_dB(std::exp(mid)) > 0 ? uhi : ulo) = mid;
  }
  return std::exp(0.5 * (ulo + uhi));
}

std::unique_ptr<Controller> make_controller(const ControllerConfig& c) {
  c.validate();
  if (c.policy == "static") return std::make_unique<StaticController>(c);
  if (c.policy == "aimd") return std::make_unique<AimdController>(c);
  if (c.policy == "seed") return std::make_unique<SeedController>(c);
  return std::make_unique<ModelController>(c);
}

}  // namespace fastserve
