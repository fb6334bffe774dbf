#include "fastserve/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>

#include "fastserve/errors.h"

namespace fastserve {

namespace {
// How far past the head, in budgets of tokens, batch assembly looks.
constexpr double kWindowBudgets = 2.0;

// A forming batch's members' earliest deadline by priority: a request joins
// only if the batch still ends in time for every member of a higher class
// (lower priority is displaced, never the reverse).
class Urgency {
 public:
  // cap: the latest end a lower class may give a batch holding a higher one
  // (now + the request latency target), whatever the higher deadlines.
  explicit Urgency(double cap) : cap_(cap) {}
  void add(int priority, double deadline) {
    auto [it, fresh] = earliest_.try_emplace(priority, deadline);
    if (!fresh) it->second = std::min(it->second, deadline);
  }
  // How late a batch may end with a request of `priority` in it: the
  // earliest deadline of members with a higher priority (inf when there is
  // none), no later than the cap unless the request is `pressed`: the
  // batches after this one, as the rule with the cap forms it, would make
  // it late. Admission predicts a request in the batch of the work queued
  // ahead of it at its priority or higher, so the cap keeps out only what
  // can wait (a bulk job), never a request admitted on that prediction (it
  // was then one batch late).
  double above(int priority, bool pressed = false) const {
    auto it = earliest_.upper_bound(priority);
    if (it == earliest_.end()) return INFINITY;
    return pressed ? earliest(it) : std::min(earliest(it), cap_);
  }
  double all() const { return earliest(earliest_.begin()); }  // every member's earliest deadline

