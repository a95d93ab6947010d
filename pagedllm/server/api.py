"""The OpenAI-compatible HTTP API: a FastAPI app over an AsyncEngine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE when stream=true), GET /health,
GET /version, GET /metrics. With an API key, every /v1 route needs `Authorization: Bearer <key>`; /health,
/version and /metrics stay open (as in vLLM), so probes and scrapers need no secret.
Every error is OpenAI's JSON shape; bodies are parsed here so that bad JSON or wrong types are a 400, not a 422.
"""
from __future__ import annotations

import hmac
import json
import logging

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import pagedllm
from pagedllm.engine.async_engine import AsyncEngine, EngineDeadError
from pagedllm.server.context import ServerContext
from pagedllm.server.errors import APIError, bad_request, from_validation_error
from pagedllm.server.prompts import PromptProcessor
from pagedllm.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from pagedllm.server.serving_chat import create_chat_completion
from pagedllm.server.serving_completions import create_completion

logger = logging.getLogger(__name__)

_PROMPT_TYPES = "a string, a list of strings, a list of token ids or a list of token-id lists"


def build_app(engine: AsyncEngine, served_model_name: str | None = None, api_key: str | None = None,
              chat_template: str | None = None) -> FastAPI:
    """The server's FastAPI app; the caller owns the engine (start it before serving, shut it down after)."""
    ctx = ServerContext(engine=engine, prompts=PromptProcessor(engine.tokenizer, engine.max_model_len, chat_template),
                        served_model_name=served_model_name or engine.model_name,
                        model_path=getattr(getattr(engine.engine, "args", None), "model", engine.model_name))
    app = FastAPI(title="pagedllm OpenAI-compatible server", version=pagedllm.__version__)
    app.state.ctx = ctx
    _add_error_handlers(app, engine)

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @v1.get("/models")
    async def list_models() -> JSONResponse:
        card = ModelCard(id=ctx.served_model_name, root=ctx.model_path, max_model_len=engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump())

    @v1.post("/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        return await create_completion(ctx, body, request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            error = engine.dead_error or EngineDeadError("the engine is not running.")
            raise APIError(503, f"The engine is not healthy: {error}", code="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedllm.__version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _parse(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise bad_request(f"The body is not valid JSON: {error}", code="invalid_json") from error
    if not isinstance(data, dict):
        raise bad_request(f"The body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        api_error = from_validation_error(error)
        if api_error.param is not None and api_error.param.startswith("prompt") and "prompt" in data:
            api_error = bad_request(f"prompt must be {_PROMPT_TYPES}.", param="prompt", code="invalid_type")
        raise api_error from error


class _ErrorResponse(JSONResponse):
    """Errors may quote what the client sent, lone surrogates included: escape to ASCII so that any text encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _add_error_handlers(app: FastAPI, engine: AsyncEngine) -> None:
    def respond(error: APIError) -> JSONResponse:
        if error.status >= 400:
            engine.metrics.record_rejected(error.status)
        return _ErrorResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError) -> JSONResponse:
        return respond(error)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_request: Request, error: EngineDeadError) -> JSONResponse:
        return respond(APIError(503, f"The engine is dead and serves no more requests: {error}", code="engine_dead"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return respond(bad_request(f"Invalid request: {error.errors()}", code="invalid_request_body"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return respond(APIError(error.status_code, str(error.detail), code=None))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error while serving a request")
        return respond(APIError(500, f"Internal server error: {type(error).__name__}: {error}", code="internal_error"))
