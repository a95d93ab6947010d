"""The benchmarks' bound (bench/roofline.py): weight bytes of the shipped configs, and the stricter bytes a decode step
reads, which leave out an untied input embedding table (Qwen3-8B) and equal all weights where it is tied (0.6B)."""
from pagedllm.bench.roofline import decode_read_bytes, model_sizes
from pagedllm.config import ModelConfig
from tests.conftest import REPO


def test_weight_bytes_and_bytes_a_decode_step_reads():
    big = ModelConfig.from_path(str(REPO / "benchmarks" / "configs" / "qwen3-8b"))
    small = ModelConfig.from_path(str(REPO / "benchmarks" / "configs" / "qwen3-0.6b"))
    weights, _, kv_per_token = model_sizes(big, 2)
    assert round(weights / 1e9, 2) == 16.38  # Qwen3-8B's 8.19 B parameters in bf16
    assert kv_per_token == 2 * 36 * 8 * 128 * 2
    embedding = 151936 * 4096 * 2
    assert decode_read_bytes(big, 2) == weights - embedding  # untied: the step reads one row of the input table
    assert decode_read_bytes(small, 2) == model_sizes(small, 2)[0]  # tied: the table is the lm_head, read whole


def test_the_workload_bound_on_bytes_read():
    """The stricter bound (bytes a step reads) is tighter only where the input embedding is untied."""
    from pagedllm.bench.roofline import Ceilings, workload_bound_seconds
    from pagedllm.bench.throughput import make_workload
    workload = make_workload()
    prompts, outputs = [len(p) for p in workload.prompts][:64], workload.max_tokens[:64]
    ceilings = Ceilings(bandwidth=4.2e12, matmul_flops=7.9e14)
    for name, tied in (("qwen3-8b", False), ("qwen3-0.6b", True)):
        cfg = ModelConfig.from_path(str(REPO / "benchmarks" / "configs" / name))
        default = workload_bound_seconds(cfg, prompts, outputs, ceilings)
        strict = workload_bound_seconds(cfg, prompts, outputs, ceilings, weight_bytes=decode_read_bytes(cfg, 2))
        assert (strict == default) if tied else (0.85 * default < strict < default), (name, strict, default)


def test_the_bound_without_overlap():
    """KV reads and matmuls one after the other cost more only in steps whose matmuls are compute-bound: never at an
    unbounded matmul rate, a little for Qwen3-8B's 256 requests at an H200's ceilings (its steps above ~190 rows)."""
    from pagedllm.bench.roofline import Ceilings, workload_bound_seconds
    from pagedllm.bench.throughput import make_workload
    workload = make_workload()
    prompts, outputs = [len(p) for p in workload.prompts], workload.max_tokens
    cfg = ModelConfig.from_path(str(REPO / "benchmarks" / "configs" / "qwen3-8b"))
    for rate, low, high in ((1e30, 1.0, 1.0 + 1e-9), (7.9e14, 1.005, 1.05)):
        ceilings = Ceilings(bandwidth=4.2e12, matmul_flops=rate)
        overlapped = workload_bound_seconds(cfg, prompts, outputs, ceilings)
        serial = workload_bound_seconds(cfg, prompts, outputs, ceilings, overlap=False)
        assert low * overlapped <= serial * (1 + 1e-12) and serial <= high * overlapped, (rate, serial, overlapped)
