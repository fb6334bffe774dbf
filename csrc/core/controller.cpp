#include "fastserve/controller.h"

#include <algorithm>
#include <cmath>
#include <sstream>

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
    double step = clampd(log_step(cur), -c_.max_step, c_.max_step);
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
    double b = fit_.slope(), a = fit_.intercept();
    double goal = c_.model_headroom * c_.target_latency_s;
    double want = b > 0 ? (goal - a) / b : static_cast<double>(c_.max_tokens);
    want = clampd(want, c_.min_tokens, c_.max_tokens);
    // Move half way (in log space) each step: damps the fit's noise.
    return 0.5 * std::log(want / budget);
  }
  std::map<std::string, double> extra_state() const override {
    double b = fit_.slope(), a = fit_.intercept();
    return {{"model_goal_tokens", b > 0 ? (c_.model_headroom * c_.target_latency_s - a) / b : 0}};
  }
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
  // Gradient descent on u = log B, with the step scaled by the local
  // curvature (a Newton step) so that one step size suits every model and
  // machine; the trust region in observe() bounds it.
  double log_step(double budget) const override {
    SeedObjective J = objective();
    if (J.b <= 0) return c_.max_step;  // latency does not grow with B: grow
    auto g = [&](double u) { double B = std::exp(u); return B * J.dJ_dB(B); };
    double u = std::log(budget), eps = 0.01;
    double grad = g(u);
    double curv = (g(u + eps) - g(u - eps)) / (2 * eps);
    if (curv > 1e-12) return -grad / curv;
    return grad > 0 ? -c_.max_step : c_.max_step;
  }
  std::map<std::string, double> extra_state() const override {
    SeedObjective J = objective();
    double B = static_cast<double>(budget_);
    return {{"objective", J.J(B)}, {"gradient", J.dJ_dB(B)}};
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
  if (initial_tokens < 0) fail("initial_tokens must be >= 0");
  if (aimd_step_tokens < 1) fail("aimd_step_tokens must be >= 1");
  if (!(aimd_backoff > 0 && aimd_backoff < 1)) fail("aimd_backoff must be in (0, 1)");
  if (!(seed_lambda > 0 && seed_lambda < 1)) fail("seed_lambda must be in (0, 1)");
  if (!(seed_smoothing > 0)) fail("seed_smoothing must be positive");
  if (!(max_step > 0)) fail("max_step must be positive");
  if (!(model_headroom > 0 && model_headroom <= 1)) fail("model_headroom must be in (0, 1]");
  if (!(fit_forgetting > 0 && fit_forgetting < 1)) fail("fit_forgetting must be in (0, 1)");
}

void LatencyModel::add(double x, double y) {
  sw_ = f_ * sw_ + 1;
  sx_ = f_ * sx_ + x;
  sy_ = f_ * sy_ + y;
  sxx_ = f_ * sxx_ + x * x;
  sxy_ = f_ * sxy_ + x * y;
  xmax_ = std::max(x, xmax_ * f_ + (1 - f_) * x);
  ++n_;
  double mx = sx_ / sw_, my = sy_ / sw_;
  double vx = sxx_ / sw_ - mx * mx;
  if (n_ >= 2 && vx > 1e-4 * mx * mx) {
    double b = (sxy_ / sw_ - mx * my) / vx;
    double a = my - b * mx;
    // Latency cannot fall with tokens nor be negative at zero tokens.
    if (b <= 0) {
      b = 0;
      a = my;
    } else if (a < 0) {
      a = 0;
      b = mx > 0 ? my / mx : 0;
    }
    a_ = a;
    b_ = b;
  } else {
    // Not identifiable: keep the intercept, fit the slope through the mean.
    a_ = std::min(a_, my);
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

std::unique_ptr<Controller> make_controller(const ControllerConfig& c) {
  c.validate();
  if (c.policy == "static") return std::make_unique<StaticController>(c);
  if (c.policy == "aimd") return std::make_unique<AimdController>(c);
  if (c.policy == "seed") return std::make_unique<SeedController>(c);
  return std::make_unique<ModelController>(c);
}

}  // namespace fastserve
