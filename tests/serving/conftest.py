"""One Ray Serve instance for the serving tests: the application (1 attention + 2 expert workers)
at "/", and on demand a second one with an API key, CORS and strict requests at "/secure"."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import pytest

from serving import APP_NAME
from serving.app import ServeAppConfig, build_app
from serving.grpc_service import SERVICER_FUNCTIONS

ENGINE = {"num_kv_blocks": 1024, "block_size": 16}
MAX_PENDING = 18  # the engine's queue: room for the 16 simultaneous streams
API_KEY = "test-key-1234"
ORIGIN = "https://app.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    http: str
    grpc: str
    model: str


@pytest.fixture(scope="session")
def server(ray_session, tiny_maverick):
    from ray import serve
    from ray.serve.config import gRPCOptions

    http_port, grpc_port = free_port(), free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)),
    )
    # the workers' CPU shares leave room for the other applications the serving tests deploy
    config = ServeAppConfig(
        model=str(tiny_maverick), engine=ENGINE, max_pending=MAX_PENDING, cpus_per_worker=0.4
    )
    try:
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield Server(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", tiny_maverick.name)
    finally:
        serve.shutdown()


@pytest.fixture(scope="session")
def secure_server(server, tiny_maverick) -> Server:
    """The single-process engine behind an API key, with CORS for ORIGIN and strict requests."""
    from ray import serve

    config = ServeAppConfig(
        model=str(tiny_maverick),
        served_model_name="secure-model",
        expert_workers=0,
        cpus_per_worker=0.01,
        engine={"num_kv_blocks": 256, "block_size": 16},
        api_key=API_KEY,
        allowed_origins=[ORIGIN],
        strict_requests=True,
    )
    serve.run(build_app(config), name="secure", route_prefix="/secure")
    return Server(f"{server.http}/secure", server.grpc, "secure-model")
