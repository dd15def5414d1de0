"""Batch scoring and batch generation: a registered model over a dataset, as one Ray Data job.

The driver resolves the model reference once, plans the reads (file list, parquet footers, column
checks) and then runs::

    from_items(read plan) -> read each file chunk (every row tagged with its file and position;
        scoring: the model's preprocessing applied, the inputs counted for drift)
        -> actor pool of Predictors (map_batches) -> Parquet in a staging directory

The read tasks run `kiln.inference.batch_read`, which does not import torch: only the scoring
actors pay for it. The actors, a model copy each, are what a job waits on, so they only run the
model on encoded inputs; everything else about a row happens in the read tasks beside them.

Rows that cannot be scored fail the job, naming the file and row, or are set aside in
`_errors/`. With `task="generate"` a language model completes each row's prompt instead (an
actor pool of `LMPredictor`s); a null prompt, or one the model cannot complete (too long for the
context with max_tokens), is a bad row like any other. Nothing is dropped: the rows read,
written and set aside are counted from the files themselves and must reconcile before the
staging directory is renamed to the output path.

Output layout::

    OUT/*.parquet          key column, prediction, prob_<class>... (classification), model
                           (--task generate: key column, prompt, completion, prompt_tokens,
                           completion_tokens, finish_reason, model)
    OUT/_errors/*.parquet  quarantined rows: key, reason, file, row, then the input columns as text
    OUT/_SUCCESS           the summary as JSON, written just before the rename
"""

from __future__ import annotations

import csv
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kiln import metrics as kiln_metrics
from kiln import storage
from kiln.data.preprocess import Preprocessor
from kiln.data.source import FileSet, resolve_files
from kiln.errors import DataError, KilnError, RegistryError
from kiln.inference.batch_read import (
    DEFAULT_KEY,
    DRIFT_PARTS,
    ERROR,
    FAILURES,
    FILE,
    READS,
    ROW,
    X_CAT,
    GenerateOptions,
    Item,
    Job,
    RowCounter,
    X,
    encoded,
    is_number_like,
    is_scalar,
    is_text,
    read_items,
    record_failure,
)
from kiln.inference.lm import Completion, LMPredictor, is_language_model
from kiln.inference.predictor import Predictor
from kiln.monitor.drift import Thresholds, drift_report
from kiln.monitor.profile import PROFILE_FILE, Binner, Profile
from kiln.registry import Registry

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
ERRORS = "_errors"
ON_ERROR = ("fail", "quarantine")

DRIFT = "_drift.json"
"""Drift of the scored input against the model's training profile, beside the output."""
_ITEM_ROWS = 1 << 18  # parquet row groups are grouped into read items of about this many rows
_PROGRESS_S = 0.5  # least seconds between an actor's progress counts
_OUTPUT_COLUMNS = ("prediction", "model")
TASKS = ("predict", "generate")
_GENERATE_COLUMNS = (
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("model", pa.string()),
)


@dataclass(frozen=True)
class ScoreSummary:
    """What a scoring job did; also written to `OUT/_SUCCESS`."""

    rows_in: int
    """Rows read from the input."""
    rows_out: int
    """Rows in the output (one per scored input row)."""
    rows_quarantined: int
    """Rows set aside in `OUT/_errors/` (always 0 with on_error="fail")."""
    seconds: float
    """Wall time of the job, from Ray being connected to the output being committed."""
    rows_per_s: float
    model: str
    """The exact model version, `name:version`."""
    output: str
    drift: dict[str, Any] | None = None
    """Drift of the scored rows against the training profile (`samples`, `over`, `verdict`;
    every feature in `OUT/_drift.json`); None when the model has no profile."""


