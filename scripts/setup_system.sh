#!/usr/bin/env bash
# Installs the system packages the C++ tests and microbenchmarks build
# against (Debian's GoogleTest, Google Benchmark and SIMDe, plus the compiler
# and build tools) when any is missing; does nothing when all are there.
# Called by scripts/test.sh and .ci/run, so the README's test command works
# on a fresh machine. Needs root, or sudo without a password.
set -euo pipefail
PACKAGES=(libgtest-dev libbenchmark-dev libsimde-dev ninja-build cmake g++)

if ! command -v dpkg-query >/dev/null; then
  # Not Debian: nothing to ask the package manager; CMake's find_package
  # says what is missing, if anything.
  echo "setup_system.sh: not a Debian system; needs GoogleTest, Google Benchmark, ninja," \
       "cmake and a C++17 compiler installed" >&2
  exit 0
fi
missing=()
for p in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" == 0 ]]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup_system.sh: missing Debian packages ${missing[*]}; run as root:" \
       "apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "setup_system.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
