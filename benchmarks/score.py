"""Batch scoring throughput: `kiln.inference.batch.score` against a single-process loop.

    .venv/bin/python benchmarks/score.py                  # about 1-2 minutes once the data exists
    .venv/bin/python benchmarks/score.py --threads 2 --batch-size 8192
    .venv/bin/python benchmarks/score.py --work /tmp/kbs-16m --rows 16000000 --shards 64

Data: ~1M synthetic rows (`kiln data synth`, 32 numeric features, 4 classes, 8 Parquet files),
generated once into `--work` (default /tmp/kiln-bench-score) and reused. Model: a seeded,
untrained `tabular_mlp` with preprocessing fitted on those columns, registered into a fresh
registry under `--work` (scoring cost does not depend on the weights being trained).

1. kiln: `score(...)` over the files (Ray Data read -> actor pool of Predictors -> Parquet), one
   scoring actor holding one CPU, torch limited to `--threads` threads (OMP_NUM_THREADS in the
   actor's environment); rows/s = rows / wall time of the `score` call, Ray already started.
   Then a 1,000-row job on the same, now warm, Ray: the start-up any job pays (printed, with
   the rate of the rest).
2. single-process: for each file, pyarrow `iter_batches(--batch-size)` -> `Predictor.predict_table`
   -> a ParquetWriter of the same columns kiln writes (key `file:row`, prediction,
   prob_<class>, model), `torch.set_num_threads(--threads)`;
   rows/s = rows / wall time including loading the Predictor.

Every input file is read once before either side is timed (the page cache then holds them for
both). `--profile` registers the model with a training profile, as `kiln train` does: kiln then
also counts every scored row into the drift bins (`_drift.json`), which the single process does
not do.

Goal: kiln / single-process >= 0.85.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.85
MODEL = "bench-score"


def ensure_data(work: Path, rows: int, features: int, classes: int, shards: int) -> Path:
    """The train/ split of the synthetic data set, generated if absent."""
    train = work / "data" / "train"
    if train.is_dir() and any(train.glob("*.parquet")):
        return train
    shutil.rmtree(work / "data", ignore_errors=True)
    kiln = str(Path(sys.executable).with_name("kiln"))
    command = [kiln, "data", "synth", str(work / "data"), "--rows", str(rows)]
    command += ["--features", str(features), "--classes", str(classes), "--shards", str(shards)]
    command += ["--test-fraction", "0.001"]
    print("generating:", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return train


def register_model(registry: Path, train: Path, hidden: int, profile: bool = False) -> str:
    """Fit preprocessing on the first file and register a seeded tabular_mlp; returns its ref.
    With `profile`, also a training profile of that file (as `kiln train` registers one), so
    kiln score counts every scored row's inputs for drift."""
    import pyarrow.parquet as pq
    import torch

    from kiln.config import JobSpec
    from kiln.data.preprocess import fit_preprocessor, merge_stats, partial_stats
    from kiln.models import build_model
    from kiln.registry import Registry
    from kiln.train.export import model_document

    table = pq.read_table(sorted(train.glob("*.parquet"))[0])
    features = [c for c in table.column_names if c != "label"]
    spec = JobSpec.model_validate(
        {
            "name": MODEL,
            "data": {
                "train": str(train),
                "validation_split": 0.1,
                "label": "label",
                "task": "classification",
            },
            "model": {"kind": "tabular_mlp", "hidden_sizes": [hidden]},
        }
    )
    stats = merge_stats(
        [
            partial_stats(
                table, numeric=features, categorical=[], label="label", task="classification"
            )
        ]
    )
    pre = fit_preprocessor(
        stats,
        spec.data.preprocess,
        features=features,
        numeric=features,
        categorical=[],
        label="label",
        task="classification",
    )
    torch.manual_seed(0)
    module = build_model(spec.model, pre.input_schema())
    documents = {
        "model.json": model_document(spec, pre),
        "preprocessing.json": pre.to_dict(),
        "metrics.json": {"metric": "none", "best": {}, "history": []},
    }
    if profile:
        from kiln.monitor import profile_table

        documents["profile.json"] = profile_table(table, numeric=features).to_dict()
    return Registry(str(registry)).register(MODEL, module.state_dict(), documents).ref


def warm_page_cache(train: Path) -> None:
    """Read every input file once, so neither side (the single process runs first) pays for
    reading the files from disk."""
    for path in sorted(train.glob("*.parquet")):
        with open(path, "rb") as handle:
            while handle.read(8 << 20):
                pass


