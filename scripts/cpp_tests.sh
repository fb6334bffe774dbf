#!/usr/bin/env bash
# Build and test the C++ core: Release, then ThreadSanitizer and
# Address+UndefinedBehaviorSanitizer builds. CPU only (FASTSERVE_CUDA=OFF).
#   scripts/cpp_tests.sh            all three builds
#   scripts/cpp_tests.sh --no-sanitizers   Release only
#   scripts/cpp_tests.sh --build-only      all three builds, no tests (CI
#                                          builds them while pip installs)
# JOBS (default 2) sets the build parallelism; FASTSERVE_STRESS_N, if set, the
# stress test's requests per producer (default 10000: ~0.2 s in Release and
# ~1.5 s under ThreadSanitizer on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS="${JOBS:-2}"
SKIP_SAN=0
BUILD_ONLY=0
case "${1:-}" in
  --no-sanitizers|--skip-sanitizers|release) SKIP_SAN=1 ;;
  --build-only) BUILD_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--no-sanitizers | --build-only]" >&2; exit 2 ;;
esac

build_and_test() {  # dir, extra cmake args...
  local dir="$1"; shift
  echo "== $dir"
  cmake -S . -B "$dir" -G Ninja -DFASTSERVE_CUDA=OFF "$@"
  cmake --build "$dir" -j"$JOBS"
  [ "$BUILD_ONLY" = 1 ] && return 0
  ctest --test-dir "$dir" --output-on-failure -j"$JOBS"
}

build_and_test build/cpp -DCMAKE_BUILD_TYPE=Release
[ "$SKIP_SAN" = 1 ] && exit 0

TSAN_OPTIONS=halt_on_error=1 \
  build_and_test build/tsan -DFASTSERVE_SANITIZE=thread -DFASTSERVE_BUILD_BENCHMARKS=OFF
# The sanitizer build also runs the layer kernels' AVX-512 path through SIMDe
# (CMake's FASTSERVE_EMULATE_AVX512), so that path is tested, bounds included,
# on CPUs without AVX-512; the kernel tests run every path in every build.
EMULATE=(-DFASTSERVE_EMULATE_AVX512=ON)
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
  EMULATE=(-DFASTSERVE_EMULATE_AVX512=OFF)
  echo "cpp_tests.sh: SIMDe (libsimde-dev) not found: the AVX-512 kernel path runs only on CPUs with AVX-512" >&2
fi
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
  build_and_test build/asan -DFASTSERVE_SANITIZE=address,undefined -DFASTSERVE_BUILD_BENCHMARKS=OFF "${EMULATE[@]}"
