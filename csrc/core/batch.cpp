#include "fastserve/batch.h"

#include <algorithm>
#include <stdexcept>

namespace fastserve {

void Batch::add(uint64_t id, std::vector<int32_t>&& tokens, double arrival, double deadline, int priority) {
  const auto len = static_cast<int32_t>(tokens.size());
  ids_.push_back(id);
  lengths_.push_back(len);
  arrivals_.push_back(arrival);
  deadlines_.push_back(deadline);
  priorities_.push_back(priority);
  tokens_.push_back(std::move(tokens));
  total_tokens_ += len;
  max_len_ = std::max<int64_t>(max_len_, len);
}

std::vector<uint64_t> Batch::remove_expired(double now, const std::vector<uint64_t>& dropped) {
  if (laid_out_.load()) throw std::logic_error("Batch::remove_expired after a layout was built");
  std::vector<uint64_t> out;
  size_t keep = 0;
  for (size_t i = 0; i < ids_.size(); ++i) {
    if (std::find(dropped.begin(), dropped.end(), ids_[i]) != dropped.end()) continue;
    if (deadlines_[i] <= now) {
      out.push_back(ids_[i]);
      continue;
    }
    if (keep != i) {
      ids_[keep] = ids_[i];
      lengths_[keep] = lengths_[i];
      arrivals_[keep] = arrivals_[i];
      deadlines_[keep] = deadlines_[i];
      priorities_[keep] = priorities_[i];
      tokens_[keep] = std::move(tokens_[i]);
    }
    ++keep;
  }
  if (keep == ids_.size()) return out;
  ids_.resize(keep);
  lengths_.resize(keep);
  arrivals_.resize(keep);
  deadlines_.resize(keep);
  priorities_.resize(keep);
  tokens_.resize(keep);
  total_tokens_ = 0;
  max_len_ = 0;
  for (int32_t len : lengths_) {
    total_tokens_ += len;
    max_len_ = std::max<int64_t>(max_len_, len);
  }
  return out;
}

double Batch::padding_ratio() const {
  const int64_t padded = padded_tokens();
  return padded ? 1.0 - static_cast<double>(total_tokens_) / static_cast<double>(padded) : 0.0;
}

const PaddedLayout& Batch::padded() const {
  std::call_once(padded_once_, [this] {
    laid_out_.store(true);
    const int64_t B = size(), L = max_len_;
    padded_.batch = B;
    padded_.max_len = L;
    padded_.input_ids.assign(static_cast<size_t>(B * L), pad_token_id_);
    padded_.attention_mask.assign(static_cast<size_t>(B * L), 0);
    for (int64_t i = 0; i < B; ++i) {
      const auto& t = tokens_[i];
      int64_t* ids = padded_.input_ids.data() + i * L;
      std::copy(t.begin(), t.end(), ids);
      std::fill_n(padded_.attention_mask.data() + i * L, t.size(), int64_t{1});
    }
  });
  return padded_;
}

const PackedLayout& Batch::packed() const {
  std::call_once(packed_once_, [this] {
    laid_out_.store(true);
    const int64_t B = size(), T = total_tokens_;
    packed_.total_tokens = T;
    packed_.max_seqlen = max_len_;
    packed_.input_ids.resize(static_cast<size_t>(T));
    packed_.position_ids.resize(static_cast<size_t>(T));
    packed_.cu_seqlens.resize(static_cast<size_t>(B + 1));
    packed_.cu_seqlens[0] = 0;
    int64_t off = 0;
    for (int64_t i = 0; i < B; ++i) {
      const auto& t = tokens_[i];
      std::copy(t.begin(), t.end(), packed_.input_ids.begin() + off);
      for (size_t j = 0; j < t.size(); ++j) packed_.position_ids[off + j] = static_cast<int64_t>(j);
      off += static_cast<int64_t>(t.size());
      packed_.cu_seqlens[i + 1] = static_cast<int32_t>(off);
    }
  });
  return packed_;
}

}  // namespace fastserve
