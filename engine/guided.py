"""Guided decoding: a grammar per request masks the logits of every step, batched across requests.

Built on llguidance (a maintained Rust grammar engine on PyPI, CPU-only, no torch or CUDA
dependency of its own): JSON schema, regular expressions, choices and Lark grammars all compile
to one matcher type, and the masks of a whole batch are computed in parallel by its executor.

A matcher advances only when a step's tokens are accepted (`advance`); computing a mask does
not change it, so a step that is replayed after a failure computes the same masks again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
import torch
from llguidance.tiktoken import lltokenizer_from_encoding

from engine.request import Guided
from model.tokenizer import Tokenizer

_BITS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A grammar that does not compile (its message says why, for the client)."""


def grammar_text(guided: Guided) -> str:
    """The llguidance grammar of a request; GrammarError when the spec is malformed."""
    try:
        if guided.kind == "choice":
            choices = json.loads(guided.spec)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise GrammarError("choice: give a non-empty list of strings")
        spec = _compact(guided.spec) if guided.kind == "json_schema" else guided.spec
        grammar = llguidance.grammar_from(guided.kind, spec)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{guided.kind}: {e}") from None
    problem = llguidance.LLMatcher.validate_grammar(grammar)  # "" when it compiles
    if problem:
        raise GrammarError(f"{guided.kind}: {problem.strip()}")
    return grammar


def _compact(schema_text: str) -> str:
    """JSON with single spaces after `:` and `,` and no other whitespace between tokens: a model
    may not pad its output with whitespace forever (llguidance's default allows any amount)."""
    schema = json.loads(schema_text)
    if not isinstance(schema, dict):
        raise GrammarError("json_schema: the schema must be a JSON object")
    layout = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
    return json.dumps({**schema, "x-guidance": {**layout, **schema.get("x-guidance", {})}})


class GuidedDecoding:
    """The matchers of one engine rank's guided requests, keyed by request id."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~5 s)
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()

    def _ll(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            stops = list(self._tokenizer.stop_token_ids)
            encoding = self._tokenizer.tiktoken_encoding
            if encoding is not None:
                self._ll_tokenizer = lltokenizer_from_encoding(
                    encoding, n_vocab=self.vocab_size, eos_token=stops
                )
            else:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.tokenizer_json, n_vocab=self.vocab_size, eos_token=stops
                )
        return self._ll_tokenizer

    def add(self, request_id: str, guided: Guided, output_token_ids: Sequence[int] = ()) -> None:
        """Compile the request's grammar; a re-admitted request replays its output so far."""
        matcher = llguidance.LLMatcher(self._ll(), grammar_text(guided), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{guided.kind}: {matcher.get_error()}")
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            raise GrammarError("the request's output so far does not follow its grammar")
        self._matchers[request_id] = matcher

    def has(self, request_id: str) -> bool:
        return request_id in self._matchers

    def allowed(self, request_ids: Sequence[str]) -> torch.Tensor | None:
        """bool [N, V]: the tokens each request may sample next (rows without a grammar: all);
        None when none of them has one. A finished grammar allows only the stop tokens."""
        rows = [(i, self._matchers[r]) for i, r in enumerate(request_ids) if r in self._matchers]
        if not rows:
            return None
        # one bit per token, 32 to an int32 word; set bits = allowed. Filled in place by the
        # executor (what llguidance.torch does, whose import costs ~4 s: it compiles a kernel
        # with torch.compile, and so loads torch's inductor, in every engine process)
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(request_ids), words), -1, dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in rows], bitmask.data_ptr(), words * 4, len(request_ids)
        )
        bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
        return bits.reshape(len(request_ids), -1)[:, : self.vocab_size].bool()

    def advance(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The request's accepted tokens; a stop token the grammar did not expect is ignored."""
        matcher = self._matchers.get(request_id)
        if matcher is not None and token_ids and not matcher.is_stopped():
            matcher.consume_tokens(list(token_ids))

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
