"""Membership epochs and the per-step header, over one TCP store that the driver hosts.

The driver (the process that owns a `ClusterEngine`) runs a `torch.distributed.TCPStore` for the
engine's whole life. Every change of members (a worker lost, added or removed) is a new epoch:
each member leaves its torch.distributed group and joins a new one whose rendezvous lives under
the store prefix `epoch<e>/`, with the new ranks. Nothing of a broken group is reused.

The per-step header reaches the expert workers through the same store, not through a
collective: the driver writes `hdr/<epoch>/<seq>` before each step and expert workers block on
it. An idle expert worker therefore waits on the driver, never in a collective (which could only
time out), and the driver can always wake it: with STEP, with LEAVE (the epoch ends: leave the
group and wait for instructions) or with STOP. Collectives of a step run under the epoch's
step-scoped timeout.
"""

from __future__ import annotations

import datetime
import enum
import struct
from dataclasses import dataclass

import torch.distributed as dist

STORE_TIMEOUT = datetime.timedelta(days=1)  # store waits: a header always comes, or the store dies
_HEADER = struct.Struct("<qqqb")  # epoch, step_id, placement_version, command


class Command(enum.IntEnum):
    STEP = 0
    STOP = 1  # the engine is closing: end the loop
    LEAVE = 2  # the epoch ends: leave the group, end the loop, wait for instructions


@dataclass(frozen=True)
class Header:
    epoch: int
    step_id: int
    placement_version: int
    command: Command

    def encode(self) -> bytes:
        return _HEADER.pack(self.epoch, self.step_id, self.placement_version, int(self.command))

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        epoch, step_id, version, command = _HEADER.unpack(raw)
        return cls(epoch, step_id, version, Command(command))


@dataclass(frozen=True)
class StoreAddress:
    host: str
    port: int


def connect(address: StoreAddress) -> dist.TCPStore:
    """A client of the driver's store (each worker keeps one for its whole life)."""
    return dist.TCPStore(address.host, address.port, is_master=False, timeout=STORE_TIMEOUT)


def epoch_store(store: dist.Store, epoch: int) -> dist.Store:
    """The rendezvous namespace of one epoch's process group."""
    return dist.PrefixStore(f"epoch{epoch}/", store)


def _key(epoch: int, seq: int) -> str:
    return f"hdr/{epoch}/{seq}"


class HeaderBoard:
    """The driver's side: the store itself and the headers of the current epoch.

    Header `seq` of an epoch is the seq-th header the expert loops of that epoch read. The driver
    writes header seq only after step seq - 1 ended (completed or failed), so every expert worker
    has read header seq - 2 by then (step seq - 2 completed, and needed all of them): that one is
    deleted. A failed step's header may be unread by some worker, so it stays until later."""

    def __init__(self, host: str) -> None:
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
        self.address = StoreAddress(host, self.store.port)
        self.epoch = 0
        self._seq = 0

    def new_epoch(self) -> int:
        """The next epoch (every loop of this one has ended): its headers start over."""
        for seq in range(max(0, self._seq - 2), self._seq):
            self.store.delete_key(_key(self.epoch, seq))
        self.epoch += 1
        self._seq = 0
        return self.epoch

    def publish(self, step_id: int, placement_version: int, command: Command = Command.STEP) -> None:
        header = Header(self.epoch, step_id, placement_version, command)
        self.store.set(_key(self.epoch, self._seq), header.encode())
        if self._seq >= 2:
            self.store.delete_key(_key(self.epoch, self._seq - 2))
        self._seq += 1


class HeaderReader:
    """An expert worker's side: the headers of one epoch, in order."""

    def __init__(self, store: dist.Store, epoch: int) -> None:
        self.store = store
        self.epoch = epoch
        self._seq = 0

    def next(self) -> Header:
        """Blocks until the driver writes the next header; raises if the store is gone."""
        raw = self.store.get(_key(self.epoch, self._seq))
        self._seq += 1
        return Header.decode(raw)
