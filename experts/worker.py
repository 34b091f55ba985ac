"""The expert worker: a Ray actor that owns one device and a set of expert slots per MoE layer.

It reads only its own experts' slices from the checkpoint, joins the process group, and then runs
a loop driven by the per-step header from attention rank 0: for each STEP it serves one exchange
per MoE layer; STOP ends the loop. No Ray call per step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

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
        self.model_dir, self.dtype = model_dir, dt
        self.version = placement.version
        self._staged: dict[int, dict] = {}
        self.steps = 0

    def run_loop(self) -> int:
        """Serve steps until a STOP header arrives; returns the number of steps served."""
        for layer in self.slots:
            layer.gate_up = [t.to(self.device) for t in layer.gate_up]
            layer.down = [t.to(self.device) for t in layer.down]
        while True:
            header = exchange_header(None, self.device)
            if header.command is Command.STOP:
                return self.steps
            if header.placement_version != self.version:
                self._switch(header.placement_version)
            for moe_idx, layer in enumerate(self.slots):
                self.server.serve(moe_idx, layer.gate_up, layer.down)
            self.steps += 1

    def stage(self, version: int, changes: dict[int, dict[int, int]]) -> float:
        """Load the weights of a coming placement into staging (no step waits for this).

        changes: moe layer index -> {local slot: logical expert}. Runs on the actor's second
        thread while the loop keeps serving; returns the seconds it took."""
        t0 = time.perf_counter()
        staged: dict[int, dict[int, tuple[int, torch.Tensor, torch.Tensor]]] = {}
        with CheckpointReader(Path(self.model_dir)) as reader:
            for moe_idx, slot_to_expert in changes.items():
                layer_idx = reader.config.moe_layers[moe_idx]
                experts = list(slot_to_expert.values())
                w = reader.expert_rows(layer_idx, experts, self.dtype)
                staged[moe_idx] = {
                    slot: (expert, w.gate_up[i].clone().to(self.device), w.down[i].clone().to(self.device))
                    for i, (slot, expert) in enumerate(slot_to_expert.items())
                }
        self._staged[version] = staged
        return time.perf_counter() - t0

    def _switch(self, version: int) -> None:
        """Between two steps: swap staged slots in (pointer swaps); retired weights are freed."""
        if version not in self._staged:
            raise RuntimeError(f"worker {self.worker_idx}: placement version {version} was never staged")
        for moe_idx, slots in self._staged.pop(version).items():
            for slot, (expert, gate_up, down) in slots.items():
                self.slots[moe_idx].replace(slot, expert, gate_up, down)
        self._staged = {v: s for v, s in self._staged.items() if v > version}
        self.version = version

    def stats(self) -> dict:
        return {
            "worker_idx": self.worker_idx,
            "placement_version": self.version,
            "rows_computed_per_layer": dict(self.server.computed.per_layer),
            "rows_per_source_rank": dict(self.server.rows_per_source),
            "experts_per_layer": [list(s.slot_to_expert) for s in self.slots],
            "bytes_read": self.bytes_read,
            "load_seconds": self.load_seconds,
        }
