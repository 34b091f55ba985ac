"""OpenAI-style response bodies: completions and chat, whole and streamed, with their logprobs.

Plain dicts in the shapes the `openai` client parses. Logprobs come in OpenAI's two layouts:
the legacy completions one (parallel lists `tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`) and the chat one (a list of `{token, logprob, bytes, top_logprobs}`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from engine.logits import TokenLogprob
from model.tokenizer import Tokenizer


def usage(num_prompt_tokens: int, num_output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_output_tokens,
        "total_tokens": num_prompt_tokens + num_output_tokens,
    }


def model_card(model_id: str, created: int, context_length: int) -> dict[str, Any]:
    return {
        "id": model_id, "object": "model", "created": created, "owned_by": "llama4-ep",
        "max_model_len": context_length,
    }  # fmt: skip


def model_list(model_id: str, created: int, context_length: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model_id, created, context_length)]}


def _envelope(
    rid: str, obj: str, model: str, choices: list[dict[str, Any]], use: dict | None
) -> dict[str, Any]:
    return {
        "id": rid, "object": obj, "created": int(time.time()), "model": model,
        "choices": choices, "usage": use,
    }  # fmt: skip


def completion_response(
    rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]
) -> dict[str, Any]:
    return _envelope(rid, "text_completion", model, choices, use)


def completion_choice(
    index: int, text: str, finish_reason: str | None, logprobs: dict | None
) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def completion_chunk(
    rid: str, model: str, choices: list[dict[str, Any]], use: dict | None = None
) -> dict[str, Any]:
    return _envelope(rid, "text_completion", model, choices, use)


def chat_response(rid: str, model: str, choices: list[dict[str, Any]], use: dict[str, int]) -> dict[str, Any]:
    return _envelope(rid, "chat.completion", model, choices, use)


def chat_choice(
    index: int,
    content: str | None,
    finish_reason: str | None,
    logprobs: dict | None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_chunk(
    rid: str, model: str, choices: list[dict[str, Any]], use: dict | None = None
) -> dict[str, Any]:
    return _envelope(rid, "chat.completion.chunk", model, choices, use)


def chat_delta(
    index: int, delta: dict[str, Any], finish_reason: str | None, logprobs: dict | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}


# -- logprobs ---------------------------------------------------------------------------


class LogprobFormatter:
    """Token ids -> the strings clients see, and the two logprob layouts."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def legacy(
        self, entries: Sequence[TokenLogprob | None], prompt_ids: Sequence[int] = (), offset: int = 0
    ) -> dict[str, list]:
        """The completions layout. `entries` None stands for the first prompt token (whose id
        is `prompt_ids[0]`), which has no logprob."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            token_id = prompt_ids[0] if entry is None else entry.token_id
            text = self.token(token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry.logprob)
            top = {self.token(i): lp for i, lp in entry.top}
            top.setdefault(text, entry.logprob)  # the chosen token is always listed (as in vLLM)
            out["top_logprobs"].append(top)
        return out

    def chat(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        """The chat layout: one object per token, its top alternatives beside it."""
        return [
            {
                **self._one(entry.token_id, entry.logprob),
                "top_logprobs": [self._one(i, lp) for i, lp in entry.top],
            }
            for entry in entries
        ]

    def _one(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def shown(entries: Sequence[TokenLogprob], stop_token_ids: Sequence[int]) -> list[TokenLogprob]:
    """The entries of tokens that are part of the text (a stop token is not)."""
    return [e for e in entries if e.token_id not in stop_token_ids]
