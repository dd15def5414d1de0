"""Preprocessing fitted on the training split from mergeable partial statistics.

Fitting streams: each batch yields a small JSON-able partial (`partial_stats`), partials merge in
any order (`merge_stats`), and `fit_preprocessor` turns the merged statistics into a
`Preprocessor` whose whole fitted state is plain JSON. No process ever holds the dataset.

Missing values: a null, NaN or infinite numeric value, or a null categorical value. Numeric
statistics use every observed value of the rows that have a label (and, with
`complete_rows_only`, no missing feature). The constant fill applies before scaling, in the
column's raw units. Category counts are capped per column (`max_distinct`, most frequent kept),
so counts of very rare values are approximate when a column has more distinct values than that.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.config.spec import PreprocessSpec
from kiln.errors import DataError

FORMAT = 1
"""Version of the `Preprocessor.to_dict` document."""
STATS_VERSION = 1
"""Version of the `partial_stats` document."""
DEFAULT_MAX_DISTINCT = 10_000
"""Distinct categories kept per column in partial statistics (the most frequent)."""

_TASKS = ("classification", "regression")
_MISSING = ("drop", "mean", "median", "constant")
_ENCODINGS = ("onehot", "index")


# ----------------------------------------------------------------------------------------------
# Reading columns


def _require_columns(table: pa.Table, names: Sequence[str]) -> None:
    present = set(table.column_names)
    for name in names:
        if name not in present:
            raise DataError(
                f"column {name!r} is missing from the data (found {table.column_names})"
            )


def _float64_values(table: pa.Table, name: str) -> np.ndarray:
    """float64 values of a numeric or bool column as stored: null becomes NaN, +-inf stays."""
    column = table.column(name)
    if column.type != pa.float64():
        kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
        if not any(check(kind) for check in (*checks, pa.types.is_decimal, pa.types.is_null)):
            raise DataError(f"numeric column {name!r} has type {column.type}, not a number")
        column = column.cast(pa.float64(), safe=False)
    return column.to_numpy()


def _float_values(table: pa.Table, name: str) -> np.ndarray:
    """`_float64_values`, except that a float32 column stays float32 (null as NaN): for writing
    into a float64 array, which widens it without an intermediate copy."""
    column = table.column(name)
    if pa.types.is_floating(column.type):
        return column.to_numpy()
    return _float64_values(table, name)


def numeric_matrix(table: pa.Table, names: list[str]) -> np.ndarray | None:
    """(rows, columns) float values of number columns in one Arrow call, null as NaN (one row
    of 64 columns: 10 us against 56 us column by column); None when a column is of a kind that
    call refuses (bool, decimal, dictionary, null, text), which `_float_values` handles."""
    if table.column_names != names:
        table = table.select(names)
    batches = table.combine_chunks().to_batches()
    if len(batches) != 1:  # no rows
        return None
    try:
        return np.asarray(batches[0].to_tensor(null_to_nan=True, row_major=False))
    except (pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _numeric_values(table: pa.Table, name: str) -> np.ndarray:
    """float64 values of a numeric or bool column; null, NaN and +-inf become NaN."""
    values = _float64_values(table, name)
    return np.where(np.isfinite(values), values, np.nan)


def _category_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A categorical column as strings (bools as "true"/"false"); nulls stay null."""
    if pa.types.is_string(column.type):
        return column
    return column.cast(pa.string())


def _missing_label(column: pa.ChunkedArray) -> np.ndarray:
    missing = column.is_null().to_numpy()
    if pa.types.is_floating(column.type):
        values = column.to_numpy()
        missing |= ~np.isfinite(values)
    return np.asarray(missing, dtype=bool)


# ----------------------------------------------------------------------------------------------
# Partial statistics


