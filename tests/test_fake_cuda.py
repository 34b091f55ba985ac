"""The fake GPU of tests.fake_cuda catches what a real one would, and counts what it promises."""

from __future__ import annotations

import pytest
import torch

from tests.fake_cuda import CUDA, CudaTensor, DeviceMixError, FakeCuda, patch_cuda


@pytest.fixture
def gpu(monkeypatch):
    patch_cuda(monkeypatch)
    with FakeCuda() as fake:
        yield fake


def test_ops_on_device_tensors_stay_there_with_the_cpu_values(gpu):
    a_cpu = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    expected = (a_cpu @ torch.ones(4, 2))[1:] * 2
    gpu.reset()
    a = a_cpu.to(CUDA)
    out = (a @ torch.ones(4, 2, device=CUDA))[1:] * 2
    assert isinstance(out, CudaTensor) and out.device == CUDA
    assert gpu.uploads == 1 and gpu.host_float_ops() == [] and gpu.syncs == []
    assert torch.equal(out.inner, expected)


def test_mixing_devices_raises_as_on_a_gpu(gpu):
    a = torch.ones(3, 4).to(CUDA)
    with pytest.raises(DeviceMixError, match="mixes cuda and cpu"):
        a + torch.ones(3, 4)
    a + torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar, as CUDA allows
    with pytest.raises(DeviceMixError, match="CPU tensor"):
        a[torch.tensor([0, 1])]
    with pytest.raises(DeviceMixError, match="Python list"):
        a[[0, 1]]
    with pytest.raises(DeviceMixError, match="writes a CPU tensor"):
        a[0] = torch.zeros(4)


def test_host_syncs_and_host_compute_are_counted(gpu):
    a = torch.arange(6).to(CUDA)
    assert a.tolist() == list(range(6))
    assert int(a.sum()) == 15
    assert torch.equal(a.cpu(), torch.arange(6))
    assert gpu.syncs == ["tolist", "item", "to_cpu"]
    torch.ones(3) * 2.0  # a float op on the host
    assert gpu.host_float_ops() == ["ones.default", "mul.Tensor"]


def test_writes_through_views_reach_the_storage(gpu):
    pool = torch.zeros(4, 2, device=CUDA)
    pool.view(-1)[torch.tensor([1, 6]).to(CUDA)] = torch.tensor([5.0, 7.0]).to(CUDA)
    assert pool.inner.view(-1).tolist() == [0, 5, 0, 0, 0, 0, 7, 0]
    pool.index_copy_(0, torch.tensor([3]).to(CUDA), torch.ones(1, 2).to(CUDA))
    assert pool.inner[3].tolist() == [1, 1]