def score(
    ref: str,
    *,
    registry: str,
    input: str,
    output: str,
    fmt: str = "parquet",
    batch_size: int = 1024,
    concurrency: tuple[int, int] = (1, 1),
    on_error: str = "fail",
    key: str | None = None,
    num_cpus_per_actor: float = 0.5,
    num_gpus: float = 0,
    read_cpus: float = 0.25,
    overwrite: bool = False,
    address: str | None = None,
    progress_interval: float | None = None,
    task: str = "predict",
    generate: GenerateOptions | None = None,
) -> ScoreSummary:
    """Score every row at `input` with a registered model and write Parquet to `output`; with
    `task="generate"`, complete every row's prompt with a registered language model.

    Args:
        ref: `name`, `name:version` or `name@alias`; resolved once, so every actor loads the same
            version even if the alias moves while the job runs.
        registry: registry root (path or URI).
        input: file, directory, glob or URI of `fmt` files.
        output: directory (path or URI) to create; it must not exist or be empty, unless
            `overwrite`.
        fmt: "parquet", "csv" or "jsonl".
        batch_size: rows per Predictor call.
        concurrency: (min, max) scoring actors; the pool autoscales between them.
        on_error: "fail" stops at the first bad row (naming file and row); "quarantine" writes
            bad rows with their reason to `output/_errors/` and scores the rest.
        key: input column to carry into the output as the row key; None: a `key` column of
            `file:row` (the file relative to `input`, the row counted from 0 within the file).
        num_cpus_per_actor, num_gpus: Ray resources per scoring actor (num_gpus > 0 scores on
            CUDA).
        read_cpus: Ray CPUs per read task.
        overwrite: replace a non-empty `output`.
        address: Ray cluster address; default RAY_ADDRESS or a local Ray.
        progress_interval: seconds between plain progress lines when stderr is not a terminal
            (default `$KILN_PROGRESS_INTERVAL` or 10; see `kiln.progress`).
        task: "predict" (a tabular model scores rows) or "generate" (a language model completes
            prompts).
        generate: the prompt column and sampling for `task="generate"` (default options if
            None).

    Raises:
        DataError: bad input (missing column, wrong type, unreadable file) or, with
            on_error="fail", a row that cannot be scored.
        KilnError: bad options, an unknown model, a task the model cannot do, an existing
            output, or counts that do not reconcile (then nothing is committed).
    """
    from kiln.cluster import connect

    generate = _check_task(task, generate)
    _check_options(batch_size, concurrency, on_error, key, num_cpus_per_actor, num_gpus, generate)
    registry = _absolute(registry)
    model = Registry(registry).resolve(ref).ref
    plan = _model_plan(registry, model, generate)
    files = resolve_files(input, fmt, field="--input")
    out_fs, out_path = storage.open_location(output, field="--output")
    _check_output(out_fs, out_path, output, overwrite)
    staging = _staging_path(out_path)
    job, expected = _plan(files, plan, key, out_fs, staging, registry, on_error, num_gpus)
    logger.info(
        "%s %d %s files (%s rows) with %s: %d..%d actors x %g CPU%s, batch %d -> %s",
        "generating for" if generate else "scoring",
        len(files.paths),
        fmt,
        "?" if expected is None else expected,
        model,
        *concurrency,
        num_cpus_per_actor,
        f" + {num_gpus:g} GPU" if num_gpus else "",
        batch_size,
        output,
    )
    connect(address)
    start = time.monotonic()
    committed = False
    try:
        out_fs.create_dir(storage.join(staging, ERRORS), recursive=True)
        resources = {"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus, "read_cpus": read_cpus}
        _run(job, batch_size, concurrency, resources, progress_interval, expected)
        rows_in, rows_out, quarantined = _reconcile(job, expected)
        drift = _write_drift(job)
        seconds = time.monotonic() - start
        rate = round(rows_in / seconds, 1)
        summary = ScoreSummary(
            rows_in, rows_out, quarantined, round(seconds, 3), rate, model, output, drift=drift
        )
        _write_success(job, summary, files)
        _commit(out_fs, staging, out_path, overwrite)
        committed = True
    finally:
        if not committed:
            _delete_dir(out_fs, staging)
    return summary


def _check_task(task: str, generate: GenerateOptions | None) -> GenerateOptions | None:
    """The generation options when `task` is generate (defaults if None), else None."""
    if task not in TASKS:
        raise KilnError(f"--task must be one of {list(TASKS)}, got {task!r}")
    if task == "predict":
        if generate is not None:
            raise KilnError("generation options (--max-tokens, ...) need --task generate")
        return None
    generate = generate or GenerateOptions()
    generate.check()
    return generate


def _check_options(
    batch_size: int,
    concurrency: tuple[int, int],
    on_error: str,
    key: str | None,
    num_cpus: float,
    num_gpus: float,
    generate: GenerateOptions | None = None,
) -> None:
    if generate is not None and key in {name for name, _ in _GENERATE_COLUMNS}:
        raise KilnError(f"--key: column {key!r} clashes with an output column of that name")
    if batch_size < 1:
        raise KilnError(f"--batch-size must be at least 1, got {batch_size}")
    low, high = concurrency
    if low < 1 or high < low:
        raise KilnError(f"--concurrency must be MIN:MAX with 1 <= MIN <= MAX, got {low}:{high}")
    if key is not None and (key in _OUTPUT_COLUMNS or key.startswith("prob_")):
        raise KilnError(f"--key: column {key!r} clashes with an output column of that name")
    if on_error not in ON_ERROR:
        raise KilnError(f"--on-error must be one of {list(ON_ERROR)}, got {on_error!r}")
    if num_cpus < 0 or num_gpus < 0 or (num_cpus == 0 and num_gpus == 0):
        raise KilnError("each scoring actor needs some CPU or GPU (--cpus/--gpus-per-worker)")


def _absolute(location: str) -> str:
    """Workers may run elsewhere than the driver's cwd: local paths become absolute."""
    return location if storage.is_uri(location) else os.path.abspath(location)


# ---------------------------------------------------------------------------------------------
# Planning on the driver


@dataclass(frozen=True)
class _ModelPlan:
    """What planning needs to know of the model: its exact ref, the input columns it reads and
    the output columns after the key."""

    ref: str
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    """Text-like input columns (for generation: the prompt column)."""
    outputs: tuple[pa.Field, ...]
    generate: GenerateOptions | None
    preprocessor: Preprocessor | None = None
    """The fitted preprocessing the read tasks apply (scoring)."""
    profile: Profile | None = None
    """The training profile the read tasks count drift against (None: no drift counts)."""


def _model_plan(registry: str, model: str, generate: GenerateOptions | None) -> _ModelPlan:
    """Check that the model can do the task, and what it reads and writes.

    Raises:
        KilnError: a language model asked to predict, or a tabular model asked to generate.
    """
    language_model = is_language_model(registry, model)
    if generate is None:
        if language_model:
            raise KilnError(
                f"{model} is a language model: generate with it (kiln score {model} "
                "--task generate --prompt-column COLUMN --max-tokens N)"
            )
        predictor = Predictor(registry, model)
        schema = predictor.schema
        return _ModelPlan(
            ref=model,
            numeric=tuple(schema["numeric"]),
            categorical=tuple(schema["categorical"]),
            outputs=_prediction_fields(predictor),
            generate=None,
            preprocessor=predictor.preprocessor,
            profile=_load_profile(registry, model),
        )
    if not language_model:
        raise KilnError(
            f"--task generate needs a language model; {model} is a tabular model (score it "
            "without --task generate)"
        )
    fields = tuple(pa.field(name, dtype) for name, dtype in _GENERATE_COLUMNS)
    return _ModelPlan(model, (), (generate.prompt_column,), fields, generate)


def _plan(
    files: FileSet,
    plan: _ModelPlan,
    key: str | None,
    out_fs: pafs.FileSystem,
    staging: str,
    registry: str,
    on_error: str,
    num_gpus: float,
) -> tuple[Job, int | None]:
    """The job description and the rows expected (parquet footers; None for csv/jsonl)."""
    numeric, categorical = plan.numeric, plan.categorical
    needed = [*numeric, *categorical] + ([key] if key and key not in numeric + categorical else [])
    if files.format == "parquet":
        text_only = plan.generate is not None
        items, key_type, float_types, expected = _plan_parquet(
            files, numeric, categorical, key, text_only
        )
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(files.paths)))) as pool:
            list(pool.map(lambda path: _check_text_head(files, path, needed), files.paths))
        items = tuple(Item(i, None, 0) for i in range(len(files.paths)))
        key_type, expected = pa.string(), None
        float_types = tuple(pa.float64() for _ in numeric)  # parsed from text
    if key in numeric or key in categorical:  # the key column is then the normalised feature
        key_type = pa.float64() if key in numeric else pa.string()
        float_types = tuple(
            pa.float64() if name == key else dtype
            for name, dtype in zip(numeric, float_types, strict=True)
        )
    job = Job(
        fmt=files.format,
        filesystem=files.filesystem,
        paths=files.paths,
        names=_key_names(files),
        shown=tuple(files.display(path) for path in files.paths),
        items=items,
        numeric=numeric,
        float_types=float_types,
        categorical=categorical,
        key=key,
        key_type=key_type,
        output_schema=pa.schema([pa.field(key or DEFAULT_KEY, key_type), *plan.outputs]),
        out_fs=out_fs,
        staging=staging,
        registry=registry,
        model=plan.ref,
        device="cuda" if num_gpus > 0 else "cpu",
        on_error=on_error,
        generate=plan.generate,
        preprocessor=plan.preprocessor,
        profile=plan.profile,
    )
    return job, expected


