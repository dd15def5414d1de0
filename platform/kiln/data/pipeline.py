"""Ray Data glue: fit preprocessing by streaming partial statistics, split, dedupe, transform.

Everything here stays lazy and streaming: statistics travel to the driver as one small JSON row
per batch and are merged as they arrive; splits and transforms are `map_batches` over the
dataset; dedupe is one hash shuffle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data
import ray.exceptions

from kiln import errors
from kiln.config.spec import PreprocessSpec
from kiln.data.preprocess import (
    Preprocessor,
    fit_preprocessor,
    merge_stats,
    partial_stats,
    summarize_stats,
)
from kiln.errors import DataError

logger = logging.getLogger(__name__)

_MERGE_EVERY = 16
"""Partials buffered on the driver before each merge."""
_DEDUPE_BUCKETS = 1024
_BUCKET_COLUMN = "__kiln_dedupe_bucket"
_ROW_COLUMN = "__kiln_row"
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------------------------
# Fitting


def fit_on_dataset(
    ds: ray.data.Dataset,
    spec: PreprocessSpec,
    *,
    features: list[str],
    numeric: list[str],
    categorical: list[str],
    label: str,
    task: str,
    seed: int = 0,
    num_cpus: float = 0.5,
    median_sample_size: int = 20_000,
    batch_size: int = 262_144,
) -> tuple[Preprocessor, dict[str, int]]:
    """Fit a `Preprocessor` on a training dataset without materialising it.

    Each batch becomes one row holding its partial statistics as JSON; the driver streams those
    rows and merges them as they arrive.

    Args:
        median_sample_size: Values per numeric column sampled for `missing: median`; the median
            is exact up to this many values, a uniform-sample estimate beyond. Only sampled
            when the median is needed, so other fits ship a few KB per batch.
        batch_size: Rows per partial. Fewer, larger partials ship fewer samples to the driver.

    Returns:
        The fitted preprocessor and the row accounting (`rows`, `rows_dropped`, `rows_used`...).
    """
    _require_columns(ds, [*features, label])
    kwargs = {
        "numeric": list(numeric),
        "categorical": list(categorical),
        "label": label,
        "task": task,
        "seed": seed,
        "sample_size": median_sample_size if spec.missing == "median" else 0,
        "complete_rows_only": spec.missing == "drop",
        "max_distinct": max(10_000, spec.max_categories),
    }
    partials = ds.map_batches(
        partial(_stats_batch, kwargs=kwargs),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
    stats = _merge_streamed(partials)
    pre = fit_preprocessor(
        stats,
        spec,
        features=list(features),
        numeric=list(numeric),
        categorical=list(categorical),
        label=label,
        task=task,
    )
    summary = summarize_stats(stats, spec.missing)
    logger.info(
        "fitted preprocessing on %d rows (%d dropped)",
        summary["rows_used"],
        summary["rows_dropped"],
    )
    return pre, summary


def _stats_batch(table: pa.Table, kwargs: dict[str, Any]) -> pa.Table:
    return pa.table({"stats": [json.dumps(partial_stats(table, **kwargs))]})


def _require_columns(ds: ray.data.Dataset, names: list[str]) -> None:
    """Fail fast, before any task runs, when the schema is known and lacks a column."""
    schema = ds.schema(fetch_if_missing=False)
    absent = [name for name in names if schema is not None and name not in schema.names]
    if absent:
        raise DataError(f"columns {absent} are missing from the data (found {schema.names})")


def _user_error(exc: Exception) -> Exception:
    """The KilnError a Ray task raised, rebuilt from its message (Ray keeps only the text)."""
    found = re.findall(r"kiln\.errors\.(\w+): (.*)", str(exc))
    kind = getattr(errors, found[-1][0], None) if found else None
    if isinstance(kind, type) and issubclass(kind, errors.KilnError):
        return kind(found[-1][1])
    return exc


def _merge_streamed(partials: ray.data.Dataset) -> dict[str, Any]:
    merged: dict[str, Any] | None = None
    pending: list[dict[str, Any]] = []
    rows = iter(partials.iter_rows())
    while True:
        try:
            row = next(rows, None)
        except ray.exceptions.RayError as exc:
            raise _user_error(exc) from exc
        if row is None:
            break
        pending.append(json.loads(row["stats"]))
        if len(pending) >= _MERGE_EVERY:
            merged = merge_stats(pending if merged is None else [merged, *pending])
            pending = []
    if pending:
        merged = merge_stats(pending if merged is None else [merged, *pending])
    if merged is None:
        raise DataError("the training split is empty: no rows to fit preprocessing on")
    return merged


# ----------------------------------------------------------------------------------------------
# Row hashing


def row_hash(table: pa.Table, columns: list[str], seed: int = 0) -> np.ndarray:
    """A stable 64-bit hash of each row's values in `columns` (uint64, one per row).

    Stable across processes, runs and batchings: it depends only on the values, their order
    in `columns` and the seed. Numbers hash by value (an int and the equal float agree), nulls
    and NaN hash alike.
    """
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise DataError(f"columns {missing} are missing from the data")
    key = _hash_key(seed)
    state = np.full(table.num_rows, _seed_word(seed), dtype=np.uint64)
    for position, name in enumerate(columns):
        column = _column_hash(table.column(name), key)
        state = _mix(state ^ column ^ np.uint64(position + 1))
    return state


def _hash_key(seed: int) -> str:
    return hashlib.blake2b(f"kiln:{seed}".encode(), digest_size=8).hexdigest()


def _seed_word(seed: int) -> np.uint64:
    digest = hashlib.blake2b(f"kiln-seed:{seed}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit affects every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _column_hash(column: pa.ChunkedArray, key: str) -> np.ndarray:
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    nulls = np.asarray(column.is_null().to_numpy(), dtype=bool)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        values = column.cast(pa.float64(), safe=False).to_numpy() + 0.0  # + 0.0 folds -0.0 into 0.0
        nulls |= np.isnan(values)
        hashed = _mix(np.where(nulls, 0.0, values).view(np.uint64))
    elif pa.types.is_timestamp(kind) or pa.types.is_duration(kind):
        hashed = _mix(column.cast(pa.int64()).fill_null(0).to_numpy().view(np.uint64))
    else:
        hashed = _string_hash(column, kind, key)
    return np.where(nulls, np.uint64(0x9E3779B97F4A7C15), hashed)


def _string_hash(column: pa.ChunkedArray, kind: pa.DataType, key: str) -> np.ndarray:
    """Hash each distinct value once (SipHash via pandas), then spread by dictionary index."""
    import pandas as pd

    if pa.types.is_dictionary(column.type):
        column = column.cast(kind)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            column = pa.chunked_array([pa.array([repr(v) for v in column.to_pylist()])])
    encoded = column.combine_chunks().dictionary_encode()
    uniques = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    hashed = pd.util.hash_array(uniques, hash_key=key, categorize=False).astype(np.uint64)
    indices = encoded.indices.fill_null(0).to_numpy()
    return hashed[indices] if uniques.size else np.zeros(len(column), dtype=np.uint64)


# ----------------------------------------------------------------------------------------------
# Split and dedupe


def split_by_hash(
    ds: ray.data.Dataset,
    fraction: float,
    *,
    columns: list[str],
    seed: int,
    num_cpus: float = 0.5,
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split rows into (train, validation) by a stable hash of their values in `columns`.

    About `fraction` of the rows go to validation. Identical rows land on the same side, and
    the split is the same on every run with the same seed. Lazy: nothing executes here.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    sides = {}
    for validation in (False, True):
        keep = partial(
            _keep_side, columns=list(columns), seed=seed, fraction=fraction, validation=validation
        )
        sides[validation] = ds.map_batches(keep, batch_format="pyarrow", num_cpus=num_cpus)
    return sides[False], sides[True]


def _keep_side(
    table: pa.Table, columns: list[str], seed: int, fraction: float, validation: bool
) -> pa.Table:
    unit = (row_hash(table, columns, seed) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return table.filter(pa.array((unit < fraction) == validation))


def dedupe(ds: ray.data.Dataset, *, columns: list[str], num_cpus: float = 0.5) -> ray.data.Dataset:
    """Remove rows whose values in `columns` duplicate an earlier row, across the whole dataset.

    Rows are bucketed by a hash and shuffled so duplicates meet; within a bucket, rows are
    compared by value, so a hash collision never removes a distinct row.
    """
    columns = list(columns)
    bucketed = ds.map_batches(
        partial(_add_bucket, columns=columns), batch_format="pyarrow", num_cpus=num_cpus
    )
    kept = bucketed.groupby(_BUCKET_COLUMN).map_groups(
        partial(_first_distinct, columns=columns), batch_format="pyarrow", num_cpus=num_cpus
    )
    return kept.drop_columns([_BUCKET_COLUMN])


def _add_bucket(table: pa.Table, columns: list[str]) -> pa.Table:
    buckets = row_hash(table, columns) % np.uint64(_DEDUPE_BUCKETS)
    return table.append_column(_BUCKET_COLUMN, pa.array(buckets.astype(np.int64)))


def _first_distinct(table: pa.Table, columns: list[str]) -> pa.Table:
    numbered = table.append_column(_ROW_COLUMN, pa.array(np.arange(table.num_rows)))
    firsts = numbered.group_by(columns, use_threads=False).aggregate([(_ROW_COLUMN, "min")])
    rows = np.sort(firsts.column(f"{_ROW_COLUMN}_min").to_numpy())
    return table.take(pa.array(rows))


# ----------------------------------------------------------------------------------------------
# Transform


def preprocess_dataset(
    ds: ray.data.Dataset,
    pre: Preprocessor,
    *,
    num_cpus: float = 0.5,
    batch_size: int | None = None,
    with_label: bool = True,
) -> ray.data.Dataset:
    """Apply `pre.transform` to every batch: the result has columns x, y (and x_cat).

    The default transforms whole blocks, so the transform fuses into the read task that made
    the block (the same CPUs, no extra hop through the object store).
    """
    return ds.map_batches(
        partial(_transform_batch, pre=pre, with_label=with_label),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )


def _transform_batch(table: pa.Table, pre: Preprocessor, with_label: bool) -> dict[str, Any]:
    return pre.transform(table, with_label=with_label)
