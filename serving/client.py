"""A small Python client for the served application, over HTTP (OpenAI-style) or gRPC.

    with HTTPClient("http://127.0.0.1:8000") as c:
        for piece in c.stream(prompt="Once upon a time", max_tokens=32):
            print(piece, end="")
    with GRPCClient("127.0.0.1:9000") as c:
        print(c.generate(chat="Hi", max_tokens=16).text)

Give exactly one of `prompt` (text), `prompt_token_ids` or `chat` (one user message); `images`
(encoded bytes, shown before the chat's text) go with `chat`. Errors come back as `ServerError`
with the status and the server's message.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from serving import APP_NAME
from serving.proto_gen import llama4_ep_pb2 as pb
from serving.proto_gen import llama4_ep_pb2_grpc


class ServerError(RuntimeError):
    def __init__(self, status: int | str, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


def _one_input(
    prompt: str | None, prompt_token_ids: Sequence[int] | None, chat: str | None, images: Sequence[bytes] = ()
) -> str:
    given = [n for n, v in (("prompt", prompt), ("prompt_token_ids", prompt_token_ids), ("chat", chat)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, prompt_token_ids or chat (got {given or 'none'})")
    if images and given[0] != "chat":
        raise ValueError("images go with a chat message")
    return given[0]


def data_url(image: bytes) -> str:
    """An image's bytes as a base64 `data:` URL (the type read off its first bytes)."""
    kinds = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"), (b"RIFF", "webp"))
    kind = next((k for magic, k in kinds if image.startswith(magic)), "octet-stream")
    media = "application/octet-stream" if kind == "octet-stream" else f"image/{kind}"
    return f"data:{media};base64,{base64.b64encode(image).decode()}"


class HTTPClient:
    """The OpenAI-compatible endpoints; `model` defaults to the one the server lists."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self._model: str | None = None

    def __enter__(self) -> HTTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._check(self.http.get("/v1/models"))["data"][0]["id"]
        return self._model

    def health(self) -> bool:
        return self.http.get("/health").status_code == 200

    def complete(self, **kwargs: Any) -> Completion:
        path, body = self._request(stream=False, **kwargs)
        data = self._check(self.http.post(path, json=body))
        choice = data["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return Completion(text, [], choice["finish_reason"], data["usage"])

    def stream(self, result: Completion | None = None, **kwargs: Any) -> Iterator[str]:
        """Text pieces as they arrive; `result` (if given) collects text, finish reason, usage."""
        result = result if result is not None else Completion()
        path, body = self._request(stream=True, **kwargs)
        with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                r.read()
                self._check(r)
            for data in _sse_data(r.iter_lines()):
                if "error" in data:
                    raise ServerError(data["error"].get("code") or "error", data["error"]["message"])
                if data.get("usage"):
                    result.usage = data["usage"]
                for choice in data["choices"]:
                    piece = choice["delta"].get("content", "") if "delta" in choice else choice["text"]
                    result.text += piece
                    result.finish_reason = choice["finish_reason"] or result.finish_reason
                    if piece:
                        yield piece

    def _request(
        self,
        stream: bool,
        prompt: str | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        chat: str | None = None,
        images: Sequence[bytes] = (),
        **sampling: Any,
    ) -> tuple[str, dict[str, Any]]:
        kind = _one_input(prompt, prompt_token_ids, chat, images)
        body = {"model": self.model, "stream": stream, **{k: v for k, v in sampling.items() if v is not None}}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if kind == "chat":
            content: Any = chat
            if images:
                parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
                content = [*parts, {"type": "text", "text": chat}]
            return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": content}]}
        return "/v1/completions", {**body, "prompt": prompt if kind == "prompt" else list(prompt_token_ids)}

    @staticmethod
    def _check(r: httpx.Response) -> dict[str, Any]:
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = r.text
            raise ServerError(r.status_code, message)
        return r.json()


def _sse_data(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


class GRPCClient:
    """The `llama4_ep.Llama4EP` service through Serve's gRPC proxy."""

    def __init__(self, target: str = "127.0.0.1:9000", application: str = APP_NAME) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = llama4_ep_pb2_grpc.Llama4EPStub(self.channel)
        self.metadata = (("application", application),)

    def __enter__(self) -> GRPCClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def generate(self, **kwargs: Any) -> Completion:
        reply = self._call(self.stub.Generate, kwargs)
        return Completion(reply.text, list(reply.token_ids), reply.finish_reason, _usage(reply.usage))

    def stream(self, result: Completion | None = None, **kwargs: Any) -> Iterator[str]:
        """Text pieces as they arrive; `result` (if given) collects ids, finish reason, usage."""
        result = result if result is not None else Completion()
        try:
            for message in self.stub.GenerateStream(request(**kwargs), metadata=self.metadata):
                if message.HasField("finish"):
                    result.finish_reason = message.finish.finish_reason
                    result.usage = _usage(message.finish.usage)
                    continue
                result.token_ids += message.delta.token_ids
                result.text += message.delta.text
                if message.delta.text:
                    yield message.delta.text
        except grpc.RpcError as e:
            raise ServerError(e.code().name, e.details()) from None

    def _call(self, method: Any, kwargs: dict[str, Any]) -> Any:
        try:
            return method(request(**kwargs), metadata=self.metadata)
        except grpc.RpcError as e:
            raise ServerError(e.code().name, e.details()) from None


def request(
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    chat: str | None = None,
    stop: Sequence[str] | str | None = None,
    images: Sequence[bytes] = (),
    **sampling: Any,
) -> Any:
    """A `GenerateRequest` message; unset sampling fields stay unset (server defaults)."""
    kind = _one_input(prompt, prompt_token_ids, chat, images)
    msg = pb.GenerateRequest(**{k: v for k, v in sampling.items() if v is not None})
    if stop:
        msg.stop.extend([stop] if isinstance(stop, str) else stop)
    if kind == "prompt":
        msg.prompt = prompt
    elif kind == "prompt_token_ids":
        msg.prompt_token_ids.ids.extend(prompt_token_ids)
    elif images:
        parts = [pb.ContentPart(image=image) for image in images] + [pb.ContentPart(text=chat)]
        msg.chat.messages.add(role="user", parts=parts)
    else:
        msg.chat.messages.add(role="user", content=chat)
    return msg


def _usage(u: Any) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
