"""Registers, stack (spills) and shared memory a thread of the engine's hot Triton kernels takes on Hopper, without a
GPU: each kernel is compiled offline for sm_90 with the local Triton (whose bundled ptxas and cuobjdump need no
driver) at the configs the engine picks for Qwen3-8B's shapes, with the divisibility marks the device's launcher
gives its arguments (NOT_DIVISIBLE). The device's Triton may compile differently; these are hints for where a kernel
runs out of registers, not measurements of the device (--device measures them).

    python benchmarks/kernel_resources.py
    python benchmarks/kernel_resources.py --device     # on a GPU: the same kernels as the engine compiled them

With --device it runs a batch-1 decode of Qwen3-8B (dummy weights) through the engine, then prints each compiled
variant of these kernels from Triton's caches: registers, spills and shared memory as the device's Triton made them.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# pointer arguments that are not bf16, by name
POINTER_TYPES = {"seq_lens_ptr": "*i32", "block_tables_ptr": "*i32", "positions_ptr": "*i64",
                 "slot_mapping_ptr": "*i64", "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "cos_ptr": "*fp32",
                 "sin_ptr": "*fp32"}
FLOAT_ARGS = {"eps", "scale_log2"}
# Integer arguments that are not multiples of 16 at Qwen3-8B's shapes (rows, kv heads, GQA group). Triton's launcher
# marks every other one, and every pointer, divisible by 16 (it specialises on that), and the marks decide whether
# the loads are vectorised and pipelined: without them the decode kernel compiles to 2-byte loads and no cp.async.
NOT_DIVISIBLE = {"M", "num_kv_heads", "group"}


def resources(fn, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """'REG:n STACK:n SHARED:n DYNAMIC:n' of fn compiled for sm_90 with these constexprs (other ints i32, pointers
    bf16): registers a thread, stack (spills), static shared memory, and the dynamic shared memory Triton's
    pipelines take (bytes a program)."""
    signature = {name: "constexpr" if name in constexprs else POINTER_TYPES.get(name, "*bf16")
                 if name.endswith("_ptr") else "fp32" if name in FLOAT_ARGS else "i32" for name in fn.arg_names}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and name not in FLOAT_ARGS | NOT_DIVISIBLE}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+ SHARED:\d+", dump)
    return f"{found.group(0) if found else '?'} DYNAMIC:{kernel.metadata.shared}"


def main() -> int:
    from bench_gemm import SHAPES  # benchmarks/ is on sys.path when this file runs as a script
    from pagedllm.attention.triton_decode import (SMALL_TILE_SPLITS, TINY_TILE_SPLITS, _decode_kernel,
                                                  _merge_splits_kernel)
    from pagedllm.layers.triton_gemv import MAX_ROWS, _gemv_kernel, gemv_config
    fused = {"qkv": (True, False), "gate_up": (True, True)}  # (norm + residual, SiLU-and-mul) as Linear.normed
    for name, (k, n) in SHAPES["8b"].items():
        for norm, silu in dict.fromkeys([(False, False), fused.get(name, (False, False))]):  # plain, then fused
            block_n, block_k, warps, stages = gemv_config(n, k)
            block_n = max(16, block_n // 2) if silu else block_n
            flags = dict(HAS_BIAS=False, NORM=norm, HAS_RESIDUAL=norm, SILU_MUL=silu, BLOCK_M=MAX_ROWS,
                         BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="tf32", USE_GDC=True)
            parts = f"{' + norm' if norm else ''}{' + silu' if silu else ''}"
            label = f"gemv {name}{parts} {(block_n, block_k, warps, stages)}"
            print(f"{label:<48} {resources(_gemv_kernel, flags, warps, stages)}")
    for splits, block_n in ((1, 128), (8, 128), (SMALL_TILE_SPLITS, 64), (32, 64), (TINY_TILE_SPLITS, 32)):
        for from_qkv in (False, True):
            flags = dict(BLOCK_G=16, D_PAD=128, BLOCK_SIZE=16, BLOCK_N=block_n, NUM_SPLITS=splits,
                         SPLIT_ALIGN=16 if splits >= SMALL_TILE_SPLITS else block_n, PRECISION="tf32",
                         FROM_QKV=from_qkv, HAS_NORM=from_qkv)
            label = f"decode{' from qkv' if from_qkv else ''}, {splits} splits, {block_n}-key tiles"
            print(f"{label:<48} {resources(_decode_kernel, flags, 4, 3)}")
    print(f"{'merge of 32 splits':<48} {resources(_merge_splits_kernel, dict(NUM_SPLITS=32, D_PAD=128), 4, 3)}")
    return 0


def on_device() -> int:
    from pagedllm import LLM, SamplingParams
    from pagedllm.attention import triton_decode
    from pagedllm.layers import triton_gemv
    llm = LLM(str(Path(__file__).resolve().parent / "configs" / "qwen3-8b"), load_format="dummy", max_model_len=1024,
              skip_tokenizer_init=True)
    llm.generate([{"prompt_token_ids": list(range(1, 513))}], SamplingParams(max_tokens=8, temperature=0),
                 use_tqdm=False)
    for fn in (triton_gemv._gemv_kernel, triton_decode._decode_kernel, triton_decode._merge_splits_kernel):
        for caches in fn.device_caches.values():
            for kernel in caches[0].values():
                kernel._init_handles()  # loads the binary, which sets n_regs and n_spills
                constants = getattr(kernel.src, "constants", {})  # keyed by (argument index,) or by name
                names = [fn.arg_names[k[0]] if isinstance(k, tuple) else str(k) for k in constants]
                flags = {n: v for n, v in zip(names, constants.values()) if n.isupper()}
                print(f"{fn.__name__:<22} REG:{getattr(kernel, 'n_regs', '?')} "
                      f"SPILLS:{getattr(kernel, 'n_spills', '?')} DYNAMIC:{kernel.metadata.shared} "
                      f"warps {kernel.metadata.num_warps} {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(on_device() if "--device" in sys.argv[1:] else main())
