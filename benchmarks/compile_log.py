"""Which Triton kernels compile, and when: runs a pagedllm command (the rest of argv, e.g. `bench throughput ...`)
with Triton's post-compile hook printing each compiled kernel's name and argument specialisation, timestamped, so
that compilations in the middle of a timed run show up. A diagnostic for the GPU machine:

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/compile_log.py bench throughput --model ... --load-format dummy
"""
import runpy
import sys
import time

import triton

START = time.perf_counter()


def _hook(*args, **kwargs):
    print(f"[compile {time.perf_counter() - START:7.2f} s] {str(kwargs.get('repr', ''))[:400]}", flush=True)
    return False


triton.knobs.runtime.jit_post_compile_hook = _hook
sys.argv = ["pagedllm"] + sys.argv[1:]
runpy.run_module("pagedllm.cli", run_name="__main__")
