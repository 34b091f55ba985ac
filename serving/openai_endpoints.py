"""POST /v1/completions and /v1/chat/completions: requests -> engine jobs -> responses or SSE.

A request becomes one engine job per (prompt, choice): `n` choices of each prompt in a batch of
completions prompts (`best_of` jobs when it asks for more, keeping the `n` with the highest
cumulative logprob). Jobs run concurrently; their deltas are merged as they come. A request
that fails before its first delta gets an ordinary HTTP error; one that fails later gets an SSE
`error` event and `[DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.logits import TokenLogprob
from engine.request import Guided, SamplingParams
from model.image_processing import ProcessedImage
from model.tokenizer import Tokenizer
from serving import openai_protocol as oai
from serving import openai_responses as out
from serving.frontend import Frontend, TextDelta, merge
from serving.metrics import RequestTimer
from serving.multimodal import openai_chat_input
from serving.tool_calls import ToolCallStream, required_schema


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_response(e: oai.APIError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@dataclass
class Job:
    """One engine request: choice `choice_idx` of prompt `prompt_idx`."""

    prompt_idx: int
    choice_idx: int
    prompt_ids: list[int]
    params: SamplingParams
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0
    images: list[ProcessedImage] | None = None  # the prompt's images, already expanded in it
    started: bool = False

    def add(self, d: TextDelta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.prompt_logprobs += d.prompt_logprobs
        self.finish_reason = d.finish_reason or self.finish_reason
        self.num_output_tokens = d.num_output_tokens

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


def _usage(jobs: list[Job]) -> dict[str, int]:
    prompts = {j.prompt_idx: len(j.prompt_ids) for j in jobs}
    return out.usage(sum(prompts.values()), sum(j.num_output_tokens for j in jobs))


class Endpoints:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend
        self.lp = out.LogprobFormatter(frontend.tokenizer)

    def _params(
        self, req: oai.SamplingFields, ids: list[int], max_tokens: int | None, **extra: Any
    ) -> SamplingParams:
        return oai.sampling_params(req, len(ids), self.f.context_length, max_tokens, **extra)

    async def _start(
        self, jobs: list[Job], timer: RequestTimer, rid: str
    ) -> AsyncIterator[tuple[int, TextDelta]]:
        streams = [
            self.f.stream(j.prompt_ids, j.params, timer, rid if len(jobs) == 1 else f"{rid}-{k}", j.images)
            for k, j in enumerate(jobs)
        ]
        return merge(streams)

    async def _collect(self, jobs: list[Job], timer: RequestTimer, rid: str) -> None:
        events = await self._start(jobs, timer, rid)
        async for k, delta in events:
            jobs[k].add(delta)
        timer.finish(200)

    # -- completions -------------------------------------------------------------------

    async def completions(self, raw: bytes, timer: RequestTimer, rid: str) -> Response:
        req = oai.parse_body(oai.CompletionRequest, raw, self.f.spec.strict_requests)
        self.f.check_model(req.model)
        prompts = [oai.prompt_ids(p, self.f.tokenizer) for p in req.prompts]
        texts = [
            p if isinstance(p, str) else self.f.tokenizer.decode(ids)
            for p, ids in zip(req.prompts, prompts, strict=True)
        ]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default
        best_of = req.best_of or req.n
        logprobs = req.logprobs if req.logprobs is not None else (0 if best_of > req.n else None)
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        jobs = [
            Job(p, i, ids, self._params(req, ids, max_tokens, seed=oai.choice_seed(req.seed, i),
                                        logprobs=logprobs, prompt_logprobs=prompt_logprobs))
            for p, ids in enumerate(prompts)
            for i in range(best_of)
        ]  # fmt: skip
        shape = _CompletionShape(self, req, texts, oai.new_id("cmpl"))
        if req.stream:
            return await self._stream(jobs, timer, rid, shape)
        await self._collect(jobs, timer, rid)
        kept = [j for p in range(len(prompts)) for j in _best([j for j in jobs if j.prompt_idx == p], req.n)]
        choices = [shape.whole(j, k) for k, j in enumerate(kept)]
        return JSONResponse(out.completion_response(shape.rid, req.model, choices, _usage(jobs)))

    # -- chat --------------------------------------------------------------------------

    async def chat(self, raw: bytes, timer: RequestTimer, rid: str) -> Response:
        req = oai.parse_body(oai.ChatCompletionRequest, raw, self.f.spec.strict_requests)
        self.f.check_model(req.model)
        ids, images = await self._chat_prompt(req)
        max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
        extra: dict[str, Any] = {"logprobs": (req.top_logprobs or 0) if req.logprobs else None}
        forced = _forced_tool_grammar(req)
        if forced is not None:
            if oai.guided(req) is not None:
                raise oai.invalid(
                    "tool_choice required or named cannot be combined with guided output", "tool_choice"
                )
            extra["guided"] = oai.check_guided(forced, "tools")
        jobs = [
            Job(0, i, ids, self._params(req, ids, max_tokens, seed=oai.choice_seed(req.seed, i), **extra),
                images=images or None)
            for i in range(req.n)
        ]  # fmt: skip
        shape = _ChatShape(self, req, oai.new_id("chatcmpl"))
        if req.stream:
            return await self._stream(jobs, timer, rid, shape)
        await self._collect(jobs, timer, rid)
        choices = [shape.whole(j, k) for k, j in enumerate(jobs)]
        return JSONResponse(out.chat_response(shape.rid, req.model, choices, _usage(jobs)))

    async def _chat_prompt(self, req: oai.ChatCompletionRequest) -> tuple[list[int], list[ProcessedImage]]:
        """The prompt's ids and, when its messages have `image_url` parts, its images (fetched,
        decoded and tiled, the prompt expanded; tools are not rendered for those yet)."""
        if any(m.has_images for m in req.messages):
            return await self.f.images.chat_prompt(openai_chat_input(req), self.f.tokenizer)
        tools = None
        if req.tools_active:
            tools = [
                t.function.model_dump(include={"name", "description", "parameters"}, exclude_none=True)
                for t in req.tools
            ]
        return chat_prompt_ids(self.f.tokenizer, req.messages, tools), []

    # -- streaming ---------------------------------------------------------------------

    async def _stream(
        self, jobs: list[Job], timer: RequestTimer, rid: str, shape: _CompletionShape
    ) -> Response:
        events = await self._start(jobs, timer, rid)
        first = await anext(events)  # an error here is still an ordinary HTTP error response
        return StreamingResponse(
            self._events(first, events, jobs, timer, shape), media_type="text/event-stream"
        )

    async def _events(
        self,
        first: tuple[int, TextDelta],
        rest: AsyncIterator[tuple[int, TextDelta]],
        jobs: list[Job],
        timer: RequestTimer,
        shape: _CompletionShape,
    ) -> AsyncIterator[str]:
        """Server-sent events: the chunks, an optional usage chunk, then `data: [DONE]`."""
        try:
            for chunk in shape.opening(jobs):
                yield sse(chunk)
            for chunk in shape.chunks(jobs[first[0]], first[1]):
                yield sse(chunk)
            async for k, delta in rest:
                for chunk in shape.chunks(jobs[k], delta):
                    yield sse(chunk)
            if shape.req.include_usage:
                yield sse(shape.usage_chunk(_usage(jobs)))
            timer.finish(200)
        except oai.APIError as e:
            timer.finish(e.status)
            yield sse(e.body())
        finally:
            timer.finish("cancelled")  # no-op unless the client went away mid-stream
            await rest.aclose()
        yield sse("[DONE]")


def chat_prompt_ids(
    tokenizer: Tokenizer,
    messages: list[oai.ChatMessage],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Messages (developer as system, assistant tool calls with their JSON arguments) through the
    chat template."""
    entries = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        if m.tool_calls:
            entry["tool_calls"] = [
                _call_arguments(c, f"messages.{i}.tool_calls.{k}") for k, c in enumerate(m.tool_calls)
            ]
        entries.append(entry)
    try:
        return tokenizer.apply_chat_template(entries, add_generation_prompt, tools=tools)
    except ValueError as e:
        raise oai.invalid(f"messages: {e}", param="messages") from None


