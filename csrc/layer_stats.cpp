// layer_stats: per-segment sums of the ratio score, deterministic for any thread count.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <type_traits>

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

// Streaming ops do ~1 ns of work per entry; below 64K entries per thread (~60 us) a second
// thread costs more than it saves (torch's grain is 32K for heavier element-wise ops).
constexpr int64_t kMinEntriesPerThread = 1 << 16;

// Each block is cut into sub-blocks whose scores and s ln s terms go through small buffers
// (L1-resident): the map loops over them vectorise, and the sums below are plain adds.
constexpr int64_t kSubBlock = 512;
// Entry i of a block adds into lane i % kLanes; the lanes are added in order at the end of the
// block. Separate lanes let the compiler vectorise the sums without reassociating any of them.
constexpr int kLanes = 8;

// ln 2 split so that e * kLn2Hi is exact for any float exponent e (kLn2Hi has 32 trailing
// zero bits); the constants are ln 2 rounded to double and its remainder.
constexpr double kLn2Hi = 6.93147180369123816490e-01;
constexpr double kLn2Lo = 1.90821492927058770002e-10;

// ln x for a float x > 0 (finite or +inf), within about one double ulp, branch-free so the
// loop calling it vectorises (std::log is a scalar libm call, ~10 ns per entry here).
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(f), f = (m - 1) / (m + 1), |f| <=
// 0.1716, and the series 2 (f + f^3/3 + ... + f^17/17) leaves out less than 9e-16 relative
// (the f^19/19 term would cut that to 3e-17 for 5% more time).
// e and m come from the bits of x widened to double: subnormal floats are normal doubles, and
// offsetting the bits by kSplit - 1.0 moves the exponent step from m = 2 to m = sqrt(2), so
// plain integer adds, masks and shifts replace the selects (a quarter of the time went there).
constexpr uint64_t kSplit = 0x3fe6a09e667f3bcdull;                   // bits of sqrt(1/2)
constexpr uint64_t kSplitOffset = 0x3ff0000000000000ull - kSplit;    // bits of 1.0 - kSplit
inline double log_of_float(float x) {
  const double xd = x;  // exact
  uint64_t bits;
  std::memcpy(&bits, &xd, sizeof bits);
  // For x = 2^e * m, m in [sqrt(1/2), sqrt(2)): the exponent field of bits + kSplitOffset is
  // e + 1023 and its mantissa field is that of m's bits less kSplit.
  const uint64_t shifted = bits + kSplitOffset;
  const int32_t e = int32_t(shifted >> 52) - 1023;
  const uint64_t m_bits = (shifted & 0xfffffffffffffull) + kSplit;
  double md;
  std::memcpy(&md, &m_bits, sizeof md);
  const double f = (md - 1.0) / (md + 1.0);  // md has float's 24 bits: md - 1, md + 1 are exact
  const double f2 = f * f;
  double q = 1.0 / 17;
  q = q * f2 + 1.0 / 15;
  q = q * f2 + 1.0 / 13;
  q = q * f2 + 1.0 / 11;
  q = q * f2 + 1.0 / 9;
  q = q * f2 + 1.0 / 7;
  q = q * f2 + 1.0 / 5;
  q = q * f2 + 1.0 / 3;
  const double two_f = 2.0 * f;
  const double ln_m = two_f + two_f * f2 * q;
  const double ed = double(e);
  return ed * kLn2Hi + (ed * kLn2Lo + ln_m);
}

// The kLanes float maxima as one GCC vector: written per lane, GCC's vectoriser could not
// group the lanes' NaN-propagating maxima and did them lane by lane (over a third of the
// time of the sums below); as a vector each step is one compare and select for all lanes.
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));

struct Lanes {
  double sum[kLanes] = {}, sum_sq[kLanes] = {}, sum_s_ln_s[kLanes] = {};
  FloatLanes max_s = {};
};

// Adds n <= kSubBlock scores (n a multiple of kLanes) into the lanes, entry i into lane i % kLanes. Compiled for AVX-512,
// AVX2 and plain x86-64, picked at load time: the same IEEE operations (no FMA contraction) in
// each, so the same bits, the wider ones just do more entries per instruction.
GEM_VECTOR_CLONES void add_scores(const float* s, int64_t n, Lanes& acc) {
  double s_ln_s[kSubBlock];
  // As the reference's where(s > 0, s ln s, 0): 0 for 0 and NaN.
  for (int64_t i = 0; i < n; ++i) {
    const double t = double(s[i]) * log_of_float(s[i]);
    s_ln_s[i] = s[i] > 0 ? t : 0.0;
  }
  Lanes a = acc;  // a local copy stays in registers (acc could alias s as far as the compiler knows)
  for (int64_t i = 0; i < n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double x = s[i + j];
      a.sum[j] += x;
      a.sum_sq[j] += x * x;
      a.sum_s_ln_s[j] += s_ln_s[i + j];
    }
  for (int64_t i = 0; i < n; i += kLanes) {
    FloatLanes x;
    std::memcpy(&x, s + i, sizeof x);
    // Lane by lane the larger of the two, NaN if either is NaN (torch.max propagates NaN).
    a.max_s = (a.max_s != a.max_s || a.max_s >= x) ? a.max_s : x;
  }
  acc = a;
}

// The common case's scores (fp32 g and w, exponent 1), in the same operations as ratio_scores.
GEM_VECTOR_CLONES void plain_f32_scores(const float* g, const float* w, int64_t n, float eps, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::fabs(g[i]) / (std::fabs(w[i]) + eps);
}

template <bool kPlain, typename G, typename W>
void block_partials(const G* g, const W* w, int64_t start, int64_t end, const ScoreParams& sp,
                    double* partial) {
  Lanes acc;
  float s[kSubBlock];
  for (int64_t base = start; base < end; base += kSubBlock) {  // kSubBlock is a multiple of kLanes
    const int64_t n = std::min(kSubBlock, end - base);
    if constexpr (kPlain && std::is_same_v<G, float> && std::is_same_v<W, float>)
      plain_f32_scores(g + base, w + base, n, sp.eps, s);
    else
      ratio_scores<kPlain>(g, w, base, n, sp, s);
    // Zeros pad the block's last few entries to whole lanes: they add 0 to every sum (and 0 ln 0
    // is 0) and leave the max as it is, since scores are >= 0 or NaN and the max starts at 0.
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    std::fill(s + n, s + padded, 0.0f);
    add_scores(s, padded, acc);
  }
  partial[0] = partial[1] = partial[2] = partial[3] = 0.0;
  for (int j = 0; j < kLanes; ++j) {
    partial[0] += acc.sum[j];
    partial[1] += acc.sum_sq[j];
    partial[2] += acc.sum_s_ln_s[j];
    partial[3] = nan_max(partial[3], double(acc.max_s[j]));
  }
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

  int64_t total = 0;
  for (int64_t n : segs.numels) total += n;
  const int threads = threads_for(total, kMinEntriesPerThread, num_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t b = 0; b < int64_t(blocks.size()); ++b) {
    const Block& blk = blocks[b];
    dispatch_float_pair(segs.grad_dtypes[blk.segment], segs.grads[blk.segment],
                        segs.weight_dtypes[blk.segment], segs.weights[blk.segment],
                        [&](auto* g, auto* w) {
                          double* partial = &partials[4 * b];
                          if (sp.plain) block_partials<true>(g, w, blk.start, blk.end, sp, partial);
                          else block_partials<false>(g, w, blk.start, blk.end, sp, partial);
                        });
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
