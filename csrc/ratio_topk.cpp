// ratio_topk: exact top-k of the ratio score by radix select on the score's bits.
//
// Each entry gets a 32-bit rank key: a finite score s (always >= 0) maps to bits(s) + 1, which
// orders like s; a non-finite score maps to 0, below every finite one. Pass 1 over g and w
// builds a histogram of the top key digit (11 bits) per group, which gives the threshold's top
// digit. Pass 2 collects every entry whose top digit is at least that (the certain winners plus
// the threshold bucket) as (key, position) pairs, in index order; the exact threshold key T and
// how many entries equal to T to take are then found among those candidates alone, and the
// winners written from them: every key above T, plus the first needed entries equal to T in
// (segment, index) order. The score is recomputed per pass into a small per-thread chunk buffer,
// never stored for a whole tensor.
//
// When the threshold bucket is large (many equal or near-equal scores, or k a large share of
// the entries) the candidates would not be compact; then the radix select goes on over the
// full data instead: two more histogram passes (11 and 9 bits), a pass counting and a pass
// writing the winners.
//
// A "group" is the set of segments one selection runs over: each segment alone (k per
// segment) or all segments together (one global k; ties go to the smaller segment first,
// which is chunk order).
#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace gem {

namespace {

constexpr int64_t kChunk = 16384;  // entries per work item: its keys (64 KiB) stay in L2
// A pass does ~1-2 ns per entry; below 64K entries per thread a second thread costs more than it
// saves (waking it takes ms on a busy machine). torch's grain for element-wise ops is 32K.
constexpr int64_t kMinEntriesPerThread = 1 << 16;
// The candidate path runs when its (key, position) pairs number at most this share of all
// entries (8 bytes each, so at most the size of one fp32 tensor); beyond it three more passes
// over g and w cost less than collecting and scanning the candidates.
constexpr int64_t kMaxCandidateShare = 8;
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
  int64_t bucket;     // entries matching the prefix after the last radix pass
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

// The common case (fp32 g and w, exponent 1), compiled for AVX-512 / AVX2 / baseline: the same
// IEEE operations as score_keys_loop, so the same keys.
GEM_VECTOR_CLONES void plain_f32_keys(const float* g, const float* w, int64_t n, float eps, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = float_bits(std::fabs(g[i]) / (std::fabs(w[i]) + eps));
    keys[i] = bits < 0x7f800000u ? bits + 1u : 0u;
  }
}

template <typename G, typename W>
void score_keys(const G* g, const W* w, int64_t start, int64_t end, const ScoreParams& sp, uint32_t* keys) {
  if constexpr (std::is_same_v<G, float> && std::is_same_v<W, float>)
    if (sp.plain) return plain_f32_keys(g + start, w + start, end - start, sp.eps, keys);
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
      // Bounds and pointers in locals: the counts are uint64 and could alias the Chunk's fields,
      // so the compiler would reload c.end and c.start after every increment.
      const int64_t n = c.end - c.start;
      const uint32_t* k = keys.data();
      uint64_t* counts = local.data();
      for (int64_t i = 0; i < n; ++i) {
        const uint32_t key = k[i];
        if (key == kExcluded || (key >> high_shift) != want_high) continue;
        ++counts[(key >> shift) & digit_mask];
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
        grp.bucket = int64_t(h[b]);
        break;
      }
      above += h[b];
    }
  }
}

struct Candidate {
  uint32_t key;
  uint32_t pos;  // position inside its chunk
};

