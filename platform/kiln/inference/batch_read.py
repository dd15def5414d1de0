"""Reading `kiln score` input: the part of a scoring job that runs in Ray Data's read tasks.

Kept free of torch and the predictors (`kiln.inference` imports them lazily), so a read task's
worker starts in a fraction of a second instead of importing torch first. `Job` (the plan every
task and actor receives) lives here for the same reason: unpickling it imports only this module.

Every block a reader yields has one schema: the numeric features in their planned float type,
categorical columns as text, the key in its planned type, plus `__file`, `__row` (the row's
position in its file) and `__error` (why the row cannot be scored, or null). When scoring, the
read task also applies the model's saved preprocessing: the block then carries the encoded
inputs (`__x`, and `__x_cat` for index-encoded categories) in place of the feature columns,
and the task counts the scorable rows' inputs into the model's drift bins. That work runs beside
the scoring actor instead of in it: the actor, one process per model copy, is what a job waits
on (16M rows, alternating runs: a first job, no profile, 25.4 -> 21.2 s; a later one, with a
profile, 21.2 -> 19.5 s; benchmarks/README.md).
"""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kiln import storage
from kiln.errors import DataError, KilnError
from kiln.monitor.profile import Binner

if TYPE_CHECKING:
    from kiln.data.preprocess import Preprocessor
    from kiln.inference.lm import GenerationRequest
    from kiln.monitor.profile import Profile

DEFAULT_KEY = "key"
"""Name of the output key column when `key` is None: the input row position `file:row`."""
READS = "_reads"  # per read item: rows read (removed before the commit)
FAILURES = "_failures"  # the bad row that failed the job (fail mode; the staging dir is deleted)
FILE, ROW, ERROR = "__file", "__row", "__error"
X, X_CAT = "__x", "__x_cat"
"""Encoded model inputs of each row (fixed-size lists: float32 features, int64 category codes)."""
DRIFT_PARTS = "_drift_parts"  # per read item: bin counts of its scorable rows (removed at commit)
_READ_ROWS = 1 << 16  # rows per table a reader yields
_TEXT_BLOCK = 4 << 20  # bytes of csv/jsonl parsed at a time
_MAX_LINE = 64 << 20
# pyarrow's CSV null markers: read as text, a numeric column treats these as missing, exactly as
# type inference would have.
_NULL_TOKENS = pa.array(pacsv.ConvertOptions().null_values, type=pa.string())


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
        from kiln.inference.lm import GenerationRequest  # torch: only where prompts complete

        return GenerationRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            seed=self.seed,
        )


class RowCounter:
    """Rows the scoring actors have finished, scored or set aside: only a progress count (the
    job's own counts come from the files it wrote). An actor of its own, so it lives here: its
    process imports this module, not torch (that import cost every job about 3 s of start-up
    on two cores)."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def total(self) -> int:
        return self.rows


@dataclass(frozen=True)
class Item:
    """One read task: a whole csv/jsonl file, or some row groups of a parquet file."""

    file: int
    row_groups: tuple[int, ...] | None
    first_row: int


@dataclass(frozen=True)
class Job:
    """Everything the read tasks and scoring actors need (pickled into them)."""

    fmt: str
    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    names: tuple[str, ...]
    """File names in keys: relative to the input location, so they do not depend on the cwd."""
    shown: tuple[str, ...]
    """File names in messages, as the user would recognise them."""
    items: tuple[Item, ...]
    numeric: tuple[str, ...]
    float_types: tuple[pa.DataType, ...]
    """Each numeric feature's type in the blocks: float32 where every file stores float32 (the
    predictor widens it without a copy in between), else float64."""
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
    """The driver's progress counter (a `RowCounter` actor) the scoring actors add to."""
    batch_size: int = 1024
    """Rows per Predictor call (`--batch-size`)."""
    preprocessor: Preprocessor | None = None
    """The model's fitted preprocessing (scoring): the read tasks encode each block with it."""
    profile: Profile | None = None
    """The model's training `Profile` (scoring a model that has one): the read tasks count each
    scorable row's inputs into its drift bins."""

    @property
    def key_name(self) -> str:
        return self.key or DEFAULT_KEY

    @property
    def columns(self) -> list[str]:
        """Input columns read: the features, then the key column unless it is a feature."""
        features = [*self.numeric, *self.categorical]
        return features + ([self.key] if self.key and self.key not in features else [])


