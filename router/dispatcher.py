"""The all-to-all token dispatcher between attention ranks and expert ranks.

World layout (`router.layout.RankLayout`): attention ranks 0..M-1 (data parallel), expert ranks
M..M+N-1. Every rank joins every exchange, in the same order, once per MoE layer:

1. counts: each attention rank sends every expert rank, for each of its local slots, how many
   rows it routes there (int64 [S] per expert rank). Rows are sorted by (destination, slot), so the
   receiver derives each row's slot from the counts alone; no per-row metadata.
2. rows: the routed rows [n, H] go out (async where the transport is, so the shared expert runs
   while they travel).
3. results: expert ranks run SwiGLU per slot (`cluster.expert_worker`) and send the rows back
   the way they came; the attention side restores token order.

Each exchange goes one way and both sides know its sizes, which is all a transport
(`router.transport`) has to carry: sockets on CPUs, collectives (NCCL) on GPUs.

Expert ranks learn that a step comes from the header the driver writes before it
(`cluster.membership`); they need no Ray call per step.

Every tensor lives on the rank's device (NCCL takes only GPU tensors): rows, results, counts,
load statistics and the placement's lookup tables. Host syncs per MoE layer, the minimum the
transport needs, since it takes its split sizes as Python ints:
- attention rank: 1, the rows per destination rank (`Route.splits`); in a layer where some
  expert has several replicas 5 more: `router.routing.choose_replica` reads its inputs' range
  (4) and `router.placement.occurrence_rank` uses CUDA's bincount (1);
- expert rank: 1, the rows per source rank, which also size the receive buffer; plus the expert
  compute's own (`experts.swiglu.grouped_swiglu`: none with the grouped GEMM, one per-slot loop);
- load statistics stay on the device and reach the host once per step (`take_load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from router.layout import RankLayout
from router.placement import Placement
from router.routing import ReplicaTable
from router.transport import CollectiveTransport, SocketTransport

Transport = CollectiveTransport | SocketTransport


@dataclass
class RowCounter:
    """Rows per MoE layer index, for the exactly-once invariant."""

    per_layer: dict[int, int] = field(default_factory=dict)

    def add(self, layer_idx: int, n: int) -> None:
        self.per_layer[layer_idx] = self.per_layer.get(layer_idx, 0) + n

    def merge(self, other: RowCounter) -> None:
        for layer_idx, n in other.per_layer.items():
            self.add(layer_idx, n)


class PendingRows:
    """Rows in flight to the experts; `wait()` collects the results in token order [T, H]."""

    def __init__(
        self,
        dispatcher: AttentionDispatcher,
        order: torch.Tensor,
        splits: list[int],
        work: dist.Work | None,
        num_rows: int,
        like: torch.Tensor,
    ) -> None:
        self._d, self._order, self._splits, self._work = dispatcher, order, splits, work
        self._num_rows, self._like = num_rows, like

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        d = self._d
        back = self._like.new_empty((self._num_rows, self._like.shape[1]))
        d.transport.recv(back, self._splits)
        out = torch.empty_like(back).index_copy_(0, self._order, back)  # back to token order
        d.step_returned.add(d.current_layer, self._num_rows)
        return out


@dataclass(frozen=True)
class Route:
    """Where one MoE layer's rows go: rows sorted by destination key (`order` int64 [T]), the
    rows per key (`counts` int64 [world * S], what is exchanged first) and per rank (`splits`)."""

    order: torch.Tensor
    counts: torch.Tensor
    splits: list[int]


class AttentionDispatcher:
    """The MoE backend of an attention rank: routes rows to expert ranks by the placement map."""

    def __init__(
        self,
        layout: RankLayout,
        placement: Placement,
        moe_layers: tuple[int, ...],
        dp_rank: int,
        device: torch.device,
        transport: Transport | None = None,
    ) -> None:
        """`transport`: None is the default group's collectives."""
        self.layout = layout
        self.transport = transport or CollectiveTransport(layout.world_size)
        # counts go to the expert ranks: int64 [S] each
        self.count_splits = [0] * layout.num_attention + [layout.slots_per_worker] * layout.num_expert_workers
        self.moe_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.dp_rank = dp_rank
        self.device = device
        self.step_id = 0
        self.sent = RowCounter()  # over the steps that completed
        self.returned = RowCounter()
        self.step_sent = RowCounter()  # this step's, counted once the step completes
        self.step_returned = RowCounter()
        self.current_layer = -1
        self.placement = placement
        self.reset_load()

    @property
    def placement(self) -> Placement:
        return self._placement

    @placement.setter
    def placement(self, placement: Placement) -> None:
        """A new map (between steps: a step uses one version); its lookups go to the device once."""
        self._placement = placement
        self._replicas = ReplicaTable(_placement_on(placement, self.device))

    def end_step(self, completed: bool) -> None:
        """Count this step's rows (a step that failed and will be replayed counts nothing)."""
        if completed:
            self.sent.merge(self.step_sent)
            self.returned.merge(self.step_returned)
        self.step_sent, self.step_returned = RowCounter(), RowCounter()
        if not completed:
            self.reset_load()

    def reset_load(self) -> None:
        """Start a new window of load counts (tokens per logical expert and per physical slot)."""
        p = self.placement
        self.expert_load = torch.zeros((p.num_layers, p.num_experts), dtype=torch.long, device=self.device)
        self.slot_load = torch.zeros((p.num_layers, p.num_slots), dtype=torch.long, device=self.device)

    def take_load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts since the last call, on the host: expert_load [L, E] and slot_load [L, W*S] (int64)."""
        load = (self.expert_load.cpu(), self.slot_load.cpu())
        self.reset_load()
        return load

    def route(self, moe_idx: int, expert_idx: torch.Tensor) -> Route:
        """Each token's destination (world rank, local slot) as key rank * S + slot, by the
        replica choice of `router.routing`, with this step's offset."""
        layout = self.layout
        slot = self._replicas.slots(moe_idx, expert_idx, self.step_id + self.dp_rank)
        key = slot + layout.first_expert_key
        counts = count_ids(key, layout.num_keys)
        splits = counts.view(layout.world_size, layout.slots_per_worker).sum(1).tolist()
        return Route(torch.argsort(key, stable=True), counts, splits)

    def dispatch(self, layer_idx: int, routed_in: torch.Tensor, expert_idx: torch.Tensor) -> PendingRows:
        """routed_in [T, H] (score-scaled), expert_idx [T] logical experts -> rows in flight."""
        m = self.moe_index[layer_idx]
        route = self.route(m, expert_idx)
        self._count_load(m, expert_idx, route.counts)
        rows = routed_in.index_select(0, route.order)  # a third of advanced indexing's cost on CPU
        counts = route.counts[self.layout.first_expert_key :]
        work = self.transport.send_parts([(counts, self.count_splits), (rows, route.splits)])
        self.step_sent.add(m, rows.shape[0])
        self.current_layer = m
        return PendingRows(self, route.order, route.splits, work, rows.shape[0], routed_in)

    def _count_load(self, moe_idx: int, expert_idx: torch.Tensor, counts: torch.Tensor) -> None:
        self.expert_load[moe_idx] += count_ids(expert_idx, self.placement.num_experts)
        # the keys past the attention ranks are the global slots
        self.slot_load[moe_idx] += counts[self.layout.first_expert_key :]


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in ids [T] (int64 [n]). On a GPU without the host sync of
    CUDA's bincount (it reads the largest id to size its output)."""
    if ids.device.type == "cpu":
        return torch.bincount(ids, minlength=n)
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def _placement_on(placement: Placement, device: torch.device) -> Placement:
    if device.type == "cpu":
        return placement
    return replace(
        placement,
        phy2log=placement.phy2log.to(device),
        log2phy=placement.log2phy.to(device),
        logcnt=placement.logcnt.to(device),
    )