 private:
  double earliest(std::map<int, double>::const_iterator it) const {
    double d = INFINITY;
    for (; it != earliest_.end(); ++it) d = std::min(d, it->second);
    return d;
  }
  double cap_;
  std::map<int, double> earliest_;
};

// The retry_after_s a refusal or a shed request carries for being `late`
// seconds past its deadline, bounded so that a client's Retry-After is a number.
double retry_after(double late) { return std::min(late, Scheduler::kMaxRetryAfterS); }
}  // namespace

const char* to_string(Cost cost) { return cost == Cost::Padded ? "padded" : "packed"; }

Cost cost_from_string(const std::string& name) {
  if (name == "padded") return Cost::Padded;
  if (name == "packed") return Cost::Packed;
  throw InvalidArgument("scheduler: unknown cost '" + name + "' (expected padded or packed)");
}

void SchedulerConfig::validate() const {
  auto fail = [](const std::string& m) { throw InvalidArgument("scheduler: " + m); };
  if (max_queue_requests < 1) fail("max_queue_requests must be >= 1");
  if (max_queue_tokens < 1) fail("max_queue_tokens must be >= 1");
  if (max_batch_size < 1) fail("max_batch_size must be >= 1");
  if (max_request_tokens < 1 || max_request_tokens > (int64_t{1} << 30))
    fail("max_request_tokens must be in [1, 2^30]");
  // Finite: an infinite aging_s made a priority-0 rank 0 * inf = NaN, and
  // NaN keys break the queue's ordering (requests lost from it).
  if (!(aging_s > 0) || !std::isfinite(aging_s))
    fail("aging_s must be positive and finite (use a large value, e.g. 1e9, to disable aging)");
  if (lookahead < 1) fail("lookahead must be >= 1");
  if (!(min_fill >= 0 && min_fill <= 1)) fail("min_fill must be in [0, 1]");
  if (attention_tokens < 0) fail("attention_tokens must be >= 0 (0: attention not counted)");
  if (long_apart_tokens < 0) fail("long_apart_tokens must be >= 0 (0: long inputs not batched apart)");
  if (preempt_layers < 0 || preempt_layers > 4096) fail("preempt_layers must be in [0, 4096] (0: never paused)");
}

Scheduler::Scheduler(SchedulerConfig config, ControllerConfig controller,
                     std::shared_ptr<Clock> clock, int workers)
    : config_(std::move(config)), clock_(clock ? std::move(clock) : steady_clock()) {
  config_.validate();
  if (workers < 1 || workers > 4096) throw InvalidArgument("scheduler: workers must be in [1, 4096]");
  for (int k = 0; k < workers; ++k) controllers_.push_back(make_controller(controller));
  lower_fill_s_ = 2 * controller.target_latency_s;  // the request latency target (the Engine's target_latency_ms)
  seen_at_.assign(static_cast<size_t>(workers), -INFINITY);
  waiting_.assign(static_cast<size_t>(workers), 0);
  retired_.assign(static_cast<size_t>(workers), 0);
  live_ = workers;
}

Scheduler::~Scheduler() { close(); }

double Scheduler::rank_of(int priority, double arrival) const {
  return static_cast<double>(priority) * config_.aging_s - arrival;
}

void Scheduler::check_request(int64_t n) const {
  if (n == 0) throw InvalidArgument("empty request: at least one token is required");
  if (n > config_.max_request_tokens)
    throw InvalidArgument("request of " + std::to_string(n) + " tokens exceeds max_request_tokens=" +
                          std::to_string(config_.max_request_tokens));
  if (n > config_.max_queue_tokens)
    throw InvalidArgument("request of " + std::to_string(n) + " tokens can never fit max_queue_tokens=" +
                          std::to_string(config_.max_queue_tokens));
}

bool Scheduler::fits_locked(int64_t n) const {
  return static_cast<int64_t>(requests_.size()) + 1 <= config_.max_queue_requests &&
         queued_tokens_ + n <= config_.max_queue_tokens;
}

[[noreturn]] void Scheduler::throw_full_locked() {
  ++stats_.rejected;
  throw QueueFull("queue full: " + std::to_string(requests_.size()) + " requests / " +
                  std::to_string(queued_tokens_) + " tokens queued (limits " +
                  std::to_string(config_.max_queue_requests) + " / " +
                  std::to_string(config_.max_queue_tokens) + ")");
}

[[noreturn]] void Scheduler::throw_overloaded_locked(double predicted, double deadline) {
  ++stats_.refused;
  // After `late` seconds the work ahead has run for that long, so (with no
  // new arrivals ahead) the same request would then be predicted on time.
  const double late = retry_after(predicted - deadline);
  char msg[160];
  std::snprintf(msg, sizeof msg,
                "overloaded: predicted to finish %.1f ms after its deadline (%zu requests queued); "
                "retry after %.3f s",
                late * 1e3, requests_.size(), late);
  throw Overloaded(msg, late);
}

void Scheduler::check_deadline(double deadline) {
  // +inf is "none"; -inf would pass as none too (isfinite), skip admission
  // and never expire, while its batch kept every lower class out.
  if (std::isnan(deadline) || deadline == -kNoDeadline)
    throw InvalidArgument("deadline must be a time or +inf (none), got " + std::to_string(deadline));
}

void Scheduler::check_owner(const Batch& batch, const char* call) const {
  if (batch.owner != this)
    throw InvalidArgument(std::string("scheduler: ") + call + ": the batch is another scheduler's");
}

bool Scheduler::predicting_locked() const { return config_.admission && compute_fit_.count() >= 3; }

// Nothing runs and nothing is queued at or above this priority: the request
// would start at once. It is never refused then, because a prediction is
// corrected only by batches that run: refusing everything on a stale fit
// (measured under a burst of contention, say) would never measure again.
bool Scheduler::idle_for_locked(int priority) const {
  return free_worker_locked() &&
         tokens_by_priority_.lower_bound(priority) == tokens_by_priority_.end();
}

double Scheduler::fit_locked(double cost) const { return std::max(0.0, compute_fit_.predict(cost)); }

double Scheduler::compute_locked(double work, double fill, double room) const {
  // work: cost tokens up to and including the request; fill: what its own
  // batch is expected to hold (what is queued at its priority or higher, and
  // such arrivals while it waits: lower priority cannot displace it).
  // Past the budget it runs in the k-th batch, after k - 1 full ones; with
  // several workers (replicas) the full batches ahead run `workers` at a time
  // (the live ones: a retired worker runs nothing).
  // With extend_past_budget, in one batch past the budget instead (charged
  // the tail J once more) when that is sooner and leaves the earliest
  // deadline ahead (room: seconds from the batch's start) a margin of J:
  // batch formation then takes it past the budget (assemble_in_order_locked).
  const double B = static_cast<double>(std::max<int64_t>(batch_budget_locked(first_live_locked()), 1));
  const double n = static_cast<double>(std::max(live_, 1));
  double t;
  if (work <= B) {
    t = fit_locked(std::max(work, std::min(B, fill)));
  } else {
    t = std::ceil(work / (B * n)) * fit_locked(B);
    if (config_.extend_past_budget && work <= extend_limit_locked(B) && fit_locked(work) + tail_s_ < t &&
        fit_locked(work) + 2 * tail_s_ <= room)
      t = fit_locked(work) + tail_s_;
  }
  return t + tail_s_;
}

double Scheduler::share_locked(double now, int worker, double budget) const {
  // Water-filling: with the k workers free earliest (this one now, f = 0),
  // each running one batch until T, sum over them of (T - f_i - a) / b is
  // the queue's cost Q; k grows while T passes the next one's start + a.
  // Another worker takes at most its own budget: one whose level would pass
  // it is held at its budget and the level found again without it.
  if (!config_.balance_workers || live_ < 2 || !compute_fit_.ready()) return budget;
  const double a = std::max(0.0, compute_fit_.intercept()), b = compute_fit_.slope();
  double budgets = 0;
  for (size_t k = 0; k < controllers_.size(); ++k)
    if (!retired_[k]) budgets += static_cast<double>(batch_budget_locked(k));
  // A queue past twice the budgets together goes in full budgets whatever
  // the split; below that its exact cost is summed (a short walk).
  if (!(b > 0) || queued_tokens_ <= 0 || cost_factor_ * static_cast<double>(queued_tokens_) > 2 * budgets)
    return budget;
  std::vector<double> until(static_cast<size_t>(workers()), -1.0);  // a running batch's predicted end
  std::vector<char> overdue(static_cast<size_t>(workers()), 0);
  for (const auto& [seq, r] : running_) {
    if (r.urgent) continue;
    // Past its predicted end by more than the compute tail J and its own
    // predicted compute (a stall, a hang): when it frees is unknown. Late by
    // less (the fit is a mean: half the batches end past it), about to free.
    const auto k = static_cast<size_t>(r.worker);
    until[k] = std::max(0.0, r.end - now);
    overdue[k] = now > r.end + std::max(tail_s_, r.full);
  }
  struct Free {
    double at, cap;
  };
  std::vector<Free> others;
  for (int w = 0; w < workers(); ++w) {
    const auto k = static_cast<size_t>(w);
    if (w == worker || overdue[k] || retired_[k]) continue;
    const double cap = static_cast<double>(batch_budget_locked(k));
    if (until[k] >= 0)
      others.push_back({until[k], cap});
    else if (waiting_[k] || now - seen_at_[k] <= kAbsentS)
      others.push_back({0.0, cap});
  }
  if (others.empty()) return budget;  // no one to share with: the queue walk below is skipped
  std::sort(others.begin(), others.end(), [](const Free& x, const Free& y) { return x.at < y.at; });
  double queued = 0;
  for (const auto& [id, r] : requests_) queued += own_cost(static_cast<int64_t>(r.tokens.size()));
  double T = 0;
  for (bool capped = true; capped;) {
    capped = false;
    double starts = a;  // this worker's
    size_t k = 0;
    T = queued * b + a;
    while (k < others.size() && T > others[k].at + a) {
      starts += others[k].at + a;
      ++k;
      T = (queued * b + starts) / static_cast<double>(k + 1);
    }
    for (size_t i = 0; i < k; ++i) {
      if ((T - others[i].at - a) / b > others[i].cap) {
        queued -= others[i].cap;
        others.erase(others.begin() + static_cast<std::ptrdiff_t>(i));
        capped = true;
        break;
      }
    }
  }
  return std::min(budget, std::max(0.0, (T - a) / b));
}

double Scheduler::extend_limit_locked(double budget) const {
  // A batch runs past the budget only to take a short queue whole (all of
  // it within the window batch formation looks at), never under overload,
  // where the queue always outruns the budget and a longer batch only
  // delays the next.
  const double queued = cost_factor_ * static_cast<double>(queued_tokens_);
  return queued <= kWindowBudgets * budget ? kWindowBudgets * budget : budget;
}

int Scheduler::busy_workers_locked() const {
  // Each worker runs one batch (or one paused batch and the urgent one in it).
  int busy = 0;
  for (const auto& [seq, r] : running_) busy += r.urgent ? 0 : 1;
  return busy;
}

double Scheduler::residual_locked(double now, std::optional<int> priority) const {
  // The next batch starts when a worker is free: at once while one is idle,
  // else when the first running batch ends (with one worker: the running
  // one). With preempt_layers, a request of a class above every member of a
  // worker's batch has that worker at the next layer boundary (predicted a
  // layer's compute away), or when the urgent batch it runs ends.
  if (free_worker_locked()) return 0.0;
  const bool pausing = priority && config_.preempt_layers > 0;
  double free = INFINITY;
  for (const auto& [seq, r] : running_) {
    if (r.urgent) continue;
    double at = r.end;
    if (pausing && r.top < *priority) {
      double next = now + r.full / static_cast<double>(config_.preempt_layers);  // the next layer boundary
      for (const auto& [useq, u] : running_)  // one or two entries per worker
        if (u.urgent && u.worker == r.worker) next = u.end;  // or the end of the urgent batch it runs
      at = std::min(at, next);
    }
    free = std::min(free, at);
  }
  return std::max(0.0, free - now);
}

double Scheduler::ahead_locked(int priority) const {
  int64_t tokens = 0;
  for (auto it = tokens_by_priority_.lower_bound(priority); it != tokens_by_priority_.end(); ++it)
    tokens += it->second;
  return cost_factor_ * static_cast<double>(tokens);
}

double Scheduler::arrivals_locked(int priority) const {
  double rate = 0;
  for (auto it = arrivals_by_priority_.lower_bound(priority); it != arrivals_by_priority_.end(); ++it)
    rate += it->second.rate;
  return rate;
}

double Scheduler::urgent_locked(int priority) const {
  // Earliest first; lower classes (rarely more than a few ahead in deadline
  // order) are skipped. Past 64 of them, the earliest of all: a bound.
  int seen = 0;
  for (const auto& [deadline, id] : deadlines_) {
    if (requests_.at(id).priority >= priority || ++seen > 64) return deadline;
  }
  return kNoDeadline;
}

double Scheduler::stretch_locked(int priority) const {
  // A batch of a class below another that arrives is paused for it: its
  // time stretches by 1 / (1 - s), s the measured share of the workers'
  // time the urgent batches took (capped at 0.8).
  // The top class has nothing above it (and priority + 1 would overflow).
  if (config_.preempt_layers <= 0 || pause_share_ <= 0 || priority == std::numeric_limits<int>::max() ||
      arrivals_locked(priority + 1) <= 0)
    return 1.0;
  return 1.0 / (1.0 - std::min(0.8, pause_share_));
}

double Scheduler::completion_locked(double now, int priority, double ahead, double own) const {
  // Its batch forms when the running one ends (or pauses for it): it then
  // holds what is queued at its priority or higher and what of that arrives
  // meanwhile, up to the budget (batch formation fills it with lower
  // priority only as far as its deadline allows).
  const double residual = residual_locked(now, priority);
  const double fill = ahead + own + cost_factor_ * arrivals_locked(priority) * residual;
  const double room = urgent_locked(priority) - now - residual;
  return now + (residual + compute_locked(ahead + own, fill, room)) * stretch_locked(priority);
}

void Scheduler::check_servable_locked(const std::vector<std::vector<int32_t>>& requests, double now,
                                      double deadline) const {
  // The list's own work, run alone on every live worker: past the deadline,
  // no wait makes it fit (the queue ahead only adds to it), so it is the
  // caller's to split or give more time, not a retry later. Refused at once
  // rather than queued in part (the rest then waited, was predicted late or
  // shed, and the call failed as Overloaded after its prefix had run).
  double own = 0;
  int64_t tokens = 0;
  for (const auto& r : requests) {
    own += own_cost(static_cast<int64_t>(r.size()));
    tokens += static_cast<int64_t>(r.size());
  }
  const double alone = compute_locked(own, own, INFINITY);
  if (now + alone <= deadline) return;
  // (snprintf, not iostreams: kernels/cpu/dispatch.cpp, shape_str, says why.)
  char msg[256];
  std::snprintf(msg, sizeof msg,
                "%zu requests of %lld tokens together need about %.3g s of compute alone at the measured rate, "
                "past their deadline %.3g s away: submit fewer at once, or give them more time",
                requests.size(), static_cast<long long>(tokens), alone, deadline - now);
  throw InvalidArgument(msg);
}

double Scheduler::predict_completion(int64_t tokens, int priority) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (!predicting_locked()) return INFINITY;
  const double now = clock_->now();
  return completion_locked(now, priority, ahead_locked(priority), own_cost(tokens));
}