def partial_stats(
    table: pa.Table,
    *,
    numeric: list[str],
    categorical: list[str],
    label: str | None,
    task: str,
    sample_size: int = 100_000,
    seed: int = 0,
    complete_rows_only: bool = False,
    max_distinct: int = DEFAULT_MAX_DISTINCT,
) -> dict[str, Any]:
    """Statistics of one batch, JSON-able, that `merge_stats` combines.

    A few hundred bytes per column, plus about 21 bytes per sampled value when `sample_size`
    is above 0 (only `missing: median` needs the sample).

    Args:
        table: One batch of the training split.
        numeric, categorical: Feature columns by kind.
        label: Label column, or None to skip label statistics.
        task: "classification" or "regression".
        sample_size: Size of the uniform sample kept per numeric column for the median
            (exact median when a column has at most this many values); 0 keeps none.
        seed: Seeds the sample's random keys, together with a hash of the batch content.
        complete_rows_only: Use only rows with no missing feature for feature statistics (for
            `missing: drop`, whose training rows are exactly those).
        max_distinct: Most frequent categories kept per column.
    """
    if task not in _TASKS:
        raise ValueError(f"task must be one of {_TASKS}, got {task!r}")
    _require_columns(table, [*numeric, *categorical, *([label] if label else [])])
    values = {name: _numeric_values(table, name) for name in numeric}
    strings = {name: _category_strings(table.column(name)) for name in categorical}
    feature_missing = _rows_missing_a_feature(table.num_rows, values, strings)
    label_missing = _missing_label(table.column(label)) if label else np.zeros_like(feature_missing)
    use = ~label_missing & ~feature_missing if complete_rows_only else ~label_missing
    use_arrow = pa.array(use)
    return {
        "version": STATS_VERSION,
        "task": task,
        "label": label,
        "sample_size": int(sample_size),
        "max_distinct": int(max_distinct),
        "rows": table.num_rows,
        "rows_with_missing_label": int(label_missing.sum()),
        "rows_with_missing_feature": int(feature_missing.sum()),
        "rows_incomplete": int((label_missing | feature_missing).sum()),
        "numeric": {
            name: _numeric_partial(array[use], name, seed, sample_size)
            for name, array in values.items()
        },
        "categorical": {
            name: _categorical_partial(column.filter(use_arrow), max_distinct)
            for name, column in strings.items()
        },
        "label_stats": _label_partial(table.column(label).filter(use_arrow), label, task)
        if label
        else None,
    }


def _rows_missing_a_feature(
    rows: int, values: dict[str, np.ndarray], strings: dict[str, pa.ChunkedArray]
) -> np.ndarray:
    missing = np.zeros(rows, dtype=bool)
    for array in values.values():
        missing |= np.isnan(array)
    for column in strings.values():
        missing |= np.asarray(column.is_null().to_numpy(), dtype=bool)
    return missing


