// Both model layouts, element by element against a naive reference.
#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <vector>

#include "fastserve/batch.h"

namespace fastserve {
namespace {

std::vector<std::vector<int32_t>> random_rows(std::mt19937& rng, int rows, int max_len) {
  std::uniform_int_distribution<int> len(1, max_len), tok(1, 30000);
  std::vector<std::vector<int32_t>> out(rows);
  for (int i = 0; i < rows; ++i) {
    // Every fourth row has length 1, the edge case of both layouts.
    const int n = i % 4 == 0 ? 1 : len(rng);
    for (int j = 0; j < n; ++j) out[i].push_back(tok(rng));
  }
  return out;
}

std::unique_ptr<Batch> make_batch(const std::vector<std::vector<int32_t>>& rows, int64_t pad) {
  auto b = std::make_unique<Batch>(1, pad, 0.0, 1 << 20);
  for (size_t i = 0; i < rows.size(); ++i) {
    auto copy = rows[i];
    b->add(100 + i, std::move(copy), 0.5 * i);
  }
  return b;
}

TEST(BatchLayouts, PaddedMatchesNaiveReferenceOnRandomBatches) {
  std::mt19937 rng(1);
  for (int trial = 0; trial < 50; ++trial) {
    const auto rows = random_rows(rng, 1 + trial % 17, 1 + trial * 3);
    const int64_t pad = trial % 2 ? -7 : 0;
    const auto bp = make_batch(rows, pad);
    const Batch& b = *bp;
    size_t L = 0;
    for (const auto& r : rows) L = std::max(L, r.size());
    const PaddedLayout& p = b.padded();
    ASSERT_EQ(p.batch, int64_t(rows.size()));
    ASSERT_EQ(p.max_len, int64_t(L));
    ASSERT_EQ(p.input_ids.size(), rows.size() * L);
    ASSERT_EQ(p.attention_mask.size(), rows.size() * L);
    for (size_t i = 0; i < rows.size(); ++i) {
      for (size_t j = 0; j < L; ++j) {
        const bool real = j < rows[i].size();
        EXPECT_EQ(p.input_ids[i * L + j], real ? int64_t(rows[i][j]) : pad) << i << "," << j;
        EXPECT_EQ(p.attention_mask[i * L + j], real ? 1 : 0) << i << "," << j;
      }
    }
    EXPECT_EQ(&b.padded(), &p);  // built once
  }
}

TEST(BatchLayouts, PackedMatchesNaiveReferenceOnRandomBatches) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 50; ++trial) {
    const auto rows = random_rows(rng, 1 + trial % 17, 1 + trial * 3);
    const auto bp = make_batch(rows, 0);
    const Batch& b = *bp;
    std::vector<int64_t> ids, pos;
    std::vector<int32_t> cu{0};
    size_t L = 0;
    for (const auto& r : rows) {
      for (size_t j = 0; j < r.size(); ++j) {
        ids.push_back(r[j]);
        pos.push_back(int64_t(j));
      }
      cu.push_back(cu.back() + int32_t(r.size()));
      L = std::max(L, r.size());
    }
    const PackedLayout& p = b.packed();
    EXPECT_EQ(p.total_tokens, int64_t(ids.size()));
    EXPECT_EQ(p.max_seqlen, int64_t(L));
    EXPECT_EQ(p.input_ids, ids);
    EXPECT_EQ(p.position_ids, pos);
    EXPECT_EQ(p.cu_seqlens, cu);
    EXPECT_EQ(&b.packed(), &p);
  }
}

TEST(Batch, ReportsSizesTokensAndPaddingRatio) {
  const auto bp = make_batch({{1, 2, 3, 4}, {5}, {6, 7}}, 0);
  const Batch& b = *bp;
  EXPECT_EQ(b.size(), 3);
  EXPECT_EQ(b.total_tokens(), 7);
  EXPECT_EQ(b.max_len(), 4);
  EXPECT_EQ(b.padded_tokens(), 12);
  EXPECT_DOUBLE_EQ(b.padding_ratio(), 5.0 / 12.0);
  EXPECT_EQ(b.ids(), (std::vector<uint64_t>{100, 101, 102}));
  EXPECT_EQ(b.lengths(), (std::vector<int32_t>{4, 1, 2}));
  EXPECT_EQ(b.arrivals(), (std::vector<double>{0.0, 0.5, 1.0}));
}

TEST(Batch, EmptyBatchHasEmptyLayoutsAndNoPadding) {
  const Batch b(7, 0, 1.0, 64);
  EXPECT_EQ(b.size(), 0);
  EXPECT_DOUBLE_EQ(b.padding_ratio(), 0.0);
  EXPECT_TRUE(b.padded().input_ids.empty());
  EXPECT_EQ(b.packed().cu_seqlens, std::vector<int32_t>{0});
}

}  // namespace
}  // namespace fastserve
