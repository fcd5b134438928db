// pybind11 module lora_kernels._C: the CUDA backend's kernels, the host-side mask and the
// metadata this binary was built with (checked against the running torch by build_info.py).
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#include "gemm.h"
#include "lora_ops.h"
#include "philox.cuh"

// The archs this binary was compiled for, passed by the build as a bare token such as 80_90.
#define LK_STRINGIFY2(x) #x
#define LK_STRINGIFY(x) LK_STRINGIFY2(x)
#ifdef LORA_KERNELS_ARCHS
static const char* kArchToken = LK_STRINGIFY(LORA_KERNELS_ARCHS);
#else
static const char* kArchToken = "";
#endif

// "80_90" -> "80;90" (the LORA_KERNELS_CUDA_ARCHS spelling recorded in _build_info.py).
static std::string compiled_archs() {
  std::string s(kArchToken);
  for (char& c : s)
    if (c == '_') c = ';';
  return s;
}

namespace py = pybind11;
using lora_kernels::GemmBackend;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels CUDA backend (fused LoRA linear forward/backward, CUTLASS base GEMMs)";
  m.def("lora_fwd", &lora_kernels::lora_fwd, "Fused LoRA forward on 2-D tensors -> (y, T, bits)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("lora_bias"), py::arg("scaling"), py::arg("p"), py::arg("seed"), py::arg("save_mask"));
  m.def("lora_bwd", &lora_kernels::lora_bwd, "Fused LoRA backward -> (dx, dA, dB, dlora_bias)", py::arg("dy"),
        py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("T"), py::arg("bits"),
        py::arg("scaling"), py::arg("p"), py::arg("seed"), py::arg("need_dx"), py::arg("need_da") = true, py::arg("need_db") = true);
  m.def("host_pack_mask", &lora_kernels::host_pack_mask_tensor,
        "CPU packed keep-mask (M, ceil(K/8)) uint8 from the kernels' Philox code", py::arg("seed"),
        py::arg("M"), py::arg("K"), py::arg("p"));
  m.def("host_keep_mask", &lora_kernels::host_keep_mask_tensor,
        "CPU boolean keep-mask (M, K) from the kernels' Philox code", py::arg("seed"), py::arg("M"),
        py::arg("K"), py::arg("p"));
  m.def(
      "host_philox",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        uint32_t c[4] = {c0, c1, c2, c3};
        lora_kernels::philox4x32_10(c, k0, k1);
        return py::make_tuple(c[0], c[1], c[2], c[3]);
      },
      "Philox4x32-10 of one counter (c0..c3) and key (k0, k1), on the CPU, from philox.cuh",
      py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"), py::arg("k0"), py::arg("k1"));
  m.def(
      "set_gemm_backend",
      [](const std::string& name) {
        GemmBackend b;
        if (name == "auto") {
          b = GemmBackend::kAuto;
        } else if (name == "cublas") {
          b = GemmBackend::kCublas;
        } else if (name == "sm80") {
          b = GemmBackend::kSm80;
        } else if (name == "sm90") {
          b = GemmBackend::kSm90;
        } else {
          throw py::value_error("gemm backend must be 'auto', 'cublas', 'sm80' or 'sm90', got '" + name + "'");
        }
        lora_kernels::set_gemm_backend(b);
      },
      "Pin the base GEMM: 'auto' (sm90 on H100, sm80 on other sm_80+, cuBLAS fallback), 'cublas', "
      "'sm80', 'sm90' (CUTLASS paths fall back to cuBLAS where they cannot run). 'auto' and 'sm90' "
      "run the forward as the fused concatenated-K GEMM on H100 (and dX at p = 0) unless LORA_KERNELS_CUDA_CONCAT_K=0",
      py::arg("name"));
  m.def("gemm_backend", [] {
    switch (lora_kernels::gemm_backend()) {
      case GemmBackend::kCublas:
        return std::string("cublas");
      case GemmBackend::kSm80:
        return std::string("sm80");
      case GemmBackend::kSm90:
        return std::string("sm90");
      default:
        return std::string("auto");
    }
  });
  m.def(
      "last_gemm_path",
      [] {
        switch (lora_kernels::last_gemm_path()) {
          case GemmBackend::kCublas:
            return std::string("cublas");
          case GemmBackend::kSm80:
            return std::string("sm80");
          case GemmBackend::kSm90:
            return std::string("sm90");
          case GemmBackend::kSm90Fused:
            return std::string("sm90-fused");
          default:
            return std::string("none");
        }
      },
      "Which implementation ran the most recent non-empty base GEMM: 'sm90-fused' (the forward's "
      "concatenated-K GEMM), 'sm90', 'sm80', 'cublas' or 'none' (the CUTLASS paths fall back to cuBLAS "
      "silently; tests check which one ran)");
  m.def("build_metadata", [] {
    py::dict d;
    d["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                         std::to_string(TORCH_VERSION_PATCH);
    // CUDART_VERSION is 1000 * major + 10 * minor.
    d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
    d["archs"] = compiled_archs();
    d["sm90_kernels"] = lora_kernels::sm90_kernels_compiled();
    return d;
  });
}
