"""The expert worker: a Ray actor that owns one device and a set of expert slots per MoE layer.

It reads only its own experts' slices from the checkpoint, joins the epoch's process group, and
runs a loop driven by the headers the driver writes to its store (`cluster.membership`): for
each STEP it serves one exchange per MoE layer (receive rows, SwiGLU per slot, send them back).
No Ray call per step. The loop ends, and the actor waits for the driver's next instruction, when
the epoch ends (LEAVE), when the group breaks under it (a peer was lost), or on STOP.

Control calls (staging, joining the next epoch, stats, ping) run on the actor's control thread
(`cluster.rendezvous.CONTROL`), the loop on its work thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from cluster.membership import Command, HeaderReader, StoreAddress
from cluster.rendezvous import CONTROL, ProcessGroupMember, first_line
from experts.slots import ExpertSlots
from experts.swiglu import grouped_swiglu
from model.config import ModelConfig
from model.device import resolve_dtype
from router.dispatcher import ExpertServer
from router.layout import RankLayout
from router.placement import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopEnd:
    """Why an expert loop ended: "stopped", "left" (the epoch ended) or "broken" (a collective
    failed; `error` says how). `steps` counts the steps it served in its epoch."""

    worker_idx: int
    epoch: int
    reason: str
    steps: int
    error: str = ""


class ExpertWorker(ProcessGroupMember):
    def __init__(
        self,
        model_dir: str,
        worker_idx: int,
        layout: RankLayout,
        placement: Placement,
        dtype: str,
        device: str,
    ) -> None:
        super().__init__(device)
        self.worker_idx = worker_idx
        self.layout = layout
        t0 = time.perf_counter()
        self.slots, self.bytes_read = ExpertSlots.load(
            model_dir, placement, worker_idx, resolve_dtype(dtype, self.device), self.device
        )
        self.load_seconds = time.perf_counter() - t0
        self.slots.to(self.device)
        self.hidden_size = ModelConfig.from_file(model_dir).hidden_size
        self.server = ExpertServer(layout, self.hidden_size, self.slots.dtype, self.device)
        self._rows_before = 0  # rows computed in earlier epochs

    @ray.method(concurrency_group=CONTROL)
    def join_epoch(
        self,
        store: StoreAddress,
        epoch: int,
        worker_idx: int,
        layout: RankLayout,
        collective_timeout_s: float,
        transport: str = "auto",
    ) -> int:
        """Join `epoch`'s group as expert worker `worker_idx` of `layout` (the driver has staged
        whatever this worker's slots change to in the new map)."""
        self._rows_before += sum(self.server.computed.per_layer.values())
        self.worker_idx, self.layout = worker_idx, layout
        rank, attention = layout.expert_rank(worker_idx), range(layout.num_attention)
        self.join(store, epoch, rank, layout.world_size, attention, collective_timeout_s, transport)
        self.server = ExpertServer(layout, self.hidden_size, self.slots.dtype, self.device, self.transport)
        return rank

    def run_loop(self) -> LoopEnd:
        """Serve this epoch's steps until its headers say STOP or LEAVE, or the group breaks."""
        headers, steps = HeaderReader(self._store, self.epoch), 0
        while True:
            header = headers.next()
            if header.command is not Command.STEP:
                self.leave()
                reason = "stopped" if header.command is Command.STOP else "left"
                return LoopEnd(self.worker_idx, self.epoch, reason, steps)
            try:
                if header.placement_version != self.slots.version:
                    self.slots.switch(header.placement_version)
                for moe_idx, layer in enumerate(self.slots.layers):
                    rows, local_slot, splits = self.server.receive()
                    out = grouped_swiglu(rows, local_slot, *layer.compute_weights())
                    self.server.send_back(moe_idx, out, splits)
            except Exception as e:  # the group broke (a peer is gone or stalled): leave, report
                self.leave()  # leaving at once wakes the peers still blocked on this worker
                log.warning(
                    "expert worker %d left epoch %d at step %d: %s",
                    self.worker_idx,
                    self.epoch,
                    header.step_id,
                    e,
                )
                return LoopEnd(self.worker_idx, self.epoch, "broken", steps, first_line(e))
            steps += 1

    @ray.method(concurrency_group=CONTROL)
    def stage(self, version: int, changes: dict[int, dict[int, int]]) -> float:
        """Load the weights of a coming placement into staging (no step waits for this).

        changes: moe layer index -> {local slot: logical expert}. Runs on the actor's control
        thread while the loop keeps serving; returns the seconds it took."""
        return self.slots.stage(version, changes, self.device)

    @ray.method(concurrency_group=CONTROL)
    def discard_staged(self) -> None:
        """Forget staged maps that will never be used (a failure replaced the plan)."""
        self.slots.discard_staged()

    @ray.method(concurrency_group=CONTROL)
    def stats(self) -> dict:
        rows = dict(self.server.computed.per_layer)
        return {
            "worker_idx": self.worker_idx,
            "epoch": self.epoch,
            "transport": self.transport_in_use(),
            "placement_version": self.slots.version,
            "rows_computed_per_layer": rows,  # this epoch's (the row-count invariant is per epoch)
            "rows_computed_total": self._rows_before + sum(rows.values()),
            "rows_per_source_rank": dict(self.server.rows_per_source),
            "experts_per_layer": self.slots.experts_per_layer(),
            "bytes_read": self.bytes_read,
            "load_seconds": self.load_seconds,
        }
