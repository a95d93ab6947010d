"""The engine on the GPU: greedy outputs close to HF transformers in bf16 (each side's token in the other's top-5 at
the first divergence), CUDA graphs giving exactly the tokens of eager mode, and real architectures' shapes."""
import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.conftest import REPO, STORIES, build_tiny_model, random_prompts

pytestmark = pytest.mark.gpu
MAX_TOKENS = 32


@pytest.fixture(autouse=True)
def free_gpu_memory():
    import gc
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _hf_greedy_with_top5(model, prompt, max_tokens):
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    top5 = [set(s[0].float().log_softmax(-1).topk(5).indices.tolist()) for s in out.scores]
    return tokens, top5


def _check_close(ours, hf_tokens, hf_top5):
    tokens = ours.token_ids
    for i, (a, b) in enumerate(zip(tokens, hf_tokens)):
        if a != b:
            assert a in hf_top5[i], f"position {i}: our token {a} is not in HF's top-5"
            assert b in ours.logprobs[i], f"position {i}: HF's token {b} is not in our top-5"
            return i
    return None


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_models")
    paths = {kind: build_tiny_model(kind, root / kind) for kind in ("qwen3", "llama-gqa", "llama3-mqa")}
    if STORIES.exists():
        paths["stories260K"] = STORIES
    return paths


@pytest.mark.parametrize("kind", ["qwen3", "llama-gqa", "llama3-mqa", "stories260K"])
def test_greedy_close_to_hf_bf16(models, kind):
    if kind not in models:
        pytest.skip("stories260K is not here")
    from transformers import AutoModelForCausalLM
    path = models[kind]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    prompts = random_prompts(6, min_len=1, max_len=200, seed=50)
    llm = LLM(str(path), dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5),
                           use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        hf_tokens, hf_top5 = _hf_greedy_with_top5(hf, prompt, MAX_TOKENS)
        # Random tiny models have near-flat logits, so bf16 rounding may diverge early: only at a near-tie.
        _check_close(output.outputs[0], hf_tokens, hf_top5)


@pytest.mark.parametrize("model", ["qwen3", "qwen3-0.6b-dummy"])
def test_cuda_graphs_equal_eager(models, model):
    if model == "qwen3-0.6b-dummy":
        kwargs = dict(model=str(REPO / "benchmarks" / "configs" / "qwen3-0.6b"), load_format="dummy",
                      max_model_len=2048)
    else:
        kwargs = dict(model=str(models[model]))
    prompts = [{"prompt_token_ids": p} for p in random_prompts(37, min_len=1, max_len=200, seed=51)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=40, ignore_eos=True)
              for i in range(len(prompts))]
    results = []
    for eager in (True, False):
        llm = LLM(skip_tokenizer_init=True, enforce_eager=eager, gpu_memory_utilization=0.3, **kwargs)
        assert (llm.llm_engine.runner.graphs is None) == eager
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_seeded_sampling_alone_equals_in_a_batch(models):
    """Each row's sampling values (temperature, top-p, seed) reach its own row: a seeded request samples the same
    tokens alone as in a batch of requests with other values (fp32, so that batching does not move a logit)."""
    llm = LLM(str(models["qwen3"]), dtype="float32", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
              max_num_seqs=16)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(9, min_len=3, max_len=60, seed=52)]
    params = [SamplingParams(temperature=0.4 + 0.15 * i, top_p=0.9 if i % 2 else 1.0, seed=200 + i, max_tokens=12,
                             ignore_eos=True) if i % 3 else SamplingParams(temperature=0, max_tokens=12,
                                                                           ignore_eos=True)
              for i in range(len(prompts))]
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)]
    assert batch == alone
    assert len({tuple(t) for t in batch}) > 1


def test_memory_planning_fills_the_budget():
    llm = LLM(str(REPO / "benchmarks" / "configs" / "qwen3-0.6b"), load_format="dummy", skip_tokenizer_init=True,
              gpu_memory_utilization=0.5, max_model_len=4096)
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert 0.35 * total < used < 0.55 * total, (used / total)
    out = llm.generate([{"prompt_token_ids": [5] * 1000}] * 8, SamplingParams(max_tokens=16, ignore_eos=True),
                       use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)


def test_no_kernel_compiles_after_start_up(models):
    """Every Triton kernel variant a run needs compiles at start-up (profiling run, graph capture): steps of other
    sizes, mixes of prefill and decode, greedy and sampled batches must not compile one mid-run (each costs about a
    second inside a step)."""
    import importlib
    import pathlib

    import triton

    import pagedllm
    root = pathlib.Path(pagedllm.__file__).parent
    kernels = []  # from the modules themselves: an earlier engine froze the heap out of gc.get_objects()' sight
    for path in root.rglob("*.py"):
        if "@triton.jit" in path.read_text():
            module = importlib.import_module("pagedllm." + ".".join(path.relative_to(root).with_suffix("").parts))
            kernels += [obj for obj in vars(module).values() if isinstance(obj, triton.runtime.JITFunction)
                        and obj.fn.__module__ == module.__name__]
    assert len(kernels) >= 7, [k.fn.__qualname__ for k in kernels]
    for kernel in kernels:  # forget what earlier tests compiled in this process (Triton's disk cache stays)
        kernel.device_caches.clear()

    def compiled() -> dict[str, int]:
        return {f"{k.fn.__module__}.{k.fn.__qualname__}": sum(len(caches[0]) for caches in k.device_caches.values())
                for k in kernels}

    llm = LLM(str(models["qwen3"]), dtype="bfloat16", skip_tokenizer_init=True, gpu_memory_utilization=0.3,
              max_num_seqs=32)
    after_start = compiled()
    prompts = random_prompts(40, 512, 3, 200, seed=3)
    for round, temperature in enumerate((0.0, 0.8, 0.0)):
        params = [SamplingParams(max_tokens=8 + 5 * i % 23, temperature=temperature if i % 3 else 0.0,
                                 ignore_eos=True) for i in range(len(prompts))]
        llm.generate([{"prompt_token_ids": p[:7 + 13 * (i + round) % 190]} for i, p in enumerate(prompts)], params,
                     use_tqdm=False)
    new = {name: n - after_start[name] for name, n in compiled().items() if n != after_start[name]}
    assert not new, f"kernel variants compiled after start-up: {new}"
