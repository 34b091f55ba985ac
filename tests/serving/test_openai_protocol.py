"""Request validation and OpenAI-style errors, without a server."""

from __future__ import annotations

import json

import pytest

from model.tokenizer import Tokenizer
from serving import openai_protocol as oai


def parse(model, body) -> oai.APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(oai.APIError) as info:
        oai.parse_body(model, raw)
    return info.value


def test_valid_completion_request():
    raw = b'{"model": "m", "prompt": [1, 2], "max_tokens": 3, "stop": "x"}'
    req = oai.parse_body(oai.CompletionRequest, raw)
    assert req.prompt == [1, 2] and req.max_tokens == 3 and req.stop_strings == ("x",)
    assert req.temperature == 1.0 and not req.stream


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, "invalid_json"),
        (b"[1, 2]", None, None),
        ({"prompt": "hi"}, "model", "missing"),
        ({"model": "m"}, "prompt", "missing"),
        ({"model": "m", "prompt": "hi", "max_tokens": "10"}, "max_tokens", "int_type"),
        ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens", "greater_than_equal"),
        ({"model": "m", "prompt": "hi", "temperature": 2.5}, "temperature", "less_than_equal"),
        ({"model": "m", "prompt": "hi", "top_p": 0}, "top_p", "greater_than"),
        ({"model": "m", "prompt": "hi", "stream": "yes"}, "stream", "bool_type"),
        ({"model": "m", "prompt": "hi", "n": 0}, "n", "greater_than_equal"),
        ({"model": "m", "prompt": "hi", "best_of": 1, "n": 2}, None, "value_error"),
        ({"model": "m", "prompt": []}, "prompt", "value_error"),
        ({"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "value_error"),
    ],
)
def test_bad_completion_requests(body, param, code):
    e = parse(oai.CompletionRequest, body)
    assert e.status == 400
    assert e.body()["error"]["type"] == "invalid_request_error"
    assert e.param == param and e.code == code
    assert e.message


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages.0"),  # "content is required"
    ],
)
def test_bad_chat_requests(body, param):
    assert parse(oai.ChatCompletionRequest, body).param == param


def test_chat_text_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    messages = [{"role": "user", "content": parts}]
    req = oai.validate(oai.ChatCompletionRequest, {"model": "m", "messages": messages})
    assert req.messages[0].text == "ab"


def test_context_length_error_says_the_numbers():
    req = oai.validate(oai.SamplingFields, {"model": "m"})
    with pytest.raises(oai.APIError) as info:
        oai.sampling_params(req, 4000, 4096, 100)
    e = info.value
    assert e.status == 400 and e.code == "context_length_exceeded"
    assert "4096" in e.message and "4100" in e.message and "4000" in e.message and "100" in e.message


def test_missing_max_tokens_takes_the_rest_of_the_context():
    req = oai.validate(oai.SamplingFields, {"model": "m", "top_k": -1})
    params = oai.sampling_params(req, 96, 4096, None)
    assert params.max_tokens == 4000 and params.top_k == 0


def test_prompt_ids_outside_the_vocabulary():
    req = oai.validate(oai.CompletionRequest, {"model": "m", "prompt": [5, 300000]})
    with pytest.raises(oai.APIError, match=r"300000.*outside the vocabulary"):
        oai.completion_prompt(req, Tokenizer())
