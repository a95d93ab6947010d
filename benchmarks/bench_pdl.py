"""Would programmatic dependent launch (PDL, Hopper) bring batch-1 decode's matmuls closer to the copy bandwidth?
An experiment, not wired into the engine.

At batch 1 a decoder layer is a chain of four matrix-vector products (qkv, o_proj, gate_up, down) that each read a
weight of 8-200 MB; every launch ramps up and drains, and cuBLAS reaches 60-89% of the copy bandwidth on Qwen3-8B's
(docs/benchmarks.md). The weights do not depend on the previous kernel. With PDL a kernel may start while the one
before it drains: it loads its first weight tile, then waits (gdc_wait) for the previous kernel's output, and it
lets the next kernel launch once its own main loop is done (gdc_launch_dependents).

The chain of --layers layers, each weight its own (as in a model, so the L2 holds none), replayed in one CUDA
graph; each matmul reads the previous one's output (a prefix of it when the sizes differ). Four ways: cuBLAS
(what the engine runs above 4 rows), the Triton kernel below without PDL, and with it, and "engine GEMV",
layers/triton_gemv.py, which the engine's linear layers call for steps of up to 4 rows. Per layer: microseconds
and the share of the copy bandwidth that the weights' bytes reach. --rows 1,2,4,8 times the chains at more rows
(tokens in a step), up to 16.

--layer times the engine's small-step decoder layer without attention instead: the two RMSNorms and SiLU-and-mul
as kernels of their own between the GEMVs, against Linear.normed's fusion of them into the GEMVs; --sweep then
tries other (BLOCK_N, BLOCK_K, warps, stages) for each fused GEMV in turn, inside the whole layer.

    python benchmarks/bench_pdl.py [--model 8b|0.6b] [--layers 36] [--rows 1] [--layer [--sweep]]
    TRITON_INTERPRET=1 python benchmarks/bench_pdl.py --check     # the kernel without PDL, on the CPU
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from bench_gemm import SHAPES  # benchmarks/ is on sys.path when this file runs as a script

# (BLOCK_N, BLOCK_K, num_warps, num_stages) by layer: the fastest split-free configurations of bench_gemm.py's
# sweep at M = 1 on an H200 (down: its fastest used 2 splits; this one has none).
CONFIGS = {"qkv": (64, 256, 4, 4), "o_proj": (32, 256, 4, 4), "gate_up": (64, 128, 4, 3), "down": (32, 256, 4, 4)}


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    """out[m, n] = sum_k x[m, k] * w[n, k] for a few rows m. With USE_GDC, the first weight tile is loaded before
    waiting for the previous kernel (which writes x), and the next kernel may launch once the main loop is done."""
    pid_n = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
    x_rows = x_ptr + rows[:, None] * stride_x
    col_mask = cols[:, None] < N
    row_mask = rows[:, None] < M
    b = tl.load(w_rows + ks[None, :], mask=col_mask & (ks[None, :] < K), other=0.0)  # independent of x
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
    a = tl.load(x_rows + ks[None, :], mask=row_mask & (ks[None, :] < K), other=0.0)
    acc = tl.dot(a, tl.trans(b))
    for k0 in range(BLOCK_K, K, BLOCK_K):  # the rest, pipelined by Triton as usual
        kk = k0 + ks
        a = tl.load(x_rows + kk[None, :], mask=row_mask & (kk[None, :] < K), other=0.0)
        b = tl.load(w_rows + kk[None, :], mask=col_mask & (kk[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(b))
    if USE_GDC:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask & (cols[None, :] < N))


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: tuple, pdl: bool) -> torch.Tensor:
    block_n, block_k, warps, stages = config
    m, (n, k) = x.shape[0], w.shape
    extra = dict(launch_pdl=True) if pdl else {}
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
                                             BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, USE_GDC=pdl,
                                             num_warps=warps, num_stages=stages, **extra)
    return out


def check_matvec(matvec, cases) -> int:
    """matvec(x [M, K], w [N, K], out [M, N], config) against torch at tiny float32 shapes, cases (M, K, N,
    config), on a GPU or in Triton's interpreter: 0 when every relative error is under 1e-5."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for m, k, n, config in cases:
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        out = matvec(x.to(device), w.to(device), torch.empty(m, n, device=device), config)
        ref = x.double() @ w.double().t()
        err = float((out.cpu().double() - ref).norm() / ref.norm())
        worst = max(worst, err)
        print(f"M {m} K {k} N {n} config {config}: relative error {err:.1e}")
    print(f"worst {worst:.1e}")
    return 0 if worst < 1e-5 else 1


def check() -> int:
    """The kernel (without PDL) against torch at tiny float32 shapes."""
    return check_matvec(lambda x, w, out, config: gemv(x, w, out, config, pdl=False),
                        ((1, 40, 24, (16, 16, 4, 2)), (3, 100, 70, (32, 32, 4, 2)), (16, 64, 33, (16, 64, 4, 2))))


