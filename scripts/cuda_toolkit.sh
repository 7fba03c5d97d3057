# The CUDA toolkit's tools, found the same way by scripts/gpu_run.sh and
# tools/narrow_gpu_check.sh (sourced; defines functions only).
#
# torch takes CUDA_HOME from `which nvcc`, which is wrong when nvcc on PATH is a
# wrapper script outside the toolkit: look through it.

# The toolkit's root: a directory with bin/nvcc and include/cuda_runtime.h.
cuda_home() {
  local nvcc candidate
  nvcc=$(command -v nvcc || true)
  for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
      "${nvcc:+$(dirname "$(dirname "$(readlink -f "$nvcc")")")}" \
      "${nvcc:+$("$nvcc" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}" \
      /usr/local/cuda; do
    if [ -n "$candidate" ] && [ -x "$candidate/bin/nvcc" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      (cd "$candidate" && pwd -P)
      return 0
    fi
  done
  return 1
}

# compute-sanitizer lives in bin/ or in compute-sanitizer/ depending on the packaging.
find_sanitizer() {
  local candidate
  for candidate in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer || true)" \
      "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
      "${CUDA_HOME:+$CUDA_HOME/compute-sanitizer/compute-sanitizer}"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
