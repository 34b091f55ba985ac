"""What the HTTP routes and the gRPC service share: the model's name and context, the tokenizer,
the call into the engine deployment, detokenization, and the metrics of every request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from engine.detokenizer import IncrementalDetokenizer
from engine.logits import TokenLogprob
from engine.request import SamplingParams
from model.config import ModelConfig
from model.image_processing import ImageProcessor, ProcessedImage
from model.tokenizer import Tokenizer
from serving.engine_server import EngineFailure, EngineServer
from serving.media import MediaConfig
from serving.metrics import RequestTimer, ServingMetrics
from serving.multimodal import ImageInputs
from serving.openai_protocol import APIError, invalid, new_id, queue_full, unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0  # health and metrics calls to the engine replicas


@dataclass(frozen=True)
class IngressSpec:
    model_dir: str
    served_model_name: str
    api_key: str | None = None  # None: no authentication
    strict_requests: bool = False  # unknown request fields: 400 instead of a warning
    allowed_origins: tuple[str, ...] = ()  # CORS; () is off, ("*",) any origin
    media: MediaConfig = MediaConfig()  # where images may come from, and how many and how large


@dataclass(frozen=True)
class TextDelta:
    """One step's worth of a request's output, as the client sees it."""

    token_ids: tuple[int, ...]
    text: str  # may be "" while a multi-byte character or a possible stop string is held back
    finish_reason: str | None  # set on the last delta only
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when asked for
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


class EngineCall(Protocol):
    """One request's stream from the engine: `RequestOutput`s, or one `EngineFailure`."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> None: ...


class EngineCalls(Protocol):
    """How the ingress reaches its engine: one stream per request, and a call to every replica."""

    def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str, images: list[ProcessedImage] | None
    ) -> EngineCall: ...

    async def broadcast(self, method: str) -> list[Any]:
        """`EngineServer.<method>()` of every engine replica: its result, or its exception."""
        ...


class HandleCalls:
    """The engine deployment's replicas, other Ray actors, through its Serve handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.streaming = handle.options(stream=True)

    def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str, images: list[ProcessedImage] | None
    ) -> EngineCall:
        extra = {"images": images} if images else {}
        return self.streaming.generate.remote(prompt, params, request_id, **extra)

    async def broadcast(self, method: str) -> list[Any]:
        try:
            response = self.handle.broadcast(method)
            return await response.results_async(timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True)
        except Exception as e:
            log.warning("engine %s call failed: %s", method, e)
            return []


class LocalCalls:
    """An engine server in the ingress's own replica (the colocated layout): the same calls
    without a Ray hop, so no message per token between two processes."""

    def __init__(self, server: EngineServer) -> None:
        self.server = server

    def generate(
        self, prompt: list[int], params: SamplingParams, request_id: str, images: list[ProcessedImage] | None
    ) -> EngineCall:
        return _LocalCall(self.server.generate(prompt, params, request_id, images))

    async def broadcast(self, method: str) -> list[Any]:
        try:
            result = getattr(self.server, method)()
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, CONTROL_TIMEOUT_S)
            return [result]
        except Exception as e:
            return [e]


class _LocalCall:
    def __init__(self, outputs: AsyncIterator[Any]) -> None:
        self._outputs = outputs
        self._closing: asyncio.Task | None = None  # held: the loop keeps only weak references

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._outputs

    def cancel(self) -> None:
        """Close the engine server's stream (that aborts the request and frees its blocks)."""
        self._closing = asyncio.get_running_loop().create_task(self._outputs.aclose())


