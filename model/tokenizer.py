"""The Llama 4 tokenizer and chat template.

By default the real tokenizer that ships inside Meta's `llama-models` package (tiktoken BPE,
202048 ids with the special tokens). A checkpoint directory that carries its own
`tokenizer.json` uses that instead (through the `tokenizers` library).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

BEGIN_OF_TEXT = 200000
HEADER_START = 200005
HEADER_END = 200006
EOT = 200008
STOP_TOKEN_IDS = (200001, 200007, 200008)
CHAT_ROLES = ("system", "user", "assistant", "ipython", "tool")


class Tokenizer:
    """encode/decode text, and the Llama 4 chat template."""

    def __init__(self, checkpoint_dir: str | Path | None = None) -> None:
        own = Path(checkpoint_dir) / "tokenizer.json" if checkpoint_dir else None
        if own is not None and own.exists():
            hf = HFTokenizer.from_file(str(own))
            self._encode = lambda s: hf.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: hf.decode(list(ids), skip_special_tokens=False)
            self.vocab_size = hf.get_vocab_size()
        else:
            # imported here: a checkpoint with its own tokenizer.json (and the GPU check, which
            # runs where llama-models and tiktoken are not installed) never needs them
            from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

            meta = MetaTokenizer.get_instance()
            self._encode = lambda s: meta.encode(s, bos=False, eos=False)
            self._decode = meta.decode
            self.vocab_size = meta.n_words
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
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """`<|begin_of_text|>` then `<|header_start|>{role}<|header_end|>\\n\\n{content}<|eot|>` per
        message, then `<|header_start|>assistant<|header_end|>\\n\\n` for the reply."""
        if not messages:
            raise ValueError("messages must hold at least one message")
        ids = [self.bos_id]
        for i, m in enumerate(messages):
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role is {role!r}; allowed: {', '.join(CHAT_ROLES)}")
            if not isinstance(content, str):
                raise ValueError(f"messages[{i}].content must be a string")
            ids += self._header(role) + list(self._encode("\n\n" + content)) + [EOT]
        if add_generation_prompt:
            ids += self._header("assistant") + list(self._encode("\n\n"))
        return ids

    def _header(self, role: str) -> list[int]:
        return [HEADER_START, *self._encode(role), HEADER_END]
