"""Where images may come from (`serving.media`), without Serve: data URLs, local files below the
allowed folder only (symlinks included), http(s) with its limits and allowed domains, redirects."""

from __future__ import annotations

import asyncio
import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serving.media import MediaConfig, MediaFetcher
from serving.openai_protocol import APIError

PARAM = "messages.0.content.0.image_url"


class _Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        if self.path == "/image":
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"bytes")
        elif self.path == "/here":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{port}/image")
            self.end_headers()
        else:  # /away: to a host that is not allowed
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{port}/image")
            self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirects)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def fetch(cfg: MediaConfig, url: str) -> bytes:
    return asyncio.run(MediaFetcher(cfg).fetch(url, PARAM))


def refusal(cfg: MediaConfig, url: str) -> APIError:
    with pytest.raises(APIError) as info:
        fetch(cfg, url)
    assert info.value.status == 400 and info.value.param == PARAM
    return info.value


def test_data_urls():
    assert fetch(MediaConfig(), "data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    assert "must be base64" in refusal(MediaConfig(), "data:image/png,abc").message
    big = "data:image/png;base64," + base64.b64encode(b"x" * 100).decode()
    assert refusal(MediaConfig(max_image_bytes=10), big).code == "image_too_large"


def test_local_files_only_below_the_allowed_folder(tmp_path):
    allowed, other = tmp_path / "allowed", tmp_path / "other"
    allowed.mkdir()
    other.mkdir()
    (allowed / "a.png").write_bytes(b"inside")
    (other / "b.png").write_bytes(b"outside")
    (allowed / "link.png").symlink_to(other / "b.png")
    cfg = MediaConfig(allowed_local_media_path=str(allowed))
    assert fetch(cfg, (allowed / "a.png").as_uri()) == b"inside"
    assert "no --allowed-local-media-path" in refusal(MediaConfig(), (allowed / "a.png").as_uri()).message
    for escape in (
        (other / "b.png").as_uri(),
        (allowed / "link.png").as_uri(),
        f"file://{allowed}/../other/b.png",
    ):
        assert refusal(cfg, escape).code == "image_url_refused"
    assert "scheme 'gopher'" in refusal(cfg, "gopher://x/y").message


def test_http_redirects_are_checked_against_the_allowed_domains(site):
    allowed = MediaConfig(allowed_media_domains=("127.0.0.1",))
    assert fetch(allowed, f"{site}/here") == b"bytes"
    assert refusal(allowed, f"{site}/away").code == "image_url_refused"
    assert fetch(MediaConfig(), f"{site}/away") == b"bytes"  # any host
    assert "does not fetch" in refusal(MediaConfig(allow_http=False), f"{site}/image").message
