#!/usr/bin/env bash
# Compile plugins/*.cu into build/plugins/libtwotower_plugins.so for every GPU generation this
# nvcc supports from sm_80 on (TT_ARCHS="90" narrows it, e.g. on a GPU host). Warnings are
# errors.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
out=${1:-build/plugins}
mkdir -p "$out"
archs=""
supported=$("$NVCC" --list-gpu-arch)
for sm in ${TT_ARCHS:-80 86 89 90 100 120}; do
  if grep -q "compute_$sm" <<<"$supported"; then
    archs+=" -gencode=arch=compute_$sm,code=sm_$sm"
  fi
done
# PTX of the newest target too, so later GPUs can JIT it.
newest=$(grep -o 'compute_[0-9]*' <<<"$supported" | sort -t_ -k2 -n | tail -1)
archs+=" -gencode=arch=$newest,code=$newest"
"$NVCC" -O3 -std=c++17 -shared -Xcompiler -fPIC,-Wall,-Wextra,-Werror --Werror all-warnings \
  --threads 2 $archs -Iplugins plugins/block_cross_attention.cu plugins/confidence_unmask.cu \
  -o "$out/libtwotower_plugins.so"
echo "built $out/libtwotower_plugins.so"