void Scheduler::track_compute_locked(int worker, double cost, double seconds) {
  // Each worker's first batch is left out: it carries one-off costs (lazy
  // initialisation on its thread, first allocations), 50-100x a steady batch
  // in the engine's tests. Only the first worker's was once: the second's
  // then made a burst at start-up look like tens of seconds of work.
  const size_t k = static_cast<size_t>(std::max(0, worker));
  if (warm_.size() <= k) warm_.resize(k + 1, false);
  if (!warm_[k]) {
    warm_[k] = true;
    return;
  }
  if (compute_fit_.ready()) {
    const double predicted = compute_fit_.predict(cost);
    if (predicted > 0) {
      // q95 of actual - predicted over the last kTailWindow batches, exact
      // (the window's 5th largest). A window rather than a slowly decaying
      // tracker: once an overload (and the contention it brings) ends, the
      // stalls it measured are forgotten after kTailWindow batches.
      const double e = std::max(0.0, seconds - predicted);
      if (excess_.size() < kTailWindow) {
        excess_.push_back(e);
      } else {
        excess_[excess_next_] = e;
        excess_next_ = (excess_next_ + 1) % kTailWindow;
      }
      std::vector<double> w = excess_;
      const size_t k = w.size() - 1 - static_cast<size_t>(0.95 * static_cast<double>(w.size() - 1));
      std::nth_element(w.begin(), w.begin() + static_cast<std::ptrdiff_t>(k), w.end(), std::greater<double>());
      tail_s_ = w[k];
      // A stall (a preempted thread, a pause) moves the fit by at most what
      // a batch 4x its prediction would: the fit is a mean, and one outlier
      // would otherwise condemn the queue for the next ten batches.
      seconds = std::min(seconds, 4 * predicted);
    }
  }
  compute_fit_.add(cost, seconds);
}

uint64_t Scheduler::enqueue_locked(std::vector<int32_t> tokens, int priority, double now, double deadline) {
  const auto n = static_cast<int64_t>(tokens.size());
  const uint64_t id = next_id_++;
  order_.insert(Key{rank_of(priority, now), id});
  if (std::isfinite(deadline)) deadlines_.insert({deadline, id});
  requests_.emplace(id, Request{id, priority, now, deadline, std::move(tokens)});
  queued_tokens_ += n;
  tokens_by_priority_[priority] += n;
  arrivals_by_priority_[priority].submitted += n;
  ++stats_.submitted;
  if (stats_.first_submit_at < 0) stats_.first_submit_at = now;
  return id;
}

uint64_t Scheduler::submit(std::vector<int32_t> tokens, int priority, double deadline) {
  const auto n = static_cast<int64_t>(tokens.size());
  check_request(n);
  check_deadline(deadline);
  const double now = clock_->now();
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw SchedulerClosed("scheduler is closed");
    if (!fits_locked(n)) throw_full_locked();
    if (std::isfinite(deadline) && predicting_locked() && !idle_for_locked(priority)) {
      const double done = completion_locked(now, priority, ahead_locked(priority), own_cost(n));
      if (done > deadline) throw_overloaded_locked(done, deadline);
    }
    id = enqueue_locked(std::move(tokens), priority, now, deadline);
  }
  cv_.notify_one();
  return id;
}

