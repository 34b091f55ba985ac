"""The Ray Serve application: an OpenAI-compatible HTTP ingress, a gRPC service and the engine
deployment behind them, plus the clients and the serving benchmark.

Request path: HTTP proxy or gRPC proxy -> `Ingress` (validation, tokenization, detokenization,
metrics) -> `EngineServer` replica (one engine each: `AsyncEngine` over a `ClusterEngine` or the
single-process `LLMEngine`) -> token ids stream back the same way.
"""

APP_NAME = "llama4-ep"  # the Serve application's name (gRPC clients send it as `application` metadata)
