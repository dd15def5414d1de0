"""Batch scoring and batch generation: a registered model over a dataset, as one Ray Data job.

The driver resolves the model reference once, plans the reads (file list, parquet footers, column
checks) and then runs::

    from_items(read plan) -> read each file chunk (every row tagged with its file and position)
        -> actor pool of Predictors (map_batches) -> Parquet in a staging directory

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
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kiln import metrics as kiln_metrics
from kiln import storage
from kiln.data.source import FileSet, resolve_files
from kiln.errors import DataError, KilnError, RegistryError
from kiln.inference.lm import Completion, GenerationRequest, LMPredictor, is_language_model
from kiln.inference.predictor import Predictor
from kiln.monitor.drift import Thresholds, drift_report
from kiln.monitor.profile import PROFILE_FILE, Binner, Profile
from kiln.registry import Registry

logger = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"
ERRORS = "_errors"
DEFAULT_KEY = "key"
"""Name of the output key column when `key` is None: the input row position `file:row`."""
ON_ERROR = ("fail", "quarantine")

_READS = "_reads"  # per read item: rows read (removed before the commit)
_FAILURES = "_failures"  # the bad row that failed the job (fail mode; the staging dir is deleted)
DRIFT = "_drift.json"
"""Drift of the scored input against the model's training profile, beside the output."""
_DRIFT_PARTS = "_drift_parts"  # per batch: bin counts of its scored rows (removed before commit)
_FILE, _ROW, _ERROR = "__file", "__row", "__error"
_ITEM_ROWS = 1 << 17  # parquet row groups are grouped into read items of about this many rows
_READ_ROWS = 1 << 16  # rows per table a reader yields
_TEXT_BLOCK = 4 << 20  # bytes of csv/jsonl parsed at a time
_MAX_LINE = 64 << 20
_PROGRESS_S = 0.5  # least seconds between an actor's progress counts
# pyarrow's CSV null markers: read as text, a numeric column treats these as missing, exactly as
# type inference would have.
_NULL_TOKENS = pa.array(pacsv.ConvertOptions().null_values, type=pa.string())
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
class GenerateOptions:
    """Batch generation (`task="generate"`): which column holds the prompts, and how to sample.
    The same options for every row; with a seed, a row's text does not depend on its batch."""

    prompt_column: str = "prompt"
    """Input column of prompt text (one completion per row)."""
    max_tokens: int = 16
    """Most tokens generated per prompt; prompt plus max_tokens must fit the context."""
    temperature: float = 0.0
    """0 is greedy decoding (the same text as the endpoint and the predictor give)."""
    top_p: float | None = None
    """Nucleus sampling threshold in (0, 1]."""
    top_k: int | None = None
    """Sample from the k most likely tokens."""
    stop: tuple[str, ...] = ()
    """Strings that end a completion (cut from the text)."""
    seed: int | None = None
    """Sampling seed, the same for every row (the same prompt gives the same text)."""

    def check(self) -> None:
        """Raises KilnError naming the flag of an option out of range."""
        problems = [
            (self.max_tokens < 1, f"--max-tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature < 0, f"--temperature must be >= 0, got {self.temperature}"),
            (
                self.top_p is not None and not 0.0 < self.top_p <= 1.0,
                f"--top-p must be in (0, 1], got {self.top_p}",
            ),
            (self.top_k is not None and self.top_k < 1, f"--top-k must be >= 1, got {self.top_k}"),
            (any(not s for s in self.stop), "--stop: a stop sequence must not be empty"),
            (not self.prompt_column, "--prompt-column must name a column"),
        ]
        for failed, message in problems:
            if failed:
                raise KilnError(message)

    def request(self, prompt: str) -> GenerationRequest:
        """The predictor's request for one prompt."""
        return GenerationRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            seed=self.seed,
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


@dataclass(frozen=True)
class _Item:
    """One read task: a whole csv/jsonl file, or some row groups of a parquet file."""

    file: int
    row_groups: tuple[int, ...] | None
    first_row: int


@dataclass(frozen=True)
class _Job:
    """Everything the read tasks and scoring actors need (pickled into them)."""

    fmt: str
    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    names: tuple[str, ...]
    """File names in keys: relative to the input location, so they do not depend on the cwd."""
    shown: tuple[str, ...]
    """File names in messages, as the user would recognise them."""
    items: tuple[_Item, ...]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    key: str | None
    key_type: pa.DataType
    output_schema: pa.Schema
    out_fs: pafs.FileSystem
    staging: str
    registry: str
    model: str
    device: str
    on_error: str
    generate: GenerateOptions | None = None
    """Batch generation options; None for scoring."""
    counter: Any = None
    """The driver's progress counter (a `_RowCounter` actor) the scoring actors add to."""

    @property
    def key_name(self) -> str:
        return self.key or DEFAULT_KEY

    @property
    def columns(self) -> list[str]:
        """Input columns read: the features, then the key column unless it is a feature."""
        features = [*self.numeric, *self.categorical]
        return features + ([self.key] if self.key and self.key not in features else [])


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
) -> tuple[_Job, int | None]:
    """The job description and the rows expected (parquet footers; None for csv/jsonl)."""
    numeric, categorical = plan.numeric, plan.categorical
    needed = [*numeric, *categorical] + ([key] if key and key not in numeric + categorical else [])
    if files.format == "parquet":
        text_only = plan.generate is not None
        items, key_type, expected = _plan_parquet(files, numeric, categorical, key, text_only)
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(files.paths)))) as pool:
            list(pool.map(lambda path: _check_text_head(files, path, needed), files.paths))
        items = tuple(_Item(i, None, 0) for i in range(len(files.paths)))
        key_type, expected = pa.string(), None
    if key in numeric or key in categorical:  # the key column is then the normalised feature
        key_type = pa.float64() if key in numeric else pa.string()
    job = _Job(
        fmt=files.format,
        filesystem=files.filesystem,
        paths=files.paths,
        names=_key_names(files),
        shown=tuple(files.display(path) for path in files.paths),
        items=items,
        numeric=numeric,
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
) -> tuple[tuple[_Item, ...], pa.DataType, int]:
    """Check every footer's columns (`text_only`: the categorical columns must be text, as
    prompts are), and split files into items of whole row groups."""
    accepts, what = (
        (_is_text, "text (the prompts)")
        if text_only
        else (_is_scalar, "a category (text, number or bool)")
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
    items: list[_Item] = []
    for index, (path, meta) in enumerate(zip(files.paths, footers, strict=True)):
        schema = meta.schema.to_arrow_schema()
        shown = files.display(path)
        for name in numeric:
            _check_column(schema, name, shown, _is_number_like, "a number")
        for name in categorical:
            _check_column(schema, name, shown, accepts, what)
        if key:
            key_types.append(_check_column(schema, key, shown, _is_scalar, "a key"))
        items.extend(_row_group_items(index, meta))
    expected = sum(meta.num_rows for meta in footers)
    if expected == 0:
        raise DataError(f"--input: {files.location!r} has no rows")
    return tuple(items), _key_type(key_types), expected


def _row_group_items(file: int, meta: pq.FileMetaData) -> Iterator[_Item]:
    group: list[int] = []
    first = rows = 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows - first >= _ITEM_ROWS:
            yield _Item(file, tuple(group), first)
            group, first = [], rows
    if group:
        yield _Item(file, tuple(group), first)


def _check_column(schema: pa.Schema, name: str, shown: str, accepts: Any, what: str) -> pa.DataType:
    index = schema.get_field_index(name)
    if index < 0:
        listed = ", ".join(schema.names[:20]) + (" ..." if len(schema.names) > 20 else "")
        raise DataError(f"--input: column {name!r} not found in {shown} (columns: {listed})")
    dtype = schema.field(index).type
    if not accepts(dtype):
        raise DataError(f"--input: column {name!r} is {dtype} in {shown}; the model reads {what}")
    return dtype


def _is_number_like(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_number_like(dtype.value_type)
    checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal)
    return pa.types.is_null(dtype) or any(check(dtype) for check in checks)


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype)