std::vector<uint64_t> Scheduler::submit_many(std::vector<std::vector<int32_t>> requests, int priority,
                                             double deadline, bool whole, bool waiting) {
  int64_t total = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    try {
      check_request(static_cast<int64_t>(requests[i].size()));
    } catch (const InvalidArgument& e) {
      throw InvalidArgument("request " + std::to_string(i) + ": " + e.what());
    }
    total += static_cast<int64_t>(requests[i].size());
  }
  // All or none of more than the queue can ever hold: never, whatever waits.
  if (whole && (static_cast<int64_t>(requests.size()) > config_.max_queue_requests ||
                total > config_.max_queue_tokens))
    throw InvalidArgument(std::to_string(requests.size()) + " requests of " + std::to_string(total) +
                          " tokens together can never fit the queue (max_queue_requests=" +
                          std::to_string(config_.max_queue_requests) +
                          ", max_queue_tokens=" + std::to_string(config_.max_queue_tokens) + ")");
  check_deadline(deadline);
  std::vector<uint64_t> ids;
  if (requests.empty()) return ids;
  ids.reserve(requests.size());
  const double now = clock_->now();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) throw SchedulerClosed("scheduler is closed");
    // Each request of the list is ahead of the next: the prediction grows.
    // (On an idle worker the first one starts at once: never refused.)
    const bool predict = std::isfinite(deadline) && predicting_locked();
    if (predict && requests.size() > 1) check_servable_locked(requests, now, deadline);
    const bool idle = idle_for_locked(priority);
    double ahead = predict ? ahead_locked(priority) : 0, late_at = 0, last = 0;
    // How many of them fit, in order (the queue's room, each one's predicted
    // completion): a prefix stops at the first that does not, `whole` looks
    // at them all, then queues all or none.
    int64_t count = static_cast<int64_t>(requests_.size()), tokens_after = queued_tokens_;
    size_t fit = requests.size();
    bool full = false;
    for (size_t i = 0; i < requests.size(); ++i) {
      const auto n = static_cast<int64_t>(requests[i].size());
      if (count + 1 > config_.max_queue_requests || tokens_after + n > config_.max_queue_tokens) {
        full = true;
        fit = std::min(fit, i);
        break;
      }
      if (predict) {
        const double own = own_cost(n);
        last = completion_locked(now, priority, ahead, own);
        if (last > deadline && !(idle && i == 0) && fit == requests.size()) {
          fit = i;
          late_at = last;
          if (!whole) break;
        }
        ahead += own;
      }
      ++count;
      tokens_after += n;
    }
    if (whole && fit < requests.size()) {
      if (full) throw_full_locked();
      // Refused with when the whole of it would end: its last request's completion.
      throw_overloaded_locked(std::max(last, deadline), deadline);
    }
    if (fit == 0) {
      if (waiting) return ids;  // the caller waits for room: nothing refused, nothing counted
      if (late_at > 0) throw_overloaded_locked(late_at, deadline);
      throw_full_locked();
    }
    for (size_t i = 0; i < fit; ++i) ids.push_back(enqueue_locked(std::move(requests[i]), priority, now, deadline));
  }
  cv_.notify_all();
  return ids;
}

std::vector<int32_t> Scheduler::take_locked(std::unordered_map<uint64_t, Request>::iterator it) {
  Request& r = it->second;
  order_.erase(Key{rank_of(r.priority, r.arrival), r.id});
  if (std::isfinite(r.deadline)) deadlines_.erase({r.deadline, r.id});
  const auto n = static_cast<int64_t>(r.tokens.size());
  queued_tokens_ -= n;
  auto p = tokens_by_priority_.find(r.priority);
  if ((p->second -= n) == 0) tokens_by_priority_.erase(p);
  std::vector<int32_t> tokens = std::move(r.tokens);
  requests_.erase(it);
  return tokens;
}

void Scheduler::erase_locked(std::unordered_map<uint64_t, Request>::iterator it) { take_locked(it); }

bool Scheduler::cancel(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = requests_.find(id);
  if (it == requests_.end()) return false;
  erase_locked(it);
  ++stats_.cancelled;
  return true;
}

std::vector<uint64_t> Scheduler::drop_expired_locked(double now) {
  std::vector<uint64_t> out;
  while (!deadlines_.empty() && deadlines_.begin()->first <= now) {
    const uint64_t id = deadlines_.begin()->second;
    out.push_back(id);
    erase_locked(requests_.find(id));
  }
  stats_.expired += static_cast<int64_t>(out.size());
  return out;
}

void Scheduler::shed_locked(double now, Batch& out) {
  // Walk the queue in its order, accumulating the work each kept request
  // leaves ahead of the next; a request predicted to finish after its
  // deadline is dropped and adds nothing.
  // Its batch holds what is queued at its priority or higher (lower
  // priority joins it only as far as its deadline allows); `urgent` is the
  // earliest deadline of the kept requests ahead, which a batch past the
  // budget must still meet.
  // What depends on the class alone, once per class: the queued cost at its
  // priority or higher (its fill), the wait for a worker, the stretch by pauses.
  struct Class {
    double fill, residual, stretch;
  };
  std::map<int, Class> by_class;
  {
    double above = 0;
    for (auto it = tokens_by_priority_.rbegin(); it != tokens_by_priority_.rend(); ++it)
      by_class[it->first] = {above += cost_factor_ * static_cast<double>(it->second),
                             residual_locked(now, it->first), stretch_locked(it->first)};
  }
  double ahead = 0, urgent = kNoDeadline;
  std::vector<uint64_t> drop;
  for (const Key& k : order_) {
    const Request& r = requests_.at(k.id);
    const double own = own_cost(static_cast<int64_t>(r.tokens.size()));
    if (std::isfinite(r.deadline)) {
      const Class& c = by_class.at(r.priority);
      const double done =
          now + (c.residual + compute_locked(ahead + own, c.fill, urgent - now - c.residual)) * c.stretch;
      if (done > r.deadline) {
        drop.push_back(r.id);
        out.shed.push_back(r.id);
        out.shed_retry_after_s.push_back(retry_after(done - r.deadline));
        continue;
      }
      urgent = std::min(urgent, r.deadline);
    }
    ahead += own;
  }
  // Never shed the whole queue: the least late request runs, so the
  // prediction that condemned them all is measured again (see
  // idle_for_locked).
  if (!drop.empty() && drop.size() == requests_.size()) {
    const auto least = std::min_element(out.shed_retry_after_s.begin(), out.shed_retry_after_s.end()) -
                       out.shed_retry_after_s.begin();
    drop.erase(drop.begin() + least);
    out.shed.erase(out.shed.begin() + least);
    out.shed_retry_after_s.erase(out.shed_retry_after_s.begin() + least);
  }
  for (uint64_t id : drop) erase_locked(requests_.find(id));
  stats_.shed += static_cast<int64_t>(drop.size());
}

std::vector<uint64_t> Scheduler::start(Batch& batch, const std::vector<uint64_t>& cancelled) {
  check_owner(batch, "start");
  const double now = clock_->now();
  const int64_t before = batch.size();
  std::vector<uint64_t> out = batch.remove_expired(now, cancelled);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.expired += static_cast<int64_t>(out.size());
  stats_.cancelled += before - batch.size() - static_cast<int64_t>(out.size());
  if (batch.size() == 0) running_.erase(batch.seq());
  return out;
}

