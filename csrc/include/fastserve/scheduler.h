// The request queue and batch assembly. Thread-safe: any number of threads
// submit and cancel, any number of workers pull batches.
//
// Ordering. Each request has an effective priority
//     priority + (now - arrival) / aging_s,
// so waiting raises it and low priority cannot starve. Because every
// request ages at the same rate, comparing two effective priorities reduces
// to comparing priority * aging_s - arrival, a key that never changes: the
// queue is an ordered set on it, with no re-sorting as time passes.
//
// Batch selection. The head (highest effective priority, oldest first)
// always goes. The next `lookahead` requests in queue order, as far as two
// budgets of tokens reach, are eligible to join it. Padded cost: among them
// the batch grows around the head's length, one neighbour in length order
// at a time, taking the side that adds the most real tokens per token of
// cost, until the controller's token budget, max_batch_size, or the
// min_fill floor on that ratio stops it. Packed cost (no padding to save):
// they join in queue order while they fit. A head longer than the budget
// runs alone.
//
// Admission and shedding (SchedulerConfig::admission). The scheduler fits
// the compute time of its batches, L(c) = a + b c in the cost measure (from
// the second batch on, each clipped at 4x its prediction), and keeps J, the
// 95th percentile of actual - predicted over the last 100 batches (a stall
// is additive: it does not scale with the batch); it predicts after three
// batches. A request with a deadline is predicted to finish at
//     now + R + C(W) + J,
//     C(W) = L(max(W, F)) when W fits the budget B, else ceil(W / B) L(B),
// where R is the rest of the running batch, W the work ahead of it plus its
// own, in cost tokens, and F (capped at B) what its batch will hold: what is
// queued at its priority or higher and such arrivals during R at their
// measured rate (a lower class joins a batch only as far as the deadlines
// of its higher-priority members and the latency target allow, so it does
// not count). At submit,
// "ahead" is what is queued at its priority or higher; a request predicted
// to miss its deadline is refused at once (Overloaded, with the seconds
// after which the backlog ahead has drained enough). When a batch is formed,
// the queue is walked in order and a request whose predicted completion has
// moved past its deadline (higher priority arrived, compute slowed) is shed:
// handed back in Batch::shed, never computed (docs/design.md, "Deadlines").
// A prediction is corrected only by batches that run, so a request that
// would start at once on an idle worker is never refused, and the least
// late request is kept when all would be shed.
//
// Workers. A scheduler built for `workers` consumers (replicas) keeps one
// controller per worker: worker k's next_batch sizes the batch with its own
// budget, and complete() feeds the batch's latency back to that worker's
// controller, since replicas on different devices have different costs.
// Each controller sees 1/workers of the arrival rate and of the queued work
// as its share.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastserve/batch.h"
#include "fastserve/clock.h"
#include "fastserve/controller.h"
#include "fastserve/stats.h"

