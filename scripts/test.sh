#!/usr/bin/env bash
# The README's test command: set-up (see env.sh), then the whole test suite.
# Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m pytest tests "$@"
