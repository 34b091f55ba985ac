"""Expert slots, stacked for the grouped GEMM on a CPU and on a (fake) GPU, still right after
slots are swapped or added; on a GPU read straight to the device."""

from __future__ import annotations

import pytest
import torch

from experts.slots import ExpertSlots, LayerSlots
from experts.swiglu import grouped_mm_works
from router.layout import plan_layout
from tests.fake_cuda import CUDA, CudaTensor, FakeCuda, patch_cuda


@pytest.fixture
def gpu(monkeypatch):
    patch_cuda(monkeypatch)
    grouped_mm_works.cache_clear()
    with FakeCuda() as fake:
        yield fake
    grouped_mm_works.cache_clear()


def _weights(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, 12, generator=g), torch.randn(n, 6, 8, generator=g)


def test_on_a_cpu_the_slots_are_stacked_once_and_follow_a_swap():
    gate_up, down = _weights(3)
    layer = LayerSlots(list(gate_up.clone()), list(down.clone()), [0, 1, 2])
    gu, dn = layer.compute_weights()
    assert torch.equal(gu, gate_up) and torch.equal(dn, down)
    assert all(t.data_ptr() == gu[s].data_ptr() for s, t in enumerate(layer.gate_up))  # views: one copy
    assert layer.compute_weights()[0] is gu  # no copy while nothing changed
    new_gu, new_dn = _weights(1, seed=1)
    layer.replace(0, 5, new_gu[0], new_dn[0])
    gu, dn = layer.compute_weights()
    assert torch.equal(gu, torch.stack([new_gu[0], gate_up[1], gate_up[2]]))
    assert torch.equal(dn, torch.stack([new_dn[0], down[1], down[2]]))


def test_on_a_gpu_the_slots_are_stacked_and_follow_swaps_and_growth(gpu):
    gate_up, down = _weights(3)
    layer = LayerSlots.from_stacked(gate_up.to(CUDA), down.to(CUDA), [0, 1, 2])
    gu, dn = layer.compute_weights()
    assert isinstance(gu, CudaTensor) and gu.shape == (3, 8, 12)
    assert layer.compute_weights()[0] is gu  # no copy while nothing changed
    new_gu, new_dn = _weights(2, seed=1)
    layer.replace(1, 7, new_gu[0].to(CUDA), new_dn[0].to(CUDA))  # a pointer swap, as the staging does
    layer.gate_up.append(new_gu[1].to(CUDA))  # a slot added (a worker taking over a lost one's)
    layer.down.append(new_dn[1].to(CUDA))
    layer.slot_to_expert.append(9)
    gu, dn = layer.compute_weights()
    with gpu.off():
        assert torch.equal(gu.inner, torch.stack([gate_up[0], new_gu[0], gate_up[2], new_gu[1]]))
        assert torch.equal(dn.inner, torch.stack([down[0], new_dn[0], down[2], new_dn[1]]))
    assert all(t.inner.data_ptr() == gu.inner[s].data_ptr() for s, t in enumerate(layer.gate_up))


def test_a_worker_reads_and_stages_its_slots_on_its_device(tiny_scout, gpu):
    layout, placement = plan_layout(8, 16, num_attention=1, num_expert_workers=2)
    gpu.reset()
    slots, _ = ExpertSlots.load(tiny_scout, placement, 1, torch.float32, CUDA)
    host = [o.dtype for o in gpu.ops if not o.on_device and o.dtype is not None and o.dtype.is_floating_point]
    assert host and set(host) == {torch.bfloat16}  # the stored bytes travel; fp32 is made on the device
    assert [layer.slot_to_expert for layer in slots.layers][0] == list(range(8, 16))
    assert all(isinstance(t, CudaTensor) for layer in slots.layers for t in layer.gate_up + layer.down)
    slots.stage(1, {0: {2: 0}}, CUDA)
    slots.switch(1)
    assert slots.layers[0].slot_to_expert[2] == 0 and isinstance(slots.layers[0].gate_up[2], CudaTensor)


def test_moving_slots_already_on_the_device_keeps_their_stack(gpu):
    gate_up, down = _weights(2)
    layer = LayerSlots.from_stacked(gate_up.to(CUDA), down.to(CUDA), [0, 1])
    assert layer.to(CUDA) is layer
