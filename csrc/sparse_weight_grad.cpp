// sparse_weight_grad: the selected entries of dW = dY^T X, without the dense product.
//
// Entry j of segment l is (o, i) = (idx / in, idx % in) and its value is sum_t dY[t, o] X[t, i].
// The rows of X and dY are contiguous, its columns are not, so T is walked in chunks: a chunk's
// needed columns of X (the distinct i) and of dY (the distinct o) are packed, as fp32, into a
// small column-major buffer that stays in L2, and every dot product then reads two contiguous,
// vectorisable runs. Packing moves T * (distinct i + distinct o) floats, never more than the
// dense T * (in + out) a full transpose would and never more than the 2 k T a gather per
// product would; with indices sorted, each distinct row o is packed once and reused by all of
// its entries.
//
// Deterministic for any thread count: T is cut into spans whose number and length depend only
// on the shapes (not on the threads); a span's sums go to its own partial slot, and the partials
// of a segment are added in span order at the end.
#include <omp.h>

#include <algorithm>

#include "kernels.h"

namespace gem {

namespace {

// Each entry accumulates into kLanes partial sums (one AVX-512 vector), t into lane t % kLanes;
// the lanes are added pairwise at the end of a span. No -ffast-math, so the compiler may not
// reassociate a single sum: separate lanes are what lets it vectorise.
constexpr int kLanes = 16;
// Chunks are whole multiples of two lane vectors: the dot loop alternates two accumulator
// vectors, so consecutive adds do not wait on each other's latency.
constexpr int64_t kChunkQuantum = 2 * kLanes;
constexpr int64_t kMaxChunk = 256;
// The packed columns of a chunk (fp32) aim at this size, a share of a core's L2 that leaves room
// for the chunk's rows of X and dY being read.
constexpr int64_t kPackBytes = 256 << 10;
// A span is at least this many rows of T (below that, a work item is too small to share out)
// and a segment has at most kMaxSpans of them, which bounds the partial sums to kMaxSpans floats
// per entry. More spans only add parallelism for single huge segments.
constexpr int64_t kMinSpan = 256;
constexpr int64_t kMaxSpans = 16;
// Work (float moves + multiply-adds) below which a second thread costs more than it saves: ~1 ns
// a unit on one core, so 256K units is ~0.2 ms, far above the microseconds of waking a thread.
constexpr int64_t kMinWorkPerThread = 1 << 18;

// What one segment needs, from its sorted indices: the distinct rows and columns and where each
// entry's column sits in the packed buffer.
struct Plan {
  int64_t x_dtype, dy_dtype, tokens, in, out;
  const void* x;
  const void* dy;
  int64_t first, count;               // its entries: [first, first + count) of indices / result
  std::vector<int64_t> cols;          // distinct columns i, ascending: packed X slot s holds cols[s]
  std::vector<int64_t> rows;          // distinct rows o, ascending: packed dY slot r holds rows[r]
  std::vector<int64_t> row_end;       // entries of rows[r] end at row_end[r] (relative to first)
  std::vector<int32_t> col_slot;      // packed X slot of each entry's column
  int64_t chunk = kChunkQuantum;      // rows of T packed at once
  int64_t span = 0, num_spans = 0;    // rows of T per work item, and how many items
  int64_t partial_base = 0;           // first of its num_spans * count partial sums
};

void plan_segment(Plan& p, const int64_t* indices) {
  const int64_t* idx = indices + p.first;
  std::vector<int32_t> slot_of_col(p.in, -1);
  for (int64_t j = 0; j < p.count; ++j) slot_of_col[idx[j] % p.in] = 0;
  for (int64_t c = 0; c < p.in; ++c)
    if (slot_of_col[c] == 0) {
      slot_of_col[c] = int32_t(p.cols.size());
      p.cols.push_back(c);
    }
  p.col_slot.resize(p.count);
  for (int64_t j = 0; j < p.count; ++j) {
    const int64_t o = idx[j] / p.in;
    if (p.rows.empty() || p.rows.back() != o) {  // sorted: a row's entries are consecutive
      if (!p.rows.empty()) p.row_end.push_back(j);
      p.rows.push_back(o);
    }
    p.col_slot[j] = slot_of_col[idx[j] % p.in];
  }
  if (!p.rows.empty()) p.row_end.push_back(p.count);

  const int64_t packed_cols = int64_t(p.cols.size() + p.rows.size());
  const int64_t fit = kPackBytes / (int64_t(sizeof(float)) * std::max<int64_t>(1, packed_cols));
  const int64_t tokens_rounded = (p.tokens + kChunkQuantum - 1) / kChunkQuantum * kChunkQuantum;
  p.chunk = std::clamp(fit / kChunkQuantum * kChunkQuantum, kChunkQuantum, kMaxChunk);
  p.chunk = std::min(p.chunk, std::max(kChunkQuantum, tokens_rounded));
  if (p.count == 0 || p.tokens == 0) return;  // nothing to sum: the entries are zeros
  const int64_t spans = std::clamp((p.tokens + kMinSpan - 1) / kMinSpan, int64_t(1), kMaxSpans);
  const int64_t per_span = (p.tokens + spans - 1) / spans;
  p.span = (per_span + p.chunk - 1) / p.chunk * p.chunk;  // whole chunks, so only the last is short
  p.num_spans = (p.tokens + p.span - 1) / p.span;
}

// dst[s * chunk + t] = src[t * ld + cols[s]] as fp32 for t < n, 0 for n <= t < chunk (zero
// products add nothing, so the dot loops always run whole chunks). T is walked in tiles of
// kLanes rows: a slot's kLanes loads touch kLanes cache lines that the next slots (neighbouring
// columns) reuse, and its stores fill one line.
// This packing is most of the op's time: ~0.5 ns a float on one core of the development machine's
// AMD EPYC, against ~0.03 ns a multiply-add in dot_chunk. Tried and measured no faster there:
// reading each row left to right with the stores strided by the chunk (3x slower: the strided
// stores thrash a few L1 sets), AVX-512 gathers (1.5x slower), transposing 8 x 8 tiles in
// registers, software prefetch of the next tile's rows (both within the noise).
template <typename T>
inline __attribute__((always_inline)) void pack_columns(const T* src, int64_t ld, int64_t n, const int64_t* cols,
                                                        int64_t num_cols, int64_t chunk, float* dst) {
  for (int64_t t0 = 0; t0 < chunk; t0 += kLanes) {
    const int64_t live = std::clamp<int64_t>(n - t0, 0, kLanes);
    for (int64_t s = 0; s < num_cols; ++s) {
      const T* col = src + t0 * ld + cols[s];
      float* out = dst + s * chunk + t0;
      if (live == kLanes) {  // a fixed trip count: unrolled, no per-element branch (25 % faster)
        for (int64_t q = 0; q < kLanes; ++q) out[q] = to_float(col[q * ld]);
      } else {
        for (int64_t q = 0; q < live; ++q) out[q] = to_float(col[q * ld]);
        for (int64_t q = live; q < kLanes; ++q) out[q] = 0.0f;
      }
    }
  }
}

// The fp32 case, also compiled for AVX2 and AVX-512 (picked at load time): only moves, so every
// version gives the same bits; measured a little faster than the baseline build alone.
GEM_VECTOR_CLONES void pack_columns_f32(const float* src, int64_t ld, int64_t n, const int64_t* cols,
                                        int64_t num_cols, int64_t chunk, float* dst) {
  pack_columns(src, ld, n, cols, num_cols, chunk, dst);
}

void pack(int dtype, const void* src, int64_t ld, int64_t n, const std::vector<int64_t>& cols, int64_t chunk,
          float* dst) {
  const int64_t num_cols = int64_t(cols.size());
  switch (dtype) {
    case kFloat32:
      return pack_columns_f32(static_cast<const float*>(src), ld, n, cols.data(), num_cols, chunk, dst);
    case kBFloat16:
      return pack_columns(static_cast<const BFloat16*>(src), ld, n, cols.data(), num_cols, chunk, dst);
    default:
      return pack_columns(static_cast<const Half*>(src), ld, n, cols.data(), num_cols, chunk, dst);
  }
}

// For every distinct row r and each of its entries j: lanes[j] += packed_dy[r] * packed_x[slot j],
// elementwise over one chunk, as two interleaved lane vectors that are added at the end (the
// same IEEE operations in every compiled version, so the same bits).
GEM_VECTOR_CLONES void dot_chunk(const float* packed_dy, const float* packed_x, const int64_t* row_end,
                                 int64_t num_rows, const int32_t* col_slot, int64_t chunk, float* lanes) {
  int64_t j = 0;
  for (int64_t r = 0; r < num_rows; ++r) {
    const float* y = packed_dy + r * chunk;
    for (; j < row_end[r]; ++j) {
      const float* x = packed_x + int64_t(col_slot[j]) * chunk;
      float a[kLanes], b[kLanes];
      for (int q = 0; q < kLanes; ++q) {
        a[q] = lanes[j * kLanes + q];
        b[q] = 0.0f;
      }
      for (int64_t t = 0; t < chunk; t += 2 * kLanes)
        for (int q = 0; q < kLanes; ++q) {
          a[q] += y[t + q] * x[t + q];
          b[q] += y[t + kLanes + q] * x[t + kLanes + q];
        }
      for (int q = 0; q < kLanes; ++q) lanes[j * kLanes + q] = a[q] + b[q];
    }
  }
}

// The kLanes partial sums of each entry, added pairwise in a fixed order.
void reduce_lanes(const float* lanes, int64_t count, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    float v[kLanes];
    std::copy(lanes + j * kLanes, lanes + (j + 1) * kLanes, v);
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int q = 0; q < width; ++q) v[q] = v[q] + v[q + width];
    out[j] = v[0];
  }
}

