"""The vision-encoder tier: Ray actors that turn a request's images into features, off the step.

A `VisionWorker` owns one device and the vision encoder; one call encodes the images of every
request handed to it since the last step (a batch across requests) and returns one object ref
per request: the features, rows [P, H] for the request's P `<|patch|>` tokens. The driver's
`VisionTier` holds a request until its features exist, then hands it to its attention rank with
the ref in place of the pixels: the attention worker fetches the features from the object store
at admission, so neither encoding nor its wait ever sits inside a decode step. The ref stays
with the driver while the request runs, so a request re-admitted on another rank gets the same
features without encoding again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import ray
import torch

from attention.vision import VisionEncoder
from cluster.rendezvous import CONTROL, check_device
from engine.request import Request
from model.checkpoint import CheckpointReader
from model.device import resolve_dtype
from model.image_processing import ProcessedImage

log = logging.getLogger(__name__)


class VisionWorker:
    """A Ray actor: the vision encoder on one device."""

    def __init__(self, model_dir: str, worker_idx: int, dtype: str, device: str) -> None:
        check_device(device)
        if device == "cpu":
            torch.set_num_threads(int(os.environ.get("LLAMA4_EP_WORKER_THREADS", "1")))
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.worker_idx = worker_idx
        with CheckpointReader(model_dir) as reader:
            self.encoder = VisionEncoder.from_checkpoint(
                reader, resolve_dtype(dtype, self.device), self.device
            )
        self.num_calls = self.num_images = self.num_tiles = 0
        self.seconds = 0.0

    def encode(self, batch: Sequence[Sequence[ProcessedImage]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The images of several requests in one forward; per request its images' features
        concatenated, [P, H] on the CPU (they travel through the object store). Called with
        `num_returns=len(batch)`, so one request gets the tensor itself."""
        t0 = time.perf_counter()
        flat = [image for images in batch for image in images]
        features = iter(self.encoder.encode_images(flat))
        out = tuple(torch.cat([next(features) for _ in images]).cpu() for images in batch)
        self.num_calls += 1
        self.num_images += len(flat)
        self.num_tiles += sum(image.num_tiles for image in flat)
        self.seconds += time.perf_counter() - t0
        return out[0] if len(out) == 1 else out

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict:
        return {
            "worker_idx": self.worker_idx,
            "calls": self.num_calls,
            "images_encoded": self.num_images,
            "tiles_encoded": self.num_tiles,
            "encode_seconds": self.seconds,
        }


@dataclass
class _Encoding:
    request: Request
    dp_rank: int
    ref: ray.ObjectRef | None = None  # None: not sent yet


class VisionTier:
    """The driver's side of the vision workers: `add` a request with images, `submit` once a
    step (one call per worker that has work, tiles balanced over the workers), take the requests
    whose features are `ready` to their attention ranks."""

    def __init__(self, workers: list) -> None:
        self.workers = workers
        self._encoding: dict[str, _Encoding] = {}
        self.features: dict[str, ray.ObjectRef] = {}  # admitted requests' features, until they end

    @property
    def num_waiting(self) -> int:
        return len(self._encoding)

    def add(self, request: Request, dp_rank: int) -> None:
        self._encoding[request.request_id] = _Encoding(request, dp_rank)

    def discard(self, request_id: str) -> bool:
        """Forget a request; True when it had not reached its attention rank yet."""
        self.features.pop(request_id, None)
        return self._encoding.pop(request_id, None) is not None

    def submit(self) -> None:
        """Send every request added since the last call: each worker gets one call with its share."""
        queued = [e for e in self._encoding.values() if e.ref is None]
        if not queued:
            return
        shares: list[list[_Encoding]] = [[] for _ in self.workers]
        tiles = [0] * len(self.workers)
        for e in sorted(queued, key=lambda e: -_tiles(e.request)):
            w = tiles.index(min(tiles))
            shares[w].append(e)
            tiles[w] += _tiles(e.request)
        for worker, share in zip(self.workers, shares, strict=True):
            if not share:
                continue
            refs = worker.encode.options(num_returns=len(share)).remote([e.request.images for e in share])
            for e, ref in zip(share, refs if len(share) > 1 else [refs], strict=True):
                e.ref = ref

    def ready(self) -> list[tuple[Request, int]]:
        """(request, dp_rank) for the requests whose features exist, the pixels replaced by the
        ref in the driver's own Request (whoever keeps it, to re-admit it elsewhere, keeps the
        ref); a failed encoding reaches the attention worker as the ref's error and is rejected."""
        sent = {e.ref: rid for rid, e in self._encoding.items() if e.ref is not None}
        if not sent:
            return []
        done, _ = ray.wait(list(sent), num_returns=len(sent), timeout=0)
        out = []
        for ref in done:
            e = self._encoding.pop(sent[ref])
            self.features[e.request.request_id] = ref
            e.request.images, e.request.image_features = (), ref
            out.append((e.request, e.dp_rank))
        return out

    def wait(self, timeout_s: float) -> None:
        """Block until some encoding finishes (or the timeout): for a driver with nothing to step."""
        refs = [e.ref for e in self._encoding.values() if e.ref is not None]
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout_s)

    def forget(self, request_id: str) -> None:
        self.features.pop(request_id, None)

    def stats(self) -> list[dict]:
        return ray.get([w.stats.remote() for w in self.workers])


def _tiles(request: Request) -> int:
    return sum(image.num_tiles for image in request.images)


def resolve_features(request: Request) -> Request:
    """The request with its features fetched, if it holds a ref to them (in the attention worker,
    before admission; the ref is ready, so this does not wait on an encoder)."""
    if isinstance(request.image_features, ray.ObjectRef):
        return replace(request, image_features=ray.get(request.image_features))
    return request
