"""Where a request's images come from: `data:` URLs (base64), http(s) URLs fetched under a size
and time limit, and local files below one allowed folder (off unless configured).

Every refusal is an `APIError` 400 naming the problem (its `param` says which image), never a
traceback: a URL scheme that is not taken, a host outside the allowed domains, a file outside
the allowed folder, a fetch that times out, is too large, or is answered with an error status.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from model.image_processing import DEFAULT_MAX_PIXELS
from serving.openai_protocol import APIError, invalid

MAX_REDIRECTS = 3


@dataclass(frozen=True)
class MediaConfig:
    """Limits on the images of one request (the Serve app's `media` arguments)."""

    max_images_per_prompt: int = 8
    max_image_bytes: int = 20 * 2**20  # encoded size, fetched or inlined
    max_image_pixels: int = DEFAULT_MAX_PIXELS  # decoded width x height
    fetch_timeout_s: float = 10.0  # the whole fetch of one URL, redirects included
    allow_http: bool = True  # fetch http(s) URLs at all
    allowed_media_domains: tuple[str, ...] | None = None  # None: any host
    allowed_local_media_path: str | None = None  # None: no local files

    def __post_init__(self) -> None:
        for name in ("max_images_per_prompt", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be > 0, got {self.fetch_timeout_s}")
        if self.allowed_local_media_path is not None and not Path(self.allowed_local_media_path).is_dir():
            raise ValueError(f"allowed_local_media_path {self.allowed_local_media_path!r} is not a directory")


def refused(message: str, param: str) -> APIError:
    return invalid(message, param=param, code="image_url_refused")


class MediaFetcher:
    def __init__(self, cfg: MediaConfig) -> None:
        self.cfg = cfg
        self._root = Path(cfg.allowed_local_media_path).resolve() if cfg.allowed_local_media_path else None

    async def fetch(self, url: str, param: str) -> bytes:
        """The encoded bytes behind an image URL; `param` names the image in errors."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._data_url(url, param)
        if scheme in ("http", "https"):
            if not self.cfg.allow_http:
                raise refused("this server does not fetch http(s) image URLs; send a data: URL", param)
            return await self._http(url, param)
        if scheme == "file":
            return await asyncio.to_thread(self._local_file, url, param)
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise refused(f"image URL with {shown}: give a data:, http(s): or file: URL", param)

    def _data_url(self, url: str, param: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise invalid("a data: image URL must be base64: data:image/png;base64,...", param=param)
        if len(payload) > self.cfg.max_image_bytes * 4 // 3 + 4:
            raise self._too_large(param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            message = "the data: URL's payload is not valid base64"
            raise invalid(message, param=param, code="invalid_image") from None

    def _local_file(self, url: str, param: str) -> bytes:
        if self._root is None:
            raise refused("local files are not served (the server has no --allowed-local-media-path)", param)
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise refused(f"file: URL with host {parsed.netloc!r}: only local files", param)
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        if not path.is_relative_to(self._root):
            raise refused("the file is outside the allowed local media path", param)
        if not path.is_file():
            raise invalid("no such image file below the allowed local media path", param=param)
        if path.stat().st_size > self.cfg.max_image_bytes:
            raise self._too_large(param)
        return path.read_bytes()

    async def _http(self, url: str, param: str) -> bytes:
        self._check_host(url, param)

        async def check_redirect(request: httpx.Request) -> None:
            self._check_host(str(request.url), param)

        try:
            async with (
                asyncio.timeout(self.cfg.fetch_timeout_s),
                httpx.AsyncClient(
                    follow_redirects=True,
                    max_redirects=MAX_REDIRECTS,
                    timeout=self.cfg.fetch_timeout_s,
                    event_hooks={"request": [check_redirect]},
                ) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise invalid(
                        f"fetching the image URL failed: the server answered {response.status_code}",
                        param=param,
                        code="image_fetch_failed",
                    )
                return await self._read_limited(response, param)
        except TimeoutError:
            raise invalid(
                f"fetching the image URL took longer than {self.cfg.fetch_timeout_s:g} s",
                param=param,
                code="image_fetch_timeout",
            ) from None
        except httpx.HTTPError as e:
            raise invalid(
                f"fetching the image URL failed: {type(e).__name__}", param=param, code="image_fetch_failed"
            ) from None

    async def _read_limited(self, response: httpx.Response, param: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_image_bytes:
            raise self._too_large(param)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.cfg.max_image_bytes:
                raise self._too_large(param)
        return bytes(body)

    def _check_host(self, url: str, param: str) -> None:
        allowed = self.cfg.allowed_media_domains
        host = (urllib.parse.urlparse(url).hostname or "").lower()
        if allowed is not None and host not in allowed:
            raise refused(f"image host {host!r} is not one of the allowed media domains", param)

    def _too_large(self, param: str) -> APIError:
        return invalid(
            f"the image is larger than {self.cfg.max_image_bytes} bytes", param=param, code="image_too_large"
        )