class Frontend:
    def __init__(self, engine: EngineCalls, spec: IngressSpec) -> None:
        self.engine = engine
        self.tokenizer = Tokenizer(spec.model_dir)
        self.context_length = ModelConfig.from_file(Path(spec.model_dir)).max_position_embeddings
        self.model = spec.served_model_name
        self.spec = spec
        self.metrics = ServingMetrics(self.model)
        self.images = ImageInputs(ImageProcessor.for_checkpoint(spec.model_dir), spec.media)

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise invalid(
                f"model {name!r} is not served here; the model is {self.model!r} (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    async def stream(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        timer: RequestTimer,
        request_id: str | None = None,
        images: list[ProcessedImage] | None = None,
    ) -> AsyncIterator[TextDelta]:
        """Text deltas of one request. Errors before the first delta raise `APIError`; a consumer
        that stops early cancels the engine call (the engine aborts the request)."""
        request_id = request_id or new_id("req")
        log.info(
            "request %s: %d prompt tokens, max_tokens %d",
            request_id,
            len(prompt_token_ids),
            params.max_tokens,
        )
        call = self.engine.generate(prompt_token_ids, params, request_id, images)
        text = IncrementalDetokenizer(self.tokenizer, params.stop)
        finished = admitted = False
        items = _engine_items(call)
        try:
            async for item in items:
                if isinstance(item, EngineFailure):
                    raise _failure_error(item, request_id)
                if not admitted:
                    timer.admitted(item.num_prompt_tokens)
                    admitted = True
                timer.tokens(item.new_token_ids)
                finished = item.finished
                shown = item.new_token_ids
                if finished and shown and shown[-1] in params.stop_token_ids and not params.ignore_eos:
                    shown = shown[:-1]  # the stop token that ended it is not part of the text
                delta = text.add(shown, final=finished)
                reason = (item.finish_reason.value if item.finish_reason else "stop") if finished else None
                if finished:
                    timer.engine_finished(reason, item.num_output_tokens)
                yield TextDelta(
                    item.new_token_ids,
                    delta,
                    reason,
                    item.num_prompt_tokens,
                    item.num_output_tokens,
                    item.logprobs,
                    item.prompt_logprobs,
                )
        finally:
            await items.aclose()
            if not finished:
                _cancel(call)

    async def engine_snapshots(self) -> list[dict[str, Any]]:
        """`EngineServer.metrics()` of every engine replica (those that answer in time)."""
        results = await self.engine.broadcast("metrics")
        return [r for r in results if isinstance(r, dict)]

    async def engine_alive(self) -> bool:
        """True when there is an engine replica and every one of them runs its step loop."""
        results = await self.engine.broadcast("is_alive")
        return bool(results) and all(r is True for r in results)


async def _engine_items(call: Any) -> AsyncIterator[Any]:
    """The engine deployment's stream, with Serve's own refusals turned into API errors."""
    try:
        async for item in call:
            yield item
    except BackPressureError as e:
        raise queue_full(f"the engine's queue is full; retry later ({e.message})") from None
    except (DeploymentUnavailableError, RayActorError) as e:
        log.warning("the engine is unavailable: %s", e)
        raise unavailable("the engine is unavailable; retry later") from None


async def merge(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """(index of the stream, item) from several streams as their items arrive. The first error
    of any stream is raised; closing the merge closes every stream (cancelling their requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async with aclosing(stream):
                async for item in stream:
                    await queue.put((i, item, None))
        except Exception as e:
            await queue.put((i, None, e))
        finally:
            await queue.put((i, None, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, error = await queue.get()
            if error is done:
                remaining -= 1
            elif error is not None:
                raise error
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _cancel(call: Any) -> None:
    """Stop the engine call (it aborts the request); a call Serve refused has nothing to stop."""
    try:
        call.cancel()
    except Exception as e:
        log.debug("cancel after %s: nothing to cancel", type(e).__name__)


def _failure_error(failure: EngineFailure, request_id: str) -> APIError:
    """The client's error for an engine failure: our own words, internals only in the log."""
    if failure.kind == "queue_full":
        return queue_full(failure.message)
    if failure.kind == "engine_dead":
        log.warning("request %s: %s", request_id, failure.message)
        return unavailable(f"the engine is not running; retry later (request id {request_id})")
    return invalid(failure.message)
