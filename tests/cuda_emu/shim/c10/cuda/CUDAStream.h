// Stand-in for torch's c10/cuda/CUDAStream.h in the CPU build of csrc/lora_ops.cpp (gemm.h needs the type).
#pragma once
#include <cuda_runtime.h>
