"""Expert slots: the routed-expert weights one process holds, and the colocated backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from cluster.checkpoint import CheckpointReader
from experts.swiglu import grouped_swiglu


@dataclass
class LayerSlots:
    """One MoE layer's slots: per slot s, gate_up[s] [H, 2I] and down[s] [I, H] hold logical expert
    slot_to_expert[s]. Separate tensors per slot, so replacing a slot is a pointer swap."""

    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    slot_to_expert: list[int]

    def replace(self, slot: int, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        self.gate_up[slot], self.down[slot], self.slot_to_expert[slot] = gate_up, down, expert


def load_slots(
    reader: CheckpointReader, experts_per_layer: Mapping[int, Sequence[int]], dtype: torch.dtype
) -> dict[int, LayerSlots]:
    """Read only the listed logical experts of each MoE layer (slot s holds experts_per_layer[l][s])."""
    out = {}
    for layer_idx, expert_ids in experts_per_layer.items():
        w = reader.expert_rows(layer_idx, list(expert_ids), dtype)
        # clone per slot: a retired slot's memory is then freed on its own
        out[layer_idx] = LayerSlots(
            [t.clone() for t in w.gate_up], [t.clone() for t in w.down], list(expert_ids)
        )
    return out


class _Done:
    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def wait(self) -> torch.Tensor:
        return self._out


class LocalExperts:
    """MoE backend of the colocated layout: every expert in this process, one slot each."""

    def __init__(self, slots: dict[int, LayerSlots]) -> None:
        self.slots = slots
        self.rows_per_expert: dict[int, torch.Tensor] = {}  # layer -> [E] rows computed (load stats)

    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader, dtype: torch.dtype) -> LocalExperts:
        cfg = reader.config
        every = range(cfg.num_local_experts)
        return cls(load_slots(reader, {layer: every for layer in cfg.moe_layers}, dtype))

    def dispatch(self, layer_idx: int, routed_in: torch.Tensor, expert_idx: torch.Tensor) -> _Done:
        s = self.slots[layer_idx]
        # identity map: slot e holds logical expert e
        return _Done(grouped_swiglu(routed_in, expert_idx, s.gate_up, s.down))
