// A batch handed from the scheduler to a worker. It owns the requests' token
// ids and assembles the two model layouts on first use (outside the
// scheduler's lock), keeping them for zero-copy views from Python.
#pragma once

#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

namespace fastserve {

struct PaddedLayout {
  int64_t batch = 0, max_len = 0;
  std::vector<int64_t> input_ids;       // [batch, max_len], pad_token_id past each length
  std::vector<int64_t> attention_mask;  // [batch, max_len], 1 on real tokens
};

struct PackedLayout {
  int64_t total_tokens = 0, max_seqlen = 0;
  std::vector<int64_t> input_ids;     // [T]
  std::vector<int64_t> position_ids;  // [T], 0..len-1 within each sequence
  std::vector<int32_t> cu_seqlens;    // [batch + 1], prefix sums of lengths
};

class Batch {
 public:
  Batch(uint64_t seq, int64_t pad_token_id, double assembled_at, int64_t budget)
      : seq_(seq), pad_token_id_(pad_token_id), assembled_at_(assembled_at), budget_(budget) {}

  void add(uint64_t id, std::vector<int32_t>&& tokens, double arrival,
           double deadline = std::numeric_limits<double>::infinity(), int priority = 0);

  // Take out the rows whose deadline is at or before `now` and return their
  // ids: called just before the batch runs, so a request whose deadline
  // passed after assembly is still never computed. The rows of `dropped`
  // (ids) go too, and are not returned. Only before a layout was built
  // (throws std::logic_error after).
  std::vector<uint64_t> remove_expired(double now, const std::vector<uint64_t>& dropped = {});

  uint64_t seq() const { return seq_; }
  int64_t size() const { return static_cast<int64_t>(ids_.size()); }
  const std::vector<uint64_t>& ids() const { return ids_; }
  const std::vector<int32_t>& lengths() const { return lengths_; }
  const std::vector<double>& arrivals() const { return arrivals_; }
  const std::vector<double>& deadlines() const { return deadlines_; }
  const std::vector<int>& priorities() const { return priorities_; }
  const std::vector<std::vector<int32_t>>& tokens() const { return tokens_; }
  int64_t total_tokens() const { return total_tokens_; }
  int64_t max_len() const { return max_len_; }
  int64_t padded_tokens() const { return max_len_ * size(); }
  // Fraction of the padded layout that is padding.
  double padding_ratio() const;
  double assembled_at() const { return assembled_at_; }
  int64_t budget() const { return budget_; }

  // Requests dropped while this batch was assembled, for the caller to fail:
  // deadline passed, or (shed) predicted to finish after it, with the
  // seconds after which a retry would be predicted to make it.
  std::vector<uint64_t> expired;
  std::vector<uint64_t> shed;
  std::vector<double> shed_retry_after_s;
  // Rows dropped while the batch was paused between layers (Scheduler::
  // preempt): lower-priority requests the pause would make late, counted
  // shed and failed by the worker, never completed.
  std::vector<uint64_t> abandoned;
  // The worker (replica) whose controller sized this batch; complete()
  // feeds that controller.
  int worker = 0;
  // The scheduler that assembled it: another scheduler's batch is refused
  // (its seq and worker index mean nothing there).
  const void* owner = nullptr;

  // Built once, on first call, thread-safe.
  const PaddedLayout& padded() const;
  const PackedLayout& packed() const;

 private:
  uint64_t seq_;
  int64_t pad_token_id_;
  double assembled_at_;
  int64_t budget_;
  std::vector<uint64_t> ids_;
  std::vector<int32_t> lengths_;
  std::vector<double> arrivals_, deadlines_;
  std::vector<int> priorities_;
  std::vector<std::vector<int32_t>> tokens_;
  int64_t total_tokens_ = 0, max_len_ = 0;
  mutable std::atomic<bool> laid_out_{false};
  mutable std::once_flag padded_once_, packed_once_;
  mutable PaddedLayout padded_;
  mutable PackedLayout packed_;
};

}  // namespace fastserve
