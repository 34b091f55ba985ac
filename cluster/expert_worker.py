"""The expert worker: a Ray actor that owns one device and a set of expert slots per MoE layer.

It reads only its own experts' slices from the checkpoint, joins the process group, and then runs
a loop driven by the per-step header from attention rank 0: for each STEP it serves one exchange
per MoE layer (receive rows, SwiGLU per slot, send them back); STOP ends the loop. No Ray call
per step. Staging for a coming placement runs on the actor's second thread.
"""

from __future__ import annotations

import time

from cluster.rendezvous import ProcessGroupMember
from experts.slots import ExpertSlots
from experts.swiglu import grouped_swiglu
from model.config import ModelConfig
from model.device import resolve_dtype
from router.dispatcher import Command, ExpertServer, exchange_header
from router.layout import RankLayout
from router.placement import Placement


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
        self.rank = layout.expert_rank(worker_idx)
        t0 = time.perf_counter()
        self.slots, self.bytes_read = ExpertSlots.load(
            model_dir, placement, worker_idx, resolve_dtype(dtype, self.device), self.device
        )
        self.load_seconds = time.perf_counter() - t0
        hidden = ModelConfig.from_file(model_dir).hidden_size
        self.server = ExpertServer(layout, hidden, self.slots.dtype, self.device)
        self.steps = 0

    def run_loop(self) -> int:
        """Serve steps until a STOP header arrives; returns the number of steps served."""
        self.slots.to(self.device)
        while True:
            header = exchange_header(None, self.device)
            if header.command is Command.STOP:
                return self.steps
            if header.placement_version != self.slots.version:
                self.slots.switch(header.placement_version)
            for moe_idx, layer in enumerate(self.slots.layers):
                rows, local_slot, splits = self.server.receive()
                self.server.send_back(
                    moe_idx, grouped_swiglu(rows, local_slot, *layer.compute_weights()), splits
                )
            self.steps += 1

    def stage(self, version: int, changes: dict[int, dict[int, int]]) -> float:
        """Load the weights of a coming placement into staging (no step waits for this).

        changes: moe layer index -> {local slot: logical expert}. Runs on the actor's second
        thread while the loop keeps serving; returns the seconds it took."""
        return self.slots.stage(version, changes, self.device)

    def stats(self) -> dict:
        return {
            "worker_idx": self.worker_idx,
            "placement_version": self.slots.version,
            "rows_computed_per_layer": dict(self.server.computed.per_layer),
            "rows_per_source_rank": dict(self.server.rows_per_source),
            "experts_per_layer": self.slots.experts_per_layer(),
            "bytes_read": self.bytes_read,
            "load_seconds": self.load_seconds,
        }
