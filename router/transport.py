"""How an exchange's tensors travel between ranks: torch.distributed collectives, or sockets.

Every exchange of the dispatcher's protocol goes one way: attention ranks send counts and rows
to the expert ranks, the expert ranks send results back, and both sides know every part's size
before it travels. So a transport has two calls: `send(x, splits)` (x's rows split by destination
rank, in rank order) and `recv(out, splits)` (rows from each source rank, in rank order). A part
of size 0 is no message. `send_parts` sends several tensors so, one after the other per
destination (the counts and then the rows of a MoE layer): over sockets one `sendmsg` each.

- `CollectiveTransport` makes each call one `all_to_all_single` of the whole world (the other
  side's splits are zeros): NCCL on GPUs, where GPU tensors have to travel that way; gloo on CPUs
  where asked for (`transport="collective"`).
- `SocketTransport`, the default on CPUs: one stream socket per pair of ranks that exchange;
  Unix (abstract namespace) where both share a host and network namespace, TCP otherwise. A send
  is `sendall` of the part's bytes, a receive `recv_into` the output's rows: no copy beyond the
  kernel's, no thread between the caller and its socket.

Why sockets: on a 2-core machine a gloo `all_to_all_single` among 3 processes takes about 1.5 ms
for a few bytes (0.2 ms among 2), three of them per MoE layer, while a round trip over a pair of
Unix sockets takes 0.06-0.09 ms for 1 to 32 rows of 256 floats. `llama4-ep bench dispatch
--transport collective,sockets` prints both side by side.

Failures read as in a collective: a peer that is gone closes its sockets, and the blocked call
raises ConnectionError at once; a peer that stalls makes it raise TimeoutError after
`timeout_s`. `close` shuts every socket, which wakes the peers still blocked on this rank.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import selectors
import socket
import struct
import time
import uuid
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TRANSPORTS = ("auto", "sockets", "collective")
SOCKET_BUFFER_BYTES = 4 << 20  # asked for; the kernel caps it (net.core.wmem_max / rmem_max)
_HELLO = struct.Struct("<i")  # the connecting rank says who it is


def resolve_transport(transport: str, device: torch.device) -> str:
    """`auto`: "sockets" on a CPU, "collective" (NCCL) on a GPU."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r} (allowed: {', '.join(TRANSPORTS)})")
    if transport == "auto":
        return "sockets" if device.type == "cpu" else "collective"
    if transport == "sockets" and device.type != "cpu":
        raise ValueError(f"the sockets transport carries CPU tensors only, not {device.type} ones")
    return transport


