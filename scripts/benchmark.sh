#!/usr/bin/env bash
# The README's benchmark command: set-up (see env.sh), then the fused operator
# against nn.Linear. Extra arguments go to benchmarks/benchmark.py (--help).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" benchmarks/benchmark.py "$@"