namespace fastserve {

// What a batch costs against the token budget.
enum class Cost {
  Padded,  // batch size * longest length (what a padded model computes)
  Packed,  // sum of lengths (what a padding-free model computes)
};

// The largest bucket of python/fastserve/shapes.py's ladder at or below
// `tokens` (steps of 16 below 128, then eight per doubling); `tokens` itself
// below the first bucket.
int64_t bucket_floor(int64_t tokens);

struct SchedulerConfig {
  int64_t max_queue_requests = 65536;
  int64_t max_queue_tokens = 1 << 24;
  int64_t max_batch_size = 256;
  int64_t max_request_tokens = 1 << 20;  // a longer submit is invalid
  int64_t pad_token_id = 0;
  double aging_s = 0.5;  // one priority level per aging_s of waiting
  int64_t lookahead = 1024;
  // A request joins a batch only if it adds at least this many real tokens
  // per token of cost, so a padded batch stays under 1 - min_fill padding.
  // The default is high because on the CPU padding is pure waste and a
  // batch's fixed cost is small (figures: docs/design.md, benchmarks/README.md).
  double min_fill = 0.8;
  Cost cost = Cost::Padded;
  // Packed cost counts attention: a sequence of len tokens costs
  // len * (1 + len / attention_tokens) against the budget, so a batch of long
  // inputs is charged what it computes (0: len). For a BERT-style layer the
  // per-token matmuls cost ~24 h^2 FLOPs and attention ~4 h len, so
  // attention_tokens = 6 h (the Engine's setting).
  int64_t attention_tokens = 0;
  // Packed cost: requests longer than this many tokens are batched apart
  // from shorter ones (a batch is all long or all short, by its head), so a
  // short request never shares a batch with a long one (0: off, the
  // default; measured against counting attention alone in docs/design.md,
  // "Long inputs").
  int64_t long_apart_tokens = 0;
  // Refuse at submit, and shed before compute, requests predicted to miss
  // their deadline (requests without one are never refused or shed).
  bool admission = true;
  // Packed cost, while admission predicts: a request that does not fit the
  // budget joins the forming batch all the same when a later batch would
  // make it late and this one, with it, still ends a tail J before every
  // member's deadline; only while the whole queue fits kWindowBudgets
  // budgets (a short queue is run whole rather than split), never under
  // overload. Admission and shedding then predict such a request with one
  // batch past the budget (+ J). Off by default: on simulated time it
  // raises light-load goodput to 98-99.5% of the best static budget (from
  // 94-98%), but puts the p99 of accepted requests during a 3x burst 0.7 ms
  // past the target (docs/design.md, "Deadlines").
  bool extend_past_budget = false;
  // Batches run padded up to a ladder of token counts (CUDA graphs; bf16
  // CPU batches through oneDNN: python/fastserve/shapes.py, bucket()): a
  // batch is formed within its budget rounded down to a bucket
  // (bucket_floor), so that a full batch fills one rather than spilling
  // just past it into the next, which computes up to 1/8 more.
  bool token_buckets = false;
  // Pausing a running batch (docs/design.md, "Pausing a batch"): the number
  // of points at which a worker offers its running batch to be paused, the
  // model's layers (0: never paused, the default). While admission predicts,
  // preempt() between two layers hands back a batch of urgent requests when
  // the head of the queue is of a class above every member of the running
  // batch and makes its deadline if it runs now; admission and shedding then
  // predict such a class with a wait of one layer, not the rest of the
  // batch, and a class below one that arrives with its time stretched by
  // the share of time urgent batches took.
  int64_t preempt_layers = 0;
  // Several workers (replicas): a worker takes only its share of a queue
  // shorter than the workers' budgets together, the cost that makes it end
  // when the others end theirs (by the compute fit, a + b * cost per batch,
  // from when each is free: at once when idle, else at its running batch's
  // predicted end; each left at most its own budget), so the last batches
  // of a list end together rather than one worker running the rest while
  // another idles. Workers count that asked for work or reported a batch
  // within the last second, wait for it, or run a batch not far past its
  // predicted end (a dead, hung or stalled replica is not waited for). A
  // longer queue goes in full budgets.
  // Off: a worker takes up to its budget whatever the others do.
  bool balance_workers = true;

  void validate() const;  // throws InvalidArgument
};

class Scheduler {
 public:
  static constexpr double kNoDeadline = std::numeric_limits<double>::infinity();
  // The longest retry_after_s a refusal or a shed request carries: with no
  // live worker (or a fit gone wild) the predicted wait is unbounded, and a
  // client's Retry-After must be a number.
  static constexpr double kMaxRetryAfterS = 3600.0;
  // The longest compute_seconds complete() takes: about 11.6 days, far past
  // any batch; more is a caller's error, and one such sample would hold the
  // fits (and admission) for thousands of batches, or overflow their sums.
  static constexpr double kMaxComputeS = 1e6;
  static constexpr int64_t kMaxExtraTokens = int64_t(1) << 48;

  Scheduler(SchedulerConfig config, ControllerConfig controller,
            std::shared_ptr<Clock> clock = steady_clock(), int workers = 1);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Enqueue one request; returns its id (never 0). Throws QueueFull past
  // capacity, Overloaded (a QueueFull) when it is predicted to miss its
  // deadline, SchedulerClosed after close(), InvalidArgument for an empty
  // or over-long request. `deadline` is absolute, on this scheduler's clock.
  uint64_t submit(std::vector<int32_t> tokens, int priority = 0,
                  double deadline = kNoDeadline);

