// Bindings of the packing kernels: fastserve._core._kernels (private; the
// public API is python/fastserve/kernels.py, which takes torch tensors,
// allocates outputs and passes raw pointers here). Every kernel releases the
// GIL: the CPU kernels touch megabytes (the CUDA ones only launch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "fastserve/errors.h"
#include "fastserve/kernels.h"

namespace py = pybind11;

namespace fastserve {
namespace {

const char* isa_name(kernels::cpu::Isa isa) {
  switch (isa) {
    case kernels::cpu::Isa::kAvx512Bf16: return "avx512_bf16";
    case kernels::cpu::Isa::kAvx512: return "avx512";
    case kernels::cpu::Isa::kAvx2: return "avx2";
    default: return "portable";
  }
}

kernels::cpu::Isa isa_named(const std::string& name) {
  using kernels::cpu::Isa;
  for (auto isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16})
    if (name == isa_name(isa)) return isa;
  throw InvalidArgument("isa must be 'avx512_bf16', 'avx512', 'avx2' or 'portable', got '" + name + "'");
}

}  // namespace

void register_kernels(py::module_& m) {
  using namespace kernels;
  py::module_ k = m.def_submodule("_kernels", "Packing kernels on raw tensors (see fastserve.kernels).");

  py::class_<TensorArg>(k, "TensorArg", "A tensor as pointer + shape + strides + dtype + device; memory not owned.")
      .def(py::init([](uintptr_t data, std::vector<int64_t> shape, std::vector<int64_t> strides,
                       const std::string& dtype, const std::string& device, int device_index) {
             TensorArg t;
             t.data = reinterpret_cast<void*>(data);
             t.shape = std::move(shape);
             t.strides = std::move(strides);
             t.dtype = dtype_from_string(dtype);
             t.dtype_name = dtype;
             if (device == "cpu") t.device = DeviceType::kCPU;
             else if (device == "cuda") t.device = DeviceType::kCUDA;
             else throw InvalidArgument("device must be 'cpu' or 'cuda', got '" + device + "'");
             t.device_index = device_index;
             return t;
           }),
           py::arg("data"), py::arg("shape"), py::arg("strides"), py::arg("dtype"), py::arg("device"),
           py::arg("device_index") = 0)
      .def_readonly("shape", &TensorArg::shape)
      .def_readonly("strides", &TensorArg::strides)
      .def_readonly("dtype", &TensorArg::dtype_name)
      .def_readonly("device_index", &TensorArg::device_index);

  k.def("pack", &pack, py::arg("x"), py::arg("seqlens"), py::arg("out"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>());
  k.def("unpack", &unpack, py::arg("x"), py::arg("cu_seqlens"), py::arg("out"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>());
  k.def(
      "segment_pool",
      [](const TensorArg& x, const TensorArg& cu, const TensorArg& out, const std::string& mode, bool normalize,
         uintptr_t stream, std::optional<TensorArg> scratch) {
        const PoolMode m = pool_mode_from_string(mode);
        py::gil_scoped_release r;
        segment_pool(x, cu, out, m, normalize, stream, scratch ? &*scratch : nullptr);
      },
      py::arg("x"), py::arg("cu_seqlens"), py::arg("out"), py::arg("mode"), py::arg("normalize"),
      py::arg("stream") = 0, py::arg("scratch") = py::none());
  k.def(
      "segment_pool_scratch",
      [](const TensorArg& x, const TensorArg& cu, const std::string& mode) {
        return segment_pool_scratch(x, cu, pool_mode_from_string(mode));
      },
      py::arg("x"), py::arg("cu_seqlens"), py::arg("mode"),
      "float32 elements of scratch segment_pool needs (0: none; CUDA tensors only).");
  k.def("gather", &gather, py::arg("x"), py::arg("index"), py::arg("out"), py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>());
  k.def(
      "attention",
      [](const TensorArg& qkv, const TensorArg& cu, const TensorArg& out, std::optional<TensorArg> bias, double scale,
         int threads, bool portable) {
        py::gil_scoped_release r;
        attention(qkv, cu, out, bias ? &*bias : nullptr, scale, threads, portable);
      },
      py::arg("qkv"), py::arg("cu_seqlens"), py::arg("out"), py::arg("bias"), py::arg("scale"), py::arg("threads"),
      py::arg("portable") = false);
  k.def("bias_gelu", &bias_gelu, py::arg("x"), py::arg("bias"), py::arg("threads"), py::arg("portable") = false,
        py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>());
  k.def("add_layer_norm", &add_layer_norm, py::arg("x"), py::arg("bias"), py::arg("residual"), py::arg("weight"),
        py::arg("beta"), py::arg("eps"), py::arg("threads"), py::arg("portable") = false, py::arg("stream") = 0,
        py::call_guard<py::gil_scoped_release>());
  k.def("cpu_vector_paths", &cpu::vector_paths,
        "Whether the CPU kernels' AVX2 + FMA paths run on this CPU (else their portable loops).");
  k.def(
      "cpu_isa", [] { return isa_name(cpu::best_isa()); },
      "The widest path the CPU layer kernels run on this CPU now: avx512_bf16, avx512, avx2 or portable.");
  k.def(
      "set_cpu_isa_cap", [](const std::string& name) { return isa_name(cpu::set_isa_cap(isa_named(name))); },
      py::arg("isa"), "Cap every CPU layer kernel call at this path, process-wide; returns the previous cap.");
  k.def("cpu_threads_for", &cpu::threads_for, py::arg("bytes"),
        "Threads the CPU kernels use for this many bytes of traffic.");
}

}  // namespace fastserve
