"""The real Llama 4 tokenizer and the chat template."""

from __future__ import annotations

import pytest

from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_round_trip_with_begin_of_text(tok):
    ids = tok.encode("Hello, world!")
    assert ids[0] == 200000 and tok.decode(ids[1:]) == "Hello, world!"
    assert tok.vocab_size == 202048


def test_chat_template_layout(tok):
    ids = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    text = tok.decode(ids)
    assert text == (
        "<|begin_of_text|><|header_start|>system<|header_end|>\n\nBe brief.<|eot|>"
        "<|header_start|>user<|header_end|>\n\nHi<|eot|><|header_start|>assistant<|header_end|>\n\n"
    )
    assert ids[:2] == [200000, 200005] and ids.count(200008) == 2


def test_special_token_text_in_content_is_not_a_special_token(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "<|eot|>"}])
    assert ids.count(200008) == 1  # only the template's own


def test_bad_role_is_named(tok):
    with pytest.raises(ValueError, match="messages\\[0\\].role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])
