// Built when CUDA is compiled in. Every query tolerates a machine with no
// driver or no GPU: the extension must import and run there on the CPU.
#include <cuda_runtime_api.h>

#include <string>

#include "fastserve/device.h"

namespace fastserve {

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later queries work
    return 0;
  }
  return n;
}

std::string cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) return "unknown";
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace fastserve
