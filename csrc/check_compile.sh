#!/usr/bin/env bash
# Compile-check every CUDA kernel source in csrc/ for sm_80 and sm_90 with this machine's nvcc.
# Nothing runs: this proves the torch-free kernels build for A100/H100 on a machine without a GPU.
# Then, where Python has torch, syntax-checks binding.cpp against torch's headers (CPU-only torch
# lacks the generated c10/cuda/impl/cuda_cmake_macros.h: an empty stand-in is used for it).
# Prints each kernel's registers, spills (LOCAL) and static shared memory per architecture where a
# cuobjdump is found (the CUDA toolkit's, else the one Triton ships; CUOBJDUMP overrides).
# Exits 0 with a "skipped" message where nvcc is absent. NVCC=/path/to/nvcc overrides the lookup.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${NVCC:-}" ] && [ ! -x "$NVCC" ]; then
  echo "check_compile: SKIPPED: NVCC=$NVCC is not an executable; CUDA kernels not compile-checked"
  exit 0
fi
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then nvcc="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then nvcc=/usr/local/cuda/bin/nvcc; fi
if [ -z "$nvcc" ]; then
  echo "check_compile: SKIPPED: nvcc not found (set NVCC or CUDA_HOME); CUDA kernels not compile-checked"
  exit 0
fi

cuobjdump="${CUOBJDUMP:-$(command -v cuobjdump || true)}"
if [ -z "$cuobjdump" ] && [ -x "$(dirname "$(readlink -f "$nvcc")")/cuobjdump" ]; then
  cuobjdump="$(dirname "$(readlink -f "$nvcc")")/cuobjdump"
fi
if [ -z "$cuobjdump" ]; then
  cuobjdump="$("${PYTHON:-python3}" -c 'import os, triton
print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
  [ -x "$cuobjdump" ] || cuobjdump=""
fi

# One line per kernel and architecture: REG, LOCAL (spills), SHARED (static), demangled name.
resource_usage() {
  "$cuobjdump" -res-usage "$1" 2>/dev/null | awk '
    /^arch = / { arch = $3 }
    /Function / { name = $2; sub(/:$/, "", name) }
    /REG:/ { printf "check_compile:          %s %s %s %s %s\n", arch, $1, $4, $3, name }' |
    sed -E 's/_ZN6recvit[0-9]+_GLOBAL__N__[0-9a-f_]+[a-z_]+_cu_[0-9a-f]+[0-9]+//'
}

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
echo "check_compile: $("$nvcc" --version | tail -n 1)"
status=0
for source in "$here"/*.cu; do
  name="$(basename "$source" .cu)"
  start=$SECONDS
  if "$nvcc" -c "$source" -o "$out/$name.o" -std=c++17 -O3 -I "$here" --Werror all-warnings \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90; then
    echo "check_compile: ok     $name.cu (sm_80, sm_90) in $((SECONDS - start)) s"
    [ -z "$cuobjdump" ] || resource_usage "$out/$name.o"
  else
    echo "check_compile: FAILED $name.cu"
    status=1
  fi
done

python="${PYTHON:-python3}"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
[ -f "$cuda_include/cuda_runtime_api.h" ] || cuda_include="$(dirname "$(readlink -f "$nvcc")")/../include"
if ! torch_includes="$("$python" -c 'from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths()))' 2>/dev/null)"; then
  echo "check_compile: skipped binding.cpp: $python cannot import torch"
elif [ ! -f "$cuda_include/cuda_runtime_api.h" ]; then
  echo "check_compile: skipped binding.cpp: CUDA headers not found (set CUDA_HOME)"
else
  python_include="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  mkdir -p "$out/stub/c10/cuda/impl"
  echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  start=$SECONDS
  # shellcheck disable=SC2086
  if "${CXX:-g++}" -fsyntax-only -std=c++20 -Wall -I "$out/stub" $torch_includes -I "$python_include" \
      -I "$cuda_include" -I "$here" -DTORCH_EXTENSION_NAME=_C "$here/binding.cpp"; then
    echo "check_compile: ok     binding.cpp (syntax, torch headers) in $((SECONDS - start)) s"
  else
    echo "check_compile: FAILED binding.cpp"
    status=1
  fi
fi
exit $status
