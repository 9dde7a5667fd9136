// pybind11 bindings: gem_kernels._C. Tensors arrive as raw data pointers (ints), sizes and dtype
// codes, so the module never links against torch. gem_kernels/cpu.py validates nothing: the
// public entry points in gem_kernels/ops.py have checked every argument before it gets here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "../csrc/kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
std::vector<T> as_pointers(const std::vector<uintptr_t>& addresses) {
  std::vector<T> out;
  out.reserve(addresses.size());
  for (uintptr_t a : addresses) out.push_back(reinterpret_cast<T>(a));
  return out;
}

gem::SegmentList segment_list(const std::vector<uintptr_t>& grads, const std::vector<int>& grad_dtypes,
                              const std::vector<uintptr_t>& weights, const std::vector<int>& weight_dtypes,
                              const std::vector<int64_t>& numels) {
  const size_t n = numels.size();
  if (grads.size() != n || grad_dtypes.size() != n || weights.size() != n || weight_dtypes.size() != n)
    throw std::invalid_argument("grads, weights, their dtypes and numels must have the same length");
  return {as_pointers<const void*>(grads), as_pointers<const void*>(weights), grad_dtypes, weight_dtypes, numels};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gem_kernels' compiled CPU kernels (C++/OpenMP); call them through gem_kernels.ops";

  m.def("layer_stats",
        [](const std::vector<uintptr_t>& grads, const std::vector<int>& grad_dtypes,
           const std::vector<uintptr_t>& weights, const std::vector<int>& weight_dtypes,
           const std::vector<int64_t>& numels, double eps, double exponent, uintptr_t out, int num_threads) {
          const gem::SegmentList segs = segment_list(grads, grad_dtypes, weights, weight_dtypes, numels);
          py::gil_scoped_release release;
          gem::layer_stats(segs, eps, exponent, reinterpret_cast<double*>(out), num_threads);
        },
        py::arg("grads"), py::arg("grad_dtypes"), py::arg("weights"), py::arg("weight_dtypes"),
        py::arg("numels"), py::arg("eps"), py::arg("exponent"), py::arg("out"), py::arg("num_threads"),
        "Writes float64 [L, 4] = (sum s, sum s^2, sum s ln s, max s) per segment to out.");

  m.def("ratio_topk",
        [](const std::vector<uintptr_t>& grads, const std::vector<int>& grad_dtypes,
           const std::vector<uintptr_t>& weights, const std::vector<int>& weight_dtypes,
           const std::vector<int64_t>& numels, const std::vector<int64_t>& k, bool per_segment, double eps,
           double exponent, uintptr_t exclude_indices, uintptr_t exclude_offsets, uintptr_t indices,
           uintptr_t offsets, int num_threads) {
          const gem::SegmentList segs = segment_list(grads, grad_dtypes, weights, weight_dtypes, numels);
          py::gil_scoped_release release;
          gem::ratio_topk(segs, k, per_segment, eps, exponent, reinterpret_cast<const int64_t*>(exclude_indices),
                          reinterpret_cast<const int64_t*>(exclude_offsets), reinterpret_cast<int64_t*>(indices),
                          reinterpret_cast<int64_t*>(offsets), num_threads);
        },
        py::arg("grads"), py::arg("grad_dtypes"), py::arg("weights"), py::arg("weight_dtypes"),
        py::arg("numels"), py::arg("k"), py::arg("per_segment"), py::arg("eps"), py::arg("exponent"),
        py::arg("exclude_indices"), py::arg("exclude_offsets"), py::arg("indices"), py::arg("offsets"),
        py::arg("num_threads"),
        "Top-k by ratio score; k holds one count per segment (per_segment) or one in all. "
        "exclude_indices/exclude_offsets are 0 when nothing is excluded. Writes indices and offsets.");

  m.def("sparse_adamw",
        [](const std::vector<uintptr_t>& params, const std::vector<int>& param_dtypes,
           const std::vector<uintptr_t>& dense_grads, const std::vector<int>& dense_grad_dtypes,
           uintptr_t compact_grads, int compact_grad_dtype, uintptr_t indices, uintptr_t offsets,
           const std::vector<uintptr_t>& state, double lr, double beta1, double beta2, double eps,
           double weight_decay, const std::vector<int64_t>& steps, uintptr_t age, int age_dtype,
           bool maximize, int num_threads) {
          if (param_dtypes.size() != params.size())
            throw std::invalid_argument("params and param_dtypes must have the same length");
          gem::AdamWArgs a;
          a.params = as_pointers<void*>(params);
          a.param_dtypes = param_dtypes;
          a.dense_grads = as_pointers<const void*>(dense_grads);
          a.dense_grad_dtypes = dense_grad_dtypes;
          a.compact_grads = reinterpret_cast<const void*>(compact_grads);
          a.compact_grad_dtype = compact_grad_dtype;
          a.indices = reinterpret_cast<const int64_t*>(indices);
          a.offsets = reinterpret_cast<const int64_t*>(offsets);
          a.state = as_pointers<float*>(state);
          a.lr = lr;
          a.beta1 = beta1;
          a.beta2 = beta2;
          a.eps = eps;
          a.weight_decay = weight_decay;
          a.steps = steps;
          a.age = reinterpret_cast<const void*>(age);
          a.age_dtype = age_dtype;
          a.maximize = maximize;
          py::gil_scoped_release release;
          gem::sparse_adamw(a, num_threads);
        },
        py::arg("params"), py::arg("param_dtypes"), py::arg("dense_grads"), py::arg("dense_grad_dtypes"),
        py::arg("compact_grads"), py::arg("compact_grad_dtype"), py::arg("indices"), py::arg("offsets"),
        py::arg("state"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("steps"), py::arg("age"), py::arg("age_dtype"),
        py::arg("maximize"), py::arg("num_threads"),
        "AdamW on the selected entries. Dense grads (one pointer per param) or compact grads "
        "(compact_grads != 0); steps per param, or age (one per entry, age != 0); state: the "
        "per-entry fp32 buffers (gem_kernels.reference.ADAMW_STATE).");

  m.def("sparse_weight_grad",
        [](const std::vector<uintptr_t>& inputs, const std::vector<int>& input_dtypes,
           const std::vector<uintptr_t>& grad_outputs, const std::vector<int>& grad_output_dtypes,
           const std::vector<int64_t>& tokens, const std::vector<int64_t>& in_features,
           const std::vector<int64_t>& out_features, uintptr_t indices, uintptr_t offsets, uintptr_t out,
           int num_threads) {
          gem::WeightGradArgs a;
          a.inputs = as_pointers<const void*>(inputs);
          a.grad_outputs = as_pointers<const void*>(grad_outputs);
          a.input_dtypes = input_dtypes;
          a.grad_output_dtypes = grad_output_dtypes;
          a.tokens = tokens;
          a.in_features = in_features;
          a.out_features = out_features;
          a.indices = reinterpret_cast<const int64_t*>(indices);
          a.offsets = reinterpret_cast<const int64_t*>(offsets);
          a.out = reinterpret_cast<float*>(out);
          py::gil_scoped_release release;
          gem::sparse_weight_grad(a, num_threads);
        },
        py::arg("inputs"), py::arg("input_dtypes"), py::arg("grad_outputs"), py::arg("grad_output_dtypes"),
        py::arg("tokens"), py::arg("in_features"), py::arg("out_features"), py::arg("indices"),
        py::arg("offsets"), py::arg("out"), py::arg("num_threads"),
        "Selected entries of dW = dY^T X per segment (X [T, in], dY [T, out], flat index o * in + i); "
        "writes one fp32 value per index to out.");

  // The codes cpu.py passes for each dtype, defined once in csrc/common.h.
  py::dict dtype_codes;
  dtype_codes["float32"] = int(gem::kFloat32);
  dtype_codes["bfloat16"] = int(gem::kBFloat16);
  dtype_codes["float16"] = int(gem::kFloat16);
  dtype_codes["int32"] = int(gem::kInt32);
  dtype_codes["int64"] = int(gem::kInt64);
  m.attr("dtype_codes") = dtype_codes;
}
