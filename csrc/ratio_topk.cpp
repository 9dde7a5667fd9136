// ratio_topk: exact top-k of the ratio score by radix select on the score's bits.
//
// Each entry gets a 32-bit rank key: a finite score s (always >= 0) maps to bits(s) + 1, which
// orders like s; a non-finite score maps to 0, below every finite one. Three passes over g and w
// build histograms of successive key digits (11, 11 and 9 bits; keys never exceed 0x7f800000)
// among the entries that still match the threshold's known high bits, which pins down the
// threshold key T and how many entries equal to T are needed. Two more passes count and then
// write the winners: every key above T, plus the first needed entries equal to T in (segment,
// index) order. The score is recomputed per pass into a small per-thread chunk buffer, never
// stored for a whole tensor.
//
// A "group" is the set of segments one selection runs over: each segment alone (k per
// segment) or all segments together (one global k; ties go to the smaller segment first,
// which is chunk order).
#include <omp.h>

#include <algorithm>

#include "kernels.h"

namespace gem {

namespace {

constexpr int64_t kChunk = 16384;  // entries per work item: its keys (64 KiB) stay in L2
constexpr uint32_t kExcluded = 0xffffffffu;  // above every real key; always skipped explicitly
constexpr int kPasses = 3;
constexpr int kDigitShift[kPasses] = {20, 9, 0};
constexpr int kDigitBits[kPasses] = {11, 11, 9};
constexpr int kMaxBins = 1 << 11;

struct Chunk {
  int64_t segment, group, start, end;
};

struct Group {
  int64_t needed;     // entries still to choose among those matching the known prefix
  uint32_t prefix;    // threshold key bits found so far
};

// Scores are >= 0 or NaN (of either sign), so "finite" is an unsigned compare of the bits:
// a branch-free test that lets the compiler vectorise the plain-exponent loop.
template <bool kPlain, typename G, typename W>
void score_keys_loop(const G* g, const W* w, int64_t start, int64_t end, const ScoreParams& sp, uint32_t* keys) {
  for (int64_t i = start; i < end; ++i) {
    const float abs_w = std::fabs(to_float(w[i]));
    const float d = kPlain ? abs_w + sp.eps : sp.denominator(abs_w);
    const uint32_t bits = float_bits(std::fabs(to_float(g[i])) / d);
    keys[i - start] = bits < 0x7f800000u ? bits + 1u : 0u;
  }
}

template <typename G, typename W>
void score_keys(const G* g, const W* w, int64_t start, int64_t end, const ScoreParams& sp, uint32_t* keys) {
  if (sp.plain) score_keys_loop<true>(g, w, start, end, sp, keys);
  else score_keys_loop<false>(g, w, start, end, sp, keys);
}

class Selector {
 public:
  Selector(const SegmentList& segs, double eps, double exponent, const int64_t* exclude_indices,
           const int64_t* exclude_offsets)
      : segs_(segs), sp_(eps, exponent), ex_idx_(exclude_indices), ex_off_(exclude_offsets) {}

  // Keys of one chunk, excluded entries marked kExcluded.
  void chunk_keys(const Chunk& c, uint32_t* keys) const {
    const int64_t l = c.segment;
    dispatch_float_pair(segs_.grad_dtypes[l], segs_.grads[l], segs_.weight_dtypes[l], segs_.weights[l],
                        [&](auto* g, auto* w) { score_keys(g, w, c.start, c.end, sp_, keys); });
    if (ex_idx_ == nullptr) return;
    const int64_t* first = ex_idx_ + ex_off_[l];
    const int64_t* last = ex_idx_ + ex_off_[l + 1];
    for (const int64_t* e = std::lower_bound(first, last, c.start); e != last && *e < c.end; ++e)
      keys[*e - c.start] = kExcluded;
  }

 private:
  const SegmentList& segs_;
  ScoreParams sp_;
  const int64_t* ex_idx_;
  const int64_t* ex_off_;
};

// One radix pass: histograms of digit `pass` per active group, then narrow each group's prefix.
void radix_pass(const Selector& sel, const std::vector<Chunk>& chunks, std::vector<Group>& groups,
                int pass, int num_threads) {
  const int shift = kDigitShift[pass];
  const int high_shift = shift + kDigitBits[pass];  // bits above this digit are already known
  const uint32_t digit_mask = (1u << kDigitBits[pass]) - 1u;
  std::vector<uint64_t> hist(groups.size() * kMaxBins, 0);

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<uint32_t> keys(kChunk);
    std::vector<uint64_t> local(kMaxBins, 0);
    int64_t local_group = -1;
    // Integer adds commute, so flushing per-thread counts with atomics stays deterministic.
    auto flush = [&]() {
      if (local_group < 0) return;
      uint64_t* dst = &hist[local_group * kMaxBins];
      for (int b = 0; b < kMaxBins; ++b)
        if (local[b]) {
#pragma omp atomic
          dst[b] += local[b];
          local[b] = 0;
        }
    };
#pragma omp for schedule(static)
    for (int64_t ci = 0; ci < int64_t(chunks.size()); ++ci) {
      const Chunk& c = chunks[ci];
      const Group& grp = groups[c.group];
      if (grp.needed == 0) continue;
      if (c.group != local_group) {
        flush();
        local_group = c.group;
      }
      sel.chunk_keys(c, keys.data());
      const uint32_t want_high = grp.prefix >> high_shift;  // high_shift <= 31
      for (int64_t i = 0; i < c.end - c.start; ++i) {
        const uint32_t key = keys[i];
        if (key == kExcluded || (key >> high_shift) != want_high) continue;
        ++local[(key >> shift) & digit_mask];
      }
    }
    flush();
  }

