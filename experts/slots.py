"""Expert slots: the routed-expert weights one process holds, their staging and the colocated backend.

A slot holds one replica of one logical expert. `ExpertSlots` is an expert worker's store: the
slots of every MoE layer, loaded from the checkpoint for one placement map, plus weights staged
for the next map and swapped in between two steps. `LocalExperts` is the colocated MoE backend:
every expert in this process, one slot each.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experts.swiglu import grouped_swiglu
from model import host_memory
from model.checkpoint import CheckpointReader
from router.placement import Placement


@dataclass
class LayerSlots:
    """One MoE layer's slots: per slot s, gate_up[s] [H, 2I] and down[s] [I, H] hold logical expert
    slot_to_expert[s]. Separate tensors per slot, so replacing a slot is a pointer swap; the
    compute reads them stacked (`compute_weights`)."""

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    slot_to_expert: list[int]
    # the slots stacked [S, H, 2I] and [S, I, H], gate_up[s]/down[s] views into them
    _stacked: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _views: tuple[list[torch.Tensor], list[torch.Tensor]] = field(
        default_factory=lambda: ([], []), repr=False, compare=False
    )

    @classmethod
    def from_stacked(cls, gate_up: torch.Tensor, down: torch.Tensor, slot_to_expert: list[int]) -> LayerSlots:
        """Slots over stacked weights [S, H, 2I] and [S, I, H], without a copy."""
        layer = cls(list(gate_up.unbind(0)), list(down.unbind(0)), slot_to_expert)
        layer._stacked, layer._views = (gate_up, down), (list(layer.gate_up), list(layer.down))
        return layer

    def replace(self, slot: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """Put one replica in `slot`; the slot right past the last one grows the layer by one."""
        if slot == len(self.slot_to_expert):
            self.gate_up.append(gate_up)
            self.down.append(down)
            self.slot_to_expert.append(expert)
            return
        self.gate_up[slot], self.down[slot], self.slot_to_expert[slot] = gate_up, down, expert

    def to(self, device: torch.device) -> LayerSlots:
        if all(t.device == device for t in self.gate_up + self.down):
            return self  # read there already: keep the stack
        return LayerSlots(
            [t.to(device) for t in self.gate_up], [t.to(device) for t in self.down], self.slot_to_expert
        )

    def compute_weights(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
        """What `grouped_swiglu` runs on: the stacked slots (for the grouped GEMM; its per-slot
        loop indexes them too). The first call stacks the loaded slots and keeps only the stack
        (gate_up[s] become views of it). After slots were replaced (a pointer swap) or added, the
        stack is made afresh once: one layer's slots are copied (bench-maverick, 128 slots: 100 MB)."""
        if not self.gate_up:
            return self.gate_up, self.down
        views_gu, views_dn = self._views
        # every step asks: a C-level identity check (map), not a generator over 2S pairs
        current = (
            len(views_gu) == len(self.gate_up) == len(self.down)
            and all(map(operator.is_, self.gate_up, views_gu))
            and all(map(operator.is_, self.down, views_dn))
        )
        if not current:
            fresh = LayerSlots.from_stacked(_stacked(self.gate_up), _stacked(self.down), [])
            self.gate_up, self.down = fresh.gate_up, fresh.down
            self._stacked, self._views = fresh._stacked, fresh._views
        return self._stacked


