"""Locate the data files a job names and check them before any training starts.

Everything here is fast and Ray-free: a location becomes a sorted `FileSet`, and `check_files`
reads only parquet footers or the first ~1 MB of a csv/jsonl file, so a bad column or a corrupt
file fails in seconds with a message naming the file and column, not minutes into a Ray job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from kiln.errors import DataError

if TYPE_CHECKING:
    import ray.data

    from kiln.config.spec import DataSpec

logger = logging.getLogger(__name__)

EXTENSIONS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz"),
    "jsonl": (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz"),
}
"""File name endings picked up when a location is a directory."""

_HEAD_BYTES = 1 << 20
_MAX_LINE_BYTES = 64 << 20
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_GLOB_CHARS = ("*", "?", "[")
_PANDAS_INDEX = "__index_level_"
_SUPPORTED = "integer, floating-point, bool and string (or dictionary-of-string) columns"
# Keys of a Ray `ray_remote_args` dict that the read APIs take as named parameters.
_NAMED_REMOTE_ARGS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "label_selector",
    "fallback_strategy",
    "max_calls",
    "accelerator_type",
    "runtime_env",
)


@dataclass(frozen=True)
class FileSet:
    """The files behind one data location, sorted by path, with the filesystem that reads them."""

    filesystem: pafs.FileSystem
    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[float | None, ...]
    """Modification times in seconds since the epoch (None where the store does not say)."""
    location: str
    """The location as the user wrote it."""
    format: str

    def uris(self) -> list[str]:
        """Paths for Ray Data's readers (pass `filesystem=self.filesystem` along with them)."""
        scheme = _scheme(self.location)
        if scheme is None or self.filesystem.type_name == "local":
            return list(self.paths)
        return [f"{scheme}://{path}" for path in self.paths]

    def display(self, path: str) -> str:
        """`path` as the user would recognise it: relative to the cwd when local, else a URI."""
        scheme = _scheme(self.location)
        if scheme is not None and self.filesystem.type_name != "local":
            return f"{scheme}://{path}"
        relative = os.path.relpath(path)
        return path if relative.startswith("..") else relative

    def fingerprint(self) -> dict[str, Any]:
        """Path, size and mtime of each file, and a sha256 over them that changes with any file."""
        files = [
            {"path": uri, "size": size, "mtime": mtime}
            for uri, size, mtime in zip(self.uris(), self.sizes, self.mtimes, strict=True)
        ]
        payload = json.dumps({"format": self.format, "files": files}, sort_keys=True)
        return {"files": files, "sha256": hashlib.sha256(payload.encode()).hexdigest()}


@dataclass(frozen=True)
class DataInfo:
    """What `check_files` learned: the unified schema and how each feature will be treated."""

    files: FileSet
    schema: pa.Schema
    """Unified schema of the features (in `features` order) and then the label."""
    features: tuple[str, ...]
    categorical: tuple[str, ...]
    numeric: tuple[str, ...]
    num_rows: int | None
    """Total rows (from parquet footers); None for csv/jsonl, which are not read in full."""


# ---------------------------------------------------------------------------------------------
# Locating files


def resolve_files(location: str, fmt: str, field: str = "data.train") -> FileSet:
    """Find the files at a file, directory, glob or pyarrow filesystem URI.

    Directories are searched recursively for the format's extensions (see `EXTENSIONS`); globs
    support `*`, `?`, `[...]` and `**/`. Names starting with `.` or `_` below the given location
    (`_SUCCESS`, `.crc`, `_temporary/`) are skipped.

    Args:
        location: The path or URI as written in the spec.
        fmt: "parquet", "csv" or "jsonl".
        field: Dotted spec field named in error messages.

    Raises:
        DataError: Nothing matches, or the filesystem cannot be opened or listed.
    """
    if fmt not in EXTENSIONS:
        raise DataError(f"{field}: unknown format {fmt!r}; use one of {sorted(EXTENSIONS)}")
    base, pattern = _split_glob(location if _scheme(location) else _local(location))
    try:
        filesystem, base_path = _filesystem(base)
        infos = _list(filesystem, base_path, pattern, EXTENSIONS[fmt])
    except (OSError, ValueError) as exc:
        raise DataError(f"{field}: cannot read {location!r} ({exc})") from exc
    if not infos:
        raise DataError(f"{field}: no {fmt} files found at {location!r}")
    infos.sort(key=lambda info: info.path)
    return FileSet(
        filesystem=filesystem,
        paths=tuple(info.path for info in infos),
        sizes=tuple(int(info.size or 0) for info in infos),
        mtimes=tuple(info.mtime.timestamp() if info.mtime else None for info in infos),
        location=location,
        format=fmt,
    )


