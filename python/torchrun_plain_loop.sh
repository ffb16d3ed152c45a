#!/usr/bin/env bash
# The plain-loop example launched by torchrun (one process; extra arguments go to plain_loop.py):
#   bash python/torchrun_plain_loop.sh --steps 20
# Run from the repository root, or with badam_kernels installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec torchrun --standalone --nproc-per-node 1 "$here/plain_loop.py" "$@"