def _moments(values: np.ndarray) -> dict[str, Any]:
    if values.size == 0:
        return {"count": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None}
    mean = float(values.mean())
    return {
        "count": int(values.size),
        "mean": mean,
        "m2": float(np.square(values - mean).sum()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def _numeric_partial(values: np.ndarray, name: str, seed: int, sample_size: int) -> dict:
    present = values[~np.isnan(values)]
    stats = _moments(present)
    stats["missing"] = int(values.size - present.size)
    keys = _sample_keys(present, name, seed) if sample_size > 0 else np.empty(0, np.uint64)
    stats["sample"] = _pack_sample(*_smallest_keys(keys, present[: keys.size], sample_size))
    return stats


def _pack_sample(keys: np.ndarray, values: np.ndarray) -> dict[str, Any]:
    """A sample as base64 of little-endian arrays: a third the size of JSON number lists."""
    return {
        "size": int(keys.size),
        "keys": base64.b64encode(keys.astype("<u8").tobytes()).decode("ascii"),
        "values": base64.b64encode(values.astype("<f8").tobytes()).decode("ascii"),
    }


def _unpack_sample(sample: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    keys = np.frombuffer(base64.b64decode(sample["keys"]), dtype="<u8")
    values = np.frombuffer(base64.b64decode(sample["values"]), dtype="<f8")
    if keys.size != sample["size"] or values.size != sample["size"]:
        raise ValueError("corrupt sample in statistics")
    return keys.astype(np.uint64), values.astype(np.float64)


def _sample_keys(values: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Uniform random keys, reproducible from the seed, the column and the batch content."""
    digest = hashlib.blake2b(f"{seed}:{name}:".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(values).tobytes())
    rng = np.random.default_rng(int.from_bytes(digest.digest(), "little"))
    return rng.integers(0, np.iinfo(np.uint64).max, size=values.size, dtype=np.uint64)


def _smallest_keys(
    keys: np.ndarray, values: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The `size` entries with the smallest keys (in no particular order).

    Equal 64-bit keys only arise from identical batches, whose tied entries hold equal values,
    so the chosen values do not depend on how ties are broken.
    """
    if keys.size <= size:
        return keys, values
    chosen = np.argpartition(keys, size - 1)[:size] if size > 0 else np.empty(0, dtype=np.intp)
    return keys[chosen], values[chosen]


def _top_counts(counts: dict[str, int], cap: int) -> dict[str, int]:
    if len(counts) <= cap:
        return counts
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:cap]
    return dict(ranked)


def _categorical_partial(strings: pa.ChunkedArray, max_distinct: int) -> dict:
    present = strings.drop_null()
    counted = pc.value_counts(present)
    values = counted.field("values").to_pylist()
    counts = counted.field("counts").to_pylist()
    return {
        "missing": len(strings) - len(present),
        "counts": _top_counts(dict(zip(values, counts, strict=True)), max_distinct),
    }


def _label_partial(column: pa.ChunkedArray, label: str, task: str) -> dict:
    if task == "regression":
        if not pa.types.is_integer(column.type) and not pa.types.is_floating(column.type):
            raise DataError(f"regression label {label!r} has type {column.type}, not a number")
        return {"kind": "moments", **_moments(column.cast(pa.float64()).to_numpy())}
    column = _class_column(column)
    counted = pc.value_counts(column)
    pairs = zip(
        counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
    )
    return {"kind": "classes", "counts": [[value, count] for value, count in pairs]}


def _class_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Class labels in a canonical type: ints, bools and strings; integral floats become ints."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_integer(kind):
        return column.cast(pa.int64())
    if pa.types.is_floating(kind):
        values = column.cast(pa.float64())
        if bool(pc.all(pc.equal(pc.floor(values), values)).as_py() is not False):
            return values.cast(pa.int64())
        return values
    if pa.types.is_boolean(kind):
        return column.cast(pa.bool_())
    return column.cast(pa.string())


# ----------------------------------------------------------------------------------------------
# Merging


def merge_stats(parts: Iterable[dict]) -> dict[str, Any]:
    """Combine partial statistics (from `partial_stats` or earlier merges) into one.

    The result has the same shape as a partial, so merging is incremental: merge a few, then
    merge that with the next few. Moments merge exactly (Chan et al.), samples keep the smallest
    keys overall (a uniform sample), category counts add up and keep the most frequent.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("merge_stats needs at least one partial")
    first = parts[0]
    _check_compatible(parts)
    sample_size = min(part["sample_size"] for part in parts)
    max_distinct = max(part["max_distinct"] for part in parts)
    row_keys = ("rows", "rows_with_missing_label", "rows_with_missing_feature", "rows_incomplete")
    return {
        **{key: first[key] for key in ("version", "task", "label")},
        "sample_size": sample_size,
        "max_distinct": max_distinct,
        **{key: sum(part[key] for part in parts) for key in row_keys},
        "numeric": {
            name: _merge_numeric([part["numeric"][name] for part in parts], sample_size)
            for name in first["numeric"]
        },
        "categorical": {
            name: _merge_categorical([part["categorical"][name] for part in parts], max_distinct)
            for name in first["categorical"]
        },
        "label_stats": _merge_label([part["label_stats"] for part in parts])
        if first["label_stats"] is not None
        else None,
    }


def _check_compatible(parts: list[dict]) -> None:
    first = parts[0]
    for part in parts[1:]:
        for key in ("version", "task", "label"):
            if part[key] != first[key]:
                raise ValueError(f"partials disagree on {key!r}: {first[key]!r} != {part[key]!r}")
        if part["numeric"].keys() != first["numeric"].keys() or (
            part["categorical"].keys() != first["categorical"].keys()
        ):
            raise ValueError("partials were computed over different columns")


def _merge_moments(items: list[dict]) -> dict[str, Any]:
    count, mean, m2 = 0, 0.0, 0.0
    for item in items:
        if item["count"] == 0:
            continue
        total = count + item["count"]
        delta = item["mean"] - mean
        mean += delta * item["count"] / total
        m2 += item["m2"] + delta * delta * count * item["count"] / total
        count = total
    lows = [item["min"] for item in items if item["min"] is not None]
    highs = [item["max"] for item in items if item["max"] is not None]
    return {
        "count": count,
        "mean": mean,
        "m2": m2,
        "min": min(lows) if lows else None,
        "max": max(highs) if highs else None,
    }


def _merge_numeric(items: list[dict], sample_size: int) -> dict[str, Any]:
    merged = _merge_moments(items)
    merged["missing"] = sum(item["missing"] for item in items)
    samples = [_unpack_sample(item["sample"]) for item in items]
    keys = np.concatenate([keys for keys, _ in samples])
    values = np.concatenate([values for _, values in samples])
    merged["sample"] = _pack_sample(*_smallest_keys(keys, values, sample_size))
    return merged


def _merge_categorical(items: list[dict], max_distinct: int) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    for item in items:
        counts.update(item["counts"])
    return {
        "missing": sum(item["missing"] for item in items),
        "counts": _top_counts(dict(counts), max_distinct),
    }


def _class_key(value: Any) -> tuple[str, Any]:
    # 1, 1.0 and True are equal dict keys in Python; a type tag keeps bools apart from numbers.
    tag = "b" if isinstance(value, bool) else "s" if isinstance(value, str) else "n"
    return tag, value


def _merge_label(items: list[dict]) -> dict[str, Any]:
    if items[0]["kind"] == "moments":
        return {"kind": "moments", **_merge_moments(items)}
    counts: dict[tuple[str, Any], list] = {}
    for item in items:
        for value, count in item["counts"]:
            entry = counts.setdefault(_class_key(value), [value, 0])
            entry[1] += count
    return {"kind": "classes", "counts": list(counts.values())}


# ----------------------------------------------------------------------------------------------
# Fitted state


@dataclass(frozen=True)
class NumericColumn:
    """A numeric feature: missing -> `fill`, then `(value - shift) / scale`."""

    name: str
    fill: float
    shift: float
    scale: float


@dataclass(frozen=True)
class CategoricalColumn:
    """A categorical feature: its vocabulary (most frequent first) and the fill for missing."""

    name: str
    vocab: tuple[str, ...]
    fill: str | None


@dataclass(frozen=True)
class LabelState:
    """The label: sorted classes (classification) or mean/std (regression)."""

    name: str
    classes: tuple[Any, ...] | None
    mean: float = 0.0
    std: float = 1.0


def summarize_stats(stats: dict, missing: str) -> dict[str, int]:
    """Row accounting of merged statistics: how many rows training uses and drops."""
    dropped = stats["rows_incomplete"] if missing == "drop" else stats["rows_with_missing_label"]
    return {
        "rows": stats["rows"],
        "rows_with_missing_label": stats["rows_with_missing_label"],
        "rows_with_missing_feature": stats["rows_with_missing_feature"],
        "rows_dropped": dropped,
        "rows_used": stats["rows"] - dropped,
    }


def fit_preprocessor(
    stats: dict,
    spec: PreprocessSpec,
    *,
    features: list[str],
    numeric: list[str],
    categorical: list[str],
    label: str,
    task: str,
) -> Preprocessor:
    """Fit preprocessing from merged training-split statistics.

    Raises:
        DataError: The split has no usable rows, a classification label has fewer than two
            classes, or a numeric column has no value at all.
    """
    numeric, categorical = _split_features(features, numeric, categorical, label)
    if stats["label"] != label or stats["task"] != task:
        raise ValueError("statistics were computed for another label or task")
    if summarize_stats(stats, spec.missing)["rows_used"] <= 0:
        raise DataError(
            f"the training split has no usable rows ({stats['rows']} rows, "
            f"{stats['rows_with_missing_label']} without label {label!r}, "
            f"{stats['rows_with_missing_feature']} with a missing feature, missing={spec.missing})"
        )
    return Preprocessor(
        task=task,
        features=features,
        numeric=[
            _fit_numeric(name, _column_stats(stats, "numeric", name), spec) for name in numeric
        ],
        categorical=[
            _fit_categorical(name, _column_stats(stats, "categorical", name), spec)
            for name in categorical
        ],
        encoding=spec.categorical,
        missing=spec.missing,
        label=_fit_label(label, stats["label_stats"], task),
    )


def _split_features(
    features: list[str], numeric: list[str], categorical: list[str], label: str
) -> tuple[list[str], list[str]]:
    """Numeric and categorical columns in feature order, after checking they partition it."""
    if label in features:
        raise DataError(f"the label column {label!r} is also listed as a feature")
    both = set(numeric) & set(categorical)
    if both:
        raise DataError(f"columns {sorted(both)} are listed as both numeric and categorical")
    unknown = (set(numeric) | set(categorical)) - set(features)
    unassigned = set(features) - set(numeric) - set(categorical)
    if unknown or unassigned:
        raise DataError(
            f"numeric and categorical columns must cover the features exactly: not features "
            f"{sorted(unknown)}, features of neither kind {sorted(unassigned)}"
        )
    return [c for c in features if c in set(numeric)], [
        c for c in features if c in set(categorical)
    ]


def _column_stats(stats: dict, kind: str, name: str) -> dict:
    if name not in stats[kind]:
        raise ValueError(f"statistics have no {kind} column {name!r}")
    return stats[kind][name]


def _fit_numeric(name: str, stats: dict, spec: PreprocessSpec) -> NumericColumn:
    count = stats["count"]
    if count == 0:
        raise DataError(f"numeric column {name!r} is entirely missing in the training split")
    mean, std = stats["mean"], math.sqrt(stats["m2"] / count)
    fill = {"mean": mean, "drop": mean, "constant": spec.fill_value}.get(spec.missing)
    if fill is None:
        _, sample = _unpack_sample(stats["sample"])
        if sample.size == 0:
            raise ValueError(f"median fill needs a sample of {name!r}: sample_size was 0")
        fill = float(np.median(sample))
    if spec.scaling == "standard":
        shift, scale = mean, std if std > 0 else 1.0
    elif spec.scaling == "minmax":
        shift, span = stats["min"], stats["max"] - stats["min"]
        scale = span if span > 0 else 1.0
    else:
        shift, scale = 0.0, 1.0
    return NumericColumn(name=name, fill=float(fill), shift=float(shift), scale=float(scale))


def _fit_categorical(name: str, stats: dict, spec: PreprocessSpec) -> CategoricalColumn:
    ranked = sorted(stats["counts"].items(), key=lambda item: (-item[1], item[0]))
    vocab = tuple(value for value, _ in ranked[: spec.max_categories])
    fill = vocab[0] if vocab and spec.missing in ("mean", "median") else None
    return CategoricalColumn(name=name, vocab=vocab, fill=fill)


def _fit_label(label: str, stats: dict | None, task: str) -> LabelState:
    if stats is None:
        raise ValueError("statistics were computed without a label")
    if task == "regression":
        std = math.sqrt(stats["m2"] / stats["count"]) if stats["count"] else 0.0
        return LabelState(name=label, classes=None, mean=stats["mean"], std=std if std > 0 else 1.0)
    values = [value for value, _ in stats["counts"]]
    tags = {_class_key(value)[0] for value in values}
    if len(tags) > 1:
        raise DataError(
            f"label {label!r} mixes value types (numbers, strings, bools): {values[:5]}"
        )
    if len(values) < 2:
        raise DataError(
            f"classification label {label!r} has {len(values)} class(es) in the training split "
            f"({values}); it needs at least 2"
        )
    return LabelState(name=label, classes=tuple(sorted(values)))


# ----------------------------------------------------------------------------------------------
# The preprocessor


class Preprocessor:
    """Fitted preprocessing: turns Arrow tables into model-ready numpy arrays.

    The state is plain JSON (`to_dict`/`from_dict`), saved with the model so that training,
    serving and batch scoring apply exactly the same transform.
    """

    def __init__(
        self,
        *,
        task: str,
        features: Sequence[str],
        numeric: Sequence[NumericColumn],
        categorical: Sequence[CategoricalColumn],
        encoding: str,
        missing: str,
        label: LabelState,
    ) -> None:
        self.task = task
        self.features = list(features)
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.encoding = encoding
        self.missing = missing
        self.label = label
        self._value_sets: list[pa.Array] | None = None
        self._numeric_names = [column.name for column in self.numeric]
        # (k, 1) columns of fill, shift and scale: one vectorized pass over all numeric columns.
        self._fill, self._shift, self._scale = (
            np.array([[getattr(c, key)] for c in self.numeric], dtype=np.float64).reshape(-1, 1)
            for key in ("fill", "shift", "scale")
        )

    # -- shape ---------------------------------------------------------------------------------

    @property
    def num_inputs(self) -> int:
        """Width of `x`: numeric columns, plus one-hot columns with one-hot encoding."""
        width = len(self.numeric)
        if self.encoding == "onehot":
            width += sum(len(c.vocab) for c in self.categorical)
        return width

    def input_schema(self) -> dict[str, Any]:
        """What a model factory needs to know about its inputs and outputs."""
        index = self.encoding == "index"
        classes = self.label.classes
        return {
            "task": self.task,
            "num_inputs": self.num_inputs,
            "categorical_cardinalities": [len(c.vocab) + 1 for c in self.categorical]
            if index
            else [],
            "num_classes": len(classes) if classes is not None else None,
            "features": list(self.features),
            "numeric": [c.name for c in self.numeric],
            "categorical": [c.name for c in self.categorical],
            "label": self.label.name,
            "classes": list(classes) if classes is not None else None,
        }

    # -- transform -----------------------------------------------------------------------------

    def transform(self, table: pa.Table, *, with_label: bool = True) -> dict[str, np.ndarray]:
        """Encode a table: `x` float32 (n, num_inputs), `y`, and `x_cat` with index encoding.

        `y` is the class index (int64) for classification or the standardized target (float32)
        for regression. Rows that `drop_mask` marks are left out, so n may be smaller than the
        table; nothing else is dropped.

        Raises:
            DataError: A feature (or, with_label, the label) column is missing, a column has the
                wrong type, or a label value was not seen in training.
        """
        self._require(table, with_label)
        x, codes, dropped = self._encode(table, with_label)
        keep = None if not dropped.any() else ~dropped
        if keep is not None:
            x, codes = x[keep], codes[keep]
        out = {"x": x}
        if self.encoding == "index" and self.categorical:
            out["x_cat"] = codes + 1
        if with_label:
            column = table.column(self.label.name)
            out["y"] = self._encode_label(column if keep is None else column.filter(keep))
        return out

    def encode_rows(self, table: pa.Table) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every row's features (no label), in one pass, for prediction.

        Returns:
            `x` (and `x_cat` with index encoding) for all rows, and the mask of rows that
            `transform` would drop (a missing feature with `missing: drop`).

        Raises:
            DataError: A feature column is missing or has the wrong type.
        """
        self._require(table, False)
        x, codes, dropped = self._encode(table, False)
        out = {"x": x}
        if self.encoding == "index" and self.categorical:
            out["x_cat"] = codes + 1
        return out, dropped

    def drop_mask(self, table: pa.Table, *, with_label: bool = True) -> np.ndarray:
        """Boolean mask over the table's rows: True where `transform` drops the row.

        Rows drop when their label is missing (with_label), and with `missing: drop` when any
        feature is missing.
        """
        self._require(table, with_label)
        _, num_missing = self._numeric_x(table)
        _, cat_missing = self._category_codes(table)
        return self._dropped(table, num_missing, cat_missing, with_label)

    def inverse_label(self, y: np.ndarray) -> np.ndarray:
        """Map model outputs back: class indices -> original labels, standardized -> raw."""
        y = np.asarray(y)
        if self.label.classes is None:
            return y.astype(np.float64) * self.label.std + self.label.mean
        numpy_type = {pa.bool_(): np.bool_, pa.string(): np.str_, pa.int64(): np.int64}
        kind = numpy_type.get(_class_type(self.label.classes), np.float64)
        return np.asarray(self.label.classes, dtype=kind)[y.astype(np.int64)]

    def _require(self, table: pa.Table, with_label: bool) -> None:
        _require_columns(table, self.features + ([self.label.name] if with_label else []))

    def _encode(
        self, table: pa.Table, with_label: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x (one-hot columns set), category codes and the drop mask of every row."""
        x, num_missing = self._numeric_x(table)
        codes, cat_missing = self._category_codes(table)
        dropped = self._dropped(table, num_missing, cat_missing, with_label)
        if self.encoding == "onehot":
            self._one_hot(x, codes)
        return x, codes, dropped

    def _numeric_x(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """x with its numeric columns filled and scaled (any one-hot columns zero), and whether
        each row misses a numeric value (null, NaN or +-inf)."""
        n, k = table.num_rows, len(self.numeric)
        block = np.empty((k, n), dtype=np.float64)  # column-major: each column writes contiguously
        matrix = numeric_matrix(table, self._numeric_names) if k else None
        if matrix is not None:
            block[:] = matrix.T
        else:
            for j, column in enumerate(self.numeric):
                block[j] = _float_values(table, column.name)
        absent = ~np.isfinite(block)
        np.copyto(block, np.broadcast_to(self._fill, block.shape), where=absent)
        block -= self._shift
        block /= self._scale
        x = np.zeros((n, self.num_inputs), dtype=np.float32)
        x[:, :k] = block.T
        return x, np.asarray(absent.any(axis=0), dtype=bool)

    def _category_codes(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """Vocabulary index per categorical column (-1: unknown or unfilled missing), and
        whether any categorical value of the row is missing."""
        codes = np.empty((len(self.categorical), table.num_rows), dtype=np.int64)
        missing = np.zeros(table.num_rows, dtype=bool)
        for j, (column, value_set) in enumerate(zip(self.categorical, self._sets(), strict=True)):
            strings = _category_strings(table.column(column.name))
            codes[j] = pc.index_in(strings, value_set=value_set).fill_null(-1).to_numpy()
            nulls = np.asarray(strings.is_null().to_numpy(), dtype=bool)
            if column.fill is not None:
                codes[j][nulls] = column.vocab.index(column.fill)
            missing |= nulls
        return codes.T, missing

    def _sets(self) -> list[pa.Array]:
        if self._value_sets is None:
            self._value_sets = [pa.array(c.vocab, type=pa.string()) for c in self.categorical]
        return self._value_sets

    def _dropped(
        self, table: pa.Table, num_missing: np.ndarray, cat_missing: np.ndarray, with_label: bool
    ) -> np.ndarray:
        dropped = (
            num_missing | cat_missing if self.missing == "drop" else np.zeros_like(cat_missing)
        )
        if with_label:
            dropped |= _missing_label(table.column(self.label.name))
        return dropped

    def _one_hot(self, x: np.ndarray, codes: np.ndarray) -> None:
        """Set the one-hot columns of x (after the numeric ones); unknown codes stay all-zero."""
        offset = len(self.numeric)
        for j, column in enumerate(self.categorical):
            rows = np.flatnonzero(codes[:, j] >= 0)
            x[rows, offset + codes[rows, j]] = 1.0
            offset += len(column.vocab)

    def _encode_label(self, column: pa.ChunkedArray) -> np.ndarray:
        if self.label.classes is None:
            values = _numeric_values(pa.table({"y": column}), "y")
            return ((values - self.label.mean) / self.label.std).astype(np.float32)
        try:
            canonical = _class_column(column).cast(_class_type(self.label.classes))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(
                f"label {self.label.name!r} ({column.type}) does not match the training classes "
                f"{list(self.label.classes)[:10]}: {exc}"
            ) from exc
        value_set = pa.array(self.label.classes, type=canonical.type)
        index = pc.index_in(canonical, value_set=value_set)
        if index.null_count:
            unknown = canonical.filter(index.is_null())[0].as_py()
            raise DataError(
                f"label {self.label.name!r} has value {unknown!r}, not a class seen in training "
                f"({list(self.label.classes)[:10]})"
            )
        return np.asarray(index.to_numpy(), dtype=np.int64)

    # -- persistence ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fitted state as a JSON-able document."""
        return {
            "format": FORMAT,
            "task": self.task,
            "features": list(self.features),
            "encoding": self.encoding,
            "missing": self.missing,
            "numeric": [
                {"name": c.name, "fill": c.fill, "shift": c.shift, "scale": c.scale}
                for c in self.numeric
            ],
            "categorical": [
                {"name": c.name, "vocab": list(c.vocab), "fill": c.fill} for c in self.categorical
            ],
            "label": {
                "name": self.label.name,
                "classes": list(self.label.classes) if self.label.classes is not None else None,
                "mean": self.label.mean,
                "std": self.label.std,
            },
        }

    @classmethod
    def from_dict(cls, document: Any) -> Preprocessor:
        """Rebuild from `to_dict` output.

        Raises:
            DataError: The document is not a valid preprocessor (names the offending key).
        """
        return _parse_preprocessor(document)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Preprocessor(task={self.task!r}, numeric={len(self.numeric)}, "
            f"categorical={len(self.categorical)}, encoding={self.encoding!r}, "
            f"num_inputs={self.num_inputs})"
        )


def _class_type(classes: Sequence[Any]) -> pa.DataType:
    if all(isinstance(c, bool) for c in classes):
        return pa.bool_()
    if all(isinstance(c, str) for c in classes):
        return pa.string()
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return pa.int64()
    return pa.float64()


# ----------------------------------------------------------------------------------------------
# Parsing a saved document


def _field(document: Any, key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(document, dict) or key not in document:
        raise DataError(f"preprocessor document: {where}{key} is missing")
    value = document[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        raise DataError(f"preprocessor document: {where}{key} has the wrong type ({value!r})")
    return value


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _choice(document: Any, key: str, choices: Sequence[str]) -> str:
    value = _field(document, key, str, "")
    if value not in choices:
        raise DataError(
            f"preprocessor document: {key} must be one of {list(choices)}, got {value!r}"
        )
    return str(value)


def _parse_preprocessor(document: Any) -> Preprocessor:
    if _field(document, "format", int, "") != FORMAT:
        raise DataError(f"preprocessor document: format {document['format']!r} is not {FORMAT}")
    features = _field(document, "features", list, "")
    if not all(isinstance(name, str) for name in features):
        raise DataError("preprocessor document: features must be strings")
    numeric = [
        _parse_numeric(item, i) for i, item in enumerate(_field(document, "numeric", list, ""))
    ]
    categorical = [
        _parse_categorical(item, i)
        for i, item in enumerate(_field(document, "categorical", list, ""))
    ]
    named = [c.name for c in numeric] + [c.name for c in categorical]
    if sorted(named) != sorted(features):
        raise DataError("preprocessor document: numeric and categorical do not match features")
    return Preprocessor(
        task=_choice(document, "task", _TASKS),
        features=features,
        numeric=numeric,
        categorical=categorical,
        encoding=_choice(document, "encoding", _ENCODINGS),
        missing=_choice(document, "missing", _MISSING),
        label=_parse_label(_field(document, "label", dict, ""), document["task"]),
    )


def _parse_numeric(item: Any, i: int) -> NumericColumn:
    where = f"numeric[{i}]."
    values = {
        key: float(_field(item, key, (int, float), where)) for key in ("fill", "shift", "scale")
    }
    if not all(math.isfinite(v) for v in values.values()) or values["scale"] == 0:
        raise DataError(f"preprocessor document: {where} has a non-finite value or zero scale")
    return NumericColumn(name=_field(item, "name", str, where), **values)


def _parse_categorical(item: Any, i: int) -> CategoricalColumn:
    where = f"categorical[{i}]."
    vocab = _field(item, "vocab", list, where)
    if not all(isinstance(value, str) for value in vocab) or len(set(vocab)) != len(vocab):
        raise DataError(f"preprocessor document: {where}vocab must be distinct strings")
    fill = _field(item, "fill", (str, type(None)), where)
    if fill is not None and fill not in vocab:
        raise DataError(f"preprocessor document: {where}fill {fill!r} is not in the vocabulary")
    return CategoricalColumn(name=_field(item, "name", str, where), vocab=tuple(vocab), fill=fill)


def _parse_label(item: dict, task: str) -> LabelState:
    name = _field(item, "name", str, "label.")
    if task == "regression":
        mean = float(_field(item, "mean", (int, float), "label."))
        std = float(_field(item, "std", (int, float), "label."))
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise DataError("preprocessor document: label.mean/std must be finite, std > 0")
        return LabelState(name=name, classes=None, mean=mean, std=std)
    classes = _field(item, "classes", list, "label.")
    if len(classes) < 2 or len({_class_key(c) for c in classes}) != len(classes):
        raise DataError("preprocessor document: label.classes must hold 2+ distinct values")
    if not all(isinstance(c, (str, int, float)) for c in classes):
        raise DataError("preprocessor document: label.classes must be numbers, strings or bools")
    return LabelState(name=name, classes=tuple(classes))
