"""The OpenAI-compatible HTTP routes of the ingress, and what every request goes through.

GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics,
GET /openapi.json.

Every response carries `x-request-id`: the client's, or a new one (Serve's proxy makes it and
echoes it; this module only adds it where no proxy did). It is also the engine's id for the
request and appears in the log lines. With an API key, the /v1 routes and /tokenize,
/detokenize, /tokenizer_info need `Authorization: Bearer <key>` (else 401); /health, /metrics and
/openapi.json stay open for probes and scrapers. CORS headers are sent only for the allowed
origins (none by default). An unexpected error is logged with the request id; the client gets
a 500 that says nothing of the internals.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from model.tokenizer import EOT, PAD
from serving import openai_protocol as oai
from serving import openai_responses as out
from serving.frontend import Frontend
from serving.metrics import CONTENT_TYPE
from serving.openai_endpoints import Endpoints, chat_prompt_ids, error_response
from serving.openapi import openapi_document

log = logging.getLogger(__name__)

Handler = Callable[[Request, str], Awaitable[Response]]
REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces
OPEN_ROUTES = ("/health", "/metrics", "/openapi.json")
CORS_HEADERS = "Authorization, Content-Type, X-Request-Id"


class OpenAIRoutes:
    def __init__(self, frontend: Frontend) -> None:
        self.f = frontend
        self.endpoints = Endpoints(frontend)
        self.routes: dict[str, tuple[str, Handler]] = {
            "/v1/models": ("GET", self.models),
            "/v1/completions": ("POST", self.completions),
            "/v1/chat/completions": ("POST", self.chat_completions),
            "/tokenize": ("POST", self.tokenize),
            "/detokenize": ("POST", self.detokenize),
            "/tokenizer_info": ("GET", self.tokenizer_info),
            "/health": ("GET", self.health),
            "/metrics": ("GET", self.metrics),
            "/openapi.json": ("GET", self.openapi),
        }
        self.created = int(time.time())
        self._openapi: dict | None = None

    async def handle(self, request: Request) -> Response:
        given = request.headers.get("x-request-id", "")
        rid = given if REQUEST_ID.match(given) else oai.new_id("req")
        try:
            response = await self._route(request, rid)
        except Exception:
            log.exception("request %s failed inside the server", rid)
            response = error_response(oai.internal(rid))
        if not given:  # behind Serve's proxy the header is always there, and echoed by the proxy
            response.headers["x-request-id"] = rid
        self._cors(request, response)
        return response

    async def _route(self, request: Request, rid: str) -> Response:
        path = _app_path(request)
        if request.method == "OPTIONS" and self._origin_allowed(request):
            return Response(status_code=204)  # a CORS preflight; the headers come in `_cors`
        if path.startswith("/v1/models/"):
            route: tuple[str, Handler] | None = ("GET", self.model)
        else:
            route = self.routes.get(path)
        if route is None:
            return error_response(oai.APIError(404, f"no route {path}", code="not_found"))
        method, handler = route
        if request.method != method:
            return error_response(oai.APIError(405, f"{path} takes {method}, not {request.method}"))
        if path not in OPEN_ROUTES and not self._authorized(request):
            return error_response(oai.unauthorized())
        try:
            return await handler(request, rid)
        except oai.APIError as e:
            return error_response(e)

    def _authorized(self, request: Request) -> bool:
        key = self.f.spec.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        allowed = self.f.spec.allowed_origins
        return bool(origin) and ("*" in allowed or origin in allowed)

    def _cors(self, request: Request, response: Response) -> None:
        if not self._origin_allowed(request):
            return
        response.headers["access-control-allow-origin"] = request.headers["origin"]
        response.headers["vary"] = "Origin"
        response.headers["access-control-expose-headers"] = "X-Request-Id"
        if request.method == "OPTIONS":
            response.headers["access-control-allow-methods"] = "GET, POST, OPTIONS"
            response.headers["access-control-allow-headers"] = CORS_HEADERS
            response.headers["access-control-max-age"] = "600"

    # -- the routes ------------------------------------------------------------------------

    async def models(self, request: Request, rid: str) -> Response:
        return JSONResponse(out.model_list(self.f.model, self.created, self.f.context_length))

    async def model(self, request: Request, rid: str) -> Response:
        name = _app_path(request).removeprefix("/v1/models/")
        if name != self.f.model:
            raise oai.APIError(
                404,
                f"model {name!r} is not served here; the model is {self.f.model!r}",
                code="model_not_found",
            )
        return JSONResponse(out.model_card(self.f.model, self.created, self.f.context_length))

    async def health(self, request: Request, rid: str) -> Response:
        alive = await self.f.engine_alive()
        return Response(status_code=200) if alive else error_response(oai.unavailable("the engine is down"))

    async def metrics(self, request: Request, rid: str) -> Response:
        return Response(self.f.metrics.render(await self.f.engine_snapshots()), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request, rid: str) -> Response:
        self._openapi = self._openapi or openapi_document(self.f.model)
        return JSONResponse(self._openapi)

    async def completions(self, request: Request, rid: str) -> Response:
        timer = self.f.metrics.request("completions")
        try:
            return await self.endpoints.completions(await request.body(), timer, rid)
        except oai.APIError as e:
            timer.finish(e.status)
            raise

    async def chat_completions(self, request: Request, rid: str) -> Response:
        timer = self.f.metrics.request("chat_completions")
        try:
            return await self.endpoints.chat(await request.body(), timer, rid)
        except oai.APIError as e:
            timer.finish(e.status)
            raise

    async def tokenize(self, request: Request, rid: str) -> Response:
        req = oai.parse_body(oai.TokenizeRequest, await request.body(), self.f.spec.strict_requests)
        if req.model is not None:
            self.f.check_model(req.model)
        tok = self.f.tokenizer
        if req.prompt is not None:
            ids = tok.encode(req.prompt, bos=req.add_special_tokens)
        else:
            ids = chat_prompt_ids(tok, req.messages, None, req.add_generation_prompt)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.f.context_length})

    async def tokenizer_info(self, request: Request, rid: str) -> Response:
        """The special tokens, as vLLM's endpoint of that name gives them (lm-eval's remote
        tokenizer reads it)."""
        tok = self.f.tokenizer
        return JSONResponse(
            {
                "tokenizer_class": "Llama4Tokenizer",
                "bos_token": tok.decode([tok.bos_id]),
                "eos_token": tok.decode([EOT]),
                "pad_token": tok.decode([PAD]),
                "model_max_length": self.f.context_length,
            }
        )

    async def detokenize(self, request: Request, rid: str) -> Response:
        req = oai.parse_body(oai.DetokenizeRequest, await request.body(), self.f.spec.strict_requests)
        if req.model is not None:
            self.f.check_model(req.model)
        ids = oai.check_token_ids(req.tokens, self.f.tokenizer.vocab_size, "tokens")
        return JSONResponse({"prompt": self.f.tokenizer.decode(ids)})


def _app_path(request: Request) -> str:
    """The path inside the application (Serve mounts it at its route prefix)."""
    path, root = request.scope.get("path", "/"), request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.strip("/")
