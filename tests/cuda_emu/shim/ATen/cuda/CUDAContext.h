// Stand-in for torch's ATen/cuda/CUDAContext.h when csrc/lora_ops.cpp is compiled for the CPU
// (tests/cuda_emu/ops_emu.cpp): the device's properties are the emulated GPU's, the stream a null handle.
#pragma once
#include <cuda_runtime.h>  // the types only (cudaDeviceProp, cudaStream_t); nothing links against cudart

namespace at::cuda {
cudaDeviceProp* getCurrentDeviceProperties();
inline cudaStream_t getCurrentCUDAStream(int = -1) { return nullptr; }
}  // namespace at::cuda
