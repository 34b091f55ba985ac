"""Streaming detokenization: the deltas add up to the whole text; stop strings end it."""

from __future__ import annotations

import pytest

from engine.detokenizer import IncrementalDetokenizer
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def stream_all(tokenizer, ids, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    ts = IncrementalDetokenizer(tokenizer, stop)
    deltas = [ts.add([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    return deltas, ts


def test_deltas_add_up_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode("Hello wörld — 日本語のテキスト 🙂 done", bos=False)
    deltas, ts = stream_all(tokenizer, ids)
    assert "".join(deltas) == ts.text == tokenizer.decode_output(ids)
    assert all("\ufffd" not in d for d in deltas)  # split characters are held back, not garbled


def test_partial_characters_are_held_back_one_token_at_a_time(tokenizer):
    ids = tokenizer.encode("héllo 👋 wörld", bos=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([t]) for t in ids]
    assert "".join(pieces) == "héllo 👋 wörld"


def test_stop_tokens_are_not_text(tokenizer):
    ids = tokenizer.encode("the end", bos=False) + [200008]
    deltas, ts = stream_all(tokenizer, ids)
    assert ts.text == "the end"


def test_stop_string_ends_the_text_before_it(tokenizer):
    ids = tokenizer.encode("one two three four five", bos=False)
    deltas, ts = stream_all(tokenizer, ids, stop=("three",))
    assert "".join(deltas) == ts.text == "one two "
    assert ts.stopped


def test_a_possible_stop_prefix_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("abc thr thrive", bos=False)
    deltas, ts = stream_all(tokenizer, ids, stop=("three",))
    assert "".join(deltas) == "abc thr thrive" and not ts.stopped


def test_stop_string_across_tokens(tokenizer):
    ids = tokenizer.encode("xx STOPPING yy", bos=False)
    deltas, ts = stream_all(tokenizer, ids, stop=("OPP",))
    assert ts.text == "xx ST"