class ExpertServer:
    """The expert-rank side of one exchange: receive the rows, and send their results back."""

    def __init__(
        self,
        layout: RankLayout,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        transport: Transport | None = None,
    ) -> None:
        """`transport`: None is the default group's collectives."""
        self.layout = layout
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.transport = transport or CollectiveTransport(layout.world_size)
        self.computed = RowCounter()
        self.rows_per_source: dict[int, int] = {}
        m, s = layout.num_attention, layout.slots_per_worker
        self._count_splits = [s] * m + [0] * layout.num_expert_workers  # int64 [S] from each attention rank
        self._counts = torch.empty(m * s, dtype=torch.long, device=device)
        self._slot_of_key = torch.arange(m * s, device=device) % s
        self._no_rows = [0] * layout.num_expert_workers  # expert ranks send each other nothing

    def receive(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The counts, then the rows of one exchange: rows [n, H], their local slot int64 [n], and
        the rows per source rank (which `send_back` needs)."""
        layout = self.layout
        counts = self._counts
        self.transport.recv(counts, self._count_splits)
        splits = counts.view(layout.num_attention, layout.slots_per_worker).sum(1).tolist() + self._no_rows
        rows = torch.empty((sum(splits), self.hidden_size), dtype=self.dtype, device=self.device)
        self.transport.recv(rows, splits)
        local_slot = torch.repeat_interleave(self._slot_of_key, counts, output_size=rows.shape[0])
        return rows, local_slot, splits

    def send_back(self, moe_idx: int, out: torch.Tensor, splits: list[int]) -> None:
        """Results [n, H], in the order `receive` gave the rows, back to their source ranks."""
        self.transport.send(out, splits)
        self.computed.add(moe_idx, out.shape[0])
        for src, n in enumerate(splits):
            self.rows_per_source[src] = self.rows_per_source.get(src, 0) + n