def _scheme(location: str) -> str | None:
    match = _URI.match(location)
    return match.group(0)[:-3] if match else None


def _local(location: str) -> str:
    return os.path.abspath(os.path.expanduser(location))


def _filesystem(base: str) -> tuple[pafs.FileSystem, str]:
    if _scheme(base) is None:
        return pafs.LocalFileSystem(), base
    filesystem, path = pafs.FileSystem.from_uri(base)
    return filesystem, path.rstrip("/") or path


def _split_glob(location: str) -> tuple[str, str | None]:
    """('a/b/*/c.pq') -> ('a/b', '*/c.pq'): the part before the first glob, and the rest."""
    parts = location.split("/")
    for i, part in enumerate(parts):
        if any(char in part for char in _GLOB_CHARS):
            base = "/".join(parts[:i]) or "/"
            return base, "/".join(parts[i:])
    return location, None


def _list(
    fs: pafs.FileSystem, base: str, pattern: str | None, extensions: tuple[str, ...]
) -> list[pafs.FileInfo]:
    info = fs.get_file_info(base)
    if pattern is None and info.type == pafs.FileType.File:
        return [info]
    if info.type != pafs.FileType.Directory:
        return []
    prefix = base.rstrip("/") + "/"
    recursive = pattern is None or "/" in pattern or "**" in pattern
    matches = _glob_regex(pattern).match if pattern is not None else None
    found = []
    for item in fs.get_file_info(pafs.FileSelector(base, recursive=recursive)):
        relative = item.path[len(prefix) :] if item.path.startswith(prefix) else item.path
        if item.type != pafs.FileType.File or _hidden(relative):
            continue
        if matches is not None and not matches(relative):
            continue
        if matches is None and not relative.lower().endswith(extensions):
            continue
        found.append(item)
    return found


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a glob into a regex where `*` stays within one directory and `**/` spans many."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


# ---------------------------------------------------------------------------------------------
# Checking files


@dataclass(frozen=True)
class _FileMeta:
    path: str
    schema: pa.Schema
    num_rows: int


def check_files(
    files: FileSet,
    *,
    label: str,
    features: list[str] | None,
    task: str,
    categorical_columns: list[str] | None,
    field: str,
) -> DataInfo:
    """Check every file's schema (parquet footer, or the first ~1 MB of csv/jsonl) up front.

    Args:
        files: From `resolve_files`.
        label: The label column.
        features: Feature columns in order; None means every column of the first file but the
            label (and pandas index columns).
        task: "classification" or "regression"; decides which label types are accepted.
        categorical_columns: Features to treat as categorical; None means every string, bool or
            dictionary feature.
        field: Dotted spec field named in error messages ("data.train").

    Raises:
        DataError: A file is unreadable or empty, a column is missing or of an unsupported type,
            or a column's type differs incompatibly between files.
    """
    if not files.paths:
        raise DataError(f"{field}: no {files.format} files found at {files.location!r}")
    metas = _read_metas(files, field)
    _check_not_empty(files, metas, field)
    names = _resolve_features(files, metas[0], label, features, field)
    schema = _unify(files, metas, names, label, field)
    _check_label(files, schema.field(label).type, label, task, field)
    categorical, numeric = _split_features(schema, names, categorical_columns, field)
    num_rows = sum(meta.num_rows for meta in metas) if files.format == "parquet" else None
    logger.info(
        "%s: %d %s files, %s rows, %d features (%d categorical)",
        field,
        len(files.paths),
        files.format,
        "?" if num_rows is None else num_rows,
        len(names),
        len(categorical),
    )
    return DataInfo(files, schema, tuple(names), categorical, numeric, num_rows)


