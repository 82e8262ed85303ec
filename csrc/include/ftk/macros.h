// Host/device annotations so one definition of each math rule serves the CPU and CUDA kernels.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FTK_HD __host__ __device__ __forceinline__
#define FTK_DEVICE_CODE 1
#else
#define FTK_HD inline
#endif

#include <cmath>
#include <cstdint>