def _prediction_fields(predictor: Predictor) -> tuple[pa.Field, ...]:
    """Scoring's output columns after the key."""
    if predictor.task == "classification":
        labels = predictor.preprocessor.inverse_label(np.zeros(1, dtype=np.int64))
        prediction_type = pa.array(labels).type
        classes = [pa.field(f"prob_{c}", pa.float32()) for c in predictor.classes or []]
    else:
        prediction_type, classes = pa.float64(), []
    return (
        pa.field("prediction", prediction_type),
        *classes,
        pa.field("model", pa.string()),
    )


def _key_names(files: FileSet) -> tuple[str, ...]:
    """Each file relative to the input directory (a file or glob: to the deepest directory
    holding every file), so keys do not depend on the cwd or the mount point."""
    _, location = storage.open_location(files.location, field="--input")
    if files.filesystem.get_file_info(location).type == pafs.FileType.Directory:
        root = location.rstrip("/")
    else:
        root = posixpath.commonpath([posixpath.dirname(p) for p in files.paths])
    return tuple(posixpath.relpath(p, root) if root else p for p in files.paths)


def _plan_parquet(
    files: FileSet,
    numeric: tuple[str, ...],
    categorical: tuple[str, ...],
    key: str | None,
    text_only: bool = False,
) -> tuple[tuple[Item, ...], pa.DataType, tuple[pa.DataType, ...], int]:
    """Check every footer's columns (`text_only`: the categorical columns must be text, as
    prompts are), and split files into items of whole row groups.

    Returns:
        The items, the key's type, each numeric feature's type in the blocks (float32 where
        every file stores float32, so a read task does not widen it; else float64), the rows.
    """
    accepts, what = (
        (is_text, "text (the prompts)")
        if text_only
        else (is_scalar, "a category (text, number or bool)")
    )

    def footer(path: str) -> pq.FileMetaData:
        try:
            with files.filesystem.open_input_file(path) as handle:
                return pq.ParquetFile(handle).metadata
        except (pa.ArrowException, OSError) as exc:
            raise DataError(
                f"--input: {files.display(path)} is not a readable parquet file ({exc})"
            ) from exc

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files.paths)))) as pool:
        footers = list(pool.map(footer, files.paths))
    key_types = []
    float32 = dict.fromkeys(numeric, True)
    items: list[Item] = []
    for index, (path, meta) in enumerate(zip(files.paths, footers, strict=True)):
        schema = meta.schema.to_arrow_schema()
        shown = files.display(path)
        for name in numeric:
            dtype = _check_column(schema, name, shown, is_number_like, "a number")
            value_type = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
            float32[name] = float32[name] and value_type == pa.float32()
        for name in categorical:
            _check_column(schema, name, shown, accepts, what)
        if key:
            key_types.append(_check_column(schema, key, shown, is_scalar, "a key"))
        items.extend(_row_group_items(index, meta))
    expected = sum(meta.num_rows for meta in footers)
    if expected == 0:
        raise DataError(f"--input: {files.location!r} has no rows")
    float_types = tuple(pa.float32() if float32[name] else pa.float64() for name in numeric)
    return tuple(items), _key_type(key_types), float_types, expected