def _best(group: list[Job], n: int) -> list[Job]:
    """best_of: the n choices with the highest cumulative logprob (in their original order)."""
    if len(group) <= n:
        return group
    keep = set(map(id, sorted(group, key=lambda j: -j.cumulative_logprob)[:n]))
    return [j for j in group if id(j) in keep]


def _call_arguments(call: oai.ToolCall, param: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        raise oai.invalid(f"{param}.function.arguments: not valid JSON", param=param) from None
    if not isinstance(arguments, dict):
        raise oai.invalid(f"{param}.function.arguments: must be a JSON object", param=param)
    return {"name": call.function.name, "arguments": arguments}


def _forced_tool_grammar(req: oai.ChatCompletionRequest) -> Guided | None:
    choice = req.tool_choice
    tools = {t.function.name: t.function.parameters for t in req.tools or ()}
    if isinstance(choice, oai.NamedToolChoice):
        return Guided("json_schema", json.dumps(tools[choice.function.name]))
    if choice == "required":
        return Guided("json_schema", json.dumps(required_schema(list(tools.items()))))
    return None


def _tool_mode(req: oai.ChatCompletionRequest) -> tuple[str | None, str | None]:
    choice = req.tool_choice
    if isinstance(choice, oai.NamedToolChoice):
        return "named", choice.function.name
    if choice == "required":
        return "required", None
    return ("auto", None) if req.tools_active else (None, None)


class _CompletionShape:
    def __init__(self, ep: Endpoints, req: oai.CompletionRequest, prompt_texts: list[str], rid: str) -> None:
        self.ep, self.req, self.texts, self.rid = ep, req, prompt_texts, rid
        self.n = req.n

    def _index(self, job: Job) -> int:
        return job.prompt_idx * self.n + job.choice_idx

    def _logprobs(self, job: Job, entries: list[TokenLogprob], prompt: list, offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        shown = out.shown(entries, job.params.stop_token_ids)
        return self.ep.lp.legacy([*prompt, *shown], job.prompt_ids, offset)

    def whole(self, job: Job, index: int) -> dict[str, Any]:
        echo = self.texts[job.prompt_idx] if self.req.echo else ""
        lp = self._logprobs(job, job.logprobs, job.prompt_logprobs, 0)
        return out.completion_choice(index, echo + job.text, job.finish_reason, lp)

    def opening(self, jobs: list[Job]) -> list[dict[str, Any]]:
        return []

    def chunks(self, job: Job, d: TextDelta) -> list[dict[str, Any]]:
        text = d.text
        if not job.started and self.req.echo:
            text = self.texts[job.prompt_idx] + text
        job.started = True
        job.add(d)
        lp = self._logprobs(job, list(d.logprobs), list(d.prompt_logprobs), 0)
        if not text and lp is None and d.finish_reason is None:
            return []
        choice = out.completion_choice(self._index(job), text, d.finish_reason, lp)
        return [out.completion_chunk(self.rid, self.req.model, [choice])]

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return out.completion_chunk(self.rid, self.req.model, [], use)


class _ChatShape(_CompletionShape):
    def __init__(self, ep: Endpoints, req: oai.ChatCompletionRequest, rid: str) -> None:
        self.ep, self.req, self.rid = ep, req, rid
        self.mode, self.named = _tool_mode(req)
        self.tool_streams: dict[int, ToolCallStream] = {}

    def _logprobs(self, job: Job, entries: list[TokenLogprob]) -> dict | None:
        if not self.req.logprobs:
            return None
        return {"content": self.ep.lp.chat(out.shown(entries, job.params.stop_token_ids)), "refusal": None}

    def whole(self, job: Job, index: int) -> dict[str, Any]:
        content, calls = job.text, []
        if self.mode is not None:
            stream = ToolCallStream(self.mode, self.named)
            shown = stream.feed(job.text)
            rest, calls = stream.finish()
            content = (shown + (rest or "")) or None
        reason = "tool_calls" if calls else job.finish_reason
        return out.chat_choice(index, content, reason, self._logprobs(job, job.logprobs), calls)

    def opening(self, jobs: list[Job]) -> list[dict[str, Any]]:
        deltas = [
            out.chat_delta(j.choice_idx, {"role": "assistant", "content": ""}, None, None) for j in jobs
        ]
        return [out.chat_chunk(self.rid, self.req.model, [d]) for d in deltas]

    def chunks(self, job: Job, d: TextDelta) -> list[dict[str, Any]]:
        job.add(d)
        text, calls = d.text, []
        if self.mode is not None:
            stream = self.tool_streams.setdefault(job.choice_idx, ToolCallStream(self.mode, self.named))
            text = stream.feed(d.text)
            if d.finish_reason is not None:
                rest, calls = stream.finish()
                text += rest or ""
        lp = self._logprobs(job, list(d.logprobs))
        chunks = []
        if text or lp is not None or (d.finish_reason is not None and not calls):
            reason = d.finish_reason if not calls else None
            chunks.append(out.chat_delta(job.choice_idx, {"content": text}, reason, lp))
        if calls:
            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
            chunks.append(out.chat_delta(job.choice_idx, delta, "tool_calls", None))
        return [out.chat_chunk(self.rid, self.req.model, [c]) for c in chunks]

    def usage_chunk(self, use: dict[str, int]) -> dict[str, Any]:
        return out.chat_chunk(self.rid, self.req.model, [], use)