std::optional<std::shared_ptr<Batch>> Scheduler::preempt(Batch& running, double done) {
  check_owner(running, "preempt");
  if (config_.preempt_layers <= 0) return std::nullopt;
  if (!(done >= 0 && done <= 1)) throw InvalidArgument("preempt: done must be in [0, 1]");
  std::lock_guard<std::mutex> lock(mu_);
  if (closed_ || order_.empty() || !predicting_locked()) return std::nullopt;
  auto self = running_.find(running.seq());
  if (self == running_.end() || self->second.urgent) return std::nullopt;
  if (free_worker_locked()) return std::nullopt;  // an idle worker takes the queue
  const double now = clock_->now();
  // Only a class above every member of the running batch pauses it: a
  // higher class never waits for a lower class's batch. (Pausing within a
  // class, when waiting was predicted to make the head late, was measured
  // and dropped: docs/design.md, "Pausing a batch".)
  const Request& head = requests_.at(order_.begin()->id);
  if (head.priority <= self->second.top || !std::isfinite(head.deadline)) return std::nullopt;
  const int urgent_class = head.priority;  // `head` is gone once it joins the batch
  // The rest of the running batch: its predicted share of the layers left,
  // or, when its layers since the last call ran slower than predicted (a
  // stall, contention), at that rate. (Not from the batch's start: its first
  // layer also carries the embeddings and the batch's setup, and at that
  // rate the rest of every batch looked 1.5-2x too long on the CPU.)
  Running& r = self->second;
  double rest = (1 - done) * r.full;
  if (r.last_done > 0 && done > r.last_done)
    rest = std::max(rest, (now - r.last_at - (r.paused - r.last_paused)) / (done - r.last_done) * (1 - done));
  r.last_at = now, r.last_done = done, r.last_paused = r.paused;
  r.end = now + rest;
  const double B = static_cast<double>(batch_budget_locked(static_cast<size_t>(running.worker)));
  // The urgent batch: the head's class in queue order, while it fits the
  // budget and every member ends by its deadline, a tail J included.
  std::vector<uint64_t> take;
  double sum = 0, earliest = INFINITY;
  int64_t seen = 0;
  for (auto it = order_.begin(); it != order_.end() && seen < config_.lookahead; ++it, ++seen) {
    const Request& q = requests_.at(it->id);
    if (q.priority < urgent_class || static_cast<int64_t>(take.size()) >= config_.max_batch_size) break;
    if (!std::isfinite(q.deadline)) continue;
    const double cost = seq_cost(static_cast<int64_t>(q.tokens.size()));
    if (!take.empty() && sum + cost > B) continue;
    if (now + fit_locked(sum + cost) + tail_s_ > std::min(earliest, q.deadline)) {
      if (take.empty()) return std::nullopt;  // running the head now saves nothing
      continue;
    }
    take.push_back(q.id);
    sum += cost;
    earliest = std::min(earliest, q.deadline);
  }
  auto batch = std::make_shared<Batch>(next_batch_seq_++, config_.pad_token_id, now,
                                       static_cast<int64_t>(B));
  batch->worker = running.worker;
  batch->owner = this;
  for (uint64_t id : take) move_to_batch_locked(now, id, *batch);
  const double compute = fit_locked(static_cast<double>(batch_cost(*batch)));
  running_[batch->seq()] = Running{running.worker, now + compute, compute, 0, urgent_class, true};
  r.end += compute;
  ++stats_.preempted;
  // Members the pause makes late (all of a lower class): dropped now, not
  // computed on.
  const std::vector<uint64_t>& gone = running.abandoned;
  for (int64_t i = 0; i < running.size(); ++i) {
    const auto k = static_cast<size_t>(i);
    const uint64_t id = running.ids()[k];
    const double d = running.deadlines()[k];
    if (r.end + tail_s_ <= d || std::find(gone.begin(), gone.end(), id) != gone.end())
      continue;
    batch->shed.push_back(id);
    batch->shed_retry_after_s.push_back(retry_after(r.end + tail_s_ - d));
  }
  running.abandoned.insert(running.abandoned.end(), batch->shed.begin(), batch->shed.end());
  stats_.shed += static_cast<int64_t>(batch->shed.size());
  return batch;
}

double Scheduler::left_out_end_locked(double now, double kept, double left, double budget) const {
  // After the batch (`kept`), the batches that take `left`: full budgets,
  // then the rest.
  const double full = std::floor(left / budget), rest = left - full * budget;
  return now + fit_locked(kept) + full * fit_locked(budget) + (rest > 0 ? fit_locked(rest) : 0.0) + tail_s_;
}

int64_t Scheduler::cost_of(int64_t count, int64_t max_len, int64_t sum_len) const {
  return config_.cost == Cost::Padded ? count * max_len : sum_len;
}

double Scheduler::seq_cost(int64_t len) const {
  const auto l = static_cast<double>(len);
  return config_.cost == Cost::Packed && config_.attention_tokens > 0
             ? l + l * l / static_cast<double>(config_.attention_tokens)
             : l;
}

double Scheduler::own_cost(int64_t len) const {
  return config_.cost == Cost::Packed ? seq_cost(len) : cost_factor_ * static_cast<double>(len);
}

int64_t Scheduler::batch_cost(const Batch& b) const {
  if (config_.cost == Cost::Padded) return cost_of(b.size(), b.max_len(), b.total_tokens());
  double c = 0;
  for (int32_t len : b.lengths()) c += seq_cost(len);
  return static_cast<int64_t>(std::llround(c));
}

int64_t bucket_floor(int64_t tokens) {
  constexpr int64_t kMinStep = 16, kPerDoubling = 8;
  if (tokens < kMinStep) return tokens;
  int64_t top = 1;
  while (top * 2 <= tokens) top *= 2;
  const int64_t step = std::max(kMinStep, top / kPerDoubling);
  return tokens / step * step;
}

int64_t Scheduler::batch_budget_locked(size_t worker) const {
  const int64_t b = controllers_[worker]->budget();
  return config_.token_buckets ? bucket_floor(b) : b;
}