def _row_group_items(file: int, meta: pq.FileMetaData) -> Iterator[Item]:
    group: list[int] = []
    first = rows = 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows - first >= _ITEM_ROWS:
            yield Item(file, tuple(group), first)
            group, first = [], rows
    if group:
        yield Item(file, tuple(group), first)


def _check_column(schema: pa.Schema, name: str, shown: str, accepts: Any, what: str) -> pa.DataType:
    index = schema.get_field_index(name)
    if index < 0:
        listed = ", ".join(schema.names[:20]) + (" ..." if len(schema.names) > 20 else "")
        raise DataError(f"--input: column {name!r} not found in {shown} (columns: {listed})")
    dtype = schema.field(index).type
    if not accepts(dtype):
        raise DataError(f"--input: column {name!r} is {dtype} in {shown}; the model reads {what}")
    return dtype


def _key_type(types: list[pa.DataType]) -> pa.DataType:
    """One key type for every file: the common type, int64 for mixed ints, else text."""
    if not types:
        return pa.string()
    types = [t.value_type if pa.types.is_dictionary(t) else t for t in types]
    if all(t == types[0] for t in types) and not pa.types.is_null(types[0]):
        return pa.large_string() if pa.types.is_large_string(types[0]) else types[0]
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    return pa.string()


