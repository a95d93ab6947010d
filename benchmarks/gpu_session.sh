#!/usr/bin/env bash
# One call on the GPU machine (see docs/benchmarks.md): GPU tests, then benchmarks. Usage:
#   bash benchmarks/gpu_session.sh tests|small|large|serve
# Needs .shared (a copy of ../shared's stories260K and Qwen3 tokenizer) and .whl (pytest, server wheels) carried.
set -uo pipefail
export PYTHONUNBUFFERED=1 PAGEDLLM_SHARED=$PWD/.shared TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
bench() { python3 -m pagedllm.cli bench "$@"; }
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -x tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
  small)
    bench throughput --model benchmarks/configs/qwen3-0.6b --load-format dummy --compare-hf \
      --output-json "$OUT/qwen3_0.6b.json" 2>&1 | tee "$OUT/qwen3_0.6b.log" | grep -v "it/s\]" | tail -8
    python3 benchmarks/bench_sharing.py prefix --model benchmarks/configs/qwen3-0.6b --load-format dummy \
      --num-prompts 256 --output-len 64 --max-model-len 4096 2>&1 | tee "$OUT/prefix.log" | grep -v INFO | tail -3 ;;
  large)
    bench throughput --model benchmarks/configs/qwen3-8b --load-format dummy \
      --output-json "$OUT/qwen3_8b.json" 2>&1 | tee "$OUT/qwen3_8b.log" | grep -v "it/s\]" | tail -6
    bench latency --model benchmarks/configs/qwen3-8b --load-format dummy \
      --output-json "$OUT/qwen3_8b_latency.json" 2>&1 | tee "$OUT/qwen3_8b_latency.log" | tail -3 ;;
  profile)
    python3 benchmarks/profile_step.py --model benchmarks/configs/qwen3-0.6b --batch 256 2>&1 | tail -1
    python3 benchmarks/profile_step.py --model benchmarks/configs/qwen3-8b --batch 256 2>&1 | tail -1 ;;
esac