def _stacked(slots: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack into memory of 2 MB pages on a CPU (`model.host_memory`): the slots are read
    cold at each step."""
    first = slots[0]
    return torch.stack(slots, out=host_memory.empty((len(slots), *first.shape), first.dtype, first.device))


def load_slots(
    reader: CheckpointReader,
    experts_per_layer: Mapping[int, Sequence[int]],
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> dict[int, LayerSlots]:
    """Read only the listed logical experts of each MoE layer (slot s holds experts_per_layer[l][s]),
    straight to `device` (default CPU)."""
    out = {}
    for layer_idx, expert_ids in experts_per_layer.items():
        w = reader.expert_rows(layer_idx, list(expert_ids), dtype, device)
        gate_up, down = w.gate_up, w.down  # stacked as read, for the grouped GEMM
        if gate_up.device.type == "cpu":  # memory of its own (in 2 MB pages), not the reader's
            gate_up, down = host_memory.copy(gate_up), host_memory.copy(down)
        out[layer_idx] = LayerSlots.from_stacked(gate_up, down, list(expert_ids))
    return out


# staged weights of one placement version: moe layer index -> {local slot: (expert, gate_up, down)}
Staged = dict[int, dict[int, tuple[int, torch.Tensor, torch.Tensor]]]


class ExpertSlots:
    """One expert worker's slots over all MoE layers (`layers[moe_idx]`), and staged changes.

    `stage` may run on another thread while the step loop serves from `layers`; `switch` runs on
    the loop's thread between two steps, so a step always sees one placement version."""

    def __init__(
        self, model_dir: str | Path, layers: list[LayerSlots], dtype: torch.dtype, version: int
    ) -> None:
        self.model_dir = Path(model_dir)
        self.layers = layers
        self.dtype = dtype
        self.version = version
        self._staged: dict[int, Staged] = {}

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        placement: Placement,
        worker_idx: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> tuple[ExpertSlots, int]:
        """The worker's slots under `placement`, read from the checkpoint straight to `device`
        (default CPU); also the bytes read."""
        with CheckpointReader(Path(model_dir)) as reader:
            cfg = reader.config
            wanted = {
                layer: placement.experts_on_worker(m, worker_idx) for m, layer in enumerate(cfg.moe_layers)
            }
            layers = list(load_slots(reader, wanted, dtype, device).values())
            bytes_read = reader.bytes_read
        return cls(model_dir, layers, dtype, placement.version), bytes_read

    def to(self, device: torch.device) -> None:
        self.layers = [layer.to(device) for layer in self.layers]

    def experts_per_layer(self) -> list[list[int]]:
        return [list(layer.slot_to_expert) for layer in self.layers]

    def stage(self, version: int, changes: Mapping[int, Mapping[int, int]], device: torch.device) -> float:
        """Load the weights of a coming placement (moe layer index -> {local slot: logical
        expert}) onto `device`, beside the live ones; returns the seconds it took. Slots past the
        current count grow the worker (after a failure the survivors may hold more)."""
        t0 = time.perf_counter()
        staged: Staged = {}
        with CheckpointReader(self.model_dir) as reader:
            for moe_idx, slot_to_expert in changes.items():
                layer_idx = reader.config.moe_layers[moe_idx]
                w = reader.expert_rows(layer_idx, list(slot_to_expert.values()), self.dtype, device)
                staged[moe_idx] = {
                    slot: (expert, w.gate_up[i].clone(), w.down[i].clone())
                    for i, (slot, expert) in enumerate(slot_to_expert.items())
                }
        self._staged[version] = staged
        return time.perf_counter() - t0

    def is_staged(self, version: int) -> bool:
        return version in self._staged

    def discard_staged(self) -> None:
        self._staged.clear()

    def switch(self, version: int) -> None:
        """Swap the staged slots of `version` in (pointer swaps); retired weights are freed, and so
        is anything staged for older versions."""
        if version not in self._staged:
            raise RuntimeError(f"placement version {version} was never staged")
        for moe_idx, slots in self._staged.pop(version).items():
            for slot in sorted(slots):  # ascending: new slots past the old count append in order
                self.layers[moe_idx].replace(slot, *slots[slot])
        self._staged = {v: s for v, s in self._staged.items() if v > version}
        self.version = version


class _Done:
    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def wait(self) -> torch.Tensor:
        return self._out


class LocalExperts:
    """MoE backend of the colocated layout: every expert in this process, one slot each."""

    def __init__(self, slots: dict[int, LayerSlots]) -> None:
        self.slots = slots
        self.rows_per_layer: dict[int, int] = {}  # moe layer index -> rows computed (stats)
        self._moe_index = {layer: m for m, layer in enumerate(sorted(slots))}

    @classmethod
    def from_checkpoint(
        cls, reader: CheckpointReader, dtype: torch.dtype, device: torch.device | None = None
    ) -> LocalExperts:
        """Every expert, read straight to `device` (default CPU) in `dtype`."""
        cfg = reader.config
        every = range(cfg.num_local_experts)
        return cls(load_slots(reader, {layer: every for layer in cfg.moe_layers}, dtype, device))

    def dispatch(self, layer_idx: int, routed_in: torch.Tensor, expert_idx: torch.Tensor) -> _Done:
        s = self.slots[layer_idx]
        m = self._moe_index[layer_idx]
        # a plain int (rows are known on the host): counting costs no device sync
        self.rows_per_layer[m] = self.rows_per_layer.get(m, 0) + routed_in.shape[0]
        # identity map: slot e holds logical expert e
        return _Done(grouped_swiglu(routed_in, expert_idx, *s.compute_weights()))