def bench(model: str, layers: int, rows: int) -> int:
    from bench_attention import _graph_ms, copy_bandwidth  # one graph replayed; the copy ceiling
    bandwidth = copy_bandwidth()
    shapes = SHAPES[model]
    dev = dict(device="cuda", dtype=torch.bfloat16)
    weights = [{name: torch.randn(n, k, **dev) * k ** -0.5 for name, (k, n) in shapes.items()} for _ in range(layers)]
    outs = {name: torch.empty(rows, n, **dev) for name, (k, n) in shapes.items()}
    x0 = torch.randn(rows, shapes["qkv"][0], **dev)
    layer_bytes = 2 * sum(k * n for k, n in shapes.values())

    def chain(matmul) -> torch.Tensor:
        x = x0
        for w in weights:
            for name in ("qkv", "o_proj", "gate_up", "down"):
                x = matmul(x[:, :w[name].shape[1]], w[name], outs[name], name)
        return x

    ways = {
        "cuBLAS": lambda x, w, out, name: torch.mm(x, w.t(), out=out),
        "Triton": lambda x, w, out, name: gemv(x, w, out, CONFIGS[name], pdl=False),
        "Triton + PDL": lambda x, w, out, name: gemv(x, w, out, CONFIGS[name], pdl=True),
        "engine GEMV": lambda x, w, out, name: engine_gemv(x, w),
    }
    from pagedllm.layers.triton_gemv import gemv as engine_gemv  # layers/triton_gemv.py, as the engine calls it
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:,.0f} GB/s; Qwen3-{model} shapes, "
          f"batch {rows}, "
          f"{layers} layers of {layer_bytes / 1e6:.0f} MB")
    reference = chain(ways["cuBLAS"]).float().clone()
    w0 = weights[0]["qkv"]
    try:  # does this Triton take the option at all?
        probe = _gemv_kernel[(1,)](x0, w0, outs["qkv"], 1, 64, 256, x0.stride(0), w0.stride(0),
                                   outs["qkv"].stride(0), BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, USE_GDC=True,
                                   launch_pdl=True)
        print(f"compiled with launch_pdl={getattr(probe.metadata, 'launch_pdl', 'unknown')}")
    except Exception as exc:  # noqa: BLE001 - reported; the rows without PDL still run
        print(f"launch_pdl refused: {type(exc).__name__}: {str(exc)[:200]}")
    for name, matmul in ways.items():
        try:
            got = chain(matmul).float()
            err = float((got - reference).norm() / reference.norm())
            us = 1e3 * _graph_ms(lambda i, m=matmul: chain(m), 1) / layers
        except Exception as exc:  # noqa: BLE001 - e.g. PDL not supported by this Triton or driver
            print(f"{name:>20}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        share = layer_bytes / (us * 1e-6) / bandwidth
        print(f"{name:>20}: {us:7.1f} us a layer, {100 * share:5.1f}% of the copy bandwidth "
              f"(output vs cuBLAS: relative difference {err:.1e})")
    return 0


def bench_layer(model: str, layers: int, rows: int, sweep: bool = False, candidates: list | None = None) -> int:
    """The engine's small-step decoder layer without attention, in one graph: the two RMSNorms and SiLU-and-mul as
    kernels of their own between the four GEMVs, against Linear.normed's fusion of them into the GEMVs."""
    from bench_attention import _graph_ms, copy_bandwidth
    from pagedllm.layers.triton_gemv import gemv
    from pagedllm.layers.triton_ops import rms_norm, silu_and_mul
    bandwidth = copy_bandwidth()
    shapes = SHAPES[model]
    dev = dict(device="cuda", dtype=torch.bfloat16)
    hidden, q_size, inter = shapes["qkv"][0], shapes["o_proj"][0], shapes["down"][0]
    weights = [{name: torch.randn(n, k, **dev) * k ** -0.5 for name, (k, n) in shapes.items()} for _ in range(layers)]
    norms = [(torch.rand(hidden, **dev) + 0.5, torch.rand(hidden, **dev) + 0.5) for _ in range(layers)]
    x0, res0 = torch.randn(rows, hidden, **dev), torch.randn(rows, hidden, **dev)
    layer_bytes = 2 * sum(k * n for k, n in shapes.values())

    def apart(i=0):
        x, res = x0, res0
        for w, (g1, g2) in zip(weights, norms):
            h, res = rms_norm(x, g1, 1e-6, res)
            o = gemv(gemv(h, w["qkv"])[:, :q_size], w["o_proj"])
            h, res = rms_norm(o, g2, 1e-6, res)
            x = gemv(silu_and_mul(gemv(h, w["gate_up"])), w["down"])
        return x

    def fused(i=0, configs=None):
        c = configs or {}
        x, res = x0, res0
        for w, (g1, g2) in zip(weights, norms):
            qkv, res = gemv(x, w["qkv"], norm=(g1, 1e-6), residual=res, config=c.get("qkv"))
            o = gemv(qkv[:, :q_size], w["o_proj"], config=c.get("o_proj"))
            h, res = gemv(o, w["gate_up"], norm=(g2, 1e-6), residual=res, silu_and_mul=True, config=c.get("gate_up"))
            x = gemv(h, w["down"], config=c.get("down"))
        return x

    assert inter * 2 == shapes["gate_up"][1]
    reference = apart().float()
    print(f"device {torch.cuda.get_device_name()}, copy {bandwidth / 1e9:,.0f} GB/s; Qwen3-{model} layers without "
          f"attention, batch {rows}, {layers} layers of {layer_bytes / 1e6:.0f} MB")
    for name, way in (("norms apart", apart), ("norms fused", fused)):
        err = float((way().float() - reference).norm() / reference.norm())
        us = 1e3 * _graph_ms(way, 1) / layers
        print(f"{name:>20}: {us:7.1f} us a layer, {100 * layer_bytes / (us * 1e-6) / bandwidth:5.1f}% of the copy "
              f"bandwidth (output vs norms apart: relative difference {err:.1e})")
    if sweep:
        sweep_configs(fused, fused().float(), {name: (n, k) for name, (k, n) in shapes.items()}, layers, layer_bytes,
                      bandwidth, candidates)
    return 0


# --deep: longer pipelines (more weight bytes in flight per program), up to ~200 KB of shared memory a program;
# measured slower than the shape rule's (docs/benchmarks.md).
DEEP_CANDIDATES = [(n, k, w, st) for n in (16, 32, 64) for k in (256, 512) for w in (4, 8) for st in (4, 6, 8)
                   if n * k * 2 * st <= 200 * 1024 and (w == 4 or n * k >= 16384) and not (w == 8 and st == 8)]


def sweep_configs(fused, reference, reference_shapes: dict, layers: int, layer_bytes: int, bandwidth: float,
                  candidates: list | None = None) -> None:
    """One GEMV at a time (qkv, o_proj, gate_up, down), each (BLOCK_N, BLOCK_K, warps, stages) below tried in the
    whole fused layer while the others keep the best found so far (the shape rule's to start with).
    reference: the fused layer's output with the shape rule's configs; reference_shapes: each GEMV's weight (N, K)."""
    from bench_attention import _graph_ms
    from pagedllm.layers.triton_gemv import gemv_config
    candidates = candidates or [(n, k, 4, st) for n in (16, 32, 64, 128) for k in (128, 256) for st in (3, 4)]
    best: dict = {}
    base_us = 1e3 * _graph_ms(lambda i: fused(), 1) / layers
    print(f"sweep, from the shape rule's configs: {base_us:.1f} us a layer")
    for name in ("qkv", "o_proj", "gate_up", "down"):
        results = []
        for config in candidates:
            trial = dict(best, **{name: config})
            try:
                err = float((fused(configs=trial).float() - reference).norm() / reference.norm())
                us = 1e3 * _graph_ms(lambda i, t=trial: fused(configs=t), 1) / layers
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: reported, skipped
                print(f"  {name} {config}: failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            if err > 1e-1:  # configs sum K in other orders; 36 random layers compound it
                print(f"  {name} {config}: relative difference {err:.1e}, skipped")
                continue
            results.append((us, config))
        results.sort()
        best[name] = results[0][1]
        rule = gemv_config(*reference_shapes[name])
        rule_us = next((u for u, c in results if c == rule), float("nan"))
        print(f"  {name:>8}: best {results[0][1]} {results[0][0]:.1f} us a layer; shape rule {rule} {rule_us:.1f}; "
              "next " + ", ".join(f"{c} {u:.1f}" for u, c in results[1:4]))
    us = 1e3 * _graph_ms(lambda i: fused(configs=best), 1) / layers
    print(f"sweep best {best}: {us:.1f} us a layer, {100 * layer_bytes / (us * 1e-6) / bandwidth:.1f}% of the copy "
          f"bandwidth (shape rule: {base_us:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="correctness at tiny float32 shapes only")
    parser.add_argument("--model", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--rows", default="1", help="comma-separated row counts (tokens in the step), each <= 16")
    parser.add_argument("--layer", action="store_true",
                        help="the engine's GEMV layer with the norms and SiLU apart or fused, instead of the chains")
    parser.add_argument("--sweep", action="store_true", help="with --layer: sweep each fused layer GEMV's config")
    parser.add_argument("--deep", action="store_true", help="with --sweep: longer pipelines (DEEP_CANDIDATES)")
    args = parser.parse_args()
    if args.check:
        return check()
    if not torch.cuda.is_available():
        print("bench_pdl: needs a CUDA GPU (or --check under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    if args.layer:
        candidates = DEEP_CANDIDATES if args.deep else None
        return max(bench_layer(args.model, args.layers, int(rows), args.sweep, candidates)
                   for rows in args.rows.split(","))
    return max(bench(args.model, args.layers, int(rows)) for rows in args.rows.split(","))


if __name__ == "__main__":
    sys.exit(main())