def _check_text_head(files: FileSet, path: str, needed: list[str]) -> None:
    """The first block of a csv/jsonl file must name every column the model reads."""
    shown = files.display(path)
    try:
        with files.filesystem.open_input_stream(path) as stream:
            head = stream.read(1 << 20)
    except OSError as exc:
        raise DataError(f"--input: cannot read {shown} ({exc})") from exc
    if files.format == "csv":
        first = head.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
        present = set(next(csv.reader([first]), []))
    else:
        present = set()
        for line in head.splitlines()[:1000]:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                present.update(record)
    missing = [name for name in needed if name not in present]
    if missing:
        raise DataError(
            f"--input: column {missing[0]!r} not found in {shown} "
            f"(columns: {', '.join(sorted(present)[:20]) or 'none'})"
        )


# ---------------------------------------------------------------------------------------------
# Output location, staging and commit


def _check_output(fs: pafs.FileSystem, path: str, shown: str, overwrite: bool) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound or overwrite:
        return
    if info.type == pafs.FileType.Directory and not fs.get_file_info(pafs.FileSelector(path)):
        return
    raise KilnError(
        f"--output: {shown} already exists and is not empty; choose another path or pass "
        "--overwrite"
    )


def _staging_path(out_path: str) -> str:
    """A hidden sibling of the output directory (a rename stays on one filesystem)."""
    parent, name = posixpath.split(out_path.rstrip("/"))
    return storage.join(parent, f".{name}.staging-{uuid.uuid4().hex[:12]}")


