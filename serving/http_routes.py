"""The OpenAI-compatible HTTP routes of the ingress.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics.
Errors are OpenAI-style bodies; a streamed request that fails before its first token gets the
error as an ordinary HTTP response, one that fails later gets an SSE `error` event and `[DONE]`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.request import SamplingParams
from serving import openai_protocol as oai
from serving.frontend import Frontend, TextDelta
from serving.metrics import CONTENT_TYPE, RequestTimer
from serving.multimodal import openai_chat_input

Handler = Callable[[Request], Awaitable[Response]]


def error_response(e: oai.APIError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class OpenAIRoutes:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend
        self.routes: dict[str, tuple[str, Handler]] = {
            "/v1/models": ("GET", self.models),
            "/v1/completions": ("POST", self.completions),
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/health": ("GET", self.health),
            "/metrics": ("GET", self.metrics),
        }
        self.created = int(time.time())

    async def handle(self, request: Request) -> Response:
        path = _app_path(request)
        route = self.routes.get(path)
        if route is None:
            return error_response(oai.APIError(404, f"no route {path}", code="not_found"))
        method, handler = route
        if request.method != method:
            return error_response(oai.APIError(405, f"{path} takes {method}, not {request.method}"))
        return await handler(request)

    async def models(self, request: Request) -> Response:
        return JSONResponse(oai.model_list(self.f.model, self.created))

    async def health(self, request: Request) -> Response:
        alive = await self.f.engine_alive()
        return Response(status_code=200) if alive else error_response(oai.unavailable("the engine is down"))

    async def metrics(self, request: Request) -> Response:
        return Response(self.f.metrics.render(await self.f.engine_snapshots()), media_type=CONTENT_TYPE)

    async def completions(self, request: Request) -> Response:
        timer = self.f.metrics.request("completions")
        try:
            req = oai.parse_body(oai.CompletionRequest, await request.body())
            self.f.check_model(req.model)
            ids = oai.completion_prompt(req, self.f.tokenizer)
            max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
            params = oai.sampling_params(req, len(ids), self.f.context_length, max_tokens)
            return await self._respond(
                req, ids, params, timer, _CompletionShape(oai.new_id("cmpl"), req.model)
            )
        except oai.APIError as e:
            timer.finish(e.status)
            return error_response(e)

    async def chat_completions(self, request: Request) -> Response:
        timer = self.f.metrics.request("chat_completions")
        try:
            req = oai.parse_body(oai.ChatCompletionRequest, await request.body())
            self.f.check_model(req.model)
            ids, images = await self._chat_prompt(req)
            max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
            params = oai.sampling_params(req, len(ids), self.f.context_length, max_tokens)
            shape = _ChatShape(oai.new_id("chatcmpl"), req.model)
            return await self._respond(req, ids, params, timer, shape, images)
        except oai.APIError as e:
            timer.finish(e.status)
            return error_response(e)

    async def _chat_prompt(self, req: oai.ChatCompletionRequest) -> tuple[list[int], list]:
        """The prompt's ids and, when its messages have `image_url` parts, its images."""
        if not any(m.has_images for m in req.messages):
            return oai.chat_prompt(req, self.f.tokenizer), []
        return await self.f.images.chat_prompt(openai_chat_input(req), self.f.tokenizer)

    async def _respond(
        self,
        req: oai.SamplingFields,
        ids: list[int],
        params: SamplingParams,
        timer: RequestTimer,
        shape: _CompletionShape,
        images: list | None = None,
    ) -> Response:
        deltas = self.f.stream(ids, params, timer, images)
        first = await anext(deltas)  # an error here is still an ordinary HTTP error response
        if req.stream:
            events = _events(first, deltas, shape, req.include_usage, timer)
            return StreamingResponse(events, media_type="text/event-stream")
        text, last = first.text, first
        async for last in deltas:
            text += last.text
        timer.finish(200)
        use = oai.usage(last.num_prompt_tokens, last.num_output_tokens)
        return JSONResponse(shape.response(text, last.finish_reason, use))


async def _events(
    first: TextDelta,
    rest: AsyncIterator[TextDelta],
    shape: _CompletionShape,
    include_usage: bool,
    timer: RequestTimer,
) -> AsyncIterator[str]:
    """Server-sent events: the chunks, an optional usage chunk, then `data: [DONE]`."""
    last = first
    try:
        for chunk in shape.opening():
            yield _sse(chunk)
        yield _sse(shape.chunk(first.text, first.finish_reason))
        async for last in rest:
            yield _sse(shape.chunk(last.text, last.finish_reason))
        if include_usage:
            yield _sse(shape.usage_chunk(oai.usage(last.num_prompt_tokens, last.num_output_tokens)))
        timer.finish(200)
    except oai.APIError as e:
        timer.finish(e.status)
        yield _sse(e.body())
    finally:
        timer.finish("cancelled")  # no-op unless the client went away mid-stream
        await rest.aclose()
    yield _sse("[DONE]")


class _CompletionShape:
    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model = rid, model

    def opening(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return oai.completion_chunk(self.rid, self.model, text, finish_reason)

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return oai.completion_chunk(self.rid, self.model, "", None, use)

    def response(self, text: str, finish_reason: str | None, use: dict[str, int]) -> dict[str, Any]:
        return oai.completion_response(self.rid, self.model, text, finish_reason, use)


class _ChatShape(_CompletionShape):
    def opening(self) -> list[dict[str, Any]]:
        return [oai.chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""}, None)]

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return oai.chat_chunk(self.rid, self.model, {"content": text}, finish_reason)

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return oai.chat_chunk(self.rid, self.model, {}, None, use)

    def response(self, text: str, finish_reason: str | None, use: dict[str, int]) -> dict[str, Any]:
        return oai.chat_response(self.rid, self.model, text, finish_reason, use)


def _app_path(request: Request) -> str:
    """The path inside the application (Serve mounts it at its route prefix)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")
