"""An engine behind an asyncio front: the step loop runs on its own thread.

Serving code calls `generate(...)` and iterates the outputs; the loop thread is the only one that
touches the engine. Commands (add, abort) cross over through a queue; outputs come back through
per-request asyncio queues. A consumer that stops iterating (client gone, task cancelled) aborts
its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from engine.core import RequestOutput
from engine.protocol import Engine, EngineUnavailable
from engine.request import SamplingParams

log = logging.getLogger(__name__)


STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)  # seconds


class StepTimes:
    """A histogram of the loop's step durations (bucket counts, not every duration: a replica
    runs for months). Written by the loop thread; a reader may see one step's update half done."""

    def __init__(self, bounds: Sequence[float] = STEP_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)  # steps that took at most each bound (cumulative)
        self.count = 0
        self.total_s = 0.0

    def add(self, seconds: float) -> None:
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1
        self.count += 1
        self.total_s += seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "count": self.count,
            "sum": self.total_s,
        }


class QueueFullError(RuntimeError):
    """Too many requests waiting; the caller should answer 429/503 (RESOURCE_EXHAUSTED)."""


class EngineDeadError(RuntimeError):
    """The step loop stopped (an engine error or shutdown)."""


async def joined_outputs(outputs: asyncio.Queue, stream_interval: int) -> AsyncIterator[RequestOutput]:
    """One request's outputs, fewer and larger: those already queued when the consumer comes back
    for more are joined into one (a consumer that lags sends fewer messages, and none waits), and
    outputs are held until they carry `stream_interval` tokens, except the first token and the
    end. An exception in the queue is raised after what came before it."""
    held: RequestOutput | None = None
    sent_a_token = False
    while True:
        item = await outputs.get()
        while not isinstance(item, BaseException):
            held = item if held is None else held.then(item)
            if held.finished or outputs.empty():
                break
            item = outputs.get_nowait()
        if isinstance(item, BaseException):
            if held is not None:
                yield held
            raise item
        n = len(held.new_token_ids)
        if held.finished or (n and not sent_a_token) or n >= stream_interval:
            sent_a_token = sent_a_token or n > 0
            out, held = held, None
            yield out
            if out.finished:
                return


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    images: tuple = ()  # model.image_processing.ProcessedImage


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], Any]
    result: concurrent.futures.Future


class AsyncEngine:
    def __init__(
        self, engine: Engine, max_pending: int = 256, idle_wait_s: float = 0.05, stream_interval: int = 1
    ) -> None:
        """`stream_interval`: tokens a request's outputs hold before they are handed on (its first
        token and its end go at once); 1 hands on every step's output."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, not {stream_interval}")
        self.engine = engine
        self.max_pending = max_pending
        self.stream_interval = stream_interval
        self._idle_wait_s = idle_wait_s
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Add] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.num_steps = 0
        self.step_times = StepTimes()  # the engine's own step, outside any serving hop
        self.last_metrics: dict = {}
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def reason(self) -> str:
        """Why the loop stopped, in words a client may read (details are in the log)."""
        if self.error is None:
            return "it was shut down"
        if isinstance(self.error, EngineUnavailable):
            return str(self.error)
        return "an internal error (see the server log)"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence = (),
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; the last one has finished=True.
        `images`: the prompt's `ProcessedImage`s (see `Engine.add`)."""
        if not self.alive:
            raise EngineDeadError(f"the engine is not running: {self.reason}")
        if len(self._streams) + self._commands.qsize() >= self.max_pending:
            raise QueueFullError(f"{self.max_pending} requests are already queued or running; retry later")
        request_id = request_id or f"req-{next(self._ids)}"
        outputs: asyncio.Queue = asyncio.Queue()
        self._commands.put(
            _Add(
                request_id, list(prompt_token_ids), params, outputs, asyncio.get_running_loop(), tuple(images)
            )
        )
        finished = False
        try:
            async with aclosing(joined_outputs(outputs, self.stream_interval)) as joined:
                async for out in joined:
                    finished = out.finished
                    yield out
        finally:
            if not finished:
                self._commands.put(_Abort(request_id))

    def gauges(self) -> dict[str, Any]:
        """The engine's gauges now (an abort frees blocks without a step); the last step's if the
        loop thread is changing them under us."""
        try:
            return dict(self.engine.metrics())
        except RuntimeError:
            return dict(self.last_metrics or {})

    def close(self) -> None:
        """Stop the step loop, then close the engine (its workers and memory)."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.close()

    # -- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands(block=not self.engine.has_unfinished)
                if self.engine.has_unfinished:
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    self.step_times.add(time.perf_counter() - start)
                    self._deliver(outputs)
                    self.num_steps += 1
                    self.last_metrics = self.engine.metrics()
        except BaseException as e:  # the engine is broken: fail every open stream, loudly
            log.exception("engine loop stopped")
            self.error = e
            for add in list(self._streams.values()):
                self._send(add, EngineDeadError(f"the engine stopped: {self.reason}"))
            self._streams.clear()

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the loop thread between two steps (the only thread that touches the
        engine); the future holds its result or its exception."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            result.set_exception(EngineDeadError(f"the engine is not running: {self.reason}"))
        else:
            self._commands.put(_Call(fn, result))
        return result

    def _apply(self, cmd: _Add | _Abort | _Call) -> None:
        if isinstance(cmd, _Call):
            try:
                cmd.result.set_result(cmd.fn(self.engine))
            except Exception as e:  # the caller gets it; the loop goes on
                cmd.result.set_exception(e)
            return
        if isinstance(cmd, _Abort):
            if self._streams.pop(cmd.request_id, None) is not None:
                self.engine.abort(cmd.request_id)
            return
        try:
            if cmd.images:
                self.engine.add(cmd.prompt, cmd.params, cmd.request_id, images=cmd.images)
            else:
                self.engine.add(cmd.prompt, cmd.params, cmd.request_id)
        except ValueError as e:
            self._send(cmd, e)
            return
        self._streams[cmd.request_id] = cmd

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            add = self._streams.get(out.request_id)
            if add is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            self._send(add, out)

    def _send(self, add: _Add, item: RequestOutput | BaseException) -> None:
        try:
            add.loop.call_soon_threadsafe(add.outputs.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            if self._streams.pop(add.request_id, None) is not None:
                self.engine.abort(add.request_id)
