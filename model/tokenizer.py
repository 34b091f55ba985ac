"""The Llama 4 tokenizer and chat template.

By default the real tokenizer that ships inside Meta's `llama-models` package (tiktoken BPE,
202048 ids with the special tokens). A checkpoint directory that carries its own
`tokenizer.json` uses that instead (through the `tokenizers` library).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

BEGIN_OF_TEXT = 200000
HEADER_START = 200005
HEADER_END = 200006
EOM = 200007  # end of message: the model waits for a tool's result
EOT = 200008
PAD = 200018  # <|finetune_right_pad|>
IMAGE = 200090  # <|image|>: an image part of a message; the processor expands it (model.image_processing)
STOP_TOKEN_IDS = (200001, 200007, 200008)
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")
# Llama 4's pythonic tool calling: the functions are listed as JSON in the system prompt and the
# model answers with a Python list of calls, `[get_weather(city="Paris"), ...]` (the format of
# Meta's llama-models `ToolPromptFormat.python_list`; vLLM's `llama4_pythonic` parser reads it).
TOOL_PROMPT = (
    "You can call functions to answer the user. If you call any, reply with nothing but a Python "
    "list of calls with keyword arguments, in the form "
    "[func_name1(param1=value1, param2=value2), func_name2(param=value)]. Call only the functions "
    "listed here; if none fits, answer in plain language. When a function's result comes back, use "
    "it to answer the user's question.\n\nThe functions, in JSON:\n"
)


class Tokenizer:
    """encode/decode text, and the Llama 4 chat template."""

    def __init__(self, checkpoint_dir: str | Path | None = None) -> None:
        own = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir else None
        if own is not None and own.exists():
            hf = HFTokenizer.from_file(str(own))
            self._encode = lambda s: hf.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: hf.decode(list(ids), skip_special_tokens=False)
            self.vocab_size = hf.get_vocab_size()
            self.tokenizer_json: str | None = str(own)
            self.tiktoken_encoding = None
        else:
            # imported here: a checkpoint with its own tokenizer.json (and the GPU check, which
            # runs where llama-models and tiktoken are not installed) never needs them
            from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

            meta = MetaTokenizer.get_instance()
            self._encode = lambda s: meta.encode(s, bos=False, eos=False)
            self._decode = meta.decode
            self.vocab_size = meta.n_words
            self.tokenizer_json = None
            self.tiktoken_encoding = meta.model  # the tiktoken Encoding (grammar engines read it)
        self.bos_id = BEGIN_OF_TEXT
        self.stop_token_ids = STOP_TOKEN_IDS

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Text as ids; special-token text is not interpreted (it is encoded as plain text)."""
        return ([self.bos_id] if bos else []) + list(self._encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._decode(list(ids))

    def decode_output(self, ids: Iterable[int]) -> str:
        """Generated text: stop tokens are not part of it."""
        return self._decode([t for t in ids if t not in self.stop_token_ids])

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        """`<|begin_of_text|>` then `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>` per
        message, then `<|header_start|>assistant<|header_end|>\\n\\n` for the reply. A content may
        also be a list of parts, `{"type": "text", "text": ...}` or `{"type": "image"}` (one
        `<|image|>` each, as transformers' Llama 4 template writes them).

        `tools` (each `{name, description, parameters}`) go into the system message, after the
        caller's own system text. An assistant message's `tool_calls` (each `{name, arguments}`,
        arguments a dict) follow its content as a pythonic call list and end with `<|eom|>`; a
        `tool` message is the `ipython` role, as Llama 4 was trained."""
        if not messages:
            raise ValueError("messages must hold at least one message")
        messages = _with_tools(list(messages), tools) if tools else messages
        ids = [self.bos_id]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role is {role!r}; allowed: {', '.join(CHAT_ROLES)}")
            calls = m.get("tool_calls") or ()
            if calls and isinstance(content, str):
                content += format_tool_calls(calls)
            elif calls and isinstance(content, Sequence):
                content = [*content, {"type": "text", "text": format_tool_calls(calls)}]
            header = self._header("ipython" if role == "tool" else role)
            end = EOM if calls or role in ("tool", "ipython") else EOT
            ids += header + self._content_ids(i, content) + [end]
        if add_generation_prompt:
            ids += self._header("assistant") + list(self._encode("\n\n"))
        return ids

    def _content_ids(self, i: int, content: object) -> list[int]:
        if isinstance(content, str):
            return list(self._encode("\n\n" + content))
        if not isinstance(content, Sequence):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        ids, text = [], "\n\n"
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text += part["text"]
            elif kind == "image":
                ids += list(self._encode(text)) if text else []
                ids.append(IMAGE)
                text = ""
            else:
                raise ValueError(f"messages[{i}].content[{j}] must be a text part or an image part")
        return ids + (list(self._encode(text)) if text else [])

    def _header(self, role: str) -> list[int]:
        return [HEADER_START, *self._encode(role), HEADER_END]


def _with_tools(
    messages: list[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    listing = json.dumps([{"type": "function", "function": dict(t)} for t in tools], indent=2)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = f"{first.get('content') or ''}\n\n{TOOL_PROMPT}{listing}".lstrip()
        return [first, *messages[1:]]
    return [{"role": "system", "content": TOOL_PROMPT + listing}, *messages]


def format_tool_calls(calls: Sequence[Mapping[str, Any]]) -> str:
    """`[name(key=value, ...), ...]` with Python literals (what `ast.literal_eval` reads back)."""
    parts = []
    for call in calls:
        args = ", ".join(f"{k}={_literal(v)}" for k, v in dict(call.get("arguments") or {}).items())
        parts.append(f"{call['name']}({args})")
    return "[" + ", ".join(parts) + "]"


def _literal(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str | int | float):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_literal(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"a tool call argument of type {type(value).__name__} has no Python literal")
