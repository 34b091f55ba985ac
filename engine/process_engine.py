"""An engine stepped in its own process, behind the same asyncio front as `AsyncEngine`.

`AsyncEngine` steps its engine on a thread of the serving process, where the step's Python shares
one GIL with the event loop, the HTTP and gRPC handlers and Ray's own threads: on this 2-core
machine a decode step took 27 ms in a Serve replica against 22 ms alone. `ProcessEngine` steps a
single-process engine on the main thread of a child process instead. The two talk over one Unix
socket: one message per command (add, abort, call, stop) and one per step (every output of the
step together, with the step's duration and the engine's gauges).

The child's side, and the messages, are in `engine.process_child`: a fresh interpreter that builds
its engine from a picklable factory, says it is ready, then applies commands and steps.

The parent keeps, for each open request, what it needs to run it again: its prompt, its params
(with a seed), the tokens streamed so far. When a child dies the parent starts another and adds
the requests to it with their tokens; the engine catches each one up on prompt and tokens (as
after a preemption) and samples the next token as the lost child would have.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Any

from engine.async_engine import EngineDeadError, QueueFullError, StepTimes, joined_outputs
from engine.core import RequestOutput
from engine.process_child import (
    AbortRequest,
    AddRequest,
    CallEngine,
    Died,
    Failed,
    Gauges,
    Rejected,
    Result,
    Start,
    Stepped,
    Stop,
    recv,
    send,
)
from engine.protocol import Engine, FaultStats
from engine.request import SamplingParams
from engine.sampling import new_seed

log = logging.getLogger(__name__)


# -- the parent's side --------------------------------------------------------------------


@dataclass
class _Stream:
    """A request the parent is streaming, with what it needs to run it again in a new child."""

    outputs: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    add: AddRequest  # its params carry a seed, so a resumed request samples what it would have
    output_token_ids: list[int] = field(default_factory=list)  # handed on so far
    prompt_logprobs: int = 0  # prompt logprob entries handed on so far
    skip_prompt_logprobs: int = 0  # entries the current child computes again, not to hand on twice
    deaths: int = 0  # engine processes lost while it ran

    def resumed(self) -> AddRequest:
        self.skip_prompt_logprobs = self.prompt_logprobs
        return replace(self.add, output_token_ids=tuple(self.output_token_ids))


class ProcessEngine:
    """`AsyncEngine`'s verbs (`generate`, `call`, `alive`, `close`) for an engine in a child
    process. `factory()` builds the engine there; it must pickle (a `functools.partial` of
    `LLMEngine.from_checkpoint` does). The constructor returns once the engine is built, and raises
    RuntimeError if it could not be.

    A child that dies (killed, crashed, its engine raised) is replaced by a new one, at most
    `restarts` times in any `restart_window_s`; its requests are added to the new child with the
    tokens they had streamed and go on from there (the same tokens as without the loss: greedy, or
    sampled from the request's seed, which the parent fixes when the request has none). Streams
    only wait. A request that was running when `max_deaths_per_request` children died fails, in
    case it is what kills them. Past the budget the engine is dead, and Serve replaces the
    replica."""

    def __init__(
        self,
        factory: Callable[[], Engine],
        threads: int | None = None,
        max_pending: int = 256,
        stream_interval: int = 1,
        restarts: int = 3,
        restart_window_s: float = 600.0,
        max_deaths_per_request: int = 2,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, not {stream_interval}")
        if restarts < 0:
            raise ValueError(f"restarts must be >= 0, not {restarts}")
        self.max_pending = max_pending
        self.stream_interval = stream_interval
        self.restarts = restarts
        self.restart_window_s = restart_window_s
        self.max_deaths_per_request = max_deaths_per_request
        self._factory = factory
        self._threads = threads
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()  # _streams, _calls, _restarting, the socket's sending end
        self._ids = itertools.count()
        # what the reader thread learns from the child (read by any thread)
        self.num_steps = 0
        self.step_times = StepTimes()
        self._metrics: dict = {}
        self._dead = False
        self._closing = False
        self._restarting = False  # between a child's death and its successor's readiness
        self._reason: str | None = None  # why the child stopped, for clients
        self._restart_times: list[float] = []  # monotonic, of each restart in the window
        self.faults = FaultStats(worker_failures={"engine": 0})  # the one worker: the child
        self._process, self._conn, self.pid, self._metrics = _start_engine_child(factory, threads)
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    # -- what the serving layer reads ---------------------------------------------------

    @property
    def alive(self) -> bool:
        """Serving, or about to again: a child that died is being replaced."""
        return not self._dead and not self._closing

    @property
    def reason(self) -> str:
        """Why the engine stopped, in words a client may read (details are in the log)."""
        if self._reason is not None:
            return self._reason
        return "it was shut down" if self._closing else "the engine process exited"

    @property
    def error(self) -> str | None:
        return None if self.alive else self.reason

    def gauges(self) -> dict[str, Any]:
        """The engine's gauges as of its last step or command, and the children lost and
        replaced (`faults`; its epoch: the children replaced)."""
        return {**self._metrics, "faults": self.faults.figures(epoch=len(self.faults.recovery_seconds))}

    # -- requests -----------------------------------------------------------------------

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        images: Sequence = (),
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; the last one has finished=True. A
        request that can never run raises ValueError (from the engine's `add`)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if params.temperature > 0 and params.seed is None:
            params = replace(params, seed=new_seed())
        add = AddRequest(request_id, list(prompt_token_ids), params, tuple(images))
        payload = pickle.dumps(add, protocol=pickle.HIGHEST_PROTOCOL)
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if not self.alive:
                raise EngineDeadError(f"the engine is not running: {self.reason}")
            if len(self._streams) >= self.max_pending:
                raise QueueFullError(
                    f"{self.max_pending} requests are already queued or running; retry later"
                )
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = _Stream(outputs, asyncio.get_running_loop(), add)
            if not self._restarting:  # a restart adds it to the new child
                with suppress(OSError):  # the child just died: the reader restarts it or fails us
                    self._conn.send_bytes(payload)
        finished = False
        try:
            async with aclosing(joined_outputs(outputs, self.stream_interval)) as joined:
                async for out in joined:
                    finished = out.finished
                    yield out
        finally:
            if not finished:
                with self._lock:
                    running = self._streams.pop(request_id, None) is not None
                if running and self.alive:
                    self._post(AbortRequest(request_id), quiet=True)

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) in the child between two steps; the future holds its result or its
        exception. fn and its result must pickle (`operator.methodcaller("stats")` does). A call
        in flight when the child dies fails, and so does one made while it is replaced."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive or self._restarting:
            why = "it is restarting" if self.alive else self.reason
            result.set_exception(EngineDeadError(f"the engine is not running: {why}"))
            return result
        call_id = next(self._ids)
        with self._lock:
            self._calls[call_id] = result
        try:
            self._post(CallEngine(call_id, fn))
        except Exception as e:  # fn did not pickle, or the child is gone
            with self._lock:
                self._calls.pop(call_id, None)
            if not result.done():
                result.set_exception(e)
        return result

    def _post(self, message: object, quiet: bool = False) -> None:
        try:
            payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            with self._lock:
                self._conn.send_bytes(payload)
        except OSError as e:
            if not quiet:
                raise EngineDeadError(f"the engine is not running: {self.reason}") from e

    def close(self) -> None:
        """Stop the child (it closes its engine) and wait for it; kill it after 30 s."""
        if self._closing:
            return
        self._closing = True
        self._post(Stop(), quiet=True)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop in 30 s: killing it")
            self._process.kill()
            self._process.wait()
        self._reader.join(timeout=30)  # a restart in progress stops its new child itself
        self._conn.close()

    # -- the reader thread --------------------------------------------------------------

    def _read(self) -> None:
        """Hand on what the child sends; when it dies, replace it (or fail everything)."""
        while True:
            reason = self._read_child()
            code = self._process.wait()
            if self._closing:
                break
            said = f" ({reason})" if reason else ""
            log.error("the engine process %d exited with code %s%s", self.pid, code, said)
            self.faults.worker_failures["engine"] += 1
            if not (self._restart_allowed() and self._restart()):
                break
        self._dead = True
        self._fail_all(EngineDeadError(f"the engine stopped: {self.reason}"))

    def _read_child(self) -> str | None:
        """Read the current child until it is gone; its last words, if it said why."""
        try:
            while True:
                message = recv(self._conn)
                if isinstance(message, Died):
                    self._reason = message.reason
                    return message.reason
                self._handle(message)
        except (EOFError, OSError):
            return None

    def _restart_allowed(self) -> bool:
        now = time.monotonic()
        self._restart_times = [t for t in self._restart_times if now - t < self.restart_window_s]
        if len(self._restart_times) >= self.restarts:
            if self.restarts:
                log.error(
                    "the engine process died %d times in %.0f s: not starting another",
                    len(self._restart_times) + 1,
                    self.restart_window_s,
                )
            return False
        self._restart_times.append(now)
        return True

    def _restart(self) -> bool:
        """A new child, with every open request added again where it stopped; False if none
        could be started."""
        start = time.perf_counter()
        with self._lock:
            self._restarting = True
            calls, self._calls = list(self._calls.values()), {}
            poisoned = []
            for request_id, stream in list(self._streams.items()):
                stream.deaths += 1
                if stream.deaths >= self.max_deaths_per_request:
                    poisoned.append(self._streams.pop(request_id))
        for future in calls:
            future.set_exception(EngineDeadError("the engine process was lost while it ran this call"))
        for stream in poisoned:
            why = f"the engine failed {stream.deaths} times while running this request"
            _hand_on(stream, EngineDeadError(why))
        old_conn = self._conn
        try:
            process, conn, pid, metrics = _start_engine_child(self._factory, self._threads)
        except RuntimeError as e:
            log.error("could not replace the engine process: %s", e)
            self._reason = "the engine process was lost and could not be replaced"
            return False
        with self._lock:
            self._process, self._conn, self.pid, self._metrics = process, conn, pid, metrics
            self._restarting = False
            resumed = list(self._streams.values())
            for stream in resumed:
                with suppress(OSError):  # it died already: the next pass of _read sees it
                    conn.send_bytes(pickle.dumps(stream.resumed(), protocol=pickle.HIGHEST_PROTOCOL))
        old_conn.close()
        self._reason = None
        seconds = time.perf_counter() - start
        self.faults.recovery_seconds.append(seconds)
        self.faults.requests_replayed += len(resumed)
        log.warning(
            "the engine process %d replaced its lost predecessor in %.1f s; requests resumed: %d",
            pid,
            seconds,
            len(resumed),
        )
        if self._closing:  # close() came during the restart: it waited on the old child
            self._post(Stop(), quiet=True)
        return True

    def _handle(self, message: object) -> None:
        if isinstance(message, Stepped):
            self.step_times.add(message.seconds)
            self.num_steps += 1
            self._metrics = message.metrics
            self._deliver(message.outputs)
        elif isinstance(message, Gauges):
            self._metrics = message.metrics
        elif isinstance(message, Rejected):
            with self._lock:
                stream = self._streams.pop(message.request_id, None)
            if stream is not None:
                _hand_on(stream, ValueError(message.message))
        elif isinstance(message, Result):
            with self._lock:
                future = self._calls.pop(message.call_id, None)
            if future is not None and message.error is not None:
                future.set_exception(message.error)
            elif future is not None:
                future.set_result(message.value)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            with self._lock:
                stream = self._streams.get(out.request_id)
                if out.finished:
                    self._streams.pop(out.request_id, None)
            if stream is None:
                continue
            if stream.skip_prompt_logprobs and out.prompt_logprobs:  # a resumed request's again
                skip = min(stream.skip_prompt_logprobs, len(out.prompt_logprobs))
                stream.skip_prompt_logprobs -= skip
                out = replace(out, prompt_logprobs=out.prompt_logprobs[skip:])
                if not (out.new_token_ids or out.prompt_logprobs or out.finished):
                    continue
            stream.output_token_ids.extend(out.new_token_ids)
            stream.prompt_logprobs += len(out.prompt_logprobs)
            _hand_on(stream, out)

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for stream in streams:
            _hand_on(stream, error)
        for future in calls:
            future.set_exception(error)


def _hand_on(stream: _Stream, item: RequestOutput | BaseException) -> None:
    with suppress(RuntimeError):  # the consumer's event loop is closed: nobody is listening
        stream.loop.call_soon_threadsafe(stream.outputs.put_nowait, item)


# `main` imported, not `python -m engine.process_child`: run as __main__, that module's message
# classes would pickle as __main__'s, which the parent cannot load
CHILD = "import sys; from engine.process_child import main; sys.exit(main(sys.argv))"


def _start_engine_child(
    factory: Callable[[], Engine], threads: int | None
) -> tuple[subprocess.Popen, Connection, int, dict]:
    """A child with its engine built: its process, socket, pid and first gauges. RuntimeError
    if the engine could not be built."""
    process, conn = _start_child()
    try:
        send(conn, Start(factory, threads))
        while not conn.poll(1.0):
            if process.poll() is not None:
                break
        try:
            reply = recv(conn)
        except (EOFError, OSError) as e:
            code = process.wait()
            raise RuntimeError(f"the engine process exited (code {code}) before its engine was built") from e
        if isinstance(reply, Failed):
            raise RuntimeError(f"the engine process could not build its engine: {reply.reason}")
    except BaseException:
        process.kill()
        process.wait()
        conn.close()
        raise
    return process, conn, reply.pid, reply.metrics


def _start_child() -> tuple[subprocess.Popen, Connection]:
    """The child, `python -c CHILD FD`, with this process's import path (a Ray worker's runtime
    env adds to sys.path, not to PYTHONPATH)."""
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
    finally:
        theirs.close()
    return process, Connection(ours.detach())