std::shared_ptr<Batch> Scheduler::assemble_locked(double now, int worker) {
  const int64_t budget = batch_budget_locked(static_cast<size_t>(worker));
  auto batch = std::make_shared<Batch>(next_batch_seq_++, config_.pad_token_id, now, budget);
  batch->worker = worker;
  batch->owner = this;
  if (order_.empty()) return batch;
  const double share = share_locked(now, worker, static_cast<double>(budget));

  // Eligible: the head and the next lookahead - 1 requests in queue order,
  // as far as kWindowBudgets budgets of tokens reach: a request is passed
  // over for one of a better length only by requests close behind it, so
  // it waits at most about one batch longer than queue order would make
  // it (what admission's prediction assumes, and what keeps a higher
  // priority class ahead of a lower one).
  std::vector<Cand> cands;
  const auto window = static_cast<size_t>(std::min<int64_t>(config_.lookahead, order_.size()));
  const double window_tokens = kWindowBudgets * static_cast<double>(budget);
  cands.reserve(window);
  double seen = 0;
  for (auto it = order_.begin(); cands.size() < window; ++it) {
    const Request& r = requests_.at(it->id);
    const auto len = static_cast<int32_t>(r.tokens.size());
    if (!cands.empty() && (seen += len) > window_tokens) break;
    cands.push_back({len, it->id, r.priority, r.deadline, cands.size()});
  }
  if (config_.cost == Cost::Packed) return assemble_in_order_locked(now, budget, share, cands, std::move(batch));
  const uint64_t head_id = cands.front().id;
  std::sort(cands.begin(), cands.end(), [](const Cand& x, const Cand& y) {
    return x.len < y.len || (x.len == y.len && x.id < y.id);
  });
  size_t h = 0;
  while (cands[h].id != head_id) ++h;

  // Grow [lo, hi] around the head, one neighbour in length order at a time.
  // Each step takes the side whose marginal fill (real tokens added per unit
  // of cost added) is higher, ties going to the side adding less padding,
  // then the shorter one; it stops at the budget, at max_batch_size, or when
  // the best marginal fill falls below min_fill. Without that floor a padded
  // batch fills its budget with ever shorter requests, and padding grows.
  // A candidate of lower priority than a member joins only if the batch,
  // predicted with the compute tail, still ends by that member's deadline
  // and within the latency target (lower_fill_s_).
  const bool guard = predicting_locked();
  auto ends_by = [&](int64_t c, double deadline) {
    return !guard || now + fit_locked(static_cast<double>(c)) + tail_s_ <= deadline;
  };
  // A request joins while the batch, with half of what it adds, stays
  // within this worker's share of the queue (balance_workers).
  bool cut = false;  // the share left out a request the budget would have taken
  auto within = [&](int64_t c, int64_t cost) {
    if (c > budget) return false;
    if ((c + cost) * 0.5 <= share) return true;
    cut = true;
    return false;
  };
  Urgency members(now + lower_fill_s_);
  members.add(cands[h].priority, cands[h].deadline);
  // A neighbour the class rule turns away (a higher member's deadline or
  // the latency target) is passed over, not an end: a request of the
  // head's class may lie beyond it in length order. Passed-over rows stay
  // out of the batch and of its cost.
  std::vector<char> passed(cands.size(), 0);
  // 1: joins; 2: joins pressed (the class rule's cap turns it away, but
  // the batches after this one, as the rule alone forms it, would make it
  // late: left_out_end_locked); 0: turned away.
  // The rows the class rule turned away (or took pressed), their tokens by
  // queue position (a Fenwick tree): the batches after this one take those
  // ahead of a row in queue order, not in the length order rows are met in
  // here (counted so, the oldest rows of a bulk list, met last, looked
  // pressed behind the newer ones and filled a query's batch).
  std::vector<double> left_at(cands.size() + 1, 0.0);
  auto leave = [&](size_t i) {
    for (size_t k = cands[i].order + 1; k < left_at.size(); k += k & (~k + 1)) left_at[k] += cands[i].len;
  };
  auto left_ahead = [&](size_t i) {
    double t = 0;
    for (size_t k = cands[i].order; k > 0; k -= k & (~k + 1)) t += left_at[k];
    return t;
  };
  int64_t pressed_cost = 0;  // what pressed rows added to the batch's cost
  auto joins = [&](size_t i, int64_t c, int64_t cost) -> int {
    if (ends_by(c, members.above(cands[i].priority))) return 1;
    const bool pressed =
        guard && left_out_end_locked(now, static_cast<double>(cost - pressed_cost), left_ahead(i) + cands[i].len,
                                     static_cast<double>(budget)) > cands[i].deadline;
    return pressed && ends_by(c, members.above(cands[i].priority, true)) ? 2 : 0;
  };
  size_t lo = h, hi = h;
  int64_t count = 1, sum = cands[h].len, max_len = cands[h].len;
  while (count < config_.max_batch_size) {
    bool can_lo = false, can_hi = false;
    double fill_lo = 0, fill_hi = 0;
    int64_t pad_lo = 0, pad_hi = 0, c_lo = 0, c_hi = 0;
    int join_lo = 0, join_hi = 0;
    const int64_t cost = cost_of(count, max_len, sum);
    while (lo > 0) {
      const int64_t l = cands[lo - 1].len, c = cost_of(count + 1, max_len, sum + l);
      if (!within(c, cost)) break;
      if (!(join_lo = joins(lo - 1, c, cost))) {
        passed[--lo] = 1;
        leave(lo);
        continue;
      }
      c_lo = c;
      can_lo = true;
      fill_lo = static_cast<double>(l) / static_cast<double>(c - cost);
      pad_lo = max_len - l;
      break;
    }
    while (hi + 1 < cands.size()) {
      const int64_t l = cands[hi + 1].len, c = cost_of(count + 1, l, sum + l);
      if (!within(c, cost)) break;
      if (!(join_hi = joins(hi + 1, c, cost))) {
        passed[++hi] = 1;
        leave(hi);
        continue;
      }
      c_hi = c;
      can_hi = true;
      fill_hi = static_cast<double>(l) / static_cast<double>(c - cost);
      pad_hi = count * (l - max_len);
      break;
    }
    can_lo = can_lo && fill_lo >= config_.min_fill;
    can_hi = can_hi && fill_hi >= config_.min_fill;
    if (!can_lo && !can_hi) break;
    const bool take_lo =
        can_lo && (!can_hi || fill_lo > fill_hi || (fill_lo == fill_hi && pad_lo <= pad_hi));
    if ((take_lo ? join_lo : join_hi) == 2) {  // for the rows after it, as if left out
      pressed_cost += (take_lo ? c_lo : c_hi) - cost;
      leave(take_lo ? lo - 1 : hi + 1);
    }
    if (take_lo) {
      sum += cands[--lo].len;
      members.add(cands[lo].priority, cands[lo].deadline);
    } else {
      sum += cands[++hi].len;
      max_len = cands[hi].len;
      members.add(cands[hi].priority, cands[hi].deadline);
    }
    ++count;
  }

  // Rows stay in length order, so rows of similar length sit together; no
  // consumer needs queue order.
  for (size_t i = lo; i <= hi; ++i)
    if (!passed[i]) move_to_batch_locked(now, cands[i].id, *batch);
  if (cut) ++stats_.balanced;
  return batch;
}

