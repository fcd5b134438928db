// The launch sequence every CUTLASS device-level GEMM here shares (2.x GemmUniversal and 3.x
// GemmUniversalAdapter expose the same calls): can_implement, a workspace from the caching
// allocator, initialize, run. Returns false, having launched nothing, when can_implement refuses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "cutlass/cutlass.h"

namespace lora_kernels {

template <class Gemm>
bool run_cutlass_gemm(const typename Gemm::Arguments& args, int device, cudaStream_t stream, const char* name) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return false;
  const size_t ws_size = Gemm::get_workspace_size(args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_size)},
                            at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  cutlass::Status st = gemm.initialize(args, ws_size ? ws.data_ptr() : nullptr, stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS ", name,
              " GEMM initialize failed: ", cutlass::cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "lora_kernels: CUTLASS ", name,
              " GEMM launch failed: ", cutlass::cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace lora_kernels