  // Enqueue several requests under one lock, in order, as many as fit: the
  // ids of the accepted prefix (a worker sees them all at once, so a list
  // is not cut into small batches while it is being queued). Every request
  // is validated first: an invalid one throws InvalidArgument and nothing is
  // queued. Throws QueueFull (or Overloaded) when not even the first fits.
  // With `whole`, all of them or none: QueueFull when the queue cannot hold
  // them all, Overloaded when the last of them is predicted late (one text's
  // windows, refused as one request with the reason that refused it), and
  // InvalidArgument when they are more requests or tokens than the queue's
  // bounds (they could never fit). With `waiting` (the caller has part of
  // its list queued already and waits for room), an empty prefix is
  // returned instead of QueueFull/Overloaded, and not counted as a refusal.
  // More than one request with a deadline, predicted to end past it even run
  // alone (their own work on every worker, nothing ahead): InvalidArgument,
  // nothing queued (no wait can make them fit).
  std::vector<uint64_t> submit_many(std::vector<std::vector<int32_t>> requests, int priority = 0,
                                    double deadline = kNoDeadline, bool whole = false, bool waiting = false);

  // Remove a queued request. False when it is unknown, already in a batch,
  // or already finished.
  bool cancel(uint64_t id);

  // Wait up to timeout_s (real time) for work. Returns a batch, possibly
  // with no requests but with expired ids to fail; nullopt when the timeout
  // passed with nothing to do or the scheduler is closed and empty.
  // `worker` (in [0, workers)) picks the controller that sizes the batch.
  std::optional<std::shared_ptr<Batch>> next_batch(double timeout_s, int worker = 0);

  // Called by the worker between two layers of `running` (its own batch, from
  // next_batch), `done` in [0, 1] the fraction of its layers run: a batch of
  // urgent requests for the worker to run at once, before it resumes
  // `running`, or nullopt (preempt_layers 0, nothing urgent, an idle worker
  // that will take the queue, or `running` is itself such a batch: never
  // paused). Members of `running` (all of a lower class than the urgent
  // batch) that the pause makes late are dropped: listed in the urgent batch's
  // `shed` (counted shed, for the worker to fail) and added to running's
  // `abandoned` (the worker stops computing their rows). The worker calls
  // start() on the urgent batch as on any batch, and reports `running`'s
  // compute without the time the urgent batch took.
  std::optional<std::shared_ptr<Batch>> preempt(Batch& running, double done);

  // Called by the worker just before it runs `batch`: takes out and returns
  // the requests whose deadline has passed since assembly (counted as
  // expired), so none is computed late, and takes out `cancelled` (ids its
  // caller cancelled after the batch was assembled, before the worker took
  // their futures; counted as cancelled), so none is computed at all.
  std::vector<uint64_t> start(Batch& batch, const std::vector<uint64_t>& cancelled = {});

  // The predicted completion time of a request of `tokens` tokens submitted
  // now at `priority` (the admission test's figure); +inf while nothing is
  // measured yet or admission is off.
  double predict_completion(int64_t tokens, int priority = 0) const;

  // Report a batch's outcome. complete() records latencies and feeds the
  // controller; fail() counts its requests as failed (no controller update:
  // a raising model says nothing about batch cost). extra_tokens: tokens
  // the runner computed beyond the batch's own (ghost sequences that round
  // it up to a bucket), counted in padded_tokens; the fits keep the batch's
  // own cost, which is what they predict from.
  void complete(const Batch& batch, double compute_seconds, int64_t extra_tokens = 0);
  void fail(const Batch& batch);

  // Refuse new work, wake every waiting worker, and hand back the ids still
  // queued so the caller can fail them. Idempotent.
  std::vector<uint64_t> close();
  bool closed() const;

  int64_t depth() const;
  int64_t queued_tokens() const;
  // Priority classes whose arrival rate is tracked (those with recent
  // arrivals: a class that stopped arriving is forgotten).
  int64_t tracked_priorities() const;
  int64_t budget() const;  // worker 0's
  int64_t budget(int worker) const;
  int workers() const { return static_cast<int>(controllers_.size()); }

