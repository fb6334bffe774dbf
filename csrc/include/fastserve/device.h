// What the extension was built with and what it can see at run time.
#pragma once

#include <string>

namespace fastserve {

bool cuda_compiled();
// Visible CUDA devices; 0 without a driver or GPU (never throws).
int cuda_device_count();
// "" when CUDA was not compiled in, else the runtime's version, e.g. "13.0".
std::string cuda_runtime_version();

}  // namespace fastserve