// Pass 2 and the rest of the common case: every group has its threshold's top digit in prefix
// (pass 1). Collects the candidates (key >= prefix), finds each group's exact threshold among
// them and writes the winners.
void select_from_candidates(const Selector& sel, const std::vector<Chunk>& chunks, const std::vector<Group>& groups,
                            size_t n_segments, int64_t* indices, int64_t* offsets, int num_threads) {
  const int64_t n_chunks = int64_t(chunks.size());
  // Each thread appends to its own list; a chunk's candidates are one run of its thread's list,
  // in index order.
  std::vector<std::vector<Candidate>> found(num_threads);
  std::vector<int64_t> run_begin(n_chunks, 0), run_end(n_chunks, 0);
  std::vector<int> run_thread(n_chunks, 0);
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num();
    std::vector<Candidate>& mine = found[t];
    std::vector<uint32_t> keys(kChunk);
#pragma omp for schedule(static)
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const Chunk& c = chunks[ci];
      const Group& grp = groups[c.group];
      run_thread[ci] = t;
      run_begin[ci] = run_end[ci] = int64_t(mine.size());
      if (grp.needed == 0) continue;
      sel.chunk_keys(c, keys.data());
      const uint32_t lowest = grp.prefix;  // the threshold bucket's smallest key
      const int64_t n = c.end - c.start;
      const uint32_t* k = keys.data();
      auto collect = [&](int64_t from, int64_t to) {
        for (int64_t i = from; i < to; ++i)
          if (k[i] >= lowest && k[i] != kExcluded) mine.push_back({k[i], uint32_t(i)});
      };
      // Few entries are candidates: a vectorised test of 16 keys skips most groups of 16 at once.
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        // Signed compares (SSE2 has no unsigned ones): finite keys are < 2^31, and kExcluded
        // reads as -1, which is never a candidate anyway.
        int any = 0;
        for (int j = 0; j < 16; ++j) any |= int32_t(k[i + j]) >= int32_t(lowest);
        if (any) collect(i, i + 16);
      }
      collect(i, n);
      run_end[ci] = int64_t(mine.size());
    }
  }
  auto run = [&](int64_t ci) {
    const Candidate* base = found[run_thread[ci]].data();
    return std::make_pair(base + run_begin[ci], base + run_end[ci]);
  };

  // The exact threshold T of each group: the needed-th largest key in its bucket.
  std::vector<std::vector<uint32_t>> bucket_keys(groups.size());
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const Group& grp = groups[chunks[ci].group];
    const auto [first, last] = run(ci);
    for (const Candidate* e = first; e != last; ++e)
      if ((e->key >> kDigitShift[0]) == (grp.prefix >> kDigitShift[0])) bucket_keys[chunks[ci].group].push_back(e->key);
  }
  std::vector<uint32_t> threshold(groups.size(), 0);
  std::vector<int64_t> equal_left(groups.size(), 0);
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    if (groups[gi].needed == 0) continue;
    std::vector<uint32_t>& b = bucket_keys[gi];
    std::nth_element(b.begin(), b.begin() + (groups[gi].needed - 1), b.end(), std::greater<uint32_t>());
    threshold[gi] = b[groups[gi].needed - 1];
    const int64_t above = std::count_if(b.begin(), b.end(), [&](uint32_t key) { return key > threshold[gi]; });
    equal_left[gi] = groups[gi].needed - above;
  }

  // Winners in chunk order, which is (segment, index) order: the segments' outputs follow one
  // another, and the entries equal to T are taken first come, first served.
  std::vector<int64_t> seg_count(n_segments, 0);
  int64_t* out = indices;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const Chunk& c = chunks[ci];
    const uint32_t t = threshold[c.group];
    int64_t& left = equal_left[c.group];
    int64_t* const before = out;
    const auto [first, last] = run(ci);
    for (const Candidate* e = first; e != last; ++e)
      if (e->key > t || (e->key == t && left-- > 0)) *out++ = c.start + e->pos;
    seg_count[c.segment] += out - before;
  }
  offsets[0] = 0;
  for (size_t l = 0; l < n_segments; ++l) offsets[l + 1] = offsets[l] + seg_count[l];
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
  for (int64_t k : k_per_group) groups.push_back({k, 0u, 0});
  int64_t total = 0;
  for (int64_t n : segs.numels) total += n;
  num_threads = threads_for(total, kMinEntriesPerThread, num_threads);

  radix_pass(sel, chunks, groups, 0, num_threads);
  // Candidates: the entries above the threshold's top digit (k - needed) and those in its bucket.
  int64_t candidates = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi)
    if (groups[gi].needed > 0) candidates += k_per_group[gi] - groups[gi].needed + groups[gi].bucket;
  if (candidates <= total / kMaxCandidateShare) {
    select_from_candidates(sel, chunks, groups, segs.size(), indices, offsets, num_threads);
    return;
  }

  for (int pass = 1; pass < kPasses; ++pass) radix_pass(sel, chunks, groups, pass, num_threads);
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
