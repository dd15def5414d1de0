"""How datasets reach the training workers."""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


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