def _is_scalar(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_scalar(dtype.value_type)
    text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    return text or _is_number_like(dtype)


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


def _write_success(job: _Job, summary: ScoreSummary, files: FileSet) -> None:
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
    _delete_dir(job.out_fs, storage.join(job.staging, _READS))
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


def _write_drift(job: _Job) -> dict[str, Any] | None:
    """Merge the batches' bin counts into `_drift.json` in the staging directory (committed
    with the output); returns its summary. None for generation or a model without profile."""
    profile = None if job.generate else _load_profile(job.registry, job.model)
    directory = storage.join(job.staging, _DRIFT_PARTS)
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


def _reconcile(job: _Job, expected: int | None) -> tuple[int, int, int]:
    """Rows read (from the readers' counts), written and quarantined (from the files)."""
    counts: dict[int, int] = {}
    reads = job.out_fs.get_file_info(
        pafs.FileSelector(storage.join(job.staging, _READS), allow_not_found=True)
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
    job: _Job,
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
    job = replace(job, counter=counter)
    items = [{"item": i} for i in range(len(job.items))]
    dataset: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    reader: Any = _read_items  # a generator of tables: Ray's stubs want a function
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
        batch_size=batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"job": job},
        compute=ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1]),
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


class _RowCounter:
    """Rows the scoring actors have finished, scored or set aside: only a progress count (the
    job's own counts come from the files it wrote)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


def _rows_done(job: _Job) -> int:
    """Rows written so far, scored or set aside (from the files' footers)."""
    return _parquet_rows(job.out_fs, job.staging) + _parquet_rows(
        job.out_fs, storage.join(job.staging, ERRORS)
    )


def _start_counter(progress: Any, expected: int | None) -> Any:
    """A `_RowCounter` actor (no CPU) that `progress` polls; None when progress is off."""
    import ray

    if progress.mode == "off":
        return None
    counter: Any = ray.remote(num_cpus=0)(_RowCounter).remote()

    def poll() -> int:
        rows = int(ray.get(counter.total.remote(), timeout=10))
        return rows if expected is None else min(rows, expected)  # retried batches count twice

    progress.set_poll(poll)
    return counter


def _record_failure(job: _Job, name: str, message: str) -> None:
    """Leave the message where the driver finds it: Ray Data passes only the error's text."""
    path = storage.join(job.staging, _FAILURES, f"{name}.json")
    job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
    storage.write_bytes(job.out_fs, path, json.dumps({"message": message}).encode())


def _recorded_failure(job: _Job) -> str | None:
    """The message of the first bad row that failed the job (a Ray Data error keeps only text)."""
    directory = storage.join(job.staging, _FAILURES)
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
# Reading: every row carries its file index, its row within the file, and any read error


def _read_items(batch: pa.Table, job: _Job) -> Iterator[pa.Table]:
    """Read the planned items named in `batch`, then record how many rows each gave."""
    readers = {"parquet": _parquet_tables, "csv": _csv_tables, "jsonl": _jsonl_tables}
    for index in batch.column("item").to_pylist():
        item = job.items[index]
        rows = item.first_row
        try:
            for table, errors in readers[job.fmt](job, item):
                yield _normalize(job, table, errors, item.file, rows)
                rows += table.num_rows
        except DataError as exc:
            _record_failure(job, f"{item.file:08d}-read-{index:08d}", str(exc))
            raise
        document = {"item": index, "rows": rows - item.first_row}
        path = storage.join(job.staging, _READS, f"{index:08d}.json")
        job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
        storage.write_bytes(job.out_fs, path, json.dumps(document).encode())


def _parquet_tables(job: _Job, item: _Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
    path = job.paths[item.file]
    try:
        with job.filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(
                batch_size=_READ_ROWS,
                row_groups=list(item.row_groups or range(parquet.num_row_groups)),
                columns=job.columns,
                use_threads=False,
            ):
                yield pa.Table.from_batches([batch]), {}
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{job.shown[item.file]}: cannot read parquet ({exc})") from exc


def _csv_tables(job: _Job, item: _Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
    """Numeric and key columns are read as text and converted per value in `_normalize`, so one
    bad value is one bad row, not an unreadable file."""
    text = [*job.numeric, *([job.key] if job.key else [])]
    convert = pacsv.ConvertOptions(
        include_columns=job.columns, column_types={name: pa.string() for name in text}
    )
    read = pacsv.ReadOptions(use_threads=False, block_size=_TEXT_BLOCK)
    shown = job.shown[item.file]
    try:
        with job.filesystem.open_input_stream(job.paths[item.file]) as stream:
            for batch in pacsv.open_csv(stream, read_options=read, convert_options=convert):
                yield pa.Table.from_batches([batch]), {}
    except (pa.ArrowException, OSError) as exc:
        raise DataError(
            f"{shown}: cannot be read as CSV ({exc}); a row with the wrong number of fields "
            "breaks the file's structure, so it cannot be set aside"
        ) from exc


def _jsonl_tables(job: _Job, item: _Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
    """Blocks of whole lines, parsed by Arrow; a block Arrow refuses is parsed line by line so
    that a bad line becomes one bad row."""
    shown = job.shown[item.file]
    try:
        with job.filesystem.open_input_stream(job.paths[item.file]) as stream:
            rest = b""
            while True:
                data = stream.read(_TEXT_BLOCK)
                if not data:  # end of file: whatever is left is the last line
                    if rest.strip():
                        yield _parse_json_block(job, rest)
                    return
                block = rest + data
                cut = block.rfind(b"\n") + 1
                if cut == 0 and len(block) > _MAX_LINE:
                    raise DataError(f"{shown}: a line is longer than {_MAX_LINE >> 20} MB")
                block, rest = block[:cut], block[cut:]
                if block.strip():
                    yield _parse_json_block(job, block)
    except OSError as exc:
        raise DataError(f"{shown}: cannot read ({exc})") from exc


def _parse_json_block(job: _Job, block: bytes) -> tuple[pa.Table, dict[int, str]]:
    options = pajson.ReadOptions(use_threads=False, block_size=len(block) + 1)
    try:
        table = pajson.read_json(pa.BufferReader(block), read_options=options)
    except pa.ArrowInvalid:
        pass
    else:
        present = [name for name in job.columns if name in table.column_names]
        if all(_is_scalar(table.schema.field(name).type) for name in present):
            return table.select(present), {}
        # a list or object where a value belongs: parse line by line, so it is a bad row
    values: dict[str, list[Any]] = {name: [] for name in job.columns}
    errors: dict[int, str] = {}
    lines = [line for line in block.split(b"\n") if line.strip()]
    for row, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            errors[row], record = f"not valid JSON ({exc}): {_clip(line)}", {}
        if not isinstance(record, dict):
            errors[row], record = f"not a JSON object: {_clip(line)}", {}
        for name in job.columns:
            values[name].append(_json_text(record.get(name)))
    return pa.table({n: pa.array(v, type=pa.string()) for n, v in values.items()}), errors


def _json_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def _clip(line: bytes, limit: int = 200) -> str:
    text = line.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _normalize(
    job: _Job, table: pa.Table, errors: dict[int, str], file: int, first_row: int
) -> pa.Table:
    """One schema for every block: numeric features float64, categorical text, the key in its
    planned type, plus `__file`, `__row` and `__error` (why the row cannot be scored, or null)."""
    n = table.num_rows
    columns: dict[str, pa.Array] = {
        _FILE: pa.array(np.full(n, file, dtype=np.int32)),
        _ROW: pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
    }
    reasons = dict(errors)
    for name in job.numeric:
        values, bad = _to_float(_column(table, name, n), name)
        columns[name] = values
        for row, reason in bad.items():
            reasons.setdefault(row, reason)
    for name in job.categorical:
        columns[name] = _column(table, name, n).cast(pa.string())
    if job.key and job.key not in columns:
        columns[job.key] = _column(table, job.key, n).cast(job.key_type)
    error = [reasons.get(row) for row in range(n)] if reasons else None
    columns[_ERROR] = pa.array(error, type=pa.string()) if error else pa.nulls(n, pa.string())
    return pa.table(columns)


def _column(table: pa.Table, name: str, n: int) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(n)  # jsonl: a key absent from every line of this block
    column = table.column(name).combine_chunks()
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _to_float(column: pa.Array, name: str) -> tuple[pa.Array, dict[int, str]]:
    """float64 values; text is parsed (pyarrow's null markers are missing values) and each value
    that is not a number is reported by row."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.cast(pa.float64(), safe=False), {}
    column = column.cast(pa.string())
    column = pc.if_else(
        pc.is_in(column, value_set=_NULL_TOKENS), pa.scalar(None, pa.string()), column
    )
    try:
        return column.cast(pa.float64()), {}
    except pa.ArrowInvalid:
        pass
    values: list[float | None] = []
    bad: dict[int, str] = {}
    for row, text in enumerate(column.to_pylist()):
        try:
            values.append(None if text is None else float(text))
        except ValueError:
            values.append(None)
            bad[row] = f"column {name!r}: {_clip(text.encode(), 80)!r} is not a number"
    return pa.array(values, type=pa.float64()), bad


# ---------------------------------------------------------------------------------------------
# Scoring


class _RowActor:
    """What the scoring and generation actors share: row keys, the checks that need no model,
    and setting bad rows aside (or failing the job on the first)."""

    def __init__(self, job: _Job) -> None:
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
        """Rows that cannot be used (unreadable, or an empty key), with the reason."""
        reasons: dict[int, str] = {}
        errors = batch.column(_ERROR)
        if errors.null_count < len(errors):
            reasons = {i: r for i, r in enumerate(errors.to_pylist()) if r is not None}
        if self.job.key:
            key = batch.column(self.job.key)
            empty = pc.is_null(key, nan_is_null=True)
            if pa.types.is_string(key.type) or pa.types.is_large_string(key.type):
                empty = pc.or_(empty, pc.equal(pc.fill_null(key, ""), ""))
            for i in np.flatnonzero(np.asarray(empty.to_numpy(), dtype=bool)).tolist():
                reasons.setdefault(i, f"key column {self.job.key!r} is empty")
        return reasons

    def _keys(self, batch: pa.Table) -> pa.Array:
        if self.job.key:
            return batch.column(self.job.key).combine_chunks()
        files = pc.take(self.names, batch.column(_FILE))
        rows = pc.cast(batch.column(_ROW), pa.string())
        return pc.binary_join_element_wise(files, rows, ":").combine_chunks()

    def _set_aside(self, batch: pa.Table, reasons: dict[int, str]) -> None:
        rows = sorted(reasons)
        bad = batch.take(rows)
        files = bad.column(_FILE).to_pylist()
        positions = bad.column(_ROW).to_pylist()
        first = f"{files[0]:08d}-{positions[0]:012d}"
        if self.job.on_error == "fail":
            more = len(rows) - 1
            more_text = f" (and {more} more in this batch)" if more else ""
            message = (
                f"{self.job.shown[files[0]]}: row {positions[0]}: {reasons[rows[0]]}{more_text}; "
                "rerun with --on-error quarantine to set bad rows aside and score the rest"
            )
            _record_failure(self.job, first, message)
            raise DataError(message)
        columns: dict[str, pa.Array] = {
            self.job.key_name: self._keys(bad).cast(pa.string()),
            "reason": pa.array([reasons[row] for row in rows], type=pa.string()),
            "file": pa.array([self.job.shown[f] for f in files], type=pa.string()),
            "row": bad.column(_ROW),
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
    """A Ray Data actor holding one `Predictor`: scores batches, sets bad rows aside."""

    def __init__(self, job: _Job) -> None:
        super().__init__(job)
        self.predictor = Predictor(job.registry, job.model, device=job.device)
        self.drop_missing = self.predictor.preprocessor.missing == "drop"
        profile = _load_profile(job.registry, job.model)
        self.binner = Binner(profile) if profile is not None else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons = self._row_problems(batch)
        candidates = np.arange(batch.num_rows)
        if reasons:
            candidates = np.setdiff1d(candidates, list(reasons))
        table = batch.take(candidates) if reasons else batch
        scored, outputs, more = self._predict(table, candidates)
        reasons.update(more)
        if reasons:
            self._set_aside(batch, reasons)
        self._count(batch.num_rows - len(reasons), len(reasons))
        self._count_drift(batch, batch.take(scored) if reasons else batch)
        return self._output(batch.take(scored) if reasons else batch, outputs)

    def _count_drift(self, batch: pa.Table, scored: pa.Table) -> None:
        """Bin counts of the scored rows' inputs, in a file named after the batch's first row
        (a retried batch overwrites rather than adds)."""
        if self.binner is None or batch.num_rows == 0:
            return
        counts = self.binner.count(scored).tolist()
        first = f"{batch.column(_FILE)[0].as_py():08d}-{batch.column(_ROW)[0].as_py():012d}"
        path = storage.join(self.job.staging, _DRIFT_PARTS, f"{first}.json")
        self.job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
        storage.write_bytes(self.job.out_fs, path, json.dumps(counts).encode())

    def _row_problems(self, batch: pa.Table) -> dict[int, str]:
        """Rows that cannot be scored, found without calling the model, with the reason."""
        reasons = super()._row_problems(batch)
        if self.drop_missing:
            dropped = self.predictor.preprocessor.drop_mask(batch, with_label=False)
            for i in np.flatnonzero(dropped).tolist():
                reasons.setdefault(i, self._missing_reason(batch, i))
        return reasons

    def _missing_reason(self, batch: pa.Table, row: int) -> str:
        missing = []
        for name in [*self.job.numeric, *self.job.categorical]:
            value = batch.column(name)[row].as_py()
            if value is None or (isinstance(value, float) and not np.isfinite(value)):
                missing.append(repr(name))
        return (
            f"missing value in {', '.join(missing[:5]) or 'a feature'} (the model was trained "
            "with data.preprocess.missing: drop)"
        )

    def _predict(
        self, table: pa.Table, rows: np.ndarray
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[int, str]]:
        """Predict `table` (batch rows `rows`); a DataError is narrowed down by halving, so the
        good rows are still scored and each bad row gets the error as its reason."""
        if table.num_rows == 0:
            return rows, {}, {}
        try:
            return rows, self.predictor.predict_table(table), {}
        except DataError as exc:
            if table.num_rows == 1:
                return rows[:0], {}, {int(rows[0]): str(exc)}
        half = table.num_rows // 2
        first = self._predict(table.slice(0, half), rows[:half])
        second = self._predict(table.slice(half), rows[half:])
        scored = [part for part in (first, second) if part[1]]
        outputs = (
            {name: np.concatenate([part[1][name] for part in scored]) for name in scored[0][1]}
            if scored
            else {}
        )
        return np.concatenate([first[0], second[0]]), outputs, {**first[2], **second[2]}

    def _output(self, batch: pa.Table, outputs: dict[str, np.ndarray]) -> pa.Table:
        schema = self.job.output_schema
        if batch.num_rows == 0:
            return schema.empty_table()
        columns = [self._keys(batch), pa.array(outputs["prediction"])]
        if "probabilities" in outputs:
            by_class = np.ascontiguousarray(outputs["probabilities"].T)
            columns += [pa.array(column) for column in by_class]
        columns.append(pa.array([self.job.model] * batch.num_rows, type=pa.string()))
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)


class GenerationActor(_RowActor):
    """A Ray Data actor holding one `LMPredictor`: completes each row's prompt, sets aside rows
    without a prompt or with one the model cannot complete."""

    def __init__(self, job: _Job) -> None:
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
            pa.array([self.job.model] * batch.num_rows, type=pa.string()),
        ]
        return pa.Table.from_arrays(columns, names=schema.names).cast(schema)