class CollectiveTransport:
    """Each call is one `all_to_all_single` of the default group; every rank of the world takes part
    in it, on one side or the other."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._zeros = [0] * world_size

    def send(self, x: torch.Tensor, splits: Sequence[int], async_op: bool = False) -> dist.Work | None:
        empty = x.new_empty((0, *x.shape[1:]))
        return dist.all_to_all_single(
            empty, x, output_split_sizes=self._zeros, input_split_sizes=list(splits), async_op=async_op
        )

    def send_parts(self, parts: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> dist.Work | None:
        """One collective per part; the last one async (what it returns)."""
        *first, (last, last_splits) = parts
        for x, splits in first:
            self.send(x, splits)
        return self.send(last, last_splits, async_op=True)

    def recv(self, out: torch.Tensor, splits: Sequence[int]) -> None:
        empty = out.new_empty((0, *out.shape[1:]))
        dist.all_to_all_single(out, empty, output_split_sizes=list(splits), input_split_sizes=self._zeros)

    def describe(self) -> str:
        return f"collective ({dist.get_backend()})" if dist.is_initialized() else "collective (no group)"

    def close(self) -> None:
        """The group is left by its owner (`cluster.rendezvous`)."""


class SocketTransport:
    """One connected stream socket per peer rank (`connect` makes the mesh through a store)."""

    def __init__(self, rank: int, conns: dict[int, socket.socket], timeout_s: float) -> None:
        self.rank = rank
        self.timeout_s = timeout_s
        self._conns = conns

    def kinds(self) -> dict[int, str]:
        """Each peer's socket family: "unix" or "tcp"."""
        return {p: "unix" if c.family == socket.AF_UNIX else "tcp" for p, c in sorted(self._conns.items())}

    def describe(self) -> str:
        """The socket families in use: `sockets (unix)`, `sockets (tcp)` or `sockets (tcp, unix)`."""
        return f"sockets ({', '.join(sorted(set(self.kinds().values()))) or 'no peers'})"

    @classmethod
    def connect(
        cls,
        store: dist.Store,
        rank: int,
        peers: Iterable[int],
        timeout_s: float,
        ip: str = "127.0.0.1",
        unix: bool = True,
    ) -> SocketTransport:
        """Meet every peer through `store` (a fresh prefix per group): each rank publishes where it
        listens, connects to its lower-ranked peers and accepts its higher-ranked ones. `ip` is the
        address peers on other hosts reach this one at; `unix=False` takes TCP even on one host."""
        peers = sorted(set(peers) - {rank})
        lower, higher = [p for p in peers if p < rank], [p for p in peers if p > rank]
        listeners, where = _listeners(ip, unix, backlog=max(1, len(higher)))
        conns: dict[int, socket.socket] = {}
        try:
            store.set(f"sockets/{rank}", json.dumps(where))
            deadline = time.monotonic() + timeout_s
            for p in lower:
                conns[p] = _dial(json.loads(store.get(f"sockets/{p}")), rank, p, unix, deadline)
            conns.update(_accept(listeners, set(higher), deadline))
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        finally:
            for s in listeners:
                s.close()
        for c in conns.values():
            c.settimeout(timeout_s)
        return cls(rank, conns, timeout_s)

    def send(self, x: torch.Tensor, splits: Sequence[int], async_op: bool = False) -> None:
        """x's rows, splits[r] of them to rank r in rank order. Returns once the kernel holds them
        (the part's bytes fit the socket's buffer) or the peer has read them: nothing to wait on."""
        self.send_parts([(x, splits)])

    def send_parts(self, parts: Sequence[tuple[torch.Tensor, Sequence[int]]]) -> None:
        """Each part as `send` would, but one `sendmsg` per destination for all its parts (the
        receiver reads them with one `recv` each, in the same order)."""
        pieces: dict[int, list[memoryview]] = {}
        for x, splits in parts:
            data, row = _bytes(x), _row_bytes(x)
            start = 0
            for r, n in enumerate(splits):
                if n:
                    pieces.setdefault(r, []).append(data[start * row : (start + n) * row])
                start += n
        for r, views in pieces.items():
            try:
                _send_all(self._conn(r), views)
            except TimeoutError:
                raise TimeoutError(self._late(r, "take")) from None
            except (BrokenPipeError, ConnectionResetError) as e:
                raise self._gone(r, e) from None

    def recv(self, out: torch.Tensor, splits: Sequence[int]) -> None:
        """splits[r] rows from each rank r, in rank order, into out (contiguous, on the CPU)."""
        data, row = _bytes(out), _row_bytes(out)
        start = 0
        for r, n in enumerate(splits):
            if n:
                self._read(r, data[start * row : (start + n) * row])
            start += n

    def close(self) -> None:
        """Shut every socket: peers blocked on this rank raise at once."""
        for c in self._conns.values():
            with contextlib.suppress(OSError):  # the peer closed it first
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._conns = {}

    def _read(self, r: int, view: memoryview) -> None:
        conn = self._conn(r)
        while view:
            try:
                n = conn.recv_into(view)
            except TimeoutError:
                raise TimeoutError(self._late(r, "send")) from None
            except ConnectionResetError as e:
                raise self._gone(r, e) from None
            if n == 0:
                raise ConnectionError(f"rank {r} closed its connection to rank {self.rank} (it is gone)")
            view = view[n:]

    def _gone(self, r: int, e: OSError) -> ConnectionError:
        return ConnectionError(f"the connection from rank {self.rank} broke ({e.strerror}): rank {r} is gone")

    def _conn(self, r: int) -> socket.socket:
        try:
            return self._conns[r]
        except KeyError:
            raise ConnectionError(f"rank {self.rank} has no connection to rank {r}") from None

    def _late(self, r: int, what: str) -> str:
        return f"rank {r} did not {what} rank {self.rank}'s data within {self.timeout_s:g} s (stalled)"


