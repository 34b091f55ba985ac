"""Tool calls in the model's output -> OpenAI `tool_calls`, whole or as stream deltas.

With `tool_choice` auto, Llama 4 answers either in plain text or with a pythonic call list,
`[get_weather(city="Paris"), ...]`, optionally between `<|python_start|>` and
`<|python_end|>`. Text that opens like a call list is held back until the end and parsed; any
other text streams as content at once. With `required` or a named function, guided decoding
makes the model write JSON instead (the schema of the calls, as vLLM enforces it): a named
function's arguments object, or a list of `{"name", "parameters"}` objects.
"""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Sequence
from typing import Any

PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def openai_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def parse_pythonic(text: str) -> list[dict[str, Any]] | None:
    """`[f(a=1), g(b="x")]` -> OpenAI tool calls; None if the text is not such a list."""
    body = text.strip().removeprefix(PYTHON_START).removesuffix(PYTHON_END).strip()
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, SyntaxError, TypeError, RecursionError):
            return None
        calls.append(openai_call(node.func.id, arguments))
    return calls


def required_schema(tools: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """tool_choice required: a non-empty JSON list of calls of the given (name, parameters)."""
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}


def parse_forced(text: str, named: str | None) -> list[dict[str, Any]] | None:
    """The JSON a forced tool choice produced -> tool calls; None if it is not valid JSON (the
    output ran into max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if named is not None:
        return [openai_call(named, value)] if isinstance(value, dict) else None
    if not isinstance(value, list):
        return None
    return [
        openai_call(c["name"], c.get("parameters") or {})
        for c in value
        if isinstance(c, dict) and "name" in c
    ]


class ToolCallStream:
    """One choice's text as it streams: what to show as content now, and the calls at the end.

    `mode`: "auto" (pythonic, parsed if the text is a call list), "required" or "named"
    (guided JSON; nothing is content)."""

    def __init__(self, mode: str, named: str | None = None) -> None:
        self.mode = mode
        self.named = named
        self._held = ""
        self._decided: bool | None = None if mode == "auto" else True  # True: holding for calls

    def feed(self, text: str) -> str:
        """Content to stream now ("" while held back)."""
        if self._decided is False:
            return text
        self._held += text
        if self._decided is None:
            head = self._held.lstrip()
            if not head:
                return ""
            candidate = head.startswith("[") or PYTHON_START.startswith(head[: len(PYTHON_START)])
            if not candidate:
                self._decided, out, self._held = False, self._held, ""
                return out
            if len(head) >= len(PYTHON_START) or head.startswith("["):
                self._decided = True
        return ""

    def finish(self) -> tuple[str | None, list[dict[str, Any]]]:
        """(content still to show, tool calls). Held text that is no call list is content."""
        held, self._held = self._held, ""
        if self._decided is False:
            return None, []
        calls = parse_pythonic(held) if self.mode == "auto" else parse_forced(held, self.named)
        if calls:
            return None, calls
        return held or None, []
