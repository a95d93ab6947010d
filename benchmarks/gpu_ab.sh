#!/usr/bin/env bash
# A/B in one call on the GPU machine: the working tree against .ab_old's pagedllm (benchmarks/ab_prepare.sh), one
# after the other, ROUNDS times (default 2). Usage, from the repository's root:
#   bash benchmarks/gpu_ab.sh bench throughput --model benchmarks/configs/qwen3-8b --load-format dummy
# Each side runs from its own directory and prints the pagedllm it imported: `python3 -m` puts the current
# directory first on sys.path, so an old tree put only on PYTHONPATH would lose to the working tree's pagedllm.
# Arguments that name existing paths (relative to the root) are made absolute.
set -uo pipefail
bash benchmarks/gpu_session.sh none >/dev/null 2>&1
export PAGEDLLM_SHARED=$PWD/.shared TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ROOT=$PWD
args=()
for a in "$@"; do if [[ -e $a ]]; then args+=("$ROOT/$a"); else args+=("$a"); fi; done
side() {
  (cd "$1" && export PYTHONPATH=/tmp/site:$1 \
    && python3 -c "import pagedllm; print('$2 ($3):', pagedllm.__file__)" \
    && python3 -m pagedllm.cli "${args[@]}" 2>&1 | grep -v "^INFO\|it/s\]" | tail -"${TAIL:-4}")
}
for _ in $(seq "${ROUNDS:-2}"); do
  side "$ROOT" new "working tree"
  side "$ROOT/.ab_old" old "$(cat "$ROOT/.ab_old/COMMIT" 2>/dev/null || echo '?')"
done
