"""Images through the Serve application (1 attention + 1 expert + 1 vision worker): the official
`openai` client with base64 data URLs, http(s) URLs from a local server, local files, gRPC image
bytes; every kind of bad image answered 400 / INVALID_ARGUMENT naming it, and each followed by a
good request. The replies equal the single-process engine's on the same prompt ids and pixels.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
from PIL import Image

from engine.core import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import SamplingParams
from model.image_processing import ImageProcessor
from model.tokenizer import Tokenizer
from serving.app import ServeAppConfig, build_app
from serving.client import GRPCClient, ServerError, data_url
from serving.proto_gen import llama4_ep_pb2 as pb
from serving.proto_gen import llama4_ep_pb2_grpc

pytestmark = pytest.mark.slow  # one Serve application with four actors: about a minute on 2 cores

ENGINE = {"num_kv_blocks": 1024, "block_size": 16, "token_budget": 256}
MAX_TOKENS = 4
IGNORE_EOS = {"ignore_eos": True}
MAX_PIXELS = 1_000_000
MAX_BYTES = 1_000_000
FETCH_TIMEOUT_S = 1.0


def png(height: int, width: int, seed: int | None = 0) -> bytes:
    """Seeded noise (seed None: one flat colour, a few kilobytes however large)."""
    if seed is None:
        pixels = np.full((height, width, 3), 90, dtype=np.uint8)
    else:
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1 if seed is not None else 9)
    return buf.getvalue()


class _Images(BaseHTTPRequestHandler):
    """/ok.png, /slow.png (answers after the fetch timeout), /big.png (over the size limit), else 404."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/slow.png":
            self.release.wait(timeout=10 * FETCH_TIMEOUT_S)
        body = {"/ok.png": png(30, 50, seed=7), "/slow.png": png(8, 8), "/big.png": b"\0" * (MAX_BYTES + 10)}
        if self.path not in body:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body[self.path])))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the fetch gave up
            self.wfile.write(body[self.path])

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Server:
    http: str
    grpc: str
    model: str
    images: str  # base URL of the local image server
    media_dir: Path


APP = "images"


@pytest.fixture(scope="module")
def server(server, tiny_maverick, tmp_path_factory):
    """The images application beside the session's on the one Serve instance, at /images."""
    from ray import serve

    media_dir = tmp_path_factory.mktemp("media")
    (media_dir / "cat.png").write_bytes(png(64, 80, seed=3))
    images = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    config = ServeAppConfig(
        model=str(tiny_maverick),
        expert_workers=1,
        vision_workers=1,
        engine=ENGINE,
        cpus_per_worker=0.1,
        media={
            "max_image_pixels": MAX_PIXELS,
            "max_image_bytes": MAX_BYTES,
            "fetch_timeout_s": FETCH_TIMEOUT_S,
            "allowed_media_domains": ["127.0.0.1"],
            "allowed_local_media_path": str(media_dir),
        },
    )
    try:
        serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
        yield Server(
            f"{server.http}/{APP}",
            server.grpc,
            tiny_maverick.name,
            f"http://127.0.0.1:{images.server_address[1]}",
            media_dir,
        )
    finally:
        _Images.release.set()
        images.shutdown()
        serve.delete(APP)


@pytest.fixture(scope="module")
def reference(tiny_maverick):
    """The single-process engine's greedy text for a user message of images then text."""
    engine = LLMEngine.from_checkpoint(tiny_maverick, EngineConfig(**ENGINE))
    tokenizer, processor = Tokenizer(tiny_maverick), ImageProcessor.for_checkpoint(tiny_maverick)

    def run(images: list[bytes], text: str) -> str:
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        processed = [processor.decode_and_preprocess(b) for b in images]
        prompt = processor.expand(
            tokenizer.apply_chat_template([{"role": "user", "content": parts}]), processed
        )
        rid = engine.add(prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), images=processed)
        ids = []
        while engine.has_unfinished:
            for out in engine.step():
                if out.request_id == rid:
                    ids += out.new_token_ids
        return tokenizer.decode_output(ids)

    return run


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, server: Server, urls: list[str], text: str = "What is this?", **kw):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [
        {"type": "text", "text": text}
    ]
    return client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": content}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body=IGNORE_EOS,
        **kw,
    )


