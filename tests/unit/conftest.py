"""Fixtures of the GPU unit tests (tests/unit/test_gpu_*.py, skipped without a GPU)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def nccl() -> Iterator[None]:
    """A one-rank nccl process group, as Ray Train sets up per worker."""
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
