"""Throughput of kiln's training and ingest paths against plain references, side by side.

    .venv/bin/python benchmarks/train.py                 # both figures, about 4-5 minutes
    .venv/bin/python benchmarks/train.py --before        # + kiln before the ingest changes
    .venv/bin/python benchmarks/train.py --only ingest --sweep   # try Ray Data knobs on ingest

1. Steady training samples/s: `kiln.train.run.prepare` + `fit` (Ray Data read -> fitted
   preprocessing -> TorchTrainer running kiln's `train_loop_per_worker` with DeepSpeed), taken
   from the per-epoch `samples_per_s` kiln reports, epochs >= 2; against the same model and
   DeepSpeed config under plain `torchrun` on in-memory tensors (benchmarks/_torchrun_baseline.py),
   also epochs >= 2.
2. Ingest rows/s into one worker: a 1-worker TorchTrainer whose loop only iterates kiln's
   `iter_micro_batches` over the training dataset `prepare` builds (read -> preprocess, cached
   per `data.cache`) through kiln's DataConfig, no training, epochs >= 2; against one process
   reading the same files with pyarrow into numpy.

`--knobs key=value,...` also measures kiln with other settings, applied by monkeypatching here
(nothing under platform/ changes); see `Knobs` and benchmarks/README.md.
Figures measured while another Ray shared the machine are marked with `*`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from _watch import Watch, raylets
from kiln.config.spec import JobSpec
from kiln.data.preprocess import Preprocessor, fit_preprocessor, merge_stats, partial_stats
from kiln.data.source import check_data

logger = logging.getLogger("kiln.bench")

HERE = Path(__file__).resolve().parent
TRAIN_GOAL, INGEST_GOAL = 0.95, 0.85


# ----------------------------------------------------------------------------------------------
# Knobs: Ray Data settings measured by patching (None = what kiln does today)


@dataclasses.dataclass(frozen=True)
class Knobs:
    v2_read: bool = False
    """Read Parquet with Ray 2.60's default datasource V2 (kiln uses V1: see read_dataset)."""
    read_blocks: int | None = None
    """`override_num_blocks` for read_dataset (kiln: one read task per file)."""
    block_mb: float | None = None
    """DataContext.target_max_block_size in MB (Ray's default: 128)."""
    pre_batch: int | None = None
    """preprocess_dataset batch_size (kiln: None = whole blocks, fused into the read)."""
    cache: bool | str = "auto"
    """data.cache: materialize the preprocessed datasets once (kiln: auto)."""
    fetch_rows: int | None = None
    """kiln.train.ingest.FETCH_ROWS in the workers: rows per Ray batch, cut into micro-batches
    in torch (kiln: 16384; the micro-batch size = one Ray batch per step)."""
    preserve_order: bool = True
    """ExecutionOptions.preserve_order for the training split (kiln: True)."""
    ingest_batch: int | None = None
    """Ingest benchmark only: micro-batch size (default: the training micro-batch)."""
    trace: bool = False
    """Workers print, per training epoch, the seconds spent waiting for the next batch."""

    @classmethod
    def parse(cls, text: str) -> Knobs:
        """'read_blocks=16,block_mb=8' -> Knobs; values parsed as JSON ('none' -> None)."""
        values: dict[str, Any] = {}
        names = {field.name for field in dataclasses.fields(cls)}
        for item in filter(None, text.split(",")):
            key, _, raw = item.partition("=")
            if key not in names:
                raise SystemExit(f"--knobs: unknown knob {key!r}; choose from {sorted(names)}")
            values[key] = None if raw.lower() == "none" else _value(raw)
        return cls(**values)

    def label(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return ",".join(changed) or "kiln as is"


def _value(raw: str) -> Any:
    try:
        return json.loads(raw.lower())
    except json.JSONDecodeError:
        return raw


@contextlib.contextmanager
def driver_knobs(knobs: Knobs) -> Iterator[None]:
    """Patch the dataset-building side of kiln (driver) for `knobs`; undone on exit."""
    import ray.data

    import kiln.data.source
    import kiln.train.ingest
    import kiln.train.run
    from kiln.data.pipeline import preprocess_dataset
    from kiln.data.source import read_dataset

    context = ray.data.DataContext.get_current()
    saved_block = context.target_max_block_size
    saved = (kiln.train.run.read_dataset, kiln.train.run.preprocess_dataset)
    saved_v1 = kiln.data.source._read_parquet_v1
    saved_config = kiln.train.ingest.ValidationExactDataConfig
    if knobs.block_mb is not None:
        context.target_max_block_size = int(knobs.block_mb * 2**20)
    if knobs.v2_read:
        kiln.data.source._read_parquet_v1 = _read_parquet_v2
    if knobs.read_blocks is not None:
        kiln.train.run.read_dataset = functools.partial(
            read_dataset, override_num_blocks=knobs.read_blocks
        )
    if knobs.pre_batch is not None:
        kiln.train.run.preprocess_dataset = functools.partial(
            preprocess_dataset, batch_size=knobs.pre_batch
        )
    if not knobs.preserve_order:
        kiln.train.ingest.ValidationExactDataConfig = _unordered_config()
    try:
        yield
    finally:
        context.target_max_block_size = saved_block
        kiln.train.run.read_dataset, kiln.train.run.preprocess_dataset = saved
        kiln.data.source._read_parquet_v1 = saved_v1
        kiln.train.ingest.ValidationExactDataConfig = saved_config


def _read_parquet_v2(paths: list[str], kwargs: dict[str, Any]) -> Any:
    """Ray's default Parquet read (datasource V2, which ignores override_num_blocks)."""
    import ray.data

    columns = kwargs.pop("columns", None)
    dataset = ray.data.read_parquet(paths, **kwargs)
    return dataset.select_columns(columns) if columns else dataset


def _unordered_config() -> type:
    from kiln.train.ingest import ValidationExactDataConfig

    class UnorderedTrainConfig(ValidationExactDataConfig):
        """A copy of kiln's `configure` with preserve_order left off for the training split."""

        def configure(  # type: ignore[override]
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
                ds.context.execution_options.preserve_order = name != "train"
                splits = ds.streaming_split(
                    world_size, equal=(name == "train"), locality_hints=hints
                )
                for rank, split in enumerate(splits):
                    output[rank][name] = split
            return output

    return UnorderedTrainConfig


def worker_knobs(knobs: Knobs) -> None:
    """Inside a Ray Train worker: apply `knobs` to kiln's fetching of training batches."""
    import kiln.train.ingest
    import kiln.train.loop

    if knobs.fetch_rows is not None:
        kiln.train.ingest.FETCH_ROWS = knobs.fetch_rows
    if knobs.trace and not getattr(kiln.train.ingest.iter_micro_batches, "_kiln_bench", False):
        original = kiln.train.ingest.iter_micro_batches

        def traced(*args: Any, **kwargs: Any) -> Any:
            return _timed(original(*args, **kwargs))

        traced._kiln_bench = True  # type: ignore[attr-defined]
        kiln.train.ingest.iter_micro_batches = traced
        kiln.train.loop.iter_micro_batches = traced


def _timed(batches: Any) -> Iterator[Any]:
    """Yield from `batches`, then print the time spent waiting in next() and in between."""
    waited, count, start = 0.0, 0, time.perf_counter()
    iterator = iter(batches)
    while True:
        before = time.perf_counter()
        batch = next(iterator, None)
        waited += time.perf_counter() - before
        if batch is None:
            break
        count += 1
        yield batch
    total = time.perf_counter() - start
    print(f"[bench] pid {os.getpid()}: {count} batches, waited {waited:.2f}s of {total:.2f}s")


def _loop_with_knobs(config: dict[str, Any], knobs: Knobs) -> Any:
    from kiln.train.loop import train_loop_per_worker

    worker_knobs(knobs)
    return train_loop_per_worker(config)


# ----------------------------------------------------------------------------------------------
# Data and spec


def ensure_data(args: argparse.Namespace) -> Path:
    """The synthetic dataset for these sizes, written once under --data and reused."""
    from kiln.data.examples import write_synth

    out = Path(args.data) / f"synth-{args.rows}x{args.features}-c{args.classes}-s{args.shards}"
    if not (out / "train").is_dir():
        logger.info("writing %d x %d synthetic rows to %s (once)", args.rows, args.features, out)
        write_synth(
            out, rows=args.rows, features=args.features, classes=args.classes, shards=args.shards
        )
    return out


def bench_spec(args: argparse.Namespace, data: Path, storage: Path) -> JobSpec:
    """The benchmarked job: tabular_mlp on DeepSpeed ZeRO-2 fp32, gloo, every epoch reported."""
    return JobSpec.model_validate(
        {
            "name": "kiln-bench",
            "data": {
                "train": str(data / "train"),
                # One test shard keeps per-epoch evaluation short; it is not timed anyway.
                "validation": str(data / "test" / "part-00000.parquet"),
                "label": "label",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": args.hidden},
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "lr": 1e-3,
                "log_every": 10**6,
                "storage": str(storage / "runs"),
                # Keep every epoch: its metrics come back with the kept checkpoints too.
                "keep_checkpoints": args.epochs,
                "max_failures": 0,
                "deepspeed": {"zero_stage": 2, "precision": "fp32"},
            },
            "registry": str(storage / "registry"),
        }
    )


def fit_local(spec: JobSpec) -> Preprocessor:
    """Fit kiln's Preprocessor with pyarrow alone (the same partial statistics kiln merges)."""
    train_info, _ = check_data(spec.data)
    numeric, categorical = list(train_info.numeric), list(train_info.categorical)
    columns = [*train_info.features, spec.data.label]
    parts = [
        partial_stats(
            pq.read_table(path, columns=columns),
            numeric=numeric,
            categorical=categorical,
            label=spec.data.label,
            task=spec.data.task,
            sample_size=0,
        )
        for path in train_info.files.paths
    ]
    return fit_preprocessor(
        merge_stats(parts),
        spec.data.preprocess,
        features=list(train_info.features),
        numeric=numeric,
        categorical=categorical,
        label=spec.data.label,
        task=spec.data.task,
    )


# ----------------------------------------------------------------------------------------------
# References: torchrun and pyarrow


def run_torchrun(spec: JobSpec, pre: Preprocessor, workdir: Path) -> dict[str, Any]:
    """Train under `torchrun --nproc_per_node W`; per-epoch figures from rank 0."""
    job, pre_file, out = workdir / "job.json", workdir / "pre.json", workdir / "torchrun.json"
    job.write_text(spec.model_dump_json())
    pre_file.write_text(json.dumps(pre.to_dict()))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        f"--nproc_per_node={spec.train.num_workers}",
        str(HERE / "_torchrun_baseline.py"),
        *("--job", str(job), "--preprocessor", str(pre_file), "--out", str(out)),
    ]
    started = time.perf_counter()
    # Its own process group, so that an interrupted benchmark takes the ranks down with it.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=1800)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"torchrun failed ({process.returncode}):\n{output[-4000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def pyarrow_read(files: list[str], columns: list[str], label: str, repeats: int) -> dict[str, Any]:
    """One process: pq.read_table each file, features into one float32 matrix, label to numpy."""
    features = [name for name in columns if name != label]
    rates, rows = [], 0
    for _ in range(repeats + 1):  # the first pass only warms the page cache
        start, rows = time.perf_counter(), 0
        for path in files:
            table = pq.read_table(path, columns=columns)
            x = np.empty((table.num_rows, len(features)), dtype=np.float32)
            for j, name in enumerate(features):
                x[:, j] = table.column(name).to_numpy()
            y = table.column(label).to_numpy()
            rows += len(y)
        rates.append(rows / (time.perf_counter() - start))
    return {"rows": rows, "rows_per_s": statistics.median(rates[1:]), "runs": rates[1:]}


def pyarrow_transform(files: list[str], columns: list[str], pre: Preprocessor) -> float:
    """Rows/s of one process reading with pyarrow and applying kiln's transform (reference)."""
    start, rows = time.perf_counter(), 0
    for path in files:
        rows += len(pre.transform(pq.read_table(path, columns=columns))["y"])
    return rows / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------
# kiln under Ray


@contextlib.contextmanager
def local_ray(watch: Watch) -> Iterator[None]:
    """kiln's own local Ray, shut down however the benchmark ends (Ctrl-C, SIGTERM, error)."""
    import ray

    from kiln.cluster import connect

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    before = raylets()
    connect(None)
    watch.ours = raylets() - before
    try:
        yield
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)
        for _ in range(30):  # let our raylet exit before the watch stops excusing it
            if not raylets() & watch.ours:
                break
            time.sleep(0.5)
        watch.ours = set()


