// The CPU kernels behind gem_kernels._C. Each call does every segment at once, with OpenMP.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace gem {

// out: float64 [L, 4] = (sum s, sum s^2, sum s ln s, max s) per segment.
void layer_stats(const SegmentList& segs, double eps, double exponent, double* out, int num_threads);

// k_per_group holds one k per segment when per_segment, else one k for all segments together.
// exclude_indices/exclude_offsets may be null. Writes indices[sum k] and offsets[L + 1].
void ratio_topk(const SegmentList& segs, const std::vector<int64_t>& k_per_group, bool per_segment,
                double eps, double exponent, const int64_t* exclude_indices,
                const int64_t* exclude_offsets, int64_t* indices, int64_t* offsets, int num_threads);

struct AdamWArgs {
  std::vector<void*> params;
  std::vector<int> param_dtypes;
  std::vector<const void*> dense_grads;  // one per segment, or empty when grads are compact
  std::vector<int> dense_grad_dtypes;
  const void* compact_grads = nullptr;   // one per selected entry
  int compact_grad_dtype = kFloat32;
  const int64_t* indices = nullptr;
  const int64_t* offsets = nullptr;      // L + 1
  std::vector<float*> state;             // one fp32 value per entry each: reference.ADAMW_STATE's order
  double lr = 0, beta1 = 0, beta2 = 0, eps = 0, weight_decay = 0;
  std::vector<int64_t> steps;            // one per segment, or empty when age is given
  const void* age = nullptr;             // one step number per entry (int32 or int64)
  int age_dtype = kInt64;
  bool maximize = false;
};

void sparse_adamw(const AdamWArgs& args, int num_threads);

// Segment l: X = inputs[l] [tokens, in], dY = grad_outputs[l] [tokens, out], both row-major.
struct WeightGradArgs {
  std::vector<const void*> inputs, grad_outputs;
  std::vector<int> input_dtypes, grad_output_dtypes;
  std::vector<int64_t> tokens, in_features, out_features;
  const int64_t* indices = nullptr;  // flat o * in + i, sorted within each segment
  const int64_t* offsets = nullptr;  // L + 1
  float* out = nullptr;              // one fp32 value per index
};

// out[j] = sum_t dY[t, o] * X[t, i] for each selected (o, i), accumulated in fp32.
void sparse_weight_grad(const WeightGradArgs& args, int num_threads);

// Throws std::invalid_argument unless every code is a float dtype code (checked before any
// parallel region, where an exception could not be thrown).
void check_float_dtypes(const std::vector<int>& codes, const char* what);

}  // namespace gem