  // A worker that has died (its replica's thread ended) is retired: from
  // then on admission, the wait for a free worker and the split of the queue
  // and of the arrivals count only the live ones, so a degraded engine
  // refuses (429) what it can no longer serve in time instead of admitting
  // it and timing it out. Idempotent; throws InvalidArgument out of range.
  void retire(int worker);
  int live_workers() const;
  const SchedulerConfig& config() const { return config_; }
  Clock& clock() const { return *clock_; }

  // A consistent snapshot of the statistics and controller state.
  struct Snapshot {
    Stats stats;
    int64_t depth = 0, queued_tokens = 0, budget = 0;
    std::string policy;
    std::map<std::string, double> controller;  // worker 0's (the first live worker's once 0 is retired)
    // Every worker's budget and controller state, worker 0 first.
    std::vector<int64_t> budgets;
    std::vector<std::map<std::string, double>> controllers;
    double now = 0;
  };
  Snapshot snapshot() const;

 private:
  struct Request {
    uint64_t id;
    int priority;
    double arrival, deadline;
    std::vector<int32_t> tokens;
  };
  // Order key: larger priority * aging_s - arrival first, then smaller id.
  struct Key {
    double rank;
    uint64_t id;
    bool operator<(const Key& o) const { return rank > o.rank || (rank == o.rank && id < o.id); }
  };
  using DeadlineKey = std::pair<double, uint64_t>;

  double rank_of(int priority, double arrival) const;
  void erase_locked(std::unordered_map<uint64_t, Request>::iterator it);
  // Remove a queued request from every index; its tokens.
  std::vector<int32_t> take_locked(std::unordered_map<uint64_t, Request>::iterator it);
  void check_request(int64_t n) const;  // throws InvalidArgument
  bool fits_locked(int64_t n) const;
  [[noreturn]] void throw_full_locked();
  static void check_deadline(double deadline);
  void check_owner(const Batch& batch, const char* call) const;
  [[noreturn]] void throw_overloaded_locked(double predicted, double deadline);
  bool predicting_locked() const;
  bool idle_for_locked(int priority) const;
  double fit_locked(double cost) const;  // fitted compute of a batch of `cost`, >= 0
  double compute_locked(double work, double fill, double room = kNoDeadline) const;  // compute up to a request, + J
  // Until a worker is free for the next batch; with `priority`, for a request
  // of that class (a batch of lower classes alone is paused for it).
  double residual_locked(double now, std::optional<int> priority = std::nullopt) const;
  int busy_workers_locked() const;
  bool free_worker_locked() const { return busy_workers_locked() < live_; }
  size_t first_live_locked() const;  // the first worker not retired (0 when none is live)
  // Worker k's batch budget: its controller's, rounded down to a token
  // bucket with token_buckets (what formation fills, and what predictions assume).
  int64_t batch_budget_locked(size_t worker) const;
  double extend_limit_locked(double budget) const;  // largest batch past the budget
  double ahead_locked(int priority) const;      // queued cost at priority or higher
  double arrivals_locked(int priority) const;   // arrival rate (real tokens/s) at priority or higher
  double urgent_locked(int priority) const;     // earliest deadline queued at priority or higher
  double stretch_locked(int priority) const;  // a class's time under pauses for higher ones
  // submit_many's refusal of a list whose own work misses its deadline.
  void check_servable_locked(const std::vector<std::vector<int32_t>>& requests, double now, double deadline) const;
  double completion_locked(double now, int priority, double ahead, double own) const;
  // This worker's share of the queue's cost when the workers split it to
  // end together (balance_workers), or `budget` when that share is larger.
  double share_locked(double now, int worker, double budget) const;
  void seen_locked(int worker) { seen_at_[static_cast<size_t>(worker)] = clock_->now(); }
  void shed_locked(double now, Batch& batch);
  void track_compute_locked(int worker, double cost, double seconds);
  uint64_t enqueue_locked(std::vector<int32_t> tokens, int priority, double now, double deadline);
  std::vector<uint64_t> drop_expired_locked(double now);
  std::shared_ptr<Batch> assemble_locked(double now, int worker);
  struct Cand {
    int32_t len;
    uint64_t id;
    int priority = 0;
    double deadline = kNoDeadline;
    size_t order = 0;  // its place in the window, in queue order
  };
  std::shared_ptr<Batch> assemble_in_order_locked(double now, int64_t budget, double share,
                                                  const std::vector<Cand>& cands, std::shared_ptr<Batch> batch);
  void move_to_batch_locked(double now, uint64_t id, Batch& batch);
  // When a request the class rule turns away would end: after the batch of
  // cost `kept`, in the batches taking `left` (what was turned away ahead of
  // it, and itself).
  double left_out_end_locked(double now, double kept, double left, double budget) const;
  int64_t cost_of(int64_t count, int64_t max_len, int64_t sum_len) const;  // tokens computed
  double seq_cost(int64_t len) const;        // one sequence against the budget (attention counted)
  double own_cost(int64_t len) const;        // a queued request's predicted cost
  int64_t batch_cost(const Batch& b) const;  // a batch against the budget