// Packed cost is the sum of lengths whatever the grouping, so nothing is
// gained by reordering: the batch is the window's requests in queue order,
// each taken when it still fits (first fit), the head always. Deadlines
// (while admission predicts): a request of lower priority than a member
// joins only if the batch, predicted with the compute tail J, still ends by
// that member's deadline and within the latency target (past the target
// when a later batch would make it late: see Urgency::above); and, with
// extend_past_budget, a request that does
// not fit the budget joins all the same when it would miss its deadline in
// a later batch (predicted to start when this one ends and to run a full
// budget) while this batch, with it, still ends a tail J before every
// member's deadline and its own (only while the whole queue fits
// kWindowBudgets budgets: extend_limit_locked). Shedding and admission
// predict with both rules (compute_locked).
std::shared_ptr<Batch> Scheduler::assemble_in_order_locked(double now, int64_t budget, double share,
                                                           const std::vector<Cand>& cands,
                                                           std::shared_ptr<Batch> batch) {
  const bool guard = predicting_locked();
  const double B = static_cast<double>(budget), limit = extend_limit_locked(B);
  Urgency members(now + lower_fill_s_);
  // pressed_sum: what pressed requests added (sum less it: the batch as the
  // class rule alone forms it); left: what the rule turned away (or took
  // pressed), the batches after it.
  double sum = 0, pressed_sum = 0, left = 0;
  int64_t count = 0;
  bool cut = false;  // the share left out a request the budget would have taken
  const int64_t apart = config_.long_apart_tokens;
  const bool head_long = apart > 0 && cands.front().len > apart;
  for (const Cand& c : cands) {
    if (count >= config_.max_batch_size) break;
    if (apart > 0 && (c.len > apart) != head_long) continue;  // long and short apart
    const double cost = seq_cost(c.len);
    bool pressed = false;
    if (count > 0) {
      const double end = now + fit_locked(sum + cost) + tail_s_;
      if (sum + cost <= B && sum + 0.5 * cost > share) {  // past this worker's share (balance_workers)
        cut = true;
        continue;
      }
      if (sum + cost <= B) {
        if (guard && end > members.above(c.priority)) {
          // Pressed: the batches after this one, as the class rule alone
          // forms it, would make it late (left_out_end_locked).
          pressed = left_out_end_locked(now, sum - pressed_sum, left + cost, B) > c.deadline;
          left += cost;
          if (!pressed || end > members.above(c.priority, true)) continue;
        }
      } else {
        // Past the budget: only to save a request a later batch would make
        // late (predicted to start when this one ends and to run a full budget).
        const bool later_in_time = now + fit_locked(sum) + fit_locked(B) + tail_s_ <= c.deadline;
        if (!guard || !config_.extend_past_budget || sum + cost > limit || !std::isfinite(c.deadline) ||
            end + tail_s_ > std::min(members.all(), c.deadline) || later_in_time)
          continue;
      }
    }
    sum += cost;
    if (pressed) pressed_sum += cost;
    ++count;
    members.add(c.priority, c.deadline);
    move_to_batch_locked(now, c.id, *batch);
  }
  if (cut) ++stats_.balanced;
  return batch;
}

void Scheduler::move_to_batch_locked(double now, uint64_t id, Batch& batch) {
  auto it = requests_.find(id);
  const double arrival = it->second.arrival, deadline = it->second.deadline;
  stats_.queue_s.add(now - arrival);
  const int priority = it->second.priority;
  batch.add(id, take_locked(it), arrival, deadline, priority);
}

std::optional<std::shared_ptr<Batch>> Scheduler::next_batch(double timeout_s, int worker) {
  if (worker < 0 || worker >= workers())
    throw InvalidArgument("scheduler: worker " + std::to_string(worker) + " out of range [0, " +
                          std::to_string(workers()) + ")");
  if (std::isnan(timeout_s)) throw InvalidArgument("scheduler: next_batch timeout must be a number of seconds, got nan");
  std::unique_lock<std::mutex> lock(mu_);
  // The wait ends on work, close, or timeout. steady_clock's nanosecond
  // ticks overflow at 2^63 ns (about 292 years, less the clock's own count):
  // a timeout past 1e9 s (about 31 years) is no timeout, as inf is.
  auto ready = [&] { return closed_ || !requests_.empty(); };
  const auto w = static_cast<size_t>(worker);
  waiting_[w] = 1;
  if (timeout_s < 1e9) {
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                           std::chrono::duration<double>(std::max(0.0, timeout_s)));
    cv_.wait_until(lock, until, ready);
  } else {
    cv_.wait(lock, ready);
  }
  waiting_[w] = 0;
  seen_locked(worker);
  if (requests_.empty()) return std::nullopt;
  const double now = clock_->now();
  std::vector<uint64_t> expired = drop_expired_locked(now);
  Batch shed(0, 0, now, 0);
  if (!deadlines_.empty() && predicting_locked()) shed_locked(now, shed);
  std::shared_ptr<Batch> batch = assemble_locked(now, worker);
  batch->expired = std::move(expired);
  batch->shed = std::move(shed.shed);
  batch->shed_retry_after_s = std::move(shed.shed_retry_after_s);
  if (batch->size() == 0 && batch->expired.empty() && batch->shed.empty()) return std::nullopt;
  if (batch->size() > 0) {
    const double cost = static_cast<double>(batch_cost(*batch));
    const double compute = compute_fit_.ready() ? compute_fit_.predict(cost) : 0.0;
    const auto& p = batch->priorities();
    running_[batch->seq()] =
        Running{worker, now + compute, compute, 0, *std::max_element(p.begin(), p.end()), false};
  }
  if (!requests_.empty()) {
    lock.unlock();
    cv_.notify_one();  // more work for another worker
  }
  return batch;
}