def single_process(registry: str, ref: str, train: Path, out: Path, batch_size: int) -> int:
    """Read, predict and write every file in this process; returns rows scored."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kiln.inference.predictor import Predictor

    predictor = Predictor(registry, ref)
    features = predictor.features
    classes = predictor.classes or []
    names = ["key", "prediction", *(f"prob_{c}" for c in classes), "model"]
    rows = 0
    for path in sorted(train.glob("*.parquet")):
        writer = None
        rows_in_file = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=features):
            result = predictor.predict_table(pa.Table.from_batches([batch]))
            by_class = np.ascontiguousarray(result["probabilities"].T)
            n = batch.num_rows
            # The same columns kiln writes: key `file:row`, prediction, prob_<class>, model.
            positions = pc.cast(pa.array(np.arange(rows_in_file, rows_in_file + n)), pa.string())
            keys = pc.binary_join_element_wise(path.name, positions, ":")
            model = pa.array([predictor.ref] * n, type=pa.string())
            columns = [keys, pa.array(result["prediction"]), *map(pa.array, by_class), model]
            rows_in_file += n
            table = pa.Table.from_arrays(columns, names=names)
            if writer is None:
                writer = pq.ParquetWriter(out / path.name, table.schema)
            writer.write_table(table)
            rows += batch.num_rows
        if writer is not None:
            writer.close()
    return rows


def run_kiln(
    registry: str, ref: str, train: Path, out: Path, batch_size: int, threads: int
) -> tuple[int, float, float]:
    """kiln's score on a local Ray started here (not timed); returns rows, seconds, and the
    seconds of a 1,000-row job run right after on the same (now warm) Ray: the start-up each
    job pays whatever its size."""
    import ray

    from kiln.inference.batch import score

    temp_dir = tempfile.mkdtemp(prefix="kb-", dir="/tmp")  # short: Ray's socket paths are capped
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={
            "env_vars": {
                "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
            }
        },
        log_to_driver=False,
    )
    try:
        start = time.perf_counter()
        summary = score(
            ref,
            registry=registry,
            input=str(train),
            output=str(out),
            batch_size=batch_size,
            concurrency=(1, 1),
            num_cpus_per_actor=1.0,
            overwrite=True,
        )
        seconds = time.perf_counter() - start
        print(f"kiln summary: {summary}", flush=True)
        import pyarrow.parquet as pq

        tiny = out.parent / "tiny"
        shutil.rmtree(tiny, ignore_errors=True)
        tiny.mkdir()
        first = sorted(train.glob("*.parquet"))[0]
        pq.write_table(pq.read_table(first).slice(0, 1000), tiny / "part.parquet")
        start = time.perf_counter()
        score(
            ref,
            registry=registry,
            input=str(tiny),
            output=str(out.parent / "out-tiny"),
            batch_size=batch_size,
            concurrency=(1, 1),
            num_cpus_per_actor=1.0,
            overwrite=True,
        )
        return summary.rows_in, seconds, time.perf_counter() - start
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/kiln-bench-score", help="data, registry, outputs")
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (first run)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8, help="parquet files")
    parser.add_argument("--hidden", type=int, default=64, help="hidden layer width of the MLP")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per predict call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--stats", action="store_true", help="log Ray Data's per-stage stats")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="register the model with a training profile (as kiln train does): kiln also "
        "counts every row for drift, which the single process does not",
    )
    args = parser.parse_args(argv)
    if args.stats:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger("kiln.inference.batch").setLevel(logging.DEBUG)

    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = ensure_data(work, args.rows, args.features, args.classes, args.shards)
    registry = work / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    ref = register_model(registry, train, args.hidden, args.profile)
    torch.set_num_threads(args.threads)
    warm_page_cache(train)

    plain_out = work / "out-single"
    shutil.rmtree(plain_out, ignore_errors=True)
    plain_out.mkdir()
    start = time.perf_counter()
    plain_rows = single_process(str(registry), ref, train, plain_out, args.batch_size)
    plain_rate = plain_rows / (time.perf_counter() - start)
    print(f"single-process: {plain_rows} rows, {plain_rate:,.0f} rows/s", flush=True)

    kiln_rows, seconds, startup = run_kiln(
        str(registry), ref, train, work / "out-kiln", args.batch_size, args.threads
    )
    kiln_rate = kiln_rows / seconds
    if kiln_rows != plain_rows:
        raise SystemExit(f"row counts differ: kiln {kiln_rows}, single-process {plain_rows}")
    # Start-up measured warm, so the rest is an upper bound on what the rows themselves took.
    rows_part = max(seconds - startup, 1e-9)
    print(
        f"kiln: {seconds:.2f} s for {kiln_rows:,} rows; a 1,000-row job right after takes "
        f"{startup:.2f} s (start-up paid by any job: actor process, torch import, model load, "
        f"Ray Data's first tasks), so the rows themselves took <= {rows_part:.2f} s "
        f"({kiln_rows / rows_part:,.0f} rows/s)"
    )
    print(
        f"score rows/s: kiln {kiln_rate:,.0f}, single-process {plain_rate:,.0f}, "
        f"ratio {kiln_rate / plain_rate:.2f} (goal >= {GOAL})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