  const SchedulerConfig config_;
  const std::shared_ptr<Clock> clock_;
  std::vector<std::unique_ptr<Controller>> controllers_;  // one per worker
  // How soon a batch holding a higher class must end when a lower class
  // joins it: within the request latency target, 2 D (the Engine's
  // target_latency_ms), or the higher members' deadlines when sooner. A
  // lower class's backlog grows the budget, and without this bound filled a
  // queued query's batch to that budget. (D itself was measured too tight:
  // at 2x overload with deadlines at the target, the smaller mixed batches
  // paid more fixed cost per batch: high class 71% within the SLO against
  // 81%, low 6% against 11%.)
  double lower_fill_s_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::unordered_map<uint64_t, Request> requests_;
  std::set<Key> order_;
  std::set<DeadlineKey> deadlines_;  // only requests with a finite deadline
  std::map<int, int64_t> tokens_by_priority_;  // queued real tokens per priority
  // Admission's prediction: compute fit, the q95 of (actual - predicted)
  // over the last kTailWindow batches (a ring of excesses), cost tokens per
  // real token, and the predicted end of each running batch.
  static constexpr size_t kTailWindow = 100;
  LatencyModel compute_fit_{0.9};
  std::vector<double> excess_;
  size_t excess_next_ = 0;
  double tail_s_ = 0.0, cost_factor_ = 1.0;
  std::vector<bool> warm_;  // per worker: its first (cold) batch has completed
  struct Running {
    int worker = 0;
    double end = 0;      // predicted end (a paused batch's: after the urgent one)
    double full = 0;     // predicted compute, all layers
    double paused = 0;   // seconds the urgent batches run inside it took
    int top = 0;         // highest priority of its members
    bool urgent = false; // run inside a paused batch (never paused itself)
    // At the worker's last preempt() call: when, the fraction of its layers
    // run, and `paused` then (the pace of its layers since).
    double last_at = 0, last_done = 0, last_paused = 0;
  };
  std::map<uint64_t, Running> running_;  // by batch seq
  int64_t queued_tokens_ = 0;
  // Per worker, for sharing a short queue: when it last asked for work or
  // reported a batch (on clock_), and whether it is waiting for work now.
  static constexpr double kAbsentS = 1.0;
  std::vector<double> seen_at_;
  std::vector<char> waiting_;
  std::vector<char> retired_;  // per worker: retire()d
  int live_ = 1;               // workers not retired
  // Arrival rates by priority (real tokens/s, smoothed; their sum is the
  // total), for the controller and the fill a class cannot be displaced from.
  // A class whose rate has decayed to nothing is dropped: callers may use any
  // number of distinct priorities, and every batch walks this map.
  struct Arrivals {
    int64_t submitted = 0;  // tokens since the entry was made
    int64_t at_last = 0;    // `submitted` at the last completion
    double rate = 0;        // smoothed tokens/s
  };
  static constexpr double kForgottenRate = 1e-3;  // tokens/s: below it, with nothing new, a class is dropped
  double last_observed_at_ = -1;
  std::map<int, Arrivals> arrivals_by_priority_;
  // Pausing: the compute urgent batches took, and its share of the workers' time.
  double urgent_s_ = 0, urgent_at_last_ = 0, pause_share_ = 0;

  uint64_t next_id_ = 1;
  uint64_t next_batch_seq_ = 1;
  bool closed_ = false;
  Stats stats_;
};

const char* to_string(Cost cost);
Cost cost_from_string(const std::string& name);

}  // namespace fastserve
