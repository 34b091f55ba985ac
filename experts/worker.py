"""The expert worker: a Ray actor that owns one device and a set of expert slots per MoE layer.

It reads only its own experts' slices from the checkpoint, joins the process group, and then runs
a loop driven by the per-step header from attention rank 0: for each STEP it serves one exchange
per MoE layer; STOP ends the loop. No Ray call per step.
"""

from __future__ import annotations

import time
from pathlib import Path

from cluster.checkpoint import CheckpointReader, parse_dtype
from cluster.rendezvous import ProcessGroupMember
from experts.slots import LayerSlots, load_slots
from router.dispatcher import Command, ExpertServer, Topology, exchange_header
from router.placement import Placement


class ExpertWorker(ProcessGroupMember):
    def __init__(
        self,
        model_dir: str,
        worker_idx: int,
        topology: Topology,
        placement: Placement,
        dtype: str,
        device: str,
    ) -> None:
        super().__init__(device)
        self.worker_idx = worker_idx
        self.topology = topology
        self.rank = topology.expert_rank(worker_idx)
        dt = parse_dtype(dtype)
        t0 = time.perf_counter()
        with CheckpointReader(Path(model_dir)) as reader:
            cfg = reader.config
            wanted = {
                layer: placement.experts_on_worker(m, worker_idx) for m, layer in enumerate(cfg.moe_layers)
            }
            self.slots: list[LayerSlots] = list(load_slots(reader, wanted, dt).values())
            self.bytes_read = reader.bytes_read
        self.load_seconds = time.perf_counter() - t0
        self.server = ExpertServer(topology, cfg.hidden_size, dt, self.device)
        self.steps = 0

    def run_loop(self) -> int:
        """Serve steps until a STOP header arrives; returns the number of steps served."""
        for s in self.slots:
            s.gate_up, s.down = s.gate_up.to(self.device), s.down.to(self.device)
        while True:
            header = exchange_header(None, self.device)
            if header.command is Command.STOP:
                return self.steps
            for moe_idx, s in enumerate(self.slots):
                self.server.serve(moe_idx, s.gate_up, s.down)
            self.steps += 1

    def stats(self) -> dict:
        return {
            "worker_idx": self.worker_idx,
            "rows_computed_per_layer": dict(self.server.computed.per_layer),
            "rows_per_source_rank": dict(self.server.rows_per_source),
            "experts_per_layer": [s.slot_to_expert for s in self.slots],
            "bytes_read": self.bytes_read,
            "load_seconds": self.load_seconds,
        }