def check_data(spec: DataSpec) -> tuple[DataInfo, DataInfo | None]:
    """Resolve and check `data.train` and, when given, `data.validation` of a job spec.

    The validation files must hold the training features and label with compatible types.
    """

    if spec.task == "language_modeling":
        return _check_text_data(spec)

    def check(location: str, field: str, features: list[str] | None) -> DataInfo:
        assert spec.label is not None  # the spec requires it for tabular tasks
        return check_files(
            resolve_files(location, spec.format, field),
            label=spec.label,
            features=features,
            task=spec.task,
            categorical_columns=spec.preprocess.categorical_columns,
            field=field,
        )

    train = check(spec.train, "data.train", spec.features)
    if spec.validation is None:
        return train, None
    validation = check(spec.validation, "data.validation", list(train.features))
    for column in train.schema:
        theirs = validation.schema.field(column.name).type
        if _merge_types(column.type, theirs) is None:
            raise DataError(
                f"data.validation: column {column.name!r} is {theirs} there but {column.type} "
                "in data.train"
            )
    return train, validation


def _check_text_data(spec: DataSpec) -> tuple[DataInfo, DataInfo | None]:
    train = check_text_files(resolve_files(spec.train, spec.format), column=spec.text)
    if spec.validation is None:
        return train, None
    files = resolve_files(spec.validation, spec.format, "data.validation")
    return train, check_text_files(files, column=spec.text, field="data.validation")


def check_text_files(files: FileSet, *, column: str, field: str = "data.train") -> DataInfo:
    """Check that every file has the text column `column` as a string column.

    Raises:
        DataError: no files, an unreadable or empty file, or the column missing or not text,
            naming the file.
    """
    if not files.paths:
        raise DataError(f"{field}: no {files.format} files found at {files.location!r}")
    metas = _read_metas(files, field)
    _check_not_empty(files, metas, field)
    for meta in metas:
        index = meta.schema.get_field_index(column)
        if index < 0:
            listed = ", ".join(meta.schema.names[:20]) or "none"
            raise DataError(
                f"{field}: text column {column!r} (data.text) not found in "
                f"{files.display(meta.path)} (columns: {listed})"
            )
        dtype = meta.schema.field(index).type
        if not (_is_text(dtype) or pa.types.is_null(dtype)):
            raise DataError(
                f"{field}: text column {column!r} is {dtype} in {files.display(meta.path)}; "
                "language modeling reads one document per row as a string"
            )
    num_rows = sum(meta.num_rows for meta in metas) if files.format == "parquet" else None
    logger.info(
        "%s: %d %s files, %s documents in column %r",
        field,
        len(files.paths),
        files.format,
        "?" if num_rows is None else num_rows,
        column,
    )
    schema = pa.schema([pa.field(column, pa.large_string())])
    return DataInfo(files, schema, (column,), (), (), num_rows)


def _read_metas(files: FileSet, field: str) -> list[_FileMeta]:
    reader = _READERS[files.format]

    def read(path: str) -> _FileMeta:
        try:
            schema, num_rows = reader(files.filesystem, path)
        except (pa.ArrowException, OSError, ValueError) as exc:
            shown = files.display(path)
            raise DataError(
                f"{field}: {shown} is not a readable {files.format} file ({exc})"
            ) from exc
        return _FileMeta(path, schema, num_rows)

    # Footers on object stores are one round-trip each; read them concurrently.
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files.paths)))) as pool:
        return list(pool.map(read, files.paths))


