#!/usr/bin/env bash
# Set up exo on this machine: a fast BLAS for MLX (when the system package manager is usable),
# a virtual environment in .venv with exo installed, and the default model in the cache.
#   deployment/setup.sh          to run a node
#   deployment/setup.sh --dev    also installs the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[test]"

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null; then
  if ! ldconfig -p | grep -q 'libblis\.so'; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq libblis4-pthread; } >/dev/null 2>&1 ||
      echo "setup: could not install libblis4-pthread; exo will use MLX's slower bundled BLAS" >&2
  fi
  # a C++ compiler and CMake build exo's native kernels when exo is installed (without them exo runs
  # stock MLX ops, slower); pip brings nanobind and a CMake of its own if the system has none
  build_packages=""
  command -v g++ >/dev/null || command -v c++ >/dev/null || build_packages="$build_packages g++"
  command -v cmake >/dev/null || build_packages="$build_packages cmake"
  if [ -n "$build_packages" ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    # shellcheck disable=SC2086  # a list of package names
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq $build_packages; } >/dev/null 2>&1 ||
      echo "setup: could not install$build_packages; exo will run without its native kernels" >&2
  fi
  if [ -n "$extras" ]; then  # --dev: tools the tests use (tests/deployment: shellcheck, systemd-analyze, ...)
    dev_packages=""
    command -v shellcheck >/dev/null || dev_packages="$dev_packages shellcheck"
    command -v systemd-analyze >/dev/null || dev_packages="$dev_packages systemd"
    command -v ip >/dev/null || dev_packages="$dev_packages iproute2"  # tests/cluster/test_netns_faults.py
    # tests/deployment/test_real_systemd.py boots a Debian with systemd in a container
    command -v debootstrap >/dev/null || dev_packages="$dev_packages debootstrap"
    command -v systemd-nspawn >/dev/null || dev_packages="$dev_packages systemd-container"
    # tests/dashboard: headless Debian Chromium, driven through its chromedriver
    command -v chromium >/dev/null || dev_packages="$dev_packages chromium"
    command -v chromedriver >/dev/null || dev_packages="$dev_packages chromium-driver"
    # tests/deployment/test_alerts*.py: promtool and a real Prometheus for deployment/alerts.yml
    command -v promtool >/dev/null || dev_packages="$dev_packages prometheus"
    if [ -n "$dev_packages" ]; then
      sudo=""
      [ "$(id -u)" -ne 0 ] && sudo="sudo"
      # shellcheck disable=SC2086  # a list of package names
      { $sudo apt-get update -qq && $sudo apt-get install -y -qq $dev_packages; } >/dev/null 2>&1 ||
        echo "setup: could not install$dev_packages; the tests that need them will be skipped" >&2
    fi
  fi
fi

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
if [ -n "$extras" ]; then
  # --dev builds llama-cpp-python, the engine the tests compare exo with, for this CPU; without its AMX
  # kernels, which crash in VMs that do not hand AMX state to guests (SIGSEGV in ggml_backend_amx_mul_mat)
  no_amx="'-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
  export CMAKE_ARGS="${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DCMAKE_C_FLAGS=$no_amx -DCMAKE_CXX_FLAGS=$no_amx"}"
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
.venv/bin/python -c 'import exo.kernels as k; i = k.info(); print(f"setup: kernels {i.path} ({i.reason})")'
.venv/bin/exo models fetch >/dev/null
echo "setup: done. Start a node with: .venv/bin/exo"