def _write_success(job: Job, summary: ScoreSummary, files: FileSet) -> None:
    document = {
        **asdict(summary),
        "input": files.location,
        "format": files.format,
        "files": len(files.paths),
        "key": job.key or "file:row",
        "on_error": job.on_error,
        "task": "generate" if job.generate else "predict",
        **({"generation": asdict(job.generate)} if job.generate else {}),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _delete_dir(job.out_fs, storage.join(job.staging, READS))
    data = (json.dumps(document, indent=2) + "\n").encode()
    storage.write_bytes(job.out_fs, storage.join(job.staging, SUCCESS), data)


def _commit(fs: pafs.FileSystem, staging: str, out_path: str, overwrite: bool) -> None:
    """Move the finished staging directory to the output path.

    Locally one rename (an existing non-empty output is first renamed aside when overwriting).
    Object stores cannot rename a directory: files move one by one, `_SUCCESS` last, so a reader
    that waits for `_SUCCESS` never sees a partial output.
    """
    exists = fs.get_file_info(out_path).type != pafs.FileType.NotFound
    if isinstance(fs, pafs.LocalFileSystem):
        aside = None
        if exists and overwrite:
            aside = _staging_path(out_path).replace(".staging-", ".replaced-")
            os.rename(out_path, aside)
        try:
            os.rename(staging, out_path)  # replaces an empty directory; fails on a non-empty one
        except OSError as exc:
            if aside:
                os.rename(aside, out_path)
            raise KilnError(f"--output: could not move the result into {out_path}: {exc}") from exc
        if aside:
            _delete_dir(fs, aside)
        return
    if exists and overwrite:
        fs.delete_dir_contents(out_path)
    infos = fs.get_file_info(pafs.FileSelector(staging, recursive=True))
    moves = sorted(
        (i.path for i in infos if i.type == pafs.FileType.File),
        key=lambda p: p.endswith("/" + SUCCESS),
    )
    for source in moves:
        target = storage.join(out_path, posixpath.relpath(source, staging))
        fs.create_dir(posixpath.dirname(target), recursive=True)
        fs.move(source, target)
    _delete_dir(fs, staging)


def _load_profile(registry: str, model: str) -> Profile | None:
    """The model's training profile, None when it has none (registered before profiles)."""
    registry_ = Registry(registry)
    try:
        return Profile.from_dict(registry_.read_document(registry_.resolve(model), PROFILE_FILE))
    except RegistryError:
        return None


def _write_drift(job: Job) -> dict[str, Any] | None:
    """Merge the read items' bin counts into `_drift.json` in the staging directory (committed
    with the output); returns its summary. None for generation or a model without profile."""
    profile = job.profile
    directory = storage.join(job.staging, DRIFT_PARTS)
    if profile is None:
        _delete_dir(job.out_fs, directory)
        return None
    total = np.zeros(Binner(profile).size, dtype=np.int64)
    for info in job.out_fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
        total += np.asarray(json.loads(storage.read_bytes(job.out_fs, info.path)), np.int64)
    _delete_dir(job.out_fs, directory)
    thresholds = Thresholds()
    report = drift_report(profile, total, thresholds)
    document = {"model": job.model, "thresholds": thresholds.to_dict(), **report}
    data = (json.dumps(document, indent=2) + "\n").encode()
    storage.write_bytes(job.out_fs, storage.join(job.staging, DRIFT), data)
    logger.info("input drift: %s", report["verdict"])
    return {"file": DRIFT, **{k: report[k] for k in ("samples", "over", "verdict")}}


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    with suppress(OSError):
        fs.delete_dir(path)


def _parquet_rows(fs: pafs.FileSystem, directory: str) -> int:
    """Rows in the directory's parquet files (not recursive), from their footers."""
    infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    total = 0
    for info in infos:
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        with fs.open_input_file(info.path) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def _reconcile(job: Job, expected: int | None) -> tuple[int, int, int]:
    """Rows read (from the readers' counts), written and quarantined (from the files)."""
    counts: dict[int, int] = {}
    reads = job.out_fs.get_file_info(
        pafs.FileSelector(storage.join(job.staging, READS), allow_not_found=True)
    )
    for info in reads:
        document = json.loads(storage.read_bytes(job.out_fs, info.path))
        counts[int(document["item"])] = int(document["rows"])
    rows_in = sum(counts.values())
    rows_out = _parquet_rows(job.out_fs, job.staging)
    quarantined = _parquet_rows(job.out_fs, storage.join(job.staging, ERRORS))
    unread = len(job.items) - len(counts)
    if (
        unread
        or (expected is not None and rows_in != expected)
        or rows_in != rows_out + quarantined
    ):
        raise KilnError(
            f"row counts do not reconcile ({rows_in} rows read of "
            f"{'?' if expected is None else expected}, {unread} read tasks unaccounted for, "
            f"{rows_out} scored + {quarantined} quarantined); nothing was written to the output"
        )
    return rows_in, rows_out, quarantined


# ---------------------------------------------------------------------------------------------
# Running the Ray Data job


def _run(
    job: Job,
    batch_size: int,
    concurrency: tuple[int, int],
    resources: dict[str, float],
    progress_interval: float | None,
    expected: int | None,
) -> None:
    import ray.data

    from kiln.progress import Progress, ray_data_bars_off

    read_cpus = resources["read_cpus"]

    label = "generating" if job.generate else "scoring"
    progress = Progress(label, total=expected, unit="rows", interval=progress_interval)
    counter = _start_counter(progress, expected)
    job = replace(job, counter=counter, batch_size=batch_size)
    items = [{"item": i} for i in range(len(job.items))]
    dataset: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    reader: Any = read_items  # a generator of tables: Ray's stubs want a function
    dataset = dataset.map_batches(
        reader,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"job": job},
        num_cpus=read_cpus,
    )
    actor: Any = GenerationActor if job.generate else ScoringActor
    dataset = dataset.map_batches(
        actor,
        # A scoring actor takes whole blocks and calls the predictor on `batch_size` rows at a
        # time: one Ray Data batch per block saves the slicing, copying and thread hand-off
        # Ray Data pays per batch (16M rows at --batch-size 4096: 24.0 -> 20.1 s, mean of 4).
        batch_size=batch_size if job.generate else None,
        batch_format="pyarrow",
        fn_constructor_kwargs={"job": job},
        # A second task queued on each actor: the next block is on hand when one finishes,
        # instead of waiting for the executor's next scheduling round (~10% faster at 16M rows).
        compute=ray.data.ActorPoolStrategy(
            min_size=concurrency[0], max_size=concurrency[1], max_tasks_in_flight_per_actor=2
        ),
        num_cpus=resources["num_cpus"],
        num_gpus=resources["num_gpus"] or None,
    )
    try:
        with ray_data_bars_off(), progress, _quiet_data_errors():
            try:
                dataset.write_parquet(
                    job.staging, filesystem=job.out_fs, ray_remote_args={"num_cpus": read_cpus}
                )
            except Exception:
                failure = _recorded_failure(job)
                if failure is None:
                    raise
                raise DataError(failure) from None
            if progress.mode != "off":  # the actors' last counts may not have been sent
                progress.update(expected if expected is not None else _rows_done(job))
    finally:
        if counter is not None:
            ray.kill(counter)
    logger.debug("Ray Data stats:\n%s", dataset.stats())


