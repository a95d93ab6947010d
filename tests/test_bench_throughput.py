"""`pagedllm bench throughput`: the reference workload's shape, the printed figures and the JSON, HF side by side."""
import json
import subprocess
import sys

from pagedllm.bench.throughput import REFERENCE_TOTAL_OUTPUT_TOKENS, make_workload


def test_reference_workload_is_reproduced():
    workload = make_workload()
    assert len(workload.prompts) == 256
    assert workload.total_output_tokens == REFERENCE_TOTAL_OUTPUT_TOKENS
    assert all(100 <= len(p) <= 1024 for p in workload.prompts)


def test_bench_throughput_reports_waste_and_hf_ratios(tiny_llama, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, "-m", "pagedllm.cli", "bench", "throughput", "--model", str(tiny_llama), "--dtype", "float32",
         "--device", "cpu", "--max-model-len", "256", "--num-requests", "6", "--min-input-len", "5",
         "--max-input-len", "40", "--min-output-len", "4", "--max-output-len", "12", "--vocab-limit", "500",
         "--bandwidth", "1e10", "--matmul-flops", "1e11", "--compare-hf", "--hf-num-requests", "3",
         "--hf-batch-size", "3", "--step-trace", "--output-json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    expected = make_workload(6, 5, 40, 4, 12, 500)
    assert figures["output_tokens"] == expected.total_output_tokens and not figures["reference_workload"]
    assert figures["output_tok_s"] > 0 and 0 < figures["efficiency"]
    # the bound with KV reads and matmuls one after the other: never above the roofline (test_roofline.py has more)
    assert figures["serial_bound_tok_s"] <= figures["bound_tok_s"] and "one after the other" in result.stdout
    assert figures["bandwidth_gb_s"] == 10 and figures["matmul_tflops"] == 0.1
    assert 0 < figures["kv_fragmentation"] < figures["kv_waste_if_contiguous"] < 1
    assert figures["hf_requests"] == 3 and figures["hf_generate_tok_s"] > 0
    assert figures["hf_generate_ratio"] == figures["output_tok_s"] / figures["hf_generate_tok_s"]
    phases = figures["phases"]  # every decode token but each request's first (its prefill's) is in a decode step
    assert phases[0]["phase"] == "with prefill" and all(p["phase"].startswith("decode batch") for p in phases[1:])
    assert sum(p["tokens"] for p in phases) == expected.total_output_tokens - 6
    # the trace runs from the first schedule to the end of the timed run: all of it but the requests' admission
    assert 0.5 * figures["seconds"] < sum(p["seconds"] for p in phases) <= figures["seconds"]
    assert all(0 < p["bound_seconds"] for p in phases) and "bound ms/step" in result.stdout
    assert figures["first_steps"][0][1] > 0 and "first steps (ms, prefill tokens, decodes)" in result.stdout
    assert "KV waste:" in result.stdout and "HF generate (padded batches, 3 requests)" in result.stdout