def host_key() -> str | None:
    """Ranks with the same key reach each other's abstract Unix sockets: one host (its boot) and
    one network namespace (a pod has its own). None off Linux (no abstract namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{socket.gethostname()}:{boot}:{netns}"


def _listeners(ip: str, unix: bool, backlog: int) -> tuple[list[socket.socket], dict]:
    """Listening sockets (an abstract Unix one where there can be one, and a TCP one) and where
    peers find them."""
    host = host_key()
    where: dict = {"host": host, "ip": ip}
    out = []
    if unix and host is not None:
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        where["unix"] = f"llama4-ep-{uuid.uuid4().hex}"
        u.bind("\0" + where["unix"])
        out.append(u)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("0.0.0.0", 0))
    where["port"] = t.getsockname()[1]
    out.append(t)
    for s in out:
        s.listen(backlog)
    return out, where


def _dial(where: dict, rank: int, peer: int, unix: bool, deadline: float) -> socket.socket:
    host = host_key()
    if unix and "unix" in where and host is not None and where["host"] == host:
        s, address = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "\0" + where["unix"]
    else:
        s, address = socket.socket(socket.AF_INET, socket.SOCK_STREAM), (where["ip"], where["port"])
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _size_buffers(s)
    s.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        s.connect(address)
        s.sendall(_HELLO.pack(rank))
    except OSError as e:
        s.close()
        raise ConnectionError(f"rank {rank} could not connect to rank {peer} at {address!r}: {e}") from None
    return s


def _accept(listeners: list[socket.socket], expected: set[int], deadline: float) -> dict[int, socket.socket]:
    conns: dict[int, socket.socket] = {}
    with selectors.DefaultSelector() as sel:
        for s in listeners:
            sel.register(s, selectors.EVENT_READ)
        while len(conns) < len(expected):
            left = deadline - time.monotonic()
            events = sel.select(timeout=max(0.0, left)) if left > 0 else []
            if not events:
                missing = sorted(expected - set(conns))
                raise TimeoutError(f"ranks {missing} did not connect in time")
            for key, _ in events:
                c, _ = key.fileobj.accept()
                c.settimeout(max(0.001, deadline - time.monotonic()))
                peer = _HELLO.unpack(_read_exactly(c, _HELLO.size))[0]
                if peer not in expected or peer in conns:
                    c.close()
                    raise ConnectionError(f"an unexpected rank {peer} connected")
                if c.family != socket.AF_UNIX:
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _size_buffers(c)
                conns[peer] = c
    return conns


def _send_all(conn: socket.socket, views: list[memoryview]) -> None:
    """`sendmsg` of the views, then whatever it did not take (a part larger than the buffer)."""
    sent = conn.sendmsg(views)
    for v in views:
        if sent >= len(v):
            sent -= len(v)
            continue
        conn.sendall(v[sent:])
        sent = 0


def _read_exactly(c: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        k = c.recv_into(view)
        if k == 0:
            raise ConnectionError("a peer closed its connection while joining")
        view = view[k:]
    return bytes(buf)


def _size_buffers(s: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)
        except OSError as e:  # a smaller buffer only means a send waits for its reader sooner
            log.debug("socket buffer: %s", e)


def _bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (a CPU tensor, contiguous)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"the sockets transport takes contiguous CPU tensors, not {t.device} {t.stride()}")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()
