"""The gRPC service `llama4_ep.Llama4EP` (proto/llama4_ep.proto) and `grpc.health.v1.Health`,
behind Serve's gRPC proxy.

Requests are checked by the same rules as the HTTP ones (the proto message becomes the same
validated fields). A bad request is INVALID_ARGUMENT with a google.rpc.BadRequest naming the
field, a missing or wrong API key UNAUTHENTICATED, a full queue RESOURCE_EXHAUSTED with a
google.rpc.RetryInfo, a dead engine UNAVAILABLE, each with a message saying why.

Deadlines: when the client's deadline passes, gRPC cancels the call; Serve's proxy cancels the
ingress call, which cancels the engine call, which aborts the request and frees its KV blocks
(the client sees DEADLINE_EXCEEDED). Serve's context does not expose `time_remaining()`; where a
context does, the generation is also cut at the deadline here, with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from engine.logits import TokenLogprob
from serving import openai_protocol as oai
from serving.frontend import Frontend, TextDelta, merge
from serving.metrics import RequestTimer
from serving.multimodal import ChatInput, ImageSource
from serving.openai_responses import LogprobFormatter, shown
from serving.proto_gen import llama4_ep_pb2 as pb

SERVICER_FUNCTION = "serving.proto_gen.llama4_ep_pb2_grpc.add_Llama4EPServicer_to_server"
HEALTH_SERVICER_FUNCTION = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
SERVICER_FUNCTIONS = (SERVICER_FUNCTION, HEALTH_SERVICER_FUNCTION)
SERVICE_NAME = "llama4_ep.Llama4EP"
DEFAULT_MAX_TOKENS = 16
HEALTH_WATCH_INTERVAL_S = 5.0
_OPTIONAL = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "n",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
)  # fmt: skip
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
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
    if request.stop_token_ids:
        data["stop_token_ids"] = list(request.stop_token_ids)
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


def _usage(prompt_tokens: int, completion_tokens: int) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class _Choice:
    def __init__(self) -> None:
        self.text, self.ids, self.logprobs = "", [], []
        self.finish_reason, self.num_output_tokens, self.num_prompt_tokens = "", 0, 0

    def add(self, d: TextDelta) -> None:
        self.text += d.text
        self.ids += d.token_ids
        self.logprobs += d.logprobs
        self.finish_reason = d.finish_reason or self.finish_reason
        self.num_output_tokens, self.num_prompt_tokens = d.num_output_tokens, d.num_prompt_tokens


class GrpcService:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend
        self.lp = LogprobFormatter(frontend.tokenizer)

    async def _start(
        self, request: pb.GenerateRequest, context: Any, timer: RequestTimer
    ) -> AsyncIterator[tuple[int, TextDelta]]:
        self._authorize(context)
        sampling = fields(request, self.f.model)
        ids, images = await prompt_inputs(request, self.f)
        max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS
        logprobs = request.logprobs if request.HasField("logprobs") else None
        rid = request.request_id or oai.new_id("req")
        streams = []
        for i in range(sampling.n):
            seed = oai.choice_seed(sampling.seed, i)
            params = oai.sampling_params(
                sampling, len(ids), self.f.context_length, max_tokens, seed=seed, logprobs=logprobs
            )
            streams.append(
                self.f.stream(ids, params, timer, rid if sampling.n == 1 else f"{rid}-{i}", images)
            )
        return _within_deadline(merge(streams), context)

    def _authorize(self, context: Any) -> None:
        key = self.f.spec.api_key
        if not key:
            return
        metadata = dict(context.invocation_metadata() or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise oai.APIError(
                401, "missing or wrong API key: send the metadata `authorization: Bearer <key>`"
            )

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
        return [
            pb.TokenLogprob(
                token_id=e.token_id, logprob=e.logprob, rank=e.rank, token=self.lp.token(e.token_id),
                top=[pb.TopLogprob(token_id=i, logprob=lp, token=self.lp.token(i)) for i, lp in e.top],
            )
            for e in shown(entries, ())
        ]  # fmt: skip

    async def generate(self, request: pb.GenerateRequest, context: Any) -> pb.GenerateResponse:
        timer = self.f.metrics.request("grpc.Generate")
        choices: dict[int, _Choice] = {}
        try:
            async for i, delta in await self._start(request, context, timer):
                choices.setdefault(i, _Choice()).add(delta)
        except oai.APIError as e:
            _set_status(context, e, timer)
            return pb.GenerateResponse()  # the status set on the context is what the client gets
        timer.finish(grpc.StatusCode.OK.name)
        ordered = [choices[i] for i in sorted(choices)]
        messages = [
            pb.Choice(
                index=i,
                text=c.text,
                token_ids=c.ids,
                finish_reason=c.finish_reason,
                logprobs=self._logprobs(c.logprobs),
            )
            for i, c in enumerate(ordered)
        ]
        first = ordered[0]
        return pb.GenerateResponse(
            request_id=request.request_id,
            text=first.text,
            token_ids=first.ids,
            finish_reason=first.finish_reason,
            usage=_usage(first.num_prompt_tokens, sum(c.num_output_tokens for c in ordered)),
            logprobs=messages[0].logprobs,
            choices=messages,
        )

    async def generate_stream(
        self, request: pb.GenerateRequest, context: Any
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        timer = self.f.metrics.request("grpc.GenerateStream")
        rid = request.request_id
        choices: dict[int, _Choice] = {}
        try:
            async for i, delta in await self._start(request, context, timer):
                choices.setdefault(i, _Choice()).add(delta)
                token_delta = pb.TokenDelta(
                    token_ids=delta.token_ids,
                    text=delta.text,
                    logprobs=self._logprobs(delta.logprobs),
                    index=i,
                )
                yield pb.GenerateStreamResponse(request_id=rid, delta=token_delta)
        except oai.APIError as e:
            _set_status(context, e, timer)
            # a stream carries the context's status only with a message or an exception
            raise GrpcAbort(e.message) from None
        timer.finish(grpc.StatusCode.OK.name)
        ordered = [choices[i] for i in sorted(choices)]
        reasons = [c.finish_reason for c in ordered]
        use = _usage(ordered[0].num_prompt_tokens, sum(c.num_output_tokens for c in ordered))
        finish = pb.Finish(finish_reason=reasons[0], usage=use, finish_reasons=reasons)
        yield pb.GenerateStreamResponse(request_id=rid, finish=finish)

    # -- grpc.health.v1 ------------------------------------------------------------------

    async def _health(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", SERVICE_NAME):
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {request.service!r}; this server has {SERVICE_NAME!r}")
            return health_pb2.HealthCheckResponse()
        alive = await self.f.engine_alive()
        status = (
            health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    async def health_check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        return await self._health(request, context)

    async def health_list(self, request: Any, context: Any) -> health_pb2.HealthListResponse:
        check = await self._health(health_pb2.HealthCheckRequest(service=""), context)
        return health_pb2.HealthListResponse(statuses={"": check, SERVICE_NAME: check})

    async def health_watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> AsyncIterator[Any]:
        """The status now, then again whenever it changes (checked every few seconds)."""
        last = None
        while True:
            reply = await self._health(request, context)
            if reply.status != last:
                last = reply.status
                yield reply
            if request.service not in ("", SERVICE_NAME):
                return
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)


async def _within_deadline(events: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    """The events, cut at the client's deadline when the context tells it."""
    remaining = getattr(context, "time_remaining", None)
    left = remaining() if callable(remaining) else None
    try:
        if left is None:
            async for item in events:
                yield item
            return
        async with asyncio.timeout(max(left, 0.0)):
            async for item in events:
                yield item
    except TimeoutError:
        raise oai.APIError(
            504, "the deadline passed before the generation finished; it was aborted"
        ) from None
    finally:
        await events.aclose()


def _set_status(context: Any, e: oai.APIError, timer: RequestTimer) -> None:
    """The status code and details, plus the rich error details (google.rpc.Status) in the
    trailing metadata: BadRequest for a bad field, RetryInfo when the client should retry."""
    code = status_code(e)
    timer.finish(code.name)
    context.set_code(code)
    context.set_details(e.message)
    details = []
    if e.retry_after_s:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=e.retry_after_s))
        details.append(_pack(info))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = error_details_pb2.BadRequest.FieldViolation(field=e.param or "", description=e.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if details:
        rich = status_pb2.Status(code=getattr(code_pb2, code.name), message=e.message, details=details)
        context.set_trailing_metadata(list(rpc_status.to_status(rich).trailing_metadata))


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
