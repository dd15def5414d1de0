"""How datasets reach the training workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from ray.train import DataConfig

FETCH_ROWS = 16384
"""Rows taken from Ray Data per fetch. Each Ray batch costs the worker ~0.5-1 ms (split
coordinator, block slicing, Arrow -> torch) on the core that trains; fetching many
micro-batches at once pays it once for all of them (benchmarks/README.md)."""


class ValidationExactDataConfig(DataConfig):
    """Ray Train's DataConfig, except that only `train` is split with `equal=True`.

    Equal training shards keep every rank on the same number of steps (DeepSpeed's collectives
    need that). Validation is split with `equal=False` so no row is dropped from the metrics; the
    evaluation loop keeps ranks in lock-step instead.
    """

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, dataset in datasets.items():
            if dataset.name is None:
                dataset.set_name(name)
            ds = dataset.copy(dataset)
            ds.context.execution_options = self._resolve_execution_options(name)
            ds.context.execution_options.preserve_order = True
            splits = ds.streaming_split(world_size, equal=(name == "train"), locality_hints=hints)
            for rank, split in enumerate(splits):
                output[rank][name] = split
        return output


def iter_micro_batches(
    shard: Any, micro_batch: int, *, shuffle_seed: int | None, device: Any = "auto"
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's training micro-batches for one epoch.

    Rows are fetched `FETCH_ROWS` (rounded to whole micro-batches) at a time and cut into
    micro-batches in torch; with a seed they are shuffled within each fetch first. Every rank
    of an `equal=True` split gets the same number of micro-batches, as before.

    Args:
        shard: The worker's `DataIterator` (`ray.train.get_dataset_shard`).
        micro_batch: Rows per micro-batch.
        shuffle_seed: Seed of the in-fetch shuffle (vary it per epoch); None keeps row order.
        device: Where the tensors go (`ray.train.torch.get_device()`; "auto" lets Ray pick).
    """
    per_fetch = max(1, FETCH_ROWS // micro_batch) * micro_batch
    generator = torch.Generator().manual_seed(shuffle_seed or 0)
    for fetched in shard.iter_torch_batches(
        batch_size=per_fetch, device=device, prefetch_batches=2
    ):
        rows = len(next(iter(fetched.values())))
        if shuffle_seed is None:
            for start in range(0, rows, micro_batch):
                yield {name: value[start : start + micro_batch] for name, value in fetched.items()}
            continue
        order = torch.randperm(rows, generator=generator)
        for start in range(0, rows, micro_batch):
            index = order[start : start + micro_batch]
            yield {name: value[index.to(value.device)] for name, value in fetched.items()}