// One work item: the span'th run of T of a segment, summed into out (count floats).
void run_span(const Plan& p, int64_t span, std::vector<float>& packed, std::vector<float>& lanes, float* out) {
  const int64_t t_begin = span * p.span, t_end = std::min(p.tokens, t_begin + p.span);
  const int64_t num_cols = int64_t(p.cols.size()), num_rows = int64_t(p.rows.size());
  packed.resize(size_t((num_cols + num_rows) * p.chunk));
  lanes.assign(size_t(p.count * kLanes), 0.0f);
  float* packed_x = packed.data();
  float* packed_dy = packed.data() + num_cols * p.chunk;
  const size_t x_size = p.x_dtype == kFloat32 ? 4 : 2, dy_size = p.dy_dtype == kFloat32 ? 4 : 2;
  for (int64_t t = t_begin; t < t_end; t += p.chunk) {
    const int64_t n = std::min(p.chunk, t_end - t);
    const char* x_rows = static_cast<const char*>(p.x) + t * p.in * x_size;
    const char* dy_rows = static_cast<const char*>(p.dy) + t * p.out * dy_size;
    pack(int(p.x_dtype), x_rows, p.in, n, p.cols, p.chunk, packed_x);
    pack(int(p.dy_dtype), dy_rows, p.out, n, p.rows, p.chunk, packed_dy);
    dot_chunk(packed_dy, packed_x, p.row_end.data(), num_rows, p.col_slot.data(), p.chunk, lanes.data());
  }
  reduce_lanes(lanes.data(), p.count, out);
}

}  // namespace

