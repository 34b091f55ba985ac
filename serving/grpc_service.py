"""The gRPC service `llama4_ep.Llama4EP` (proto/llama4_ep.proto), behind Serve's gRPC proxy.

Requests are checked by the same rules as the HTTP ones (the proto message becomes the same
validated fields). A bad request is INVALID_ARGUMENT, a full queue RESOURCE_EXHAUSTED, a dead
engine UNAVAILABLE, each with a message saying why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from serving import openai_protocol as oai
from serving.frontend import Frontend, TextDelta
from serving.metrics import RequestTimer
from serving.multimodal import ChatInput, ImageSource
from serving.proto_gen import llama4_ep_pb2 as pb

SERVICER_FUNCTION = "serving.proto_gen.llama4_ep_pb2_grpc.add_Llama4EPServicer_to_server"
DEFAULT_MAX_TOKENS = 16
_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed")
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class GrpcAbort(Exception):
    """Raised after the status is set on the context; Serve's proxy answers with that status."""


def status_code(e: oai.APIError) -> grpc.StatusCode:
    return _CODES.get(e.status, grpc.StatusCode.INTERNAL)


def fields(request: pb.GenerateRequest, model: str) -> oai.SamplingFields:
    """The proto's sampling fields, validated like an HTTP request's. Unset optional fields take
    the defaults, except temperature: 0 (greedy), as with the command line."""
    data: dict[str, Any] = {"model": model, "temperature": 0.0, "ignore_eos": request.ignore_eos}
    for name in _OPTIONAL:
        if request.HasField(name):
            data[name] = getattr(request, name)
    if request.stop:
        data["stop"] = list(request.stop)
    return oai.validate(oai.SamplingFields, data)


def prompt_token_ids(request: pb.GenerateRequest, frontend: Frontend) -> list[int]:
    kind = request.WhichOneof("input")
    tokenizer = frontend.tokenizer
    if kind == "prompt":
        return tokenizer.encode(request.prompt)
    if kind == "prompt_token_ids":
        if not request.prompt_token_ids.ids:
            raise oai.invalid("prompt_token_ids: give at least one id", param="prompt_token_ids")
        return oai.check_token_ids(request.prompt_token_ids.ids, tokenizer.vocab_size, "prompt_token_ids")
    if kind == "chat":
        messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
        try:
            return tokenizer.apply_chat_template(messages)
        except ValueError as e:
            raise oai.invalid(f"chat: {e}", param="chat") from None
    raise oai.invalid("set one of prompt, prompt_token_ids or chat", param="input")


async def prompt_inputs(request: pb.GenerateRequest, frontend: Frontend) -> tuple[list[int], list]:
    """The prompt's ids and its images (a chat whose messages have image parts)."""
    if request.WhichOneof("input") == "chat" and any(m.parts for m in request.chat.messages):
        return await frontend.images.chat_prompt(chat_input(request.chat), frontend.tokenizer)
    return prompt_token_ids(request, frontend), []


def chat_input(chat: pb.Chat) -> ChatInput:
    """A chat's messages with their parts in order; images as bytes or URLs."""
    messages, images = [], []
    for i, m in enumerate(chat.messages):
        if not m.parts:
            messages.append({"role": m.role, "content": m.content})
            continue
        if m.content:
            raise oai.invalid(
                f"chat.messages.{i}: give content or parts, not both", param=f"chat.messages.{i}"
            )
        parts = []
        for j, part in enumerate(m.parts):
            kind, param = part.WhichOneof("part"), f"chat.messages.{i}.parts.{j}"
            if kind == "text":
                parts.append({"type": "text", "text": part.text})
            elif kind in ("image", "image_url"):
                src = (
                    ImageSource(param, data=part.image)
                    if kind == "image"
                    else ImageSource(param, url=part.image_url)
                )
                images.append(src)
                parts.append({"type": "image"})
            else:
                raise oai.invalid(f"{param}: set one of text, image or image_url", param=param)
        messages.append({"role": m.role, "content": parts})
    return ChatInput(messages, images)


def _usage(delta: TextDelta) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=delta.num_prompt_tokens,
        completion_tokens=delta.num_output_tokens,
        total_tokens=delta.num_prompt_tokens + delta.num_output_tokens,
    )


class GrpcService:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend

    async def _start(self, request: pb.GenerateRequest, timer: RequestTimer) -> AsyncIterator[TextDelta]:
        sampling = fields(request, self.f.model)
        ids, images = await prompt_inputs(request, self.f)
        max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS
        params = oai.sampling_params(sampling, len(ids), self.f.context_length, max_tokens)
        return self.f.stream(ids, params, timer, images)

    async def generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        timer = self.f.metrics.request("grpc.Generate")
        try:
            text, ids, last = "", [], None
            async for last in await self._start(request, timer):
                text += last.text
                ids += last.token_ids
        except oai.APIError as e:
            _set_status(context, e, timer)
            return pb.GenerateResponse()  # the status set on the context is what the client gets
        timer.finish(grpc.StatusCode.OK.name)
        return pb.GenerateResponse(
            request_id=request.request_id,
            text=text,
            token_ids=ids,
            finish_reason=last.finish_reason,
            usage=_usage(last),
        )

    async def generate_stream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        timer = self.f.metrics.request("grpc.GenerateStream")
        rid = request.request_id
        try:
            async for delta in await self._start(request, timer):
                yield pb.GenerateStreamResponse(
                    request_id=rid, delta=pb.TokenDelta(token_ids=delta.token_ids, text=delta.text)
                )
                last = delta
        except oai.APIError as e:
            _set_status(context, e, timer)
            # a stream carries the context's status only with a message or an exception
            raise GrpcAbort(e.message) from None
        timer.finish(grpc.StatusCode.OK.name)
        finish = pb.Finish(finish_reason=last.finish_reason, usage=_usage(last))
        yield pb.GenerateStreamResponse(request_id=rid, finish=finish)


def _set_status(context: Any, e: oai.APIError, timer: RequestTimer) -> None:
    code = status_code(e)
    timer.finish(code.name)
    context.set_code(code)
    context.set_details(e.message)