def _parquet_meta(fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        return parquet.schema_arrow, parquet.metadata.num_rows


def _csv_meta(fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    head = _head(fs, path)
    if not head.strip():
        return pa.schema([]), 0
    options = pacsv.ReadOptions(use_threads=False, block_size=len(head) + 1)
    table = pacsv.read_csv(pa.BufferReader(head), read_options=options)
    return table.schema, table.num_rows


def _jsonl_meta(fs: pafs.FileSystem, path: str) -> tuple[pa.Schema, int]:
    head = _head(fs, path)
    if not head.strip():
        return pa.schema([]), 0
    options = pajson.ReadOptions(use_threads=False, block_size=len(head) + 1)
    table = pajson.read_json(pa.BufferReader(head), read_options=options)
    return table.schema, table.num_rows


def _head(fs: pafs.FileSystem, path: str) -> bytes:
    """The first ~1 MB of a (possibly gzipped) text file, cut after its last complete line."""
    with fs.open_input_stream(path) as stream:  # compression detected from the extension
        data = stream.read(_HEAD_BYTES)
        eof = len(data) < _HEAD_BYTES
        while not eof and b"\n" not in data:
            if len(data) >= _MAX_LINE_BYTES:
                raise ValueError(f"first line is longer than {_MAX_LINE_BYTES >> 20} MB")
            more = stream.read(_HEAD_BYTES)
            data += more
            eof = len(more) < _HEAD_BYTES
    return bytes(data) if eof else bytes(data[: data.rfind(b"\n") + 1])


_READERS: dict[str, Callable[[pafs.FileSystem, str], tuple[pa.Schema, int]]] = {
    "parquet": _parquet_meta,
    "csv": _csv_meta,
    "jsonl": _jsonl_meta,
}


def _check_not_empty(files: FileSet, metas: Sequence[_FileMeta], field: str) -> None:
    if files.format != "parquet":
        for meta in metas:
            if meta.num_rows == 0:
                raise DataError(f"{field}: {files.display(meta.path)} is empty (no rows)")
    elif sum(meta.num_rows for meta in metas) == 0:
        raise DataError(
            f"{field}: the data at {files.location!r} is empty (0 rows in {len(metas)} "
            "parquet files)"
        )


def _resolve_features(
    files: FileSet, first: _FileMeta, label: str, features: list[str] | None, field: str
) -> list[str]:
    if features is not None:
        names = list(features)
    else:
        names = [
            name
            for name in first.schema.names
            if name != label and not name.startswith(_PANDAS_INDEX)
        ]
    if not names:
        raise DataError(
            f"{field}: no feature columns: {files.display(first.path)} has only the label "
            f"column {label!r}"
        )
    return names


def _unify(
    files: FileSet, metas: Sequence[_FileMeta], names: list[str], label: str, field: str
) -> pa.Schema:
    """One type per column across all files; ints widen and int+float becomes float."""
    types: dict[str, pa.DataType] = {}
    seen_in: dict[str, str] = {}
    for meta in metas:
        for name in [label, *names]:
            index = meta.schema.get_field_index(name)
            if index < 0:
                raise DataError(_missing_message(files, meta, name, label, field))
            new = meta.schema.field(index).type
            if name not in types:
                types[name], seen_in[name] = new, meta.path
                continue
            merged = _merge_types(types[name], new)
            if merged is None:
                raise DataError(
                    f"{field}: column {name!r} is {types[name]} in "
                    f"{files.display(seen_in[name])} but {new} in {files.display(meta.path)}"
                )
            types[name] = merged
    for name in [*names, label]:
        _check_supported(files, name, types[name], seen_in[name], field)
    return pa.schema([pa.field(name, types[name]) for name in [*names, label]])


def _missing_message(files: FileSet, meta: _FileMeta, name: str, label: str, field: str) -> str:
    kind = "label" if name == label else "feature"
    columns = meta.schema.names
    more = f", ... ({len(columns)} in all)" if len(columns) > 20 else ""
    listed = ", ".join(columns[:20]) + more
    return (
        f"{field}: {kind} column {name!r} not found in {files.display(meta.path)} "
        f"(columns: {listed or 'none'})"
    )


def _merge_types(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The common type of two columns, or None when they cannot be mixed."""
    if a == b:
        return a
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if _is_number(a) and _is_number(b):
        pair = [pa.schema([("c", a)]), pa.schema([("c", b)])]
        return pa.unify_schemas(pair, promote_options="permissive").field("c").type
    if _is_text(a) and _is_text(b):
        return pa.large_string() if pa.large_string() in (a, b) else pa.string()
    return None


def _is_number(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


def _is_text(dtype: pa.DataType) -> bool:
    if pa.types.is_dictionary(dtype):
        return _is_text(dtype.value_type)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _check_supported(files: FileSet, name: str, dtype: pa.DataType, path: str, field: str) -> None:
    if pa.types.is_null(dtype):
        where = "every file" if files.format == "parquet" else "the first block of every file"
        raise DataError(f"{field}: column {name!r} has no values (all missing) in {where}")
    if not (_is_number(dtype) or _is_text(dtype) or pa.types.is_boolean(dtype)):
        raise DataError(
            f"{field}: column {name!r} has unsupported type {dtype} in {files.display(path)}; "
            f"kiln reads {_SUPPORTED}"
        )


def _check_label(files: FileSet, dtype: pa.DataType, label: str, task: str, field: str) -> None:
    if task == "regression":
        if not _is_number(dtype):
            raise DataError(
                f"{field}: label column {label!r} is {dtype}, but a regression label must be "
                "numeric (integer or floating-point)"
            )
        return
    text = pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if not (pa.types.is_integer(dtype) or pa.types.is_boolean(dtype) or text):
        raise DataError(
            f"{field}: label column {label!r} is {dtype}, but a classification label must be "
            "integer, string or bool (cast float class ids to int, or use task: regression)"
        )


def _split_features(
    schema: pa.Schema, names: list[str], categorical_columns: list[str] | None, field: str
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    types = {name: schema.field(name).type for name in names}
    if categorical_columns is None:
        chosen = {n for n, t in types.items() if _is_text(t) or pa.types.is_boolean(t)}
    else:
        for name in categorical_columns:
            if name not in types:
                raise DataError(
                    f"data.preprocess.categorical_columns: {name!r} is not a feature column "
                    f"(features: {', '.join(names)})"
                )
        chosen = set(categorical_columns)
        for name, dtype in types.items():
            if name not in chosen and _is_text(dtype):
                raise DataError(
                    f"{field}: feature {name!r} is a string column; list it in "
                    "data.preprocess.categorical_columns (or leave that option unset)"
                )
    categorical = tuple(name for name in names if name in chosen)
    return categorical, tuple(name for name in names if name not in chosen)


# ---------------------------------------------------------------------------------------------
# Reading with Ray Data


def read_dataset(
    files: FileSet,
    *,
    columns: list[str] | None = None,
    ray_remote_args: dict[str, Any] | None = None,
    override_num_blocks: int | None = None,
) -> ray.data.Dataset:
    """Read a checked `FileSet` with Ray Data.

    Args:
        files: From `resolve_files` (its filesystem is passed to the reader).
        columns: Columns to keep (Ray pushes the selection down into the file readers).
        ray_remote_args: Per-read-task Ray options such as {"num_cpus": 0.25}; keys the readers
            take as named parameters (num_cpus, memory, resources, ...) are passed that way.
        override_num_blocks: Number of read tasks; None means one per Parquet file, and Ray's
            own choice for CSV/JSONL.
    """
    import ray.data

    remote = dict(ray_remote_args or {})
    kwargs: dict[str, Any] = {
        "filesystem": files.filesystem,
        # The paths are resolved and checked already: no hive partition columns that
        # `check_files` never saw, and no extension filter beyond what the paths carry.
        "file_extensions": _ray_extensions(files),
        "partitioning": None,
        "override_num_blocks": override_num_blocks,
        **{key: remote.pop(key) for key in _NAMED_REMOTE_ARGS if key in remote},
    }
    if remote:
        kwargs["ray_remote_args"] = remote
    paths = files.uris()
    if files.format == "parquet":
        kwargs["override_num_blocks"] = override_num_blocks or len(paths)
        return _read_parquet_v1(paths, {**kwargs, "columns": columns})
    if files.format == "csv":
        if columns:
            kwargs["convert_options"] = pacsv.ConvertOptions(include_columns=columns)
        return ray.data.read_csv(paths, **kwargs)
    # Arrow's JSON reader is line-delimited already; `lines=True` would refuse `filesystem=`.
    dataset = ray.data.read_json(paths, **kwargs)
    return dataset.select_columns(columns) if columns else dataset


def _read_parquet_v1(paths: list[str], kwargs: dict[str, Any]) -> ray.data.Dataset:
    """`read_parquet` through Ray's V1 Parquet datasource.

    Ray 2.60's default (datasource V2) lists files in a pool of footer-reading actors at the
    start of every execution, so every epoch waited 2-9 s for its first batch here, and it
    bin-packs files into large read tasks that ignore `override_num_blocks`. V1 reads the
    footers once, when the dataset is built, and makes one read task per file
    (benchmarks/README.md has the measurements).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    saved, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        context.use_datasource_v2 = saved


def _ray_extensions(files: FileSet) -> list[str] | None:
    """Extensions that let every path through Ray's filter (its parquet reader treats None as
    `.parquet` only, which would silently drop `.pq` files)."""
    if files.format != "parquet":
        return None
    names = [path.rsplit("/", 1)[-1] for path in files.paths]
    for path, name in zip(files.paths, names, strict=True):
        if "." not in name.lstrip("."):
            raise DataError(
                f"{files.display(path)}: Ray Data reads parquet files only by extension; "
                "rename it to end in .parquet"
            )
    return sorted({name.rsplit(".", 1)[-1].lower() for name in names})
