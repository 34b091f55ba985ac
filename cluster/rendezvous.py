"""Joining and leaving an epoch's group from Ray actors.

Every member connects once to the driver's TCP store (`cluster.membership`) and, for each
membership epoch, joins a fresh group under that epoch's store prefix with its new rank: a
torch.distributed group with NCCL on GPUs, a mesh of sockets on CPUs (`router.transport`; gloo
where `transport="collective"`). No port is hard-coded: the store and the sockets listen on free
ones.

Collectives run under a step-scoped timeout: a stalled peer fails the step after
`collective_timeout_s` at the latest. A dead peer fails it at once (its sockets close), and a
member that sees its group break leaves it at once, which in turn wakes the members still
blocked on it.
"""

from __future__ import annotations

import datetime
import logging
import os

import ray
import torch
import torch.distributed as dist

from cluster.membership import StoreAddress, connect, epoch_store
from router.transport import CollectiveTransport, SocketTransport, resolve_transport

log = logging.getLogger(__name__)
DEVICES = ("cpu", "cuda")

# A worker actor's two threads. Its work (an attention worker's steps, an expert worker's loop, a
# vision worker's encodes) runs on the default group's one thread, always the same one; control
# calls (pings, stats, staging, joining the next epoch) on the control group's, also while the
# work blocks. One thread for the work matters on a CPU: each thread that runs torch ops on
# several threads has an OpenMP team of its own (`attention.threads.compute_threads`), and steps
# that landed on either thread of a plain `max_concurrency=2` pool made two. With that and the
# load on one intra-op thread, an attention worker's step at batch 1 took 15.1 ms against 22.1
# (bench-maverick, 1 + 2 workers, 2 cores, `bench overhead`).
CONTROL = "control"
CONCURRENCY_GROUPS = {CONTROL: 1}


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (allowed: {', '.join(DEVICES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is visible")
    return device


class ProcessGroupMember:
    """Mixin for actors that join the group. CPU actors use one thread: the node's cores are
    shared by many workers."""

    def __init__(self, device: str) -> None:
        check_device(device)
        if device == "cpu":
            torch.set_num_threads(int(os.environ.get("LLAMA4_EP_WORKER_THREADS", "1")))
            self.device = torch.device("cpu")
        else:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(self.device)
        self.rank = -1
        self.epoch = -1
        self._store: dist.TCPStore | None = None
        self.transport: CollectiveTransport | SocketTransport | None = None

    @ray.method(concurrency_group=CONTROL)
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group=CONTROL)
    def where(self) -> tuple[str, int]:
        """This worker's Ray node and process id."""
        return ray.get_runtime_context().get_node_id(), os.getpid()

    @ray.method(concurrency_group=CONTROL)
    def ping(self) -> int:
        """Answered on the control thread, also while a step blocks the work thread: a worker
        that does not answer is hung."""
        return os.getpid()

    @ray.method(concurrency_group=CONTROL)
    def join(
        self,
        store: StoreAddress,
        epoch: int,
        rank: int,
        world_size: int,
        peers: range,
        collective_timeout_s: float,
        transport: str = "auto",
    ) -> int:
        """Leave the current group (if any) and join `epoch`'s group as `rank`; `peers` are the
        ranks this one exchanges with (a socket each)."""
        self.leave()
        if self._store is None:
            self._store = connect(store)
        prefixed = epoch_store(self._store, epoch)
        if resolve_transport(transport, self.device) == "sockets":
            ip = ray.util.get_node_ip_address()
            self.transport = SocketTransport.connect(prefixed, rank, peers, collective_timeout_s, ip)
        else:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            timeout = datetime.timedelta(seconds=collective_timeout_s)
            dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size,
                                    timeout=timeout)  # fmt: skip
            self.transport = CollectiveTransport(world_size)
        self.rank, self.epoch = rank, epoch
        return rank

    @ray.method(concurrency_group=CONTROL)
    def transport_in_use(self) -> str:
        return self.transport.describe() if self.transport is not None else "none (not in a group)"

    @ray.method(concurrency_group=CONTROL)
    def leave(self) -> None:
        """Leave the group, broken or not (a no-op outside one). Sockets are shut at once; NCCL
        communicators are aborted first: a destroy alone can block on a peer that is gone."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if not dist.is_initialized():
            return
        try:
            if dist.get_backend() == "nccl":
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception as e:  # a group that broke can fail to tear down; it is gone either way
            log.warning("leaving epoch %d's group: %s", self.epoch, e)


def first_line(e: BaseException) -> str:
    """An error's first line, without the C++ source path gloo puts in front of it: what a log line
    or a client may see."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text
