"""The dispatcher on a (fake) GPU: what it hands the collectives is on the device, as NCCL needs,
results come back in token order, and the host syncs per MoE layer are the ones documented.

The collectives are stand-ins (one process plays both sides of a world of 1 attention rank and 1
expert rank); the real exchange, over sockets and over gloo, is covered by tests/cluster.
"""

from __future__ import annotations

import pytest
import torch

import router.dispatcher as dispatcher_module
from experts.slots import LayerSlots
from experts.swiglu import grouped_mm_works, grouped_swiglu
from router.dispatcher import AttentionDispatcher, ExpertServer
from router.layout import plan_layout
from tests.fake_cuda import CUDA, CudaTensor, FakeCuda, patch_cuda

HIDDEN, EXPERTS = 16, 4


class Done:
    def wait(self) -> None:
        pass


class FakeWorld:
    """Collectives between attention rank 0 and expert rank 1: it checks that every tensor is on
    the GPU, and answers for the other rank (the expert doubles each row)."""

    def __init__(self, counts_from_attention: torch.Tensor | None = None, rows: torch.Tensor | None = None):
        self.calls = 0
        self.sent: torch.Tensor | None = None
        self.counts_from_attention, self.rows_from_attention = counts_from_attention, rows

    def all_to_all_single(
        self, output, input, output_split_sizes=None, input_split_sizes=None, async_op=False
    ):  # noqa: A002
        assert isinstance(output, CudaTensor) and isinstance(input, CudaTensor), "NCCL takes GPU tensors only"
        self.calls += 1
        if self.counts_from_attention is not None:  # we are the expert rank
            incoming = self.counts_from_attention if output.dtype == torch.long else self.rows_from_attention
            if output.numel():
                output.copy_(incoming)
            else:
                self.sent = input
        elif output.dtype == torch.long:  # attention rank, counts out: nothing comes back
            assert output.numel() == 0 and input.numel() == EXPERTS  # the expert rank's slots
        elif input.numel():  # attention rank, rows out
            self.sent = input
        else:  # attention rank, results back
            output.copy_(self.sent * 2)
        return Done() if async_op else None


@pytest.fixture
def gpu(monkeypatch):
    patch_cuda(monkeypatch)
    grouped_mm_works.cache_clear()
    with FakeCuda() as fake:
        yield fake
    grouped_mm_works.cache_clear()


def test_attention_side_rows_and_results_stay_on_the_gpu(gpu, monkeypatch):
    world = FakeWorld()
    monkeypatch.setattr(dispatcher_module.dist, "all_to_all_single", world.all_to_all_single)
    layout, placement = plan_layout(1, EXPERTS, num_attention=1, num_expert_workers=1)
    d = AttentionDispatcher(layout, placement, moe_layers=(0,), dp_rank=0, device=CUDA)
    x = torch.randn(10, HIDDEN).to(CUDA)
    expert_idx = torch.tensor([3, 0, 3, 1, 1, 3, 0, 2, 2, 3]).to(CUDA)
    gpu.reset()
    out = d.dispatch(0, x, expert_idx).wait()
    assert world.calls == 3  # counts, rows out, results back
    assert gpu.syncs == ["tolist"]  # the split sizes all_to_all_single takes as ints
    assert gpu.uploads == 0 and gpu.host_float_ops() == []
    assert isinstance(out, CudaTensor) and torch.equal(out.inner, x.inner * 2)  # token order
    expert_load, slot_load = d.take_load()
    assert not isinstance(expert_load, CudaTensor) and expert_load[0].tolist() == [2, 2, 2, 4]
    assert slot_load[0].tolist() == [2, 2, 2, 4]  # slot e holds expert e


def test_expert_side_rows_and_slots_stay_on_the_gpu(gpu, monkeypatch):
    layout, _ = plan_layout(1, EXPERTS, num_attention=1, num_expert_workers=1)
    # what attention rank 0 routes to each of this rank's slots 0..3
    counts = torch.tensor([2, 0, 3, 1]).to(CUDA)
    rows = torch.randn(6, HIDDEN).to(CUDA)
    world = FakeWorld(counts, rows)
    monkeypatch.setattr(dispatcher_module.dist, "all_to_all_single", world.all_to_all_single)
    server = ExpertServer(layout, HIDDEN, torch.float32, CUDA)
    g = torch.Generator().manual_seed(0)
    stacked = (torch.randn(EXPERTS, HIDDEN, 32, generator=g), torch.randn(EXPERTS, 16, HIDDEN, generator=g))
    slots = LayerSlots.from_stacked(stacked[0].to(CUDA), stacked[1].to(CUDA), list(range(EXPERTS)))
    gpu.reset()
    got, local_slot, splits = server.receive()
    assert splits == [6, 0] and local_slot.tolist() == [0, 0, 2, 2, 2, 3]
    out = grouped_swiglu(got, local_slot, *slots.compute_weights())
    server.send_back(0, out, splits)
    assert gpu.syncs == ["tolist", "tolist"]  # the splits, and this test's own look at local_slot
    assert gpu.uploads == 0 and gpu.host_float_ops() == []
    assert isinstance(world.sent, CudaTensor)
    with gpu.off():
        expected = grouped_swiglu(rows.inner, torch.tensor([0, 0, 2, 2, 2, 3]), *stacked)
        torch.testing.assert_close(world.sent.inner, expected)
