"""Plain-torchrun reference for benchmarks/train.py: kiln's model and DeepSpeed config, no Ray.

Every rank reads the training files with pyarrow, applies the same fitted kiln `Preprocessor`,
keeps its equal share of the rows as in-memory tensors, then trains the way kiln's per-worker
loop does (same micro-batch, loss, engine, per-epoch shuffle) and times each epoch's steps.
Started by benchmarks/train.py as:

    torchrun --standalone --nproc_per_node W benchmarks/_torchrun_baseline.py \
        --job JOB.json --preprocessor PRE.json --out RESULT.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from kiln.config.spec import JobSpec
from kiln.data.preprocess import Preprocessor
from kiln.data.source import resolve_files
from kiln.models import build_model
from kiln.train.engine import build_engine


def load_shard(
    spec: JobSpec, pre: Preprocessor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of the preprocessed training rows, as (x, y) tensors."""
    files = resolve_files(spec.data.train, spec.data.format)
    columns = [*pre.features, pre.label.name]
    parts = [pre.transform(pq.read_table(path, columns=columns)) for path in files.paths]
    x = np.concatenate([part["x"] for part in parts])
    y = np.concatenate([part["y"] for part in parts])
    per_rank = len(y) // world  # equal shards, like Ray Train's streaming_split(equal=True)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return torch.from_numpy(x[rows].copy()), torch.from_numpy(y[rows].copy())


def train(spec: JobSpec, pre: Preprocessor) -> dict[str, object]:
    """Load this rank's rows, train `spec.train.epochs` epochs; per-epoch figures (all ranks)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    load_start = time.perf_counter()
    x, y = load_shard(spec, pre, rank, world)
    load_s = time.perf_counter() - load_start

    train = spec.train
    torch.manual_seed(train.seed)
    micro = train.batch_size // (world * train.deepspeed.grad_accum)
    steps_per_epoch = math.ceil(len(y) / micro)
    model = build_model(spec.model, pre.input_schema())
    engine = build_engine(model, train, total_steps=train.epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss() if spec.data.task == "classification" else None
    loss_fn = loss_fn or torch.nn.MSELoss()
    epochs = []
    for epoch in range(1, train.epochs + 1):
        engine.train()
        generator = torch.Generator().manual_seed(train.seed + epoch)
        order = torch.randperm(len(y), generator=generator) if train.shuffle else None
        dist.barrier()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for first in range(0, len(y), micro):
            rows = slice(first, first + micro)
            index = order[rows] if order is not None else rows
            xb, yb = x[index], y[index]
            loss = loss_fn(engine(xb).float(), yb)
            engine.backward(loss)
            engine.step()
            seen += len(yb)
            loss_sum += loss.item() * len(yb)
        elapsed = time.perf_counter() - start
        totals = torch.tensor([float(seen), loss_sum], dtype=torch.float64)
        dist.all_reduce(totals)
        epochs.append(
            {
                "epoch": epoch,
                "samples_per_s": totals[0].item() / elapsed,
                "train_loss": totals[1].item() / totals[0].item(),
                "seconds": elapsed,
                "steps": steps_per_epoch,
            }
        )
    return {
        "epochs": epochs,
        "load_s": load_s,
        "rows_per_rank": len(y),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True, help="JobSpec as JSON")
    parser.add_argument("--preprocessor", required=True, help="Preprocessor.to_dict() as JSON")
    parser.add_argument("--out", required=True, help="rank 0 writes per-epoch figures here")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    spec = JobSpec.model_validate_json(Path(args.job).read_text())
    pre = Preprocessor.from_dict(json.loads(Path(args.preprocessor).read_text()))
    result = train(spec, pre)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
