"""What every endpoint handler needs: the engine, the prompt processor and the served model's name."""
from __future__ import annotations

from dataclasses import dataclass

from pagedllm.engine.async_engine import AsyncEngine
from pagedllm.server.errors import APIError
from pagedllm.server.prompts import PromptProcessor


@dataclass
class ServerContext:
    engine: AsyncEngine
    prompts: PromptProcessor
    served_model_name: str
    model_path: str

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves "
                                f"`{self.served_model_name}`).", param="model", code="model_not_found")

    def check_alive(self) -> None:
        if self.engine.errored:
            raise APIError(503, f"The engine is dead and serves no more requests: {self.engine.dead_error}",
                           code="engine_dead")