  for (size_t gi = 0; gi < groups.size(); ++gi) {
    Group& grp = groups[gi];
    if (grp.needed == 0) continue;
    const uint64_t* h = &hist[gi * kMaxBins];
    uint64_t above = 0;
    for (int64_t b = digit_mask; b >= 0; --b) {
      if (above + h[b] >= uint64_t(grp.needed)) {
        grp.prefix |= uint32_t(b) << shift;
        grp.needed -= int64_t(above);
        break;
      }
      above += h[b];
    }
  }
}

}  // namespace

void ratio_topk(const SegmentList& segs, const std::vector<int64_t>& k_per_group, bool per_segment,
                double eps, double exponent, const int64_t* exclude_indices,
                const int64_t* exclude_offsets, int64_t* indices, int64_t* offsets, int num_threads) {
  check_float_dtypes(segs.grad_dtypes, "gradient");
  check_float_dtypes(segs.weight_dtypes, "weight");
  if (k_per_group.size() != (per_segment ? segs.size() : 1))
    throw std::invalid_argument("k must have one entry per segment, or be a single global k");
  const Selector sel(segs, eps, exponent, exclude_indices, exclude_offsets);

  std::vector<Chunk> chunks;
  for (size_t l = 0; l < segs.size(); ++l)
    for (int64_t start = 0; start < segs.numels[l]; start += kChunk)
      chunks.push_back({int64_t(l), per_segment ? int64_t(l) : 0, start,
                        std::min(start + kChunk, segs.numels[l])});
  std::vector<Group> groups;
  for (int64_t k : k_per_group) groups.push_back({k, 0u});

  for (int pass = 0; pass < kPasses; ++pass) radix_pass(sel, chunks, groups, pass, num_threads);
  // Now each group with k > 0 has its threshold key in prefix and, in needed, how many
  // entries equal to it to take (the ones above it all go).

  const int64_t n_chunks = int64_t(chunks.size());
  std::vector<int64_t> above(n_chunks, 0), equal(n_chunks, 0);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<uint32_t> keys(kChunk);
#pragma omp for schedule(static)
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const Chunk& c = chunks[ci];
      const Group& grp = groups[c.group];
      if (grp.needed == 0) continue;
      sel.chunk_keys(c, keys.data());
      int64_t n_above = 0, n_equal = 0;
      for (int64_t i = 0; i < c.end - c.start; ++i) {
        const uint32_t key = keys[i];
        n_above += key != kExcluded && key > grp.prefix;
        n_equal += key == grp.prefix;
      }
      above[ci] = n_above;
      equal[ci] = n_equal;
    }
  }

  // Hand out the equal-to-threshold quota in chunk order, i.e. (segment, index) order, and
  // place each chunk's winners right after those of the chunks before it in its segment.
  std::vector<int64_t> take_equal(n_chunks, 0), write_at(n_chunks, 0), seg_count(segs.size(), 0);
  std::vector<int64_t> equal_left(groups.size());
  for (size_t gi = 0; gi < groups.size(); ++gi) equal_left[gi] = groups[gi].needed;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const Chunk& c = chunks[ci];
    take_equal[ci] = std::min(equal[ci], equal_left[c.group]);
    equal_left[c.group] -= take_equal[ci];
    write_at[ci] = seg_count[c.segment];
    seg_count[c.segment] += above[ci] + take_equal[ci];
  }
  offsets[0] = 0;
  for (size_t l = 0; l < segs.size(); ++l) offsets[l + 1] = offsets[l] + seg_count[l];

#pragma omp parallel num_threads(num_threads)
  {
    std::vector<uint32_t> keys(kChunk);
#pragma omp for schedule(static)
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const Chunk& c = chunks[ci];
      if (above[ci] + take_equal[ci] == 0) continue;
      const uint32_t threshold = groups[c.group].prefix;
      sel.chunk_keys(c, keys.data());
      int64_t* out = indices + offsets[c.segment] + write_at[ci];
      int64_t equal_left_here = take_equal[ci];
      for (int64_t i = 0; i < c.end - c.start; ++i) {
        const uint32_t key = keys[i];
        if (key == kExcluded) continue;
        if (key > threshold || (key == threshold && equal_left_here-- > 0)) *out++ = c.start + i;
      }
    }
  }
}

}  // namespace gem
