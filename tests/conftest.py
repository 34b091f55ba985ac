"""Shared fixtures: tiny checkpoints made once per session, the transformers referee, prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.synthetic import make_checkpoint


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA: without it they are skipped, and the skip says why."""
    if torch.cuda.is_available():
        return
    reason = (
        f"needs a CUDA GPU: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees none here; "
        "tests/engine/test_device.py covers the device path on a fake GPU"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_maverick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("tiny-maverick", tmp_path_factory.mktemp("ckpt") / "tiny-maverick", seed=0)


@pytest.fixture(scope="session")
def tiny_scout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        "tiny-scout", tmp_path_factory.mktemp("ckpt") / "tiny-scout", seed=1, max_shard_size="20MB"
    )


@pytest.fixture(scope="session", params=["tiny-maverick", "tiny-scout"])
def tiny_checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def skewed_maverick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-maverick with Zipf(1.2) expert popularity: what replication is for."""
    return make_checkpoint(
        "tiny-maverick", tmp_path_factory.mktemp("ckpt") / "skewed", seed=0, expert_skew=1.2, skew_seed=3
    )