def kiln_train(spec: JobSpec, knobs: Knobs, run_dir: Path) -> dict[str, Any]:
    """The real driver path (check, plan, prepare, fit); per-epoch metrics from the Result."""
    import ray

    import kiln.train.loop
    from kiln.cluster import plan_training
    from kiln.train.run import fit, prepare

    started = time.perf_counter()
    check = check_data(spec.data)
    resources = ray.cluster_resources()
    plan = plan_training(spec.train, cluster_cpus=float(resources.get("CPU", 0)), cluster_gpus=0)
    spec = with_cache(spec, knobs)
    original_loop = kiln.train.loop.train_loop_per_worker
    if knobs.fetch_rows is not None or knobs.trace:
        kiln.train.loop.train_loop_per_worker = functools.partial(_loop_with_knobs, knobs=knobs)
    try:
        with driver_knobs(knobs):
            prepared = prepare(spec, plan, check, run_dir=str(run_dir))
            prepared_s = time.perf_counter() - started
            result = fit(spec, prepared, plan, str(run_dir))
    finally:
        kiln.train.loop.train_loop_per_worker = original_loop
    history = getattr(result, "return_value", None) or [m for _, m in result.best_checkpoints]
    epochs = sorted(history, key=lambda m: m["epoch"])
    return {
        "epochs": [
            {k: m[k] for k in ("epoch", "samples_per_s", "train_loss", "val_accuracy")}
            for m in epochs
        ],
        "prepare_s": prepared_s,
        "wall_s": time.perf_counter() - started,
        "plan": plan.describe(),
        "preprocessor": prepared.preprocessor.to_dict(),
    }