def is_number_like(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return is_number_like(dtype.value_type)
    checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal)
    return pa.types.is_null(dtype) or any(check(dtype) for check in checks)


def is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_null(dtype)


def is_scalar(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return is_scalar(dtype.value_type)
    text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    return text or is_number_like(dtype)


def record_failure(job: Job, name: str, message: str) -> None:
    """Leave the message where the driver finds it: Ray Data passes only the error's text."""
    path = storage.join(job.staging, FAILURES, f"{name}.json")
    job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
    storage.write_bytes(job.out_fs, path, json.dumps({"message": message}).encode())


# ---------------------------------------------------------------------------------------------
# Reading: every row carries its file index, its row within the file, and any read error


def read_items(batch: pa.Table, job: Job) -> Iterator[pa.Table]:
    """Read the planned items named in `batch` (encoded for the model when scoring), then record
    how many rows each gave and, for a model with a training profile, its drift bin counts."""
    readers = {"parquet": _parquet_tables, "csv": _csv_tables, "jsonl": _jsonl_tables}
    binner = Binner(job.profile) if job.profile is not None else None
    for index in batch.column("item").to_pylist():
        item = job.items[index]
        rows = item.first_row
        counts = np.zeros(binner.size, dtype=np.int64) if binner is not None else None
        try:
            for table, errors in readers[job.fmt](job, item):
                block = _normalize(job, table, errors, item.file, rows)
                if job.preprocessor is not None:
                    block = _encode(job, job.preprocessor, block, binner, counts)
                yield block
                rows += table.num_rows
        except DataError as exc:
            record_failure(job, f"{item.file:08d}-read-{index:08d}", str(exc))
            raise
        if counts is not None:  # named after the item: a retried task overwrites, not adds
            path = storage.join(job.staging, DRIFT_PARTS, f"{index:08d}.json")
            job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
            storage.write_bytes(job.out_fs, path, json.dumps(counts.tolist()).encode())
        document = {"item": index, "rows": rows - item.first_row}
        path = storage.join(job.staging, READS, f"{index:08d}.json")
        job.out_fs.create_dir(posixpath.dirname(path), recursive=True)
        storage.write_bytes(job.out_fs, path, json.dumps(document).encode())


def _parquet_tables(job: Job, item: Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
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


def _csv_tables(job: Job, item: Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
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


def _jsonl_tables(job: Job, item: Item) -> Iterator[tuple[pa.Table, dict[int, str]]]:
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


def _parse_json_block(job: Job, block: bytes) -> tuple[pa.Table, dict[int, str]]:
    options = pajson.ReadOptions(use_threads=False, block_size=len(block) + 1)
    try:
        table = pajson.read_json(pa.BufferReader(block), read_options=options)
    except pa.ArrowInvalid:
        pass
    else:
        present = [name for name in job.columns if name in table.column_names]
        if all(is_scalar(table.schema.field(name).type) for name in present):
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
    job: Job, table: pa.Table, errors: dict[int, str], file: int, first_row: int
) -> pa.Table:
    """One schema for every block: numeric features in their planned float type, categorical
    text, the key in its planned type, plus `__file`, `__row` and `__error` (why the row cannot
    be scored, or null)."""
    n = table.num_rows
    columns: dict[str, pa.Array] = {
        FILE: pa.array(np.full(n, file, dtype=np.int32)),
        ROW: pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
    }
    reasons = dict(errors)
    for name, dtype in zip(job.numeric, job.float_types, strict=True):
        values, bad = _to_float(_column(table, name, n), name, dtype)
        columns[name] = values
        for row, reason in bad.items():
            reasons.setdefault(row, reason)
    for name in job.categorical:
        columns[name] = _column(table, name, n).cast(pa.string())
    if job.key and job.key not in columns:
        columns[job.key] = _column(table, job.key, n).cast(job.key_type)
    if job.key:
        for row in _empty_rows(columns[job.key]):
            reasons.setdefault(row, f"key column {job.key!r} is empty")
    error = [reasons.get(row) for row in range(n)] if reasons else None
    columns[ERROR] = pa.array(error, type=pa.string()) if error else pa.nulls(n, pa.string())
    return pa.table(columns)


def _empty_rows(key: pa.Array) -> list[int]:
    """Rows whose key is null, NaN or empty text."""
    empty = pc.is_null(key, nan_is_null=True)
    if pa.types.is_string(key.type) or pa.types.is_large_string(key.type):
        empty = pc.or_(empty, pc.equal(pc.fill_null(key, ""), ""))
    return np.flatnonzero(np.asarray(empty.to_numpy(zero_copy_only=False), dtype=bool)).tolist()


def _encode(
    job: Job,
    preprocessor: Preprocessor,
    block: pa.Table,
    binner: Binner | None,
    counts: np.ndarray | None,
) -> pa.Table:
    """`block` with the model's encoded inputs in place of its features (kept with
    on_error="quarantine", where a set-aside row is written with its inputs), rows the model
    cannot take (a missing value, trained with `missing: drop`) marked in `__error`, and the
    scorable rows' inputs added to the drift `counts`."""
    arrays, dropped = preprocessor.encode_rows(block)
    errors = block.column(ERROR)
    if dropped.any():
        reasons = errors.to_pylist()
        for row in np.flatnonzero(dropped).tolist():
            if reasons[row] is None:
                reasons[row] = _missing_reason(job, block, row)
        errors = pa.chunked_array([pa.array(reasons, type=pa.string())])
    if binner is not None and counts is not None:
        scorable = errors.is_null()
        counts += binner.count(block if pc.all(scorable).as_py() else block.filter(scorable))
    keep = [FILE, ROW] + (job.columns if job.on_error == "quarantine" else [])
    keep += [job.key] if job.key and job.key not in keep else []
    columns = {name: block.column(name) for name in keep}
    columns[ERROR] = errors
    columns[X] = _fixed_size(arrays["x"])
    if "x_cat" in arrays:
        columns[X_CAT] = _fixed_size(arrays["x_cat"])
    return pa.table(columns)


def _fixed_size(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A (rows, width) matrix as one fixed-size list per row, without a copy."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def encoded(table: pa.Table, name: str) -> np.ndarray:
    """The (rows, width) matrix of an encoded-input column (`__x`, `__x_cat`)."""
    column = table.column(name).combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), column.type.list_size)


def _missing_reason(job: Job, block: pa.Table, row: int) -> str:
    """Why a row cannot be scored by a model trained with `missing: drop`."""
    missing = []
    for name in [*job.numeric, *job.categorical]:
        value = block.column(name)[row].as_py()
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            missing.append(repr(name))
    return (
        f"missing value in {', '.join(missing[:5]) or 'a feature'} (the model was trained "
        "with data.preprocess.missing: drop)"
    )


def _column(table: pa.Table, name: str, n: int) -> pa.Array:
    if name not in table.column_names:
        return pa.nulls(n)  # jsonl: a key absent from every line of this block
    column = table.column(name).combine_chunks()
    return column.dictionary_decode() if pa.types.is_dictionary(column.type) else column


def _to_float(column: pa.Array, name: str, dtype: pa.DataType) -> tuple[pa.Array, dict[int, str]]:
    """`dtype` values (float64 for text); text is parsed (pyarrow's null markers are missing
    values) and each value that is not a number is reported by row."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return (column if column.type == dtype else column.cast(dtype, safe=False)), {}
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