def _rows_done(job: Job) -> int:
    """Rows written so far, scored or set aside (from the files' footers)."""
    return _parquet_rows(job.out_fs, job.staging) + _parquet_rows(
        job.out_fs, storage.join(job.staging, ERRORS)
    )


def _start_counter(progress: Any, expected: int | None) -> Any:
    """A `RowCounter` actor (no CPU) that `progress` polls; None when progress is off."""
    import ray

    if progress.mode == "off":
        return None
    counter: Any = ray.remote(num_cpus=0)(RowCounter).remote()

    def poll() -> int:
        rows = int(ray.get(counter.total.remote(), timeout=10))
        return rows if expected is None else min(rows, expected)  # retried batches count twice

    progress.set_poll(poll)
    return counter


def _recorded_failure(job: Job) -> str | None:
    """The message of the first bad row that failed the job (a Ray Data error keeps only text)."""
    directory = storage.join(job.staging, FAILURES)
    try:
        infos = job.out_fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    except OSError:
        return None
    for info in sorted(infos, key=lambda i: i.base_name):
        return str(json.loads(storage.read_bytes(job.out_fs, info.path))["message"])
    return None


class _DropErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextmanager
def _quiet_data_errors() -> Iterator[None]:
    """Ray Data logs a failed task's stack trace; a bad row is reported by its message alone,
    and any other failure is re-raised with the remote traceback, so those records go."""
    names = [
        "ray.data._internal.execution.streaming_executor_state",
        "ray.data.exceptions",
        "ray.exceptions",
    ]
    quiet = _DropErrors()
    for name in names:
        logging.getLogger(name).addFilter(quiet)
    try:
        yield
    finally:
        for name in names:
            logging.getLogger(name).removeFilter(quiet)


# ---------------------------------------------------------------------------------------------
# Scoring


