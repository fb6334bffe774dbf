"""Shared pytest configuration for fastserve's Python tests.

The `gpu` and `slow` markers are declared in pyproject.toml. Tests marked
`gpu` are skipped here, in one place, unless PyTorch sees a CUDA device.
"""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _one_replica_by_default():
    """Engine(replicas=None) runs two replicas on a CPU of two or more cores
    (replicas.default_replicas). Most tests hold "the" worker in a batch
    (tiny_models.held) or count one worker's batches, so for them an engine
    left at the default gets one replica, set here once for the session
    (before any module's engine fixture). Tests of the default itself take
    the `real_default_replicas` fixture; test_replicas.py covers several
    workers, and the CLI and server subprocess tests run the real default."""
    from fastserve import replicas

    real = replicas.default_replicas
    replicas.default_replicas = lambda *args, **kwargs: None
    yield real
    replicas.default_replicas = real


@pytest.fixture
def real_default_replicas(_one_replica_by_default):
    """Within the test, Engine(replicas=None) resolves as it does outside tests."""
    from fastserve import replicas

    pinned = replicas.default_replicas
    replicas.default_replicas = _one_replica_by_default
    yield
    replicas.default_replicas = pinned


@pytest.fixture
def restore_torch_threads():
    """torch's thread count in the test's thread put back after the test."""
    import torch

    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)
