"""Joining one torch.distributed process group from Ray actors.

Rank 0 picks a free port on its own node and reports its address through Ray; every member then
joins with a TCP init method. NCCL on GPUs, gloo on CPUs. No port is hard-coded.
"""

from __future__ import annotations

import datetime
import os
import socket

import ray
import torch
import torch.distributed as dist

# Expert ranks wait in a broadcast between steps; an idle server must not time them out.
IDLE_TIMEOUT = datetime.timedelta(days=7)
DEVICES = ("cpu", "cuda")


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r} (allowed: {', '.join(DEVICES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but no CUDA GPU is visible")
    return device


def free_address() -> tuple[str, int]:
    """This node's IP and a port that is free right now."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


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

    def pid(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        return free_address()

    def join(self, master: tuple[str, int], world_size: int) -> int:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master[0]}:{master[1]}",
            rank=self.rank,
            world_size=world_size,
            timeout=IDLE_TIMEOUT,
        )
        return self.rank

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
