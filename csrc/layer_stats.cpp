// layer_stats: per-segment sums of the ratio score, deterministic for any thread count.
#include <omp.h>

#include <algorithm>
#include <limits>

#include "kernels.h"

namespace gem {

namespace {

// Fixed block size: each block is summed in order on one thread, then the block partials of a
// segment are added in block order, so the bits never depend on the thread count.
constexpr int64_t kStatsBlock = 8192;

// The larger of a and b, NaN if either is NaN (torch.max propagates NaN).
inline double nan_max(double a, double b) { return (std::isnan(a) || a >= b) ? a : b; }

struct Block {
  int64_t segment, start, end;
};

template <typename G, typename W>
void block_partials(const G* g, const W* w, int64_t start, int64_t end, const ScoreParams& sp,
                    double* partial) {
  double sum = 0, sum_sq = 0, sum_s_ln_s = 0, max_s = 0;
  for (int64_t i = start; i < end; ++i) {
    const double s = ratio_score(g, w, i, sp);
    sum += s;
    sum_sq += s * s;
    if (s > 0) sum_s_ln_s += s * std::log(s);  // as the reference's where(s > 0, ...): 0 for 0 and NaN
    max_s = nan_max(max_s, s);
  }
  partial[0] = sum;
  partial[1] = sum_sq;
  partial[2] = sum_s_ln_s;
  partial[3] = max_s;
}

}  // namespace

void layer_stats(const SegmentList& segs, double eps, double exponent, double* out, int num_threads) {
  check_float_dtypes(segs.grad_dtypes, "gradient");
  check_float_dtypes(segs.weight_dtypes, "weight");
  const ScoreParams sp(eps, exponent);
  std::vector<Block> blocks;
  for (size_t l = 0; l < segs.size(); ++l)
    for (int64_t start = 0; start < segs.numels[l]; start += kStatsBlock)
      blocks.push_back({int64_t(l), start, std::min(start + kStatsBlock, segs.numels[l])});
  std::vector<double> partials(blocks.size() * 4);

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t b = 0; b < int64_t(blocks.size()); ++b) {
    const Block& blk = blocks[b];
    dispatch_float_pair(segs.grad_dtypes[blk.segment], segs.grads[blk.segment],
                        segs.weight_dtypes[blk.segment], segs.weights[blk.segment],
                        [&](auto* g, auto* w) { block_partials(g, w, blk.start, blk.end, sp, &partials[4 * b]); });
  }

  std::fill(out, out + 4 * segs.size(), 0.0);
  for (size_t b = 0; b < blocks.size(); ++b) {
    double* row = out + 4 * blocks[b].segment;
    const double* p = &partials[4 * b];
    row[0] += p[0];
    row[1] += p[1];
    row[2] += p[2];
    row[3] = nan_max(row[3], p[3]);
  }
}

void check_float_dtypes(const std::vector<int>& codes, const char* what) {
  for (int c : codes)
    if (c != kFloat32 && c != kBFloat16 && c != kFloat16)
      throw std::invalid_argument(std::string("unsupported ") + what + " dtype code " + std::to_string(c));
}

}  // namespace gem
