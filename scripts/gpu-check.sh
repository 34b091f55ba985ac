#!/usr/bin/env bash
# The prepared GPU check of issue 12 (bench/gpu.py): the colocated engine on one GPU against
# transformers; progress on stderr, one JSON line on stdout. It needs torch (with CUDA),
# safetensors and transformers, and imports neither Ray nor the serving stack.
#
#   scripts/gpu-check.sh                      # the full check on cuda (well under 10 minutes on an H200)
#   scripts/gpu-check.sh --device cpu --tiny  # a dry run of every step at toy sizes, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m bench.gpu "$@"
