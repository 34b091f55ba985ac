"""The child side of `engine.process_engine`: the messages parent and child send each other over
their socket, and the child's loop.

The child is a fresh interpreter that calls `main` (not multiprocessing's spawn, which re-runs
the parent's `__main__`: in a Ray worker, Ray's). It builds its engine from a picklable factory,
says it is ready, then loops: apply the commands that came in, step, send what the step produced
(one message per step). It stops when told to, when the parent's end of the socket closes (the
parent died), or when the engine raises, after saying why.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.core import RequestOutput
from engine.protocol import Engine, EngineUnavailable
from engine.request import SamplingParams

INTERNAL_ERROR = "an internal error (see the server log)"


# -- messages, parent to child ------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    factory: Callable[[], Engine]
    threads: int | None  # torch intra-op threads of the child; None: its default


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    images: tuple = ()  # model.image_processing.ProcessedImage
    output_token_ids: tuple[int, ...] = ()  # a resumed request's tokens so far


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class CallEngine:
    call_id: int
    fn: Callable[[Engine], Any]


@dataclass(frozen=True)
class Stop:
    pass


# -- messages, child to parent ------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    pid: int
    metrics: dict


@dataclass(frozen=True)
class Failed:
    reason: str  # why the engine could not be built


@dataclass(frozen=True)
class Stepped:
    outputs: list[RequestOutput]
    seconds: float  # the engine's step alone
    metrics: dict


@dataclass(frozen=True)
class Rejected:
    request_id: str
    message: str  # the engine's ValueError: a request that can never run


@dataclass(frozen=True)
class Result:
    call_id: int
    value: Any = None
    error: Exception | None = None


@dataclass(frozen=True)
class Gauges:
    metrics: dict  # after commands that changed them with no step to report it (an abort)


@dataclass(frozen=True)
class Died:
    reason: str  # for clients: EngineUnavailable's message, or INTERNAL_ERROR


def send(conn: Connection, message: object) -> None:
    # plain pickle: multiprocessing's would move tensors through shared memory, this copies them
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


# -- the child's side ---------------------------------------------------------------------


class _ChildLoop:
    def __init__(self, conn: Connection, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine

    def run(self) -> int:
        """Step until told to stop or the parent is gone (0), or the engine raises (1)."""
        try:
            while self._apply_commands(block=not self.engine.has_unfinished):
                if self.engine.has_unfinished:
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    seconds = time.perf_counter() - start
                    send(self.conn, Stepped(outputs, seconds, self.engine.metrics()))
            return 0
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent is gone
            return 0
        except BaseException as e:
            traceback.print_exc()
            reason = str(e) if isinstance(e, EngineUnavailable) else INTERNAL_ERROR
            with suppress(OSError):
                send(self.conn, Died(reason))
            return 1
        finally:
            self.engine.close()

    def _apply_commands(self, block: bool) -> bool:
        """Apply what the parent sent (waiting for something if `block`); False: stop."""
        applied = False
        while self.conn.poll(None if block and not applied else 0):
            message = recv(self.conn)
            if isinstance(message, Stop):
                return False
            self._apply(message)
            applied = True
        if applied and not self.engine.has_unfinished:
            send(self.conn, Gauges(self.engine.metrics()))
        return True

    def _apply(self, message: object) -> None:
        if isinstance(message, AddRequest):
            extra: dict[str, Any] = {}  # keywords only where needed: any `Engine` takes the rest
            if message.images:
                extra["images"] = message.images
            if message.output_token_ids:
                extra["output_token_ids"] = message.output_token_ids
            try:
                self.engine.add(message.prompt, message.params, message.request_id, **extra)
            except ValueError as e:
                send(self.conn, Rejected(message.request_id, str(e)))
        elif isinstance(message, AbortRequest):
            self.engine.abort(message.request_id)
        elif isinstance(message, CallEngine):
            try:
                result = Result(message.call_id, value=message.fn(self.engine))
                payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # the caller gets it; the loop goes on
                payload = pickle.dumps(Result(message.call_id, error=_picklable(e)))
            self.conn.send_bytes(payload)


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def main(argv: list[str]) -> int:
    """The child: build the engine the parent asks for, say so, then step it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the parent, which stops us
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-process %(levelname)s %(message)s")
    conn = Connection(int(argv[1]))
    start: Start = recv(conn)
    if start.threads is not None:
        import torch

        torch.set_num_threads(min(start.threads, len(os.sched_getaffinity(0))))
    try:
        engine = start.factory()
    except Exception as e:
        traceback.print_exc()
        send(conn, Failed(f"{type(e).__name__}: {e}"))
        return 1
    send(conn, Ready(os.getpid(), engine.metrics()))
    return _ChildLoop(conn, engine).run()