class _RowActor:
    """What the scoring and generation actors share: row keys, the checks that need no model,
    and setting bad rows aside (or failing the job on the first)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.names = pa.array(job.names, type=pa.string())
        tags = kiln_metrics.model_tags(job.model)
        self._rows_metric = kiln_metrics.create("kiln_score_rows", default_tags=tags)
        self._quarantined_metric = kiln_metrics.create(
            "kiln_score_quarantined_rows", default_tags=tags
        )
        self._unsent, self._sent_at = 0, time.monotonic()  # rows not yet told to the counter

    def _count(self, scored: int, quarantined: int) -> None:
        """Add one batch to the scoring counters (Prometheus)."""
        if scored > 0:
            self._rows_metric.inc(scored)
        if quarantined > 0:
            self._quarantined_metric.inc(quarantined)
        if self.job.counter is not None:  # the driver's progress line
            self._unsent += scored + quarantined
            if time.monotonic() - self._sent_at >= _PROGRESS_S:  # a call per batch costs ~2%
                self.job.counter.add.remote(self._unsent)  # fire and forget
                self._unsent, self._sent_at = 0, time.monotonic()

    def _row_problems(self, batch: pa.Table) -> dict[int, str]:
        """Rows the read task found unusable (unreadable, an empty key, a value the model
        cannot take), with the reason."""
        errors = batch.column(ERROR)
        if errors.null_count == len(errors):
            return {}
        return {i: r for i, r in enumerate(errors.to_pylist()) if r is not None}

    def _keys(self, batch: pa.Table) -> pa.Array:
        if self.job.key:
            return batch.column(self.job.key).combine_chunks()
        files = pc.take(self.names, batch.column(FILE))
        rows = pc.cast(batch.column(ROW), pa.string())
        return pc.binary_join_element_wise(files, rows, ":").combine_chunks()

    def _set_aside(self, batch: pa.Table, reasons: dict[int, str]) -> None:
        rows = sorted(reasons)
        bad = batch.take(rows)
        files = bad.column(FILE).to_pylist()
        positions = bad.column(ROW).to_pylist()
        first = f"{files[0]:08d}-{positions[0]:012d}"
        if self.job.on_error == "fail":
            more = len(rows) - 1
            more_text = f" (and {more} more in this batch)" if more else ""
            message = (
                f"{self.job.shown[files[0]]}: row {positions[0]}: {reasons[rows[0]]}{more_text}; "
                "rerun with --on-error quarantine to set bad rows aside and score the rest"
            )
            record_failure(self.job, first, message)
            raise DataError(message)
        columns: dict[str, pa.Array] = {
            self.job.key_name: self._keys(bad).cast(pa.string()),
            "reason": pa.array([reasons[row] for row in rows], type=pa.string()),
            "file": pa.array([self.job.shown[f] for f in files], type=pa.string()),
            "row": bad.column(ROW),
        }
        for name in self.job.columns:
            if name != self.job.key:
                label = name if name not in columns else f"{name}_input"
                columns[label] = bad.column(name).cast(pa.string())
        # Named after its first bad row: a retried batch overwrites rather than duplicates.
        path = storage.join(self.job.staging, ERRORS, f"{first}.parquet")
        with self.job.out_fs.open_output_stream(path) as stream:
            pq.write_table(pa.table(columns), stream)


class ScoringActor(_RowActor):
    """A Ray Data actor holding one `Predictor`: scores the read tasks' encoded blocks
    `--batch-size` rows per call, sets bad rows aside."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self.predictor = Predictor(job.registry, job.model, device=job.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = self._row_problems(batch)
        if reasons:
            self._set_aside(batch, reasons)
            batch = batch.take(np.setdiff1d(np.arange(batch.num_rows), list(reasons)))
        outputs = self._predict(batch)
        self._count(batch.num_rows, len(reasons))
        return self._output(batch, outputs)

    def _predict(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """The predictor's outputs for every row, `job.batch_size` rows per call."""
        inputs = {"x": encoded(batch, X)}
        if X_CAT in batch.column_names:
            inputs["x_cat"] = encoded(batch, X_CAT)
        step = self.job.batch_size
        parts = [
            self.predictor.predict_arrays(
                {name: a[start : start + step] for name, a in inputs.items()}
            )
            for start in range(0, batch.num_rows, step)
        ]
        return (
            {name: _concatenate([part[name] for part in parts]) for name in parts[0]}
            if parts
            else {}
        )

    def _output(self, batch: pa.Table, outputs: dict[str, np.ndarray]) -> pa.Table:
        schema = self.job.output_schema
        if batch.num_rows == 0:
            return schema.empty_table()
        columns = [self._keys(batch), pa.array(outputs["prediction"])]
        if "probabilities" in outputs:
            by_class = np.ascontiguousarray(outputs["probabilities"].T)
            columns += [pa.array(column) for column in by_class]
        columns.append(pa.repeat(pa.scalar(self.job.model, pa.string()), batch.num_rows))
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """Consecutive slices' outputs as one; (rows, classes) probabilities come out column-major,
    so each class's column is contiguous for the output table."""
    if parts[0].ndim == 2:
        return np.concatenate([part.T for part in parts], axis=1).T
    return np.concatenate(parts)


class GenerationActor(_RowActor):
    """A Ray Data actor holding one `LMPredictor`: completes each row's prompt, sets aside rows
    without a prompt or with one the model cannot complete."""

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        assert job.generate is not None
        self.options = job.generate
        self.predictor = LMPredictor(job.registry, job.model, device=job.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = self._row_problems(batch)
        column = self.options.prompt_column
        prompts = batch.column(column).to_pylist()
        done: list[int] = []
        results: list[Completion] = []
        for row, prompt in enumerate(prompts):
            if row in reasons:
                continue
            if prompt is None:
                reasons[row] = f"prompt column {column!r} is null"
                continue
            try:
                results.append(self.predictor.complete(self.options.request(prompt)))
            except DataError as exc:
                reasons[row] = str(exc)
                continue
            done.append(row)
        if reasons:
            self._set_aside(batch, reasons)
        self._count(len(done), len(reasons))
        rows = np.asarray(done, dtype=np.int64)  # an empty list would have no type
        return self._output(batch.take(rows), [prompts[row] for row in done], results)

    def _output(self, batch: pa.Table, prompts: list[str], results: list[Completion]) -> pa.Table:
        schema = self.job.output_schema
        if batch.num_rows == 0:
            return schema.empty_table()
        columns = [
            self._keys(batch),
            pa.array(prompts, type=pa.string()),
            pa.array([r.text for r in results], type=pa.string()),
            pa.array([r.prompt_tokens for r in results], type=pa.int32()),
            pa.array([r.completion_tokens for r in results], type=pa.int32()),
            pa.array([r.finish_reason for r in results], type=pa.string()),
            pa.repeat(pa.scalar(self.job.model, pa.string()), batch.num_rows),
        ]
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