def with_cache(spec: JobSpec, knobs: Knobs) -> JobSpec:
    data = spec.data.model_copy(update={"cache": knobs.cache})
    return spec.model_copy(update={"data": data})


def _ingest_loop(config: dict[str, Any]) -> None:
    """A Ray Train worker that only iterates its shard the way kiln's loop does, timing it."""
    import ray.train

    from kiln.train.ingest import iter_micro_batches

    worker_knobs(config["knobs"])
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(1, config["epochs"] + 1):
        start, rows, first = time.perf_counter(), 0, None
        seed = epoch if config["shuffle"] else None
        for batch in iter_micro_batches(shard, config["micro_batch"], shuffle_seed=seed):
            if first is None:
                first = time.perf_counter() - start
            rows += len(batch["y"])
        elapsed = time.perf_counter() - start
        metrics = {"epoch": epoch, "rows": rows, "seconds": elapsed, "first_batch_s": first}
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "metrics.json").write_text(json.dumps(metrics))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def kiln_ingest(spec: JobSpec, knobs: Knobs, epochs: int, run_dir: Path) -> dict[str, Any]:
    """Rows/s one Ray Train worker gets from kiln's prepared training dataset (no training)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import kiln.train.ingest
    from kiln.cluster import plan_training
    from kiln.train.run import prepare

    spec = with_cache(spec, knobs)
    one = spec.model_copy(update={"train": spec.train.model_copy(update={"num_workers": 1})})
    resources = ray.cluster_resources()
    plan = plan_training(one.train, cluster_cpus=float(resources.get("CPU", 0)), cluster_gpus=0)
    with driver_knobs(knobs):
        prepared = prepare(one, plan, check_data(one.data), run_dir=str(run_dir))
        micro = spec.train.batch_size // (spec.train.num_workers * spec.train.deepspeed.grad_accum)
        trainer = TorchTrainer(
            _ingest_loop,
            train_loop_config={
                "epochs": epochs,
                "micro_batch": knobs.ingest_batch or micro,
                "shuffle": spec.train.shuffle,
                "knobs": knobs,
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker=plan.worker_resources),
            torch_config=TorchConfig(backend="gloo"),
            datasets={"train": prepared.datasets["train"]},
            dataset_config=kiln.train.ingest.ValidationExactDataConfig(),
            run_config=RunConfig(
                name=run_dir.name,
                storage_path=str(run_dir.parent),
                checkpoint_config=CheckpointConfig(num_to_keep=None),
            ),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    runs = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    return {"epochs": runs, "micro_batch": knobs.ingest_batch or micro, "plan": plan.describe()}


# ----------------------------------------------------------------------------------------------
# Figures


def steady_rate(epochs: list[dict[str, Any]], key: str = "samples_per_s") -> float:
    """Harmonic mean over epochs >= 2 (equal-sized epochs: total samples / total seconds)."""
    rates = [e[key] for e in epochs if e["epoch"] >= 2] or [e[key] for e in epochs]
    return statistics.harmonic_mean(rates)


def ingest_rate(epochs: list[dict[str, Any]]) -> float:
    steady = [e for e in epochs if e["epoch"] >= 2] or epochs
    return sum(e["rows"] for e in steady) / sum(e["seconds"] for e in steady)


def human(rate: float) -> str:
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate:,.0f}"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    print("\n== kiln benchmark", time.strftime("%Y-%m-%d %H:%M"), "==")
    print(
        f"data: {results['rows']:,} training rows x {args.features} features, {args.classes} "
        f"classes; batch {args.batch_size} over {args.workers} workers; epochs {args.epochs}"
    )
    noisy = set(results["noisy"])
    if noisy:
        print(
            "* another Ray shared the CPUs meanwhile: noisy; rerun when `pgrep -f raylet` is empty"
        )
    train, ingest = results.get("train"), results.get("ingest")
    names = [*(train or {}), *(ingest or {})]
    width = max(map(len, names), default=10) + 4
    if train:
        first = next(iter(train.values()))
        header = "".join(f"{'epoch ' + str(e['epoch']):>11}" for e in first)
        print(f"\n{'training samples/s':<{width}}{header}   last train loss")
        for name, run in train.items():
            label = name + (" *" if {name, f"train {name}"} & noisy else "")
            cells = "".join(f"{human(e['samples_per_s']):>11}" for e in run)
            print(f"{label:<{width}}{cells}   {run[-1]['train_loss']:.4f}")
    if ingest:
        print(f"\n{'ingest rows/s into one worker':<{width}}   per epoch (first batch after s)")
        for name, run in ingest.items():
            label = name + (" *" if {name, f"ingest {name}"} & noisy else "")
            if name.startswith("pyarrow"):
                print(f"{label:<{width}}{human(run):>11}")
                continue
            cells = (
                f"{human(e['rows'] / e['seconds']):>11} ({e['first_batch_s']:.1f}s)" for e in run
            )
            print(f"{label:<{width}}" + "".join(cells))
    print()
    if train:
        runs = [name for name in train if name.startswith("torchrun")]
        clean = [name for name in runs if name not in noisy] or runs  # drop a disturbed one
        references = [e for name in clean for e in train[name]]
        base = steady_rate(references)
        for name, run in train.items():
            if not name.startswith("torchrun"):
                kiln = steady_rate(run)
                print(
                    f"train samples/s: {name} {kiln:,.0f}, torchrun {base:,.0f}, "
                    f"ratio {kiln / base:.2f} (goal >= {TRAIN_GOAL})"
                )
    if ingest:
        base = ingest["pyarrow (read + numpy)"]
        for name, run in ingest.items():
            if not name.startswith("pyarrow"):
                kiln = ingest_rate(run)
                print(
                    f"ingest rows/s: {name} {human(kiln)}, pyarrow {human(base)}, "
                    f"ratio {kiln / base:.2f} (goal >= {INGEST_GOAL})"
                )


BEFORE = "v2_read=true,pre_batch=4096,cache=false,fetch_rows=1"
"""kiln before the changes these measurements led to (Ray's default reader, 4096-row
preprocessing batches, no caching, one Ray batch per micro-batch)."""

SWEEP = [
    "",
    "cache=false",
    "cache=false,pre_batch=4096",
    "cache=false,v2_read=true",
    "fetch_rows=1",
    "fetch_rows=4096",
    "fetch_rows=65536",
    "preserve_order=false",
    "ingest_batch=32768",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="/tmp/kiln-bench", help="dataset cache directory")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows (train + 10%% test)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--shards", type=int, default=16, help="parquet files per split")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (>= 2 timed)")
    parser.add_argument("--ingest-epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1024, help="global batch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--only", choices=("train", "ingest"), help="run one of the two figures")
    parser.add_argument(
        "--knobs",
        action="append",
        default=[],
        help="also measure kiln with these knobs (repeatable), e.g. read_blocks=64,block_mb=8",
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help="also measure kiln as it was before the ingest changes: " + BEFORE,
    )
    parser.add_argument("--sweep", action="store_true", help="ingest: try the built-in knob list")
    parser.add_argument(
        "--no-default",
        action="store_true",
        help="skip the kiln-as-is variant (only the --knobs variants)",
    )
    parser.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the local Ray started here (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS=2)",
    )
    parser.add_argument("--json", help="write every figure here as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")

    data = ensure_data(args)
    workdir = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    spec = bench_spec(args, data, workdir)
    info, _ = check_data(spec.data)
    files, columns = list(info.files.paths), [*info.features, spec.data.label]
    variants = [Knobs(), *(Knobs.parse(text) for text in args.knobs)]
    names = {Knobs(): "kiln"}
    if args.before:
        before = Knobs.parse(BEFORE)
        variants.append(before)
        names[before] = "kiln before"
    if args.no_default:
        variants = variants[1:]
    if args.sweep:
        variants = [Knobs.parse(text) for text in SWEEP]
    results: dict[str, Any] = {"rows": info.num_rows, "args": vars(args)}
    train, ingest = args.only != "ingest", args.only != "train"
    watch = Watch()
    watch.start()
    try:
        pre = fit_local(spec)
        if train:
            # Before and after kiln (A-B-A): this machine's speed drifts by 10-20% over minutes.
            logger.info("torchrun reference (before)...")
            with watch.phase("torchrun (before)"):
                run = run_torchrun(spec, pre, workdir)
            results["train"] = {"torchrun (before)": run["epochs"]}
        if ingest:
            logger.info("pyarrow reference...")
            with watch.phase("pyarrow (read + numpy)"):
                results["ingest"] = {
                    "pyarrow (read + numpy)": pyarrow_read(files, columns, "label", 3)[
                        "rows_per_s"
                    ],
                    "pyarrow (+ kiln transform)": pyarrow_transform(files, columns, pre),
                }
        for item in args.ray_env:  # inherited by the Ray processes started below
            key, _, value = item.partition("=")
            os.environ[key] = value
        with local_ray(watch):
            for i, knobs in enumerate(variants):
                name = names.get(knobs, f"kiln[{knobs.label()}]")
                if train and not args.sweep and knobs.ingest_batch is None:
                    logger.info("kiln training: %s", knobs.label())
                    with watch.phase(f"train {name}"):
                        run = kiln_train(spec, knobs, workdir / "runs" / f"train-{i}")
                    results["train"][name] = run["epochs"]
                if ingest:
                    logger.info("kiln ingest: %s", knobs.label())
                    with watch.phase(f"ingest {name}"):
                        run = kiln_ingest(spec, knobs, args.ingest_epochs, workdir / f"i{i}")
                    results["ingest"][name] = run["epochs"]
        if train and not args.sweep:
            logger.info("torchrun reference (after)...")
            with watch.phase("torchrun (after)"):
                run = run_torchrun(spec, pre, workdir)
            results["train"]["torchrun (after)"] = run["epochs"]
    finally:
        watch.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["noisy"] = watch.noisy()
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    sys.exit(main())
