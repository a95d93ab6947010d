#!/usr/bin/env bash
# One call on the GPU machine (see docs/benchmarks.md): GPU tests, then benchmarks. Usage:
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]     stages: tests engine-tests small large latency trace serve
#   structured structured-8b attention profile (host/GPU split of a decode step) profile-workload kernels
#   (its kernels, eager) kernels-latency attention-ragged profile-structured overlap gemm gemm-fused pdl kernels-8b
#   kernels-prefill decode-layout layer layer-sweep decode-block lean-gemv decode-tiles compiles
# Needs .shared and .whl, made by benchmarks/gpu_prepare.sh on the development machine,
# carried. Each stage has its own time limit so that one slow stage cannot take the others' results with it.
set -uo pipefail
export PYTHONUNBUFFERED=1 PAGEDLLM_SHARED=$PWD/.shared TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
git log -1 --format='commit %h' 2>/dev/null || true
QWEN_TOK=.shared/tokenizers/qwen3
stage() {
  case "$1" in
  tests)
    timeout 300 python3 -m pytest -q tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
  engine-tests)
    timeout 200 python3 -m pytest -q tests/gpu/test_engine_gpu.py 2>&1 | tee "$OUT/gpu_engine_tests.log" | tail -5 ;;
  small)
    timeout 300 python3 -m pagedllm.cli bench throughput --model benchmarks/configs/qwen3-0.6b --load-format dummy --compare-hf \
      --hf-num-requests 16 --output-json "$OUT/qwen3_0.6b.json" 2>&1 | tee "$OUT/qwen3_0.6b.log" | grep -v "it/s\]" | tail -14
    timeout 150 python3 benchmarks/bench_sharing.py prefix --model benchmarks/configs/qwen3-0.6b --load-format dummy \
      --num-prompts 256 --output-len 64 --max-model-len 4096 2>&1 | tee "$OUT/prefix.log" | grep -v INFO | tail -3 ;;
  large)
    timeout 300 python3 -m pagedllm.cli bench throughput --model benchmarks/configs/qwen3-8b --load-format dummy --compare-hf \
      --hf-num-requests 8 --hf-batch-size 8 \
      --output-json "$OUT/qwen3_8b.json" 2>&1 | tee "$OUT/qwen3_8b.log" | grep -v "it/s\]" | tail -14
    timeout 120 python3 -m pagedllm.cli bench latency --model benchmarks/configs/qwen3-8b --load-format dummy \
      --output-json "$OUT/qwen3_8b_latency.json" 2>&1 | tail -3 ;;
  latency)  # batch-1 decode of Qwen3-8B alone (also part of large)
    timeout 120 python3 -m pagedllm.cli bench latency --model benchmarks/configs/qwen3-8b --load-format dummy \
      --output-json "$OUT/qwen3_8b_latency.json" 2>&1 | tail -3 ;;
  trace)  # where the reference workload's time goes, by phase against its bound (no HF, no latency run)
    for m in qwen3-0.6b qwen3-8b; do
      timeout 150 python3 -m pagedllm.cli bench throughput --model benchmarks/configs/$m --load-format dummy --step-trace \
        --output-json "$OUT/trace_$m.json" 2>&1 | tee "$OUT/trace_$m.log" | grep -v "it/s\]" | tail -16
    done ;;
  serve)
    python3 -m pagedllm.cli serve benchmarks/configs/qwen3-0.6b --load-format dummy --tokenizer $QWEN_TOK \
      --served-model-name qwen3-0.6b --port 8011 --log-level warning > "$OUT/server.log" 2>&1 &
    local pid=$!
    for _ in $(seq 180); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
    for rate in 4 16 inf; do
      timeout 150 python3 -m pagedllm.cli bench serve --base-url http://127.0.0.1:8011 --model qwen3-0.6b --tokenizer $QWEN_TOK \
        --num-prompts 200 --random-input-len 1024 --random-output-len 128 --request-rate $rate --disable-tqdm \
        --goodput ttft:500 tpot:50 --save-result --result-filename "/tmp/serve_rate_$rate.json" 2>&1 \
        | tee -a "$OUT/serve.log" | tail -16
    done
    curl -s localhost:8011/metrics | grep -E "^pagedllm:(num_preemptions|prompt_tokens|generation_tokens)_total" | head
    kill $pid ;;
  structured)
    timeout 300 python3 benchmarks/bench_structured.py --tokenizer $QWEN_TOK --model benchmarks/configs/qwen3-0.6b \
      --load-format dummy --output-json "$OUT/structured.json" 2>&1 | tee "$OUT/structured.log" | grep -v INFO \
      | tail -14 ;;
  structured-8b)  # the same with Qwen3-8B's step (its forward pass is long enough to hide the bitmask's fill)
    timeout 300 python3 benchmarks/bench_structured.py --tokenizer $QWEN_TOK --model benchmarks/configs/qwen3-8b \
      --load-format dummy 2>&1 | tee "$OUT/structured_8b.log" | grep -v INFO | tail -14 ;;
  attention)  # decode/prefill kernels at Qwen3-0.6B's and Qwen3-8B's head shapes, with a sweep of tile configs
    timeout 200 python3 benchmarks/bench_attention.py --tune --heads 16 --kv-heads 8 --head-dim 128 2>&1 \
      | tee "$OUT/attention_0.6b.log" | tail -30
    timeout 200 python3 benchmarks/bench_attention.py --heads 32 --kv-heads 8 --head-dim 128 2>&1 \
      | tee "$OUT/attention_8b.log" | tail -14 ;;
  profile)
    for flag in --async-scheduling --no-async-scheduling; do
      timeout 100 python3 benchmarks/profile_step.py --model benchmarks/configs/qwen3-0.6b --batch 256 $flag 2>&1 | tail -1
    done
    timeout 100 python3 benchmarks/profile_step.py --model benchmarks/configs/qwen3-8b --batch 256 2>&1 | tail -1 ;;
  profile-workload)  # the same on the reference workload's ragged prompts, at several batch sizes
    for batch in 1 16 64 256; do
      timeout 100 python3 benchmarks/profile_step.py --model benchmarks/configs/qwen3-0.6b --batch $batch --workload \
        2>&1 | tail -1
    done
    timeout 120 python3 benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-0.6b --batch 256 --workload \
      --steps 10 2>&1 | grep -v INFO | tee "$OUT/kernels_workload_0.6b.log" | tail -26 ;;
  attention-ragged)  # decode attention over ragged contexts (the workload's decode phase), by split count and order
    for shape in "16 8" "32 8"; do
      set -- $shape
      timeout 120 python3 benchmarks/bench_attention.py --ragged ${TUNE:-} --heads $1 --kv-heads $2 2>&1 | tail -41
    done ;;
  profile-structured)  # host/GPU split of a decode step with every request JSON-schema constrained
    for m in qwen3-0.6b qwen3-8b; do
      for batch in ${BATCHES:-1 16 64}; do
        for flag in "" --structured; do
          timeout 100 python3 benchmarks/profile_step.py --model benchmarks/configs/$m --batch $batch --workload \
            --steps 100 $flag --tokenizer $QWEN_TOK 2>&1 | tail -1 | sed "s/^/$m: /"
        done
      done
    done ;;
  overlap)  # would one half-batch's attention beside the other's matmuls pay (Qwen3-8B shapes, batch 256)?
    timeout 120 python3 benchmarks/bench_overlap.py 2>&1 | tail -8 ;;
  gemm)  # a Triton GEMM for decode's small M against cuBLAS, on both models' linear shapes (an experiment)
    timeout ${GEMM_LIMIT:-500} python3 benchmarks/bench_gemm.py --batches ${GEMM_BATCHES:-1,32,256} 2>&1 \
      | tee "$OUT/gemm.log" | tail -40 ;;
  gemm-fused)  # a decoder layer's matmuls with the norms and SiLU fused in (fused_linear.py) against cuBLAS
    timeout 200 python3 benchmarks/bench_gemm.py --fused --batches ${GEMM_BATCHES:-1,8,16,32,64} 2>&1 \
      | tee "$OUT/gemm_fused.log" | tail -100 ;;
  pdl)  # batch-1 matmul chains: cuBLAS, a Triton GEMV, and the same with programmatic dependent launch (an experiment)
    for m in 8b 0.6b; do timeout 150 python3 benchmarks/bench_pdl.py --model $m 2>&1 | tail -5; done ;;
  decode-block)  # the attention block of a 1-4 sequence decode step: the q/k work apart or in the decode kernel
    for shape in "32 8" "16 8"; do set -- $shape; timeout 150 python3 benchmarks/bench_decode_block.py --heads $1 --kv-heads $2 2>&1 | tail -16; done ;;
  compiles)  # Triton kernels compiled after start-up in a cold 0.6B throughput run (none expected; compile_log.py)
    TRITON_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/compile_log.py bench throughput \
      --model benchmarks/configs/qwen3-0.6b --load-format dummy 2>&1 | grep "compile\|throughput\|ready in" \
      | tee "$OUT/compiles.log" | awk '/ready in/{f=1} f' | cut -c1-160 | tail -12 ;;
  decode-tiles)  # smaller key tiles at 16-32 splits with page-sized chunks, batch 1-2 (run at 158232b)
    (cd benchmarks; timeout 300 python3 bench_decode_block.py --batches 1,2 --contexts 512,768,1024,2048,4096 \
      --splits 16,32 --block-n 16,32 2>&1 | tail -24) ;;
  lean-gemv)  # a dot-free GEMV against the engine's, each Qwen3-8B layer shape at batch 1
    timeout 580 python3 benchmarks/bench_lean_gemv.py 2>&1 | tail -20 ;;
  layer-sweep)  # the fused GEMV layer of Qwen3-8B at batch 1, each GEMV's config swept in turn
    timeout 400 python3 benchmarks/bench_pdl.py --layer --sweep --model 8b --rows 1 2>&1 | tail -24 ;;
  layer)  # the GEMV layer (no attention) with the norms and SiLU-and-mul apart or fused into the GEMVs
    for m in 8b 0.6b; do timeout 150 python3 benchmarks/bench_pdl.py --layer --model $m --rows 1,4 2>&1 | tail -6; done ;;
  decode-layout)  # decode attention with the cache in NHD or HND layout, pages of 16 or 32 (an experiment)
    for shape in "16 8" "32 8"; do
      set -- $shape
      timeout 200 python3 benchmarks/bench_decode_layout.py --heads $1 --kv-heads $2 2>&1 | tee -a "$OUT/decode_layout.log" | tail -60
    done ;;
  kernels-latency)  # Qwen3-8B's kernels at batch 1 (the latency figure's step)
    timeout 150 python3 benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-8b --batch 1 --prompt-len 512 \
      --steps 20 2>&1 | grep -v INFO | tee "$OUT/kernels_8b_batch1.log" | tail -26 ;;
  kernels-8b)  # Qwen3-8B's kernels at batch 256 on the workload's ragged prompts (the 62-70% decode phase)
    timeout 150 python3 benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-8b --batch 256 --workload \
      --steps 10 2>&1 | grep -v INFO | tee "$OUT/kernels_8b_workload.log" | tail -26 ;;
  kernels-prefill)  # Qwen3-0.6B's kernels in prefill steps (that phase runs at 55% of its bound)
    timeout 150 python3 benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-0.6b --prefill --batch 64 \
      2>&1 | grep -v INFO | tee "$OUT/kernels_0.6b_prefill.log" | tail -26 ;;
  kernels)
    timeout 120 python3 benchmarks/profile_kernels.py --model benchmarks/configs/qwen3-0.6b --batch 256 \
      --prompt-len 512 --steps 10 2>&1 | grep -v INFO | tee "$OUT/kernels_0.6b.log" | tail -26 ;;
  *) echo "unknown stage $1"; return 1 ;;
  esac
}
for s in "${@:-tests}"; do echo "=== stage $s"; stage "$s"; done
