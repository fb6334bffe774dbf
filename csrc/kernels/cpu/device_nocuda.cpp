// Built when CUDA is not compiled in.
#include "fastserve/device.h"

namespace fastserve {

bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_runtime_version() { return ""; }

}  // namespace fastserve
