"""The OpenAPI 3.1 document of the HTTP routes (GET /openapi.json), from the request models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from serving import openai_protocol as oai

_REF = "#/components/schemas/{model}"
_POSTS = {
    "/v1/completions": (oai.CompletionRequest, "Text completions (one prompt or a batch)"),
    "/v1/chat/completions": (oai.ChatCompletionRequest, "Chat completions, with tools and guided output"),
    "/tokenize": (oai.TokenizeRequest, "Token ids of a prompt or of chat messages"),
    "/detokenize": (oai.DetokenizeRequest, "Text of token ids"),
}
_GETS = {
    "/v1/models": "The served model",
    "/health": "200 while every engine replica runs its step loop, else 503",
    "/metrics": "Prometheus metrics",
}
_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}


def _responses(ok: str) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}}}
    return {
        "200": {"description": ok},
        "400": {"description": "Invalid request", **error},
        "401": {"description": "Missing or wrong API key", **error},
        "429": {"description": "The engine's queue is full", **error},
        "503": {"description": "The engine is down", **error},
    }


def openapi_document(model_name: str) -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m, _ in _POSTS.values()], ref_template=_REF)
    schemas = {**top.get("$defs", {}), "Error": _ERROR}
    paths: dict[str, Any] = {}
    for path, (model, summary) in _POSTS.items():
        body = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
        paths[path] = {
            "post": {"summary": summary, "requestBody": body, "responses": _responses("The result")}
        }
    for path, summary in _GETS.items():
        paths[path] = {"get": {"summary": summary, "responses": _responses(summary)}}
    paths["/v1/models/{model}"] = {
        "get": {
            "summary": "One model's card",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {**_responses("The model card"), "404": {"description": "Not served here"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llama4-ep",
            "version": "0.1.0",
            "description": f"OpenAI-compatible API serving {model_name!r}",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
