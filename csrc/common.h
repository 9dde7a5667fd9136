// Shared helpers of the CPU kernels: dtype codes, exact fp16/bf16 conversions, the ratio score.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

// Compile a hot loop for AVX-512, AVX2 and baseline x86-64, the best one picked when the module
// loads (GCC/Clang function multi-versioning; the package is built without -march flags).
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define GEM_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GEM_VECTOR_CLONES
#endif

namespace gem {

// Dtype codes shared with gem_kernels/cpu.py (DTYPE_CODES there).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt32 = 3, kInt64 = 4 };

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct BFloat16 { uint16_t bits; };
struct Half { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(BFloat16 x) { return bits_float(uint32_t(x.bits) << 16); }

inline float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24 is exact in fp32.
    return bits_float(sign | float_bits(float(mantissa) * 0x1p-24f));
  }
  if (exponent == 31) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }

// Round to nearest even, NaN kept quiet: the same bits as torch's conversions.
template <> inline BFloat16 from_float<BFloat16>(float f) {
  const uint32_t u = float_bits(f);
  if (std::isnan(f)) return BFloat16{uint16_t(0x7fc0u)};
  return BFloat16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

template <> inline Half from_float<Half>(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return Half{uint16_t(sign | 0x7e00u)};  // NaN
  if (magnitude >= 0x477ff000u) return Half{uint16_t(sign | 0x7c00u)};  // rounds to inf (>= 65520)
  if (magnitude < 0x38800000u) {
    // Below the smallest normal half (2^-14): adding 0.5 puts the fp32 ulp at 2^-24, the half
    // subnormal step, so the FPU's own rounding gives the nearest-even subnormal (or 0x400).
    const float shifted = bits_float(magnitude) + 0.5f;
    return Half{uint16_t(sign | (float_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (magnitude >> 13) & 1u;
  const uint32_t rebiased = magnitude + (uint32_t(15 - 127) << 23) + 0xfffu + odd;
  return Half{uint16_t(sign | (rebiased >> 13))};
}

// The denominator (|w| + eps) ** exponent as reference.ratio_score computes it: the power in
// fp64, rounded to fp32. torch's pow takes shortcuts for a few exponents; mirroring them keeps
// scores bit-identical to the reference there too.
struct ScoreParams {
  float eps;         // already rounded to fp32, as the reference adds torch.tensor(eps, float32)
  double exponent;
  bool plain;        // exponent == 1: no power at all

  ScoreParams(double eps_, double exponent_)
      : eps(float(eps_)), exponent(exponent_), plain(exponent_ == 1.0) {}

  float denominator(float abs_w) const {
    const float d = abs_w + eps;
    if (plain) return d;
    const double x = d;
    double r;
    if (exponent == 0.5) r = std::sqrt(x);
    else if (exponent == -0.5) r = 1.0 / std::sqrt(x);
    else if (exponent == -1.0) r = 1.0 / x;
    else if (exponent == 2.0) r = x * x;
    else if (exponent == 3.0) r = x * x * x;
    else if (exponent == -2.0) r = 1.0 / (x * x);
    else r = std::pow(x, exponent);
    return float(r);
  }
};

// Scores of entries [start, start + n) into out. kPlain (exponent 1) is a loop of IEEE fp32 adds
// and divides that the compiler vectorises; the same operations as ratio_score, so the same bits.
template <bool kPlain, typename G, typename W>
inline void ratio_scores(const G* g, const W* w, int64_t start, int64_t n, const ScoreParams& sp, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float abs_w = std::fabs(to_float(w[start + i]));
    const float d = kPlain ? abs_w + sp.eps : sp.denominator(abs_w);
    out[i] = std::fabs(to_float(g[start + i])) / d;
  }
}

// How many threads a parallel region over `work` items gets: one unless every thread has at
// least min_per_thread items. Waking a second thread costs microseconds on an idle machine and
// milliseconds on a busy one (the region waits for a core), so small calls stay on one thread.
inline int threads_for(int64_t work, int64_t min_per_thread, int num_threads) {
  const int64_t useful = work / min_per_thread;
  return int(std::max<int64_t>(1, std::min<int64_t>(num_threads, useful)));
}

template <typename G, typename W>
inline float ratio_score(const G* g, const W* w, int64_t i, const ScoreParams& sp) {
  return std::fabs(to_float(g[i])) / sp.denominator(std::fabs(to_float(w[i])));
}

// Calls fn(G*, W*) with the pointers cast to their element types.
template <typename Fn>
inline void dispatch_float_pair(int g_dtype, const void* g, int w_dtype, const void* w, Fn&& fn) {
  auto with_w = [&](auto* gp) {
    switch (w_dtype) {
      case kFloat32: return fn(gp, static_cast<const float*>(w));
      case kBFloat16: return fn(gp, static_cast<const BFloat16*>(w));
      case kFloat16: return fn(gp, static_cast<const Half*>(w));
    }
    throw std::invalid_argument("unsupported weight dtype code " + std::to_string(w_dtype));
  };
  switch (g_dtype) {
    case kFloat32: return with_w(static_cast<const float*>(g));
    case kBFloat16: return with_w(static_cast<const BFloat16*>(g));
    case kFloat16: return with_w(static_cast<const Half*>(g));
  }
  throw std::invalid_argument("unsupported gradient dtype code " + std::to_string(g_dtype));
}

// One list of segments as the Python side describes it: raw pointers, dtype codes, sizes.
struct SegmentList {
  std::vector<const void*> grads;
  std::vector<const void*> weights;
  std::vector<int> grad_dtypes;
  std::vector<int> weight_dtypes;
  std::vector<int64_t> numels;

  size_t size() const { return numels.size(); }
};

}  // namespace gem
