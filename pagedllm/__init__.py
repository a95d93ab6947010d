"""pagedllm: a high-throughput, memory-efficient LLM inference and serving engine built on PagedAttention."""
from pagedllm.config import EngineArgs
from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Heavy parts load on first use, so `import pagedllm` stays light.
    if name == "LLM":
        from pagedllm.llm import LLM
        return LLM
    if name == "LLMEngine":
        from pagedllm.engine.llm_engine import LLMEngine
        return LLMEngine
    if name == "AsyncEngine":
        from pagedllm.engine.async_engine import AsyncEngine
        return AsyncEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncEngine", "EngineArgs", "SamplingParams", "StructuredOutputsParams",
           "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
