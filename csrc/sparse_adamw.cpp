// sparse_adamw: torch AdamW's single-tensor update (AMSGrad too) on the selected entries only, in fp32.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"

namespace gem {

namespace {

// Scalars shared by every entry, rounded to fp32 where torch rounds its Python scalars.
struct Constants {
  float decay;           // 1 - lr * wd, computed in double
  float lerp_weight;     // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  double lr, beta1_d, beta2_d;
  bool maximize;
};

// -lr / (1 - beta1^n) and sqrt(1 - beta2^n), in double as the host computes them, then fp32.
struct BiasCorrection {
  float neg_step_size;
  float bc2_sqrt;
};

inline BiasCorrection bias_correction(const Constants& c, double step) {
  const double step_size = c.lr / (1.0 - std::pow(c.beta1_d, step));
  return {-float(step_size), float(std::sqrt(1.0 - std::pow(c.beta2_d, step)))};
}

// torch's vectorised lerp: a fused multiply-add from whichever end is nearer the weight.
// (The fused steps here, lerp and addcmul, round as torch's x86 CPU kernels do: exp_avg and
// exp_avg_sq come out bit-identical to reference.sparse_adamw_. fp32 params can still differ by
// one ulp, because torch's vectorised fp32 sqrt is not correctly rounded and std::sqrt is.)
inline float lerp(float start, float end, float weight) {
  return std::fabs(weight) < 0.5f ? std::fma(weight, end - start, start)
                                  : std::fma(weight - 1.0f, end - start, end);
}

// AdamWArgs::state by name, in reference.ADAMW_STATE's order: the two moments, then AMSGrad's
// running maximum of exp_avg_sq, whose presence makes the step AMSGrad's (null without it).
struct State {
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
};

inline State named_state(const std::vector<float*>& state) {
  if (state.size() < 2 || state.size() > 3)
    throw std::invalid_argument("state must hold exp_avg, exp_avg_sq and optionally max_exp_avg_sq");
  return {state[0], state[1], state.size() > 2 ? state[2] : nullptr};
}

inline int64_t read_age(const void* age, int dtype, int64_t e) {
  return dtype == kInt32 ? int64_t(static_cast<const int32_t*>(age)[e]) : static_cast<const int64_t*>(age)[e];
}

// Entries are spread over whole tensors (density ~1e-3: each on its own page), so every param
// and dense-grad access misses the caches and the TLB. Prefetching them this many entries ahead
// keeps several misses in flight instead of one at a time.
constexpr int64_t kPrefetchAhead = 32;
// ~20 ns (warm) to ~45 ns (cold) per entry, bound by memory latency, so a second thread nearly
// halves the time on an idle machine (medium benchmark, 50K entries, cold: 2.17 ms on one thread,
// 1.25 ms on two). 2K entries (~50-100 us of work) per thread makes the microseconds it costs to
// wake a thread on an idle machine negligible. On a machine whose cores are busy with other jobs a
// wake-up can take milliseconds (1,000 entries: 7.8 ms with 2 threads, 40 us with 1): there, run
// with fewer threads (torch.set_num_threads), as for torch's own ops.
constexpr int64_t kMinEntriesPerThread = 1 << 11;

// Entries [lo, hi) of one segment. Dense grads are read at the entry's index, compact ones at
// the entry itself. kDense and kAge are template flags so the loop has no per-entry dispatch.
template <bool kDense, bool kAge, typename P, typename G>
void update_run(P* param, const G* grad, const AdamWArgs& a, const State& s, const Constants& c,
                BiasCorrection segment_bc, int64_t lo, int64_t hi) {
  for (int64_t e = lo; e < hi; ++e) {
    if (e + kPrefetchAhead < hi) {
      const int64_t ahead = a.indices[e + kPrefetchAhead];
      __builtin_prefetch(param + ahead, 1);
      if (kDense) __builtin_prefetch(grad + ahead, 0);
    }
    const int64_t j = a.indices[e];
    const BiasCorrection bc = kAge ? bias_correction(c, double(read_age(a.age, a.age_dtype, e))) : segment_bc;
    float g = to_float(grad[kDense ? j : e]);
    if (c.maximize) g = -g;
    float w = to_float(param[j]) * c.decay;
    const float m = lerp(s.exp_avg[e], g, c.lerp_weight);
    const float v = std::fma(c.one_minus_beta2 * g, g, s.exp_avg_sq[e] * c.beta2);  // torch's addcmul, fused
    s.exp_avg[e] = m;
    s.exp_avg_sq[e] = v;
    float v_hat = v;
    if (s.max_exp_avg_sq) {  // AMSGrad: torch.maximum(max_exp_avg_sq, exp_avg_sq), NaN-propagating
      const float old = s.max_exp_avg_sq[e];
      v_hat = (std::isnan(old) || std::isnan(v)) ? std::numeric_limits<float>::quiet_NaN() : std::max(old, v);
      s.max_exp_avg_sq[e] = v_hat;
    }
    const float denom = std::sqrt(v_hat) / bc.bc2_sqrt + c.eps;
    w = w + (bc.neg_step_size * m) / denom;  // addcdiv's order: (value * t1) / t2
    param[j] = from_float<P>(w);
  }
}

template <typename Fn>
void dispatch_param_grad(int p_dtype, void* p, int g_dtype, const void* g, Fn&& fn) {
  auto with_g = [&](auto* pp) {
    switch (g_dtype) {
      case kFloat32: return fn(pp, static_cast<const float*>(g));
      case kBFloat16: return fn(pp, static_cast<const BFloat16*>(g));
      default: return fn(pp, static_cast<const Half*>(g));
    }
  };
  switch (p_dtype) {
    case kFloat32: return with_g(static_cast<float*>(p));
    case kBFloat16: return with_g(static_cast<BFloat16*>(p));
    default: return with_g(static_cast<Half*>(p));
  }
}

}  // namespace

void sparse_adamw(const AdamWArgs& a, int num_threads) {
  const int64_t n_segments = int64_t(a.params.size());
  const bool dense = a.compact_grads == nullptr;
  const State s = named_state(a.state);
  check_float_dtypes(a.param_dtypes, "param");
  if (dense) {
    check_float_dtypes(a.dense_grad_dtypes, "gradient");
    if (int64_t(a.dense_grads.size()) != n_segments || int64_t(a.dense_grad_dtypes.size()) != n_segments)
      throw std::invalid_argument("dense grads need one tensor per param");
  } else {
    check_float_dtypes({a.compact_grad_dtype}, "compact gradient");
  }
  if (a.age == nullptr && int64_t(a.steps.size()) != n_segments)
    throw std::invalid_argument("step needs one value per param when age is not given");
  if (a.age != nullptr && a.age_dtype != kInt32 && a.age_dtype != kInt64)
    throw std::invalid_argument("age must be int32 or int64");

  Constants c;
  c.decay = float(1.0 - a.lr * a.weight_decay);
  c.lerp_weight = float(1.0 - a.beta1);
  c.beta2 = float(a.beta2);
  c.one_minus_beta2 = float(1.0 - a.beta2);
  c.eps = float(a.eps);
  c.lr = a.lr;
  c.beta1_d = a.beta1;
  c.beta2_d = a.beta2;
  c.maximize = a.maximize;
  std::vector<BiasCorrection> segment_bc(n_segments, BiasCorrection{0.f, 1.f});
  if (a.age == nullptr)
    for (int64_t l = 0; l < n_segments; ++l) segment_bc[l] = bias_correction(c, double(a.steps[l]));

  const int64_t total = a.offsets[n_segments];
#pragma omp parallel num_threads(threads_for(total, kMinEntriesPerThread, num_threads))
  {
    // An equal share of entries per thread, walked segment by segment.
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = total * t / threads, hi = total * (t + 1) / threads;
    int64_t seg = int64_t(std::upper_bound(a.offsets, a.offsets + n_segments + 1, lo) - a.offsets) - 1;
    for (int64_t pos = lo; pos < hi; ++seg) {
      const int64_t end = std::min(hi, a.offsets[seg + 1]);
      if (end == pos) continue;
      const void* grad = dense ? a.dense_grads[seg] : a.compact_grads;
      const int grad_dtype = dense ? a.dense_grad_dtypes[seg] : a.compact_grad_dtype;
      dispatch_param_grad(a.param_dtypes[seg], a.params[seg], grad_dtype, grad, [&](auto* p, auto* g) {
        const BiasCorrection bc = segment_bc[seg];
        if (dense && a.age) update_run<true, true>(p, g, a, s, c, bc, pos, end);
        else if (dense) update_run<true, false>(p, g, a, s, c, bc, pos, end);
        else if (a.age) update_run<false, true>(p, g, a, s, c, bc, pos, end);
        else update_run<false, false>(p, g, a, s, c, bc, pos, end);
      });
      pos = end;
    }
  }
}

}  // namespace gem
