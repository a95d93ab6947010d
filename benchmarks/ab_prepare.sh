#!/usr/bin/env bash
# Put COMMIT's pagedllm into .ab_old (git-ignored) on the development machine, for benchmarks/gpu_ab.sh on the GPU
# machine (carry .ab_old with .whl and .shared). Usage: bash benchmarks/ab_prepare.sh COMMIT
set -euo pipefail
rm -rf .ab_old && mkdir -p .ab_old && git archive "$1" pagedllm | tar -x -C .ab_old
git rev-parse --short "$1" > .ab_old/COMMIT
