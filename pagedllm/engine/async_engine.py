"""AsyncEngine: an LLMEngine stepped by one background thread, with asyncio streams of outputs per request.

The synchronous engine is not thread-safe and its steps block, so a single thread owns it: callers send it
commands (add, abort, call) through a queue, and it hands each step's outputs back to the callers' event loops.
Outputs are cumulative, so a consumer that falls behind only ever needs the newest one.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable, Iterable

from pagedllm.engine.metrics import EngineMetrics, FinishedRequest
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's background loop has stopped (a step raised, or it was shut down): nothing more is served."""


@dataclass
class _Add:
    stream: "RequestStream"
    prompt: Any
    params: SamplingParams | BeamSearchParams
    arrival_time: float
    done: concurrent.futures.Future


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    done: concurrent.futures.Future


_STOP = object()


class RequestStream:
    """The outputs of one request, in order; iterate with `async for`. Abort it to stop the request early."""

    def __init__(self, engine: "AsyncEngine", request_id: str, n: int) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._n = n
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        # Engine-thread state (touched only by the engine thread):
        self._last: RequestOutput | None = None
        self._arrival_time = 0.0
        self._first_token_time: float | None = None

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty():  # cumulative outputs: the newest says everything the older ones did
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Stop the request (its KV blocks are freed before the next step); no-op once it has finished."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    """Serves many concurrent asyncio callers from one LLMEngine stepped in a background thread."""

    def __init__(self, engine, start: bool = True) -> None:
        self.engine = engine
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        # The engine thread uses engine.tokenizer; callers (chat templates, echo) get their own copy.
        self.tokenizer = copy.deepcopy(engine.tokenizer) if engine.tokenizer is not None else None
        self.metrics = EngineMetrics(self.model_name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._lock = threading.Lock()  # orders "is it dead?" checks against the thread's death
        self._dead: EngineDeadError | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_engine_args(cls, args, start: bool = True) -> "AsyncEngine":
        from pagedllm.engine.llm_engine import LLMEngine
        return cls(LLMEngine(args), start=start)

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the background loop; requests still in flight fail with EngineDeadError."""
        with self._lock:
            if self._dead is None:
                self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    # -- requests --------------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int] | dict,
                          params: SamplingParams | BeamSearchParams,
                          arrival_time: float | None = None) -> RequestStream:
        """Validate and queue a request (BeamSearchParams: a beam search, whose one output comes when it ends);
        raises ValueError (bad input) or EngineDeadError before returning."""
        stream = RequestStream(self, request_id, params.n)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_Add(stream, prompt, params, time.time() if arrival_time is None else arrival_time, done))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(request_id)  # it may be added after we stopped waiting
            raise
        return stream

    async def generate(self, prompt: str | list[int] | dict, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative RequestOutputs until the request finishes; leaving early aborts the request."""
        stream = await self.add_request(request_id or uuid.uuid4().hex, prompt, params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str | Iterable[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); a live stream ends with finish_reason 'abort'."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        with self._lock:
            if self._dead is None:
                self._commands.put(_Abort(ids))

    async def run_in_engine_thread(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(llm_engine) between two steps, in the engine's own thread, and return its result."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_Call(fn, done))
        return await asyncio.wrap_future(done)

    async def get_stats(self):
        return await self.run_in_engine_thread(lambda engine: engine.get_stats())

    def _send(self, command) -> None:
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if self._thread is None:
                raise EngineDeadError("the engine has not been started (call start()).")
            self._commands.put(command)

    # -- the engine thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._handle_commands(block=not engine.has_unfinished_requests()):
                    self._die(EngineDeadError("the engine was shut down."))
                    return
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                self.metrics.record_stats(engine.get_stats())  # before the outputs: readers see both at once
                self._dispatch(outputs)
                if not outputs and hasattr(engine, "wait_for_work"):
                    engine.wait_for_work()
        except BaseException as error:  # noqa: BLE001 - whatever broke the step, the engine is now unusable
            logger.exception("the engine loop failed; the engine is dead and will serve no more requests")
            self._die(EngineDeadError(f"the engine failed: {type(error).__name__}: {error}"))

    def _handle_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once asked to stop."""
        handled = False
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                if handled:  # the gauges (running, waiting, KV usage) move with adds and aborts too
                    self.metrics.record_stats(self.engine.get_stats())
                return True
            block = False
            handled = True
            if command is _STOP:
                return False
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_ids)
            elif isinstance(command, _Call):
                try:
                    command.done.set_result(command.fn(self.engine))
                except Exception as error:  # noqa: BLE001 - handed to the caller
                    command.done.set_exception(error)

    def _add(self, command: _Add) -> None:
        stream = command.stream
        if stream.request_id in self._streams:
            command.done.set_exception(ValueError(f"request id {stream.request_id!r} is already in use."))
            return
        try:
            add = (self.engine.add_beam_search_request if isinstance(command.params, BeamSearchParams)
                   else self.engine.add_request)
            add(stream.request_id, command.prompt, command.params, command.arrival_time)
        except Exception as error:  # noqa: BLE001 - bad input goes back to its caller, the engine lives on
            command.done.set_exception(error)
            return
        stream._arrival_time = command.arrival_time
        self._streams[stream.request_id] = stream
        command.done.set_result(None)

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        deliveries = []
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                final = _aborted_output(stream)
                self._record_finished(stream, final, "abort")
                deliveries.append((stream, final))
        self._deliver(deliveries)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        deliveries = []
        now = time.time()
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if stream._first_token_time is None and any(c.token_ids for c in output.outputs):
                stream._first_token_time = now
            stream._last = output
            if output.finished:
                del self._streams[output.request_id]
                reasons = [c.finish_reason for c in output.outputs]
                self._record_finished(stream, output, "length" if "length" in reasons else "stop")
            deliveries.append((stream, output))
        self._deliver(deliveries)

    def _record_finished(self, stream: RequestStream, output: RequestOutput | None, reason: str) -> None:
        num_generated = sum(len(c.token_ids) for c in output.outputs) if output is not None else 0
        num_prompt = len(output.prompt_token_ids) if output is not None else 0
        try:
            self.metrics.record_finished(FinishedRequest(reason, num_prompt, num_generated, stream._arrival_time,
                                                         stream._first_token_time, time.time()))
        except Exception:  # noqa: BLE001 - metrics must never take the engine down
            logger.exception("recording request metrics failed")

    def _deliver(self, deliveries: list[tuple[RequestStream, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream._loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # that caller's event loop is closed: nobody is listening

    def _die(self, error: EngineDeadError) -> None:
        with self._lock:
            self._dead = error
        while True:  # fail whatever was queued before the door closed
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, (_Add, _Call)):
                command.done.set_exception(error)
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            self._record_finished(stream, stream._last, "error")
        self._deliver([(stream, error) for stream in streams])


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        stream._queue.put_nowait(item)


def _aborted_output(stream: RequestStream) -> RequestOutput:
    """The final output of an aborted request: what it had so far, with finish_reason 'abort'."""
    last = stream._last
    if last is None:
        outputs = [CompletionOutput(i, "", [], None, None, "abort") for i in range(stream._n)]
        return RequestOutput(stream.request_id, None, [], outputs, finished=True)
    outputs = [c if c.finish_reason is not None else replace(c, finish_reason="abort") for c in last.outputs]
    return replace(last, outputs=outputs, finished=True)