void Scheduler::complete(const Batch& batch, double compute_seconds, int64_t extra_tokens) {
  // One NaN, infinite or huge time would poison the fits for good (and with
  // them admission, which then refuses nothing, or everything).
  if (!(compute_seconds >= 0 && compute_seconds <= kMaxComputeS)) {
    char msg[120];
    std::snprintf(msg, sizeof msg, "scheduler: compute_seconds must be in [0, 1e6] (about 11.6 days), got %g",
                  compute_seconds);
    throw InvalidArgument(msg);
  }
  if (extra_tokens < 0 || extra_tokens > kMaxExtraTokens)
    throw InvalidArgument("scheduler: extra_tokens must be in [0, 2^48], got " + std::to_string(extra_tokens));
  check_owner(batch, "complete");
  const double now = clock_->now();
  std::lock_guard<std::mutex> lock(mu_);
  if (batch.worker >= 0 && batch.worker < workers()) seen_locked(batch.worker);
  if (auto it = running_.find(batch.seq()); it != running_.end()) {
    if (it->second.urgent) {  // the paused batch it ran inside resumes later by this much
      for (auto& [seq, r] : running_)
        if (r.worker == it->second.worker && !r.urgent) r.paused += compute_seconds;
      urgent_s_ += compute_seconds;
    }
    running_.erase(it);
  }
  const std::vector<uint64_t>& gone = batch.abandoned;
  for (int64_t i = 0; i < batch.size(); ++i)
    if (gone.empty() || std::find(gone.begin(), gone.end(), batch.ids()[static_cast<size_t>(i)]) == gone.end())
      stats_.latency_s.add(now - batch.arrivals()[static_cast<size_t>(i)]);
  stats_.completed += batch.size() - static_cast<int64_t>(gone.size());
  stats_.batches += 1;
  stats_.batch_compute_s.add(compute_seconds);
  stats_.batch_size.add(static_cast<double>(batch.size()));
  stats_.batch_tokens.add(static_cast<double>(batch.total_tokens()));
  stats_.real_tokens += batch.total_tokens();
  // Tokens the model computed: padding (in padded execution) and ghosts included.
  stats_.padded_tokens += cost_of(batch.size(), batch.max_len(), batch.total_tokens()) + extra_tokens;
  stats_.last_complete_at = now;
  Observation o;
  o.now = now;
  o.tokens = batch_cost(batch);
  o.budget = batch.budget();
  o.batch_size = batch.size();
  o.latency_s = compute_seconds;
  o.queue_depth = static_cast<int64_t>(requests_.size());
  o.compute_tail_s = tail_s_;
  o.request_timeout_s = INFINITY;
  for (int64_t i = 0; i < batch.size(); ++i)
    o.request_timeout_s = std::min(o.request_timeout_s, batch.deadlines()[i] - batch.arrivals()[i]);
  // Arrival rate: submitted tokens per second since the last completion,
  // smoothed over ~0.5 s, in the batch's cost measure (x its padding factor).
  if (last_observed_at_ >= 0 && now > last_observed_at_) {
    const double dt = now - last_observed_at_;
    const double w = 1 - std::exp(-dt / 0.5);
    // The share of the workers' time urgent batches took, over ~0.5 s.
    const double urgent = (urgent_s_ - urgent_at_last_) / (dt * static_cast<double>(std::max(live_, 1)));
    pause_share_ += w * (std::min(1.0, urgent) - pause_share_);
    for (auto it = arrivals_by_priority_.begin(); it != arrivals_by_priority_.end();) {
      Arrivals& a = it->second;
      const bool arrived = a.submitted != a.at_last;
      a.rate += w * (static_cast<double>(a.submitted - a.at_last) / dt - a.rate);
      a.at_last = a.submitted;
      it = (!arrived && a.rate < kForgottenRate) ? arrivals_by_priority_.erase(it) : std::next(it);
    }
  } else if (last_observed_at_ < 0) {  // the first completion: arrivals count from here
    for (auto& entry : arrivals_by_priority_) entry.second.at_last = entry.second.submitted;
  }  // (another at the same instant: its arrivals count at the next completion, over its dt)
  last_observed_at_ = now;
  urgent_at_last_ = urgent_s_;
  const double cost_factor =
      batch.total_tokens() > 0 ? static_cast<double>(o.tokens) / static_cast<double>(batch.total_tokens()) : 1.0;
  // Each live worker's share of the arrivals and of the queue.
  const double share = 1.0 / static_cast<double>(std::max(live_, 1));
  o.arrival_tokens_per_s = arrivals_locked(std::numeric_limits<int>::min()) * cost_factor * share;
  o.queued_tokens = static_cast<double>(queued_tokens_) * cost_factor * share;
  // A batch that dropped rows mid-way computed neither its whole cost nor
  // that of the rows left: it says nothing about batch cost.
  if (!gone.empty()) return;
  const auto k = static_cast<size_t>(batch.worker);
  if (k < controllers_.size()) controllers_[k]->observe(o);
  track_compute_locked(batch.worker, static_cast<double>(o.tokens), compute_seconds);
  cost_factor_ += 0.1 * (cost_factor - cost_factor_);
}

void Scheduler::fail(const Batch& batch) {
  check_owner(batch, "fail");
  std::lock_guard<std::mutex> lock(mu_);
  if (batch.worker >= 0 && batch.worker < workers()) seen_locked(batch.worker);
  running_.erase(batch.seq());
  stats_.failed += batch.size() - static_cast<int64_t>(batch.abandoned.size());  // those were shed
  stats_.failed_batches += 1;
}

std::vector<uint64_t> Scheduler::close() {
  std::vector<uint64_t> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!closed_) {
      closed_ = true;
      // Hand back in queue order so callers fail them oldest first.
      left.reserve(order_.size());
      for (const Key& k : order_) left.push_back(k.id);
      stats_.closed_unserved += static_cast<int64_t>(left.size());
      requests_.clear();
      order_.clear();
      deadlines_.clear();
      tokens_by_priority_.clear();
      queued_tokens_ = 0;
    }
  }
  cv_.notify_all();
  return left;
}

bool Scheduler::closed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return closed_;
}

int64_t Scheduler::depth() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(requests_.size());
}

int64_t Scheduler::queued_tokens() const {
  std::lock_guard<std::mutex> lock(mu_);
  return queued_tokens_;
}

int64_t Scheduler::tracked_priorities() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(arrivals_by_priority_.size());
}

void Scheduler::retire(int worker) {
  if (worker < 0 || worker >= workers())
    throw InvalidArgument("scheduler: worker " + std::to_string(worker) + " out of range");
  std::lock_guard<std::mutex> lock(mu_);
  auto& gone = retired_[static_cast<size_t>(worker)];
  if (gone) return;
  gone = 1;
  --live_;
  cv_.notify_all();  // waiters re-plan their share of the queue without it
}

size_t Scheduler::first_live_locked() const {
  for (size_t k = 0; k < retired_.size(); ++k)
    if (!retired_[k]) return k;
  return 0;  // none live: worker 0's, as before any was retired
}

int Scheduler::live_workers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return live_;
}

int64_t Scheduler::budget() const { return budget(0); }

int64_t Scheduler::budget(int worker) const {
  if (worker < 0 || worker >= workers())
    throw InvalidArgument("scheduler: worker " + std::to_string(worker) + " out of range");
  std::lock_guard<std::mutex> lock(mu_);
  return controllers_[static_cast<size_t>(worker)]->budget();
}

Scheduler::Snapshot Scheduler::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  Snapshot s;
  s.stats = stats_;
  s.depth = static_cast<int64_t>(requests_.size());
  s.queued_tokens = queued_tokens_;
  const size_t first = first_live_locked();  // worker 0's, or the first live one's once it is retired
  s.budget = controllers_[first]->budget();
  s.policy = controllers_[first]->name();
  s.controller = controllers_[first]->state();
  // Admission's own prediction state, beside the (first) controller's.
  s.controller["admission_tail_s"] = tail_s_;
  s.controller["admission_fit_intercept_s"] = compute_fit_.intercept();
  s.controller["admission_fit_slope_s_per_token"] = compute_fit_.slope();
  s.controller["admission_cost_factor"] = cost_factor_;
  s.controller["admission_arrival_tokens_per_s"] = arrivals_locked(std::numeric_limits<int>::min());
  s.controller["admission_pause_share"] = pause_share_;
  for (const auto& c : controllers_) {
    s.budgets.push_back(c->budget());
    s.controllers.push_back(c->state());
  }
  s.now = clock_->now();
  return s;
}

}  // namespace fastserve