def test_base64_images_through_the_openai_client_equal_the_engine(server, client, reference):
    one, two = png(300, 650, seed=1), png(40, 40, seed=2)
    whole = chat(client, server, [data_url(one)])
    assert whole.choices[0].message.content == reference([one], "What is this?")
    assert whole.usage.prompt_tokens > 3 * 144  # 1 x 2 tiles and the global one
    stream = chat(client, server, [data_url(one), data_url(two)], stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    assert streamed == reference([one, two], "What is this?")


def test_eight_images_per_prompt_and_not_nine(server, client, reference):
    images = [png(20 + i, 30, seed=10 + i) for i in range(8)]
    reply = chat(client, server, [data_url(b) for b in images], text="Compare them.")
    assert reply.choices[0].message.content == reference(images, "Compare them.")
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, server, [data_url(images[0])] * 9)
    assert info.value.body["code"] == "too_many_images" and "at most 8" in info.value.body["message"]


def test_http_and_local_file_urls(server, client, reference):
    fetched = chat(client, server, [f"{server.images}/ok.png"])
    assert fetched.choices[0].message.content == reference([png(30, 50, seed=7)], "What is this?")
    local = chat(client, server, [(server.media_dir / "cat.png").as_uri()])
    assert local.choices[0].message.content == reference([png(64, 80, seed=3)], "What is this?")


def bad_images(server: Server) -> list[tuple[str, str, str]]:
    """(image URL, the error code, words of the message)"""
    truncated = png(64, 64)[:-60]
    outside = server.media_dir.parent / "elsewhere.png"
    outside.write_bytes(png(8, 8))
    localhost = server.images.replace("127.0.0.1", "localhost")
    return [
        (data_url(b"plain text, not an image"), "invalid_image", "not an image"),
        (data_url(truncated), "invalid_image", "truncated or corrupt"),
        (data_url(png(1001, 1000, seed=None)), "invalid_image", "too many pixels"),
        ("data:image/png;base64,@@not base64@@", "invalid_image", "not valid base64"),
        ("data:image/png,rawbytes", None, "must be base64"),
        ("ftp://127.0.0.1/cat.png", "image_url_refused", "scheme 'ftp'"),
        (f"{localhost}/ok.png", "image_url_refused", "not one of the allowed media domains"),
        (outside.as_uri(), "image_url_refused", "outside the allowed local media path"),
        (f"{server.images}/slow.png", "image_fetch_timeout", "longer than 1 s"),
        (f"{server.images}/big.png", "image_too_large", f"larger than {MAX_BYTES} bytes"),
        (f"{server.images}/missing.png", "image_fetch_failed", "answered 404"),
    ]


def test_bad_images_are_400_naming_the_image_and_serving_goes_on(server, client):
    good = png(20, 20, seed=5)
    for url, code, words in bad_images(server):
        with pytest.raises(openai.BadRequestError) as info:
            chat(client, server, [data_url(good), url])
        error = info.value.body
        assert error["code"] == code and words in error["message"], (url[:60], error)
        assert error["param"] == "messages.0.content.1.image_url", error
        assert chat(client, server, [data_url(good)]).choices[0].finish_reason == "length"


def test_images_outside_user_messages_are_refused(server, client):
    image = {"type": "image_url", "image_url": {"url": data_url(png(8, 8))}}
    with pytest.raises(openai.BadRequestError, match="user messages only"):
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "system", "content": [image]}, {"role": "user", "content": "hi"}],
            max_tokens=1,
        )


def test_grpc_image_bytes_equal_http_and_bad_bytes_are_invalid_argument(server, client, reference):
    image = png(336, 336, seed=4)
    with GRPCClient(server.grpc, application=APP) as c:
        reply = c.generate(chat="What is this?", images=[image], max_tokens=MAX_TOKENS, ignore_eos=True)
        assert reply.text == reference([image], "What is this?")
        with pytest.raises(ServerError) as info:
            c.generate(chat="What is this?", images=[b"GIF89a but no more"], max_tokens=1)
        assert info.value.status == "INVALID_ARGUMENT" and "parts.0" in info.value.message
        stub = llama4_ep_pb2_grpc.Llama4EPStub(c.channel)
        empty_part = pb.GenerateRequest(
            chat=pb.Chat(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart()])])
        )
        with pytest.raises(grpc.RpcError) as rpc:
            stub.Generate(empty_part, metadata=(("application", APP),))
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.generate(chat="still serving", images=[image], max_tokens=1).usage["completion_tokens"] == 1


def test_vision_worker_encoded_the_images(server):
    from ray import serve

    handle = serve.get_deployment_handle("EngineServer", APP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = handle.vision_stats.remote().result()
        if stats and stats[0]["images_encoded"] > 0:
            break
        time.sleep(0.2)
    assert stats[0]["images_encoded"] > 0 and stats[0]["calls"] > 0