void sparse_weight_grad(const WeightGradArgs& a, int num_threads) {
  const int64_t num_segments = int64_t(a.inputs.size());
  check_float_dtypes(a.input_dtypes, "input");
  check_float_dtypes(a.grad_output_dtypes, "grad_output");
  if (int64_t(a.grad_outputs.size()) != num_segments || int64_t(a.input_dtypes.size()) != num_segments ||
      int64_t(a.grad_output_dtypes.size()) != num_segments || int64_t(a.tokens.size()) != num_segments ||
      int64_t(a.in_features.size()) != num_segments || int64_t(a.out_features.size()) != num_segments)
    throw std::invalid_argument("inputs, grad_outputs, their dtypes and sizes must have the same length");

  std::vector<Plan> plans(num_segments);
  for (int64_t l = 0; l < num_segments; ++l) {
    Plan& p = plans[l];
    p.x = a.inputs[l];
    p.dy = a.grad_outputs[l];
    p.x_dtype = a.input_dtypes[l];
    p.dy_dtype = a.grad_output_dtypes[l];
    p.tokens = a.tokens[l];
    p.in = a.in_features[l];
    p.out = a.out_features[l];
    p.first = a.offsets[l];
    p.count = a.offsets[l + 1] - a.offsets[l];
  }
  const int64_t total = a.offsets[num_segments];
  const int planning_threads = threads_for(total, 1 << 14, num_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(planning_threads)
  for (int64_t l = 0; l < num_segments; ++l) plan_segment(plans[l], a.indices);

  // Work items (segment, span); a segment with several spans sums into its partials first.
  std::vector<std::pair<int64_t, int64_t>> items;
  int64_t partial_size = 0, work = 0;
  for (int64_t l = 0; l < num_segments; ++l) {
    Plan& p = plans[l];
    if (p.num_spans == 0) std::fill(a.out + p.first, a.out + p.first + p.count, 0.0f);  // T = 0: zeros
    if (p.num_spans > 1) {
      p.partial_base = partial_size;
      partial_size += p.num_spans * p.count;
    }
    for (int64_t s = 0; s < p.num_spans; ++s) items.emplace_back(l, s);
    work += p.num_spans * p.span * int64_t(p.cols.size() + p.rows.size() + p.count);
  }
  std::vector<float> partials(static_cast<size_t>(partial_size));

#pragma omp parallel num_threads(threads_for(work, kMinWorkPerThread, num_threads))
  {
    std::vector<float> packed, lanes;  // per thread, reused across its items
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < int64_t(items.size()); ++it) {
      const Plan& p = plans[items[it].first];
      const int64_t span = items[it].second;
      float* out = p.num_spans > 1 ? partials.data() + p.partial_base + span * p.count : a.out + p.first;
      run_span(p, span, packed, lanes, out);
    }
  }

  // Partials of multi-span segments, added in span order (the order never depends on threads).
  for (const Plan& p : plans) {
    if (p.num_spans < 2) continue;
    float* out = a.out + p.first;
    const float* part = partials.data() + p.partial_base;
    std::copy(part, part + p.count, out);
    for (int64_t s = 1; s < p.num_spans; ++s)
      for (int64_t j = 0; j < p.count; ++j) out[j] += part[s * p.count + j];
  }
}

}  // namespace gem
