// Adaptive batch-size controllers. A controller sizes the scheduler's token
// budget (the most tokens one batch may cost) from the measured compute
// latency of past batches. All policies share one interface and are driven
// only by observations, so they are deterministic under a simulated clock.
//
// Policies (see docs/design.md, "Controllers", for the derivations):
//   static  fixed budget.
//   aimd    additive increase while a budget-bound batch meets the latency
//           target, multiplicative decrease when one misses it (Clipper).
//   seed    the FastServe objective J(B), made coherent, on an online
//           latency model; each step moves log B half way to J's minimiser
//           (the root of dJ/dB, which rises with B).
//   model   fits latency = a + b * tokens online and sets the budget to the
//           largest B whose predicted latency meets the target, or, when the
//           arrival rate needs more, the smallest B whose throughput keeps up.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>

namespace fastserve {

// The largest budget (and AIMD step) a controller takes, in tokens.
inline constexpr int64_t kMaxBudgetTokens = int64_t{1} << 48;

struct ControllerConfig {
  std::string policy = "model";
  double target_latency_s = 0.05;  // D: compute latency target of one batch
  int64_t min_tokens = 32;         // bounds the budget never leaves
  int64_t max_tokens = 16384;
  int64_t initial_tokens = 0;      // 0: geometric mean of the bounds
  // aimd
  int64_t aimd_step_tokens = 64;
  // Not Clipper's 0.9: one miss alone would then drop the budget 10%, and
  // with latency noise misses come before B* is reached, so it could not
  // stay within 10% of B*.
  double aimd_backoff = 0.95;
  // seed: J(B) = lambda * softplus_s((L - D) / D) + (1 - lambda) * (Tmax - T) / Tmax
  double seed_lambda = 0.6;
  // s, width of the smoothed hinge. J's minimiser sits about s * D * |logit|
  // below the target, so s is kept small (figures: benchmarks/README.md).
  double seed_smoothing = 0.01;
  // seed and model: largest change of log(budget) in one step
  double max_step = 0.4;
  // model: aim predicted latency at headroom * D, leaving room for noise.
  // The budget then sits (1 - h) D / (D - a) below B*, so h stays close to 1
  // (figures: benchmarks/README.md).
  double model_headroom = 0.98;
  // model: a batch must carry this multiple of the arrival rate, so a queue
  // that built up drains instead of growing
  double model_load_margin = 1.25;
  // forgetting factor of the latency fit (effective window 1 / (1 - f))
  double fit_forgetting = 0.9;

  void validate() const;  // throws InvalidArgument
};

// One finished batch, as the controller sees it.
struct Observation {
  double now = 0;          // clock time at completion
  int64_t tokens = 0;      // cost of the batch in the scheduler's measure
  int64_t budget = 0;      // the budget in force when it was assembled
  int64_t batch_size = 0;  // requests in the batch
  double latency_s = 0;    // compute time of the batch
  int64_t queue_depth = 0; // requests left waiting
  // Recent arrival rate, in the same token measure as `tokens` (an EWMA over
  // about half a second, kept by the scheduler); 0 when unknown.
  double arrival_tokens_per_s = 0;
  // Work still queued when the batch completed, in the same token measure.
  double queued_tokens = 0;
  // The tightest timeout (deadline - arrival) of the batch's requests; inf
  // when none has a deadline.
  double request_timeout_s = INFINITY;
  // The scheduler's 95th percentile of (actual - predicted) batch compute,
  // in seconds, over its recent batches (0 when unknown): how far a batch
  // runs past its fit. Additive, not a ratio: on a shared machine the
  // outliers are stalls (a preempted thread) whose length does not shrink
  // with the batch (docs/design.md, "Target = tail latency").
  double compute_tail_s = 0.0;
};

// Weighted least-squares fit of latency = a + b * tokens with exponential
// forgetting. When the recent tokens barely vary (a static budget) the slope
// is not identifiable; the fit then keeps the last intercept and scales the
// slope so the line passes through the recent mean.
class LatencyModel {
 public:
  explicit LatencyModel(double forgetting = 0.9) : f_(forgetting) {}
  void add(double tokens, double latency);
  bool ready() const { return n_ >= 2; }
  double intercept() const { return a_; }
  double slope() const { return b_; }
  double predict(double tokens) const { return a_ + b_ * tokens; }
  // Largest tokens seen within the effective window (decays slowly).
  double recent_max_tokens() const { return xmax_; }
  int64_t count() const { return n_; }

 private:
  double f_;
  double sw_ = 0, sww_ = 0, sx_ = 0, sy_ = 0, sxx_ = 0, sxy_ = 0, syy_ = 0;
  double a_ = 0, b_ = 0, xmax_ = 0;
  int64_t n_ = 0;
};

class Controller {
 public:
  virtual ~Controller() = default;
  virtual const char* name() const = 0;
  virtual int64_t budget() const = 0;
  virtual void observe(const Observation& obs) = 0;
  // Policy-specific numbers for stats (fit parameters, objective, ...).
  virtual std::map<std::string, double> state() const = 0;
};

std::unique_ptr<Controller> make_controller(const ControllerConfig& config);

// The coherent FastServe objective and its derivative in log B on a linear
// latency model L(B) = a + b B, throughput T(B) = B / L(B), Tmax = 1 / b.
// Exposed for tests and for the design notes' worked example.
struct SeedObjective {
  double lambda, target, smoothing, a, b;
  double J(double B) const;
  double dJ_dB(double B) const;
  // argmin of J over [lo, hi] (J is convex in B for a, b > 0).
  double minimiser(double lo, double hi) const;
};

}  // namespace fastserve
