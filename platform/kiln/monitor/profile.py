"""Training profiles: per raw input feature, the statistics drift is measured against.

A numeric feature gets bin edges at training quantiles (so the bins hold roughly equal shares of
the training rows), exact counts per bin, the missing count, mean and std. A categorical one gets
the frequencies of its most common categories plus an "other" bucket. Live or scored inputs are
counted into the same bins (`Binner`), so drift is a comparison of two count vectors.

Bins of a numeric feature with edges e_0 < e_1 < ... < e_k (e_0 the training minimum, e_k the
maximum) are: `x < e_0`, `x == e_0`, `(e_0, e_1]`, ..., `(e_{k-1}, e_k]`, `x > e_k`. The two
open-ended outer bins catch values outside the training range; the `== e_0` bin keeps a point
mass at the minimum (a pixel that is mostly 0) apart from the rest. A constant feature has one
edge, so three bins: below, equal, above. Every feature also has a last bin for missing values
(null, NaN or infinite, as preprocessing treats them).

Profiles are built in two streaming passes over a dataset (`profile_dataset`): a mergeable
sketch per batch (exact count, min, max, mean, M2; quantiles at 101 levels; capped category
counts), merged on the driver as the partials arrive, then exact bin counts per batch. The
driver only ever holds these small partials, never rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.data.preprocess import numeric_matrix
from kiln.errors import DataError

logger = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
"""The registry document holding a model version's training profile."""
FORMAT = 1
LEVELS = np.linspace(0.0, 1.0, 101)
"""Quantile levels of a per-batch sketch."""
DEFAULT_BINS = 10
DEFAULT_TOP_K = 20
_MAX_DISTINCT = 1_000
"""Categories a partial keeps (its most frequent); the final top-K comes from these."""
_MERGE_EVERY = 16


@dataclass
class FeatureProfile:
    """One feature's training statistics and bins."""

    name: str
    kind: str
    """"numeric" or "categorical"."""
    count: int
    """Training rows with a value."""
    missing: int
    """Training rows without one (null, NaN, infinite)."""
    counts: list[int]
    """Training rows per bin, missing excluded (see the module docstring for the bins)."""
    edges: list[float] = field(default_factory=list)
    """Numeric: the bin edges, training minimum first and maximum last."""
    categories: list[str] = field(default_factory=list)
    """Categorical: the top categories; the last count is every other category."""
    mean: float | None = None
    std: float | None = None

    @property
    def width(self) -> int:
        """Bins including the missing one."""
        return len(self.counts) + 1

    def expected(self) -> np.ndarray:
        """Training counts per bin, the missing bin last."""
        return np.asarray([*self.counts, self.missing], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "count": self.count,
            "missing": self.missing,
            "counts": list(self.counts),
        }
        if self.kind == "numeric":
            document.update(edges=list(self.edges), mean=self.mean, std=self.std)
        else:
            document["categories"] = list(self.categories)
        return document

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> FeatureProfile:
        return cls(
            name=str(document["name"]),
            kind=str(document["kind"]),
            count=int(document["count"]),
            missing=int(document["missing"]),
            counts=[int(c) for c in document["counts"]],
            edges=[float(e) for e in document.get("edges", [])],
            categories=[str(c) for c in document.get("categories", [])],
            mean=document.get("mean"),
            std=document.get("std"),
        )


@dataclass
class Profile:
    """A model version's training profile: every raw input feature, in input order."""

    rows: int
    features: list[FeatureProfile]
    bins: int = DEFAULT_BINS
    top_k: int = DEFAULT_TOP_K

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "rows": self.rows,
            "bins": self.bins,
            "top_k": self.top_k,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> Profile:
        if int(document.get("format", 0)) != FORMAT:
            raise DataError(f"{PROFILE_FILE}: unknown format {document.get('format')!r}")
        return cls(
            rows=int(document["rows"]),
            features=[FeatureProfile.from_dict(f) for f in document["features"]],
            bins=int(document.get("bins", DEFAULT_BINS)),
            top_k=int(document.get("top_k", DEFAULT_TOP_K)),
        )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature(self, name: str) -> FeatureProfile:
        for item in self.features:
            if item.name == name:
                return item
        raise KeyError(name)


# ---- column values ---------------------------------------------------------------------------


def numeric_values(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """A column as float64 with NaN for every missing value (null, NaN, infinite)."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    checks = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean, pa.types.is_decimal)
    if not any(check(kind) for check in checks) and not pa.types.is_null(kind):
        raise DataError(f"numeric column {name!r} has type {column.type}, not a number")
    values = np.asarray(column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False))
    return np.where(np.isfinite(values), values, np.nan)


def category_values(column: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """A column as strings (None for null), as preprocessing reads categories."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return column.to_pylist()


def _numeric_matrix(table: pa.Table, names: list[str]) -> np.ndarray:
    """(rows, columns) float64 values of numeric columns, columns contiguous, null as NaN.

    Raises:
        DataError: a column is not numeric.
    """
    matrix = numeric_matrix(table, names)  # one Arrow call where the column kinds allow it
    if matrix is not None:
        return matrix.astype(np.float64, order="F", copy=False)
    values = np.empty((table.num_rows, len(names)), dtype=np.float64, order="F")
    for j, name in enumerate(names):
        values[:, j] = numeric_values(table.column(name), name)
    return values


# ---- pass 1: mergeable sketches --------------------------------------------------------------


def sketch_table(table: pa.Table, numeric: Sequence[str], categorical: Sequence[str]) -> dict:
    """One batch's partial statistics (JSON-able, a few KB per feature)."""
    sketch: dict[str, Any] = {"rows": table.num_rows, "numeric": {}, "categorical": {}}
    for name in numeric:
        values = numeric_values(table.column(name), name)
        present = values[~np.isnan(values)]
        part: dict[str, Any] = {"n": int(present.size), "missing": int(values.size - present.size)}
        if present.size:
            mean = float(present.mean())
            part.update(
                min=float(present.min()),
                max=float(present.max()),
                mean=mean,
                m2=float(((present - mean) ** 2).sum()),
                q=np.quantile(present, LEVELS, method="inverted_cdf").tolist(),
            )
        sketch["numeric"][name] = part
    for name in categorical:
        raw = category_values(table.column(name))
        present = [v for v in raw if v is not None]
        unique, counts = np.unique(
            np.asarray(present, dtype=object).astype(str), return_counts=True
        )
        top = np.argsort(-counts, kind="stable")[:_MAX_DISTINCT]
        sketch["categorical"][name] = {
            "n": len(present),
            "missing": len(raw) - len(present),
            "counts": {str(unique[i]): int(counts[i]) for i in top},
        }
    return sketch


def merge_sketches(parts: Sequence[dict]) -> dict:
    """One sketch for the union of the parts' rows (exact counts and moments; quantiles of the
    mixture of the parts' piecewise-linear CDFs, evaluated on their quantile points)."""
    merged: dict[str, Any] = {"rows": sum(p["rows"] for p in parts), "numeric": {}}
    for name in parts[0]["numeric"]:
        merged["numeric"][name] = _merge_numeric([p["numeric"][name] for p in parts])
    merged["categorical"] = {}
    for name in parts[0]["categorical"]:
        pieces = [p["categorical"][name] for p in parts]
        counts: dict[str, int] = {}
        for piece in pieces:
            for value, count in piece["counts"].items():
                counts[value] = counts.get(value, 0) + count
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_DISTINCT]
        merged["categorical"][name] = {
            "n": sum(p["n"] for p in pieces),
            "missing": sum(p["missing"] for p in pieces),
            "counts": dict(top),
        }
    return merged


def _merge_numeric(parts: list[dict]) -> dict:
    present = [p for p in parts if p["n"]]
    merged: dict[str, Any] = {
        "n": sum(p["n"] for p in parts),
        "missing": sum(p["missing"] for p in parts),
    }
    if not present:
        return merged
    n = merged["n"]
    mean = sum(p["n"] * p["mean"] for p in present) / n
    m2 = sum(p["m2"] + p["n"] * (p["mean"] - mean) ** 2 for p in present)
    merged.update(
        min=min(p["min"] for p in present),
        max=max(p["max"] for p in present),
        mean=mean,
        m2=m2,
        q=mixture_quantiles(
            [p["n"] for p in present], [np.asarray(p["q"]) for p in present], LEVELS
        ).tolist(),
    )
    return merged


def sketch_cdf(quantiles: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The right-continuous CDF of a quantile sketch (values at `LEVELS`) at `x`, linear
    between distinct quantile points; ties (point masses) give it jumps."""
    above = np.searchsorted(quantiles, x, side="right")  # quantile points <= x
    inside = (above > 0) & (above < len(quantiles))
    cdf = np.where(above >= len(quantiles), 1.0, 0.0)
    lo = np.clip(above - 1, 0, len(quantiles) - 1)
    hi = np.clip(above, 0, len(quantiles) - 1)
    span = quantiles[hi] - quantiles[lo]
    frac = np.divide(x - quantiles[lo], span, out=np.zeros_like(span), where=span > 0)
    between = LEVELS[lo] + frac * (LEVELS[hi] - LEVELS[lo])
    return np.where(inside, between, cdf)


def mixture_quantiles(
    weights: Sequence[int], sketches: Sequence[np.ndarray], levels: np.ndarray
) -> np.ndarray:
    """Quantiles at `levels` of the weighted mixture of sketches: the first point of the union
    of their quantile points where the mixture CDF reaches the level."""
    grid = np.unique(np.concatenate(sketches))
    total = float(sum(weights))
    cdf = sum(w * sketch_cdf(q, grid) for w, q in zip(weights, sketches, strict=True)) / total
    cdf = np.maximum.accumulate(np.asarray(cdf))
    index = np.searchsorted(cdf, levels - 1e-12, side="left")
    return np.asarray(grid[np.clip(index, 0, grid.size - 1)], dtype=np.float64)


# ---- bins ----------------------------------------------------------------------------------


def numeric_edges(sketch: dict, bins: int) -> list[float]:
    """Distinct edges at the sketch's quantiles 0, 1/bins, ..., 1 (min and max exact)."""
    if not sketch["n"]:
        return []
    levels = np.linspace(0.0, 1.0, bins + 1)
    inner = mixture_quantiles([1], [np.asarray(sketch["q"])], levels)
    edges = np.unique(np.concatenate([[sketch["min"]], inner, [sketch["max"]]]))
    edges = edges[(edges >= sketch["min"]) & (edges <= sketch["max"])]
    return [float(e) for e in edges]


def numeric_counts(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """One feature's bin counts (see `Binner`), the missing count last, from its float64 values
    with NaN for missing."""
    present = int(values.size - np.count_nonzero(np.isnan(values)))
    missing = int(values.size) - present
    if not len(edges):
        return np.asarray([present, missing], dtype=np.int64)
    above = np.asarray([np.count_nonzero(values > edge) for edge in edges], dtype=np.int64)
    from_min = int(np.count_nonzero(values >= edges[0]))
    inner = above[:-1] - above[1:]
    return np.concatenate([[present - from_min, from_min - above[0]], inner, [above[-1], missing]])


def category_counts(column: pa.ChunkedArray | pa.Array, categories: pa.Array) -> np.ndarray:
    """Counts per category of `categories` (a string array), then every other category, then
    missing (null), with values read as strings as `category_values` reads them."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    missing = column.null_count
    index = pc.index_in(column, value_set=categories)
    known = np.bincount(
        np.asarray(index.drop_null().to_numpy(), dtype=np.int64), minlength=len(categories)
    )
    other = len(column) - missing - int(known.sum())
    return np.concatenate([known, [other, missing]]).astype(np.int64)


def _numeric_width(edges: Sequence[float]) -> int:
    return len(edges) + 2 if len(edges) else 1


_SMALL_ROWS = 2048
"""Below this many rows, numeric features are binned in one broadcast comparison (per-call
numpy overhead dominates: one row of 64 features 0.1-0.15 ms, against 0.8 ms a feature at a
time); above it, one pass per feature and edge (memory-bound: 250k rows x 64 features 38 ms,
against 90 ms broadcast). Binning each value by binary search cost 2.2 ms and 534 ms."""
_CELLS = 1 << 22
"""Booleans one broadcast comparison may allocate."""


@dataclass
class Binner:
    """Counts raw feature values into a profile's bins: one flat int64 vector, each feature's
    bins followed by its missing bin, features in profile order.

    Numeric bins are counted, not assigned: with `gt_i` the values above edge `e_i` (NaN
    compares false, so missing values are in none), the bins are `present - ge_0` below,
    `ge_0 - gt_0` at the minimum, then `gt_{i-1} - gt_i`, the last being `gt_k` above the
    range. A comparison pass per edge costs ~0.15 ns a value; a binary search per value ~20 ns.
    """

    profile: Profile
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for item in self.profile.features:
            self.offsets.append(self.offsets[-1] + item.width)
        self._categories = {
            f.name: pa.array(f.categories, pa.string())
            for f in self.profile.features
            if f.kind == "categorical"
        }
        numeric = [(i, f) for i, f in enumerate(self.profile.features) if f.kind == "numeric"]
        self._numeric = [f.name for _, f in numeric]
        # Edges padded with +inf (nothing is above it) to one width, plus one padding column,
        # so that gt_{k} - gt_{k+1} is the above-range count for every feature.
        width = max((len(f.edges) for _, f in numeric), default=0) + 1
        self._edges = np.full((len(numeric), width), np.inf)
        gather: list[int] = []
        dest: list[int] = []
        for j, (i, item) in enumerate(numeric):
            self._edges[j, : len(item.edges)] = item.edges
            row = j * (width + 3)  # below, at minimum, `width` differences, missing
            bins = [0, 1, *range(2, 2 + len(item.edges))] if item.edges else [0]
            gather += [row + b for b in bins] + [row + width + 2]
            dest += range(self.offsets[i], self.offsets[i + 1])
        self._gather = np.asarray(gather, dtype=np.int64)
        self._dest = np.asarray(dest, dtype=np.int64)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def count(self, table: pa.Table) -> np.ndarray:
        """Bin counts of `table`'s rows (its columns named after the profile's features).

        Raises:
            DataError: a feature column is missing or not numeric where the profile says so.
        """
        columns = set(table.column_names)
        for item in self.profile.features:
            if item.name not in columns:
                raise DataError(f"column {item.name!r} is missing (found {table.column_names})")
        out = np.zeros(self.size, dtype=np.int64)
        small = table.num_rows < _SMALL_ROWS
        if small and self._numeric:
            out[self._dest] = self._small_numeric_counts(table)
        for item, start in zip(self.profile.features, self.offsets, strict=False):
            if item.kind == "categorical":
                counts = category_counts(table.column(item.name), self._categories[item.name])
            elif not small:
                counts = numeric_counts(
                    numeric_values(table.column(item.name), item.name), item.edges
                )
            else:
                continue
            out[start : start + item.width] = counts
        return out

    def _small_numeric_counts(self, table: pa.Table) -> np.ndarray:
        """Every numeric feature's bins at once, for a few rows (`_SMALL_ROWS`)."""
        values = _numeric_matrix(table, self._numeric).T  # (features, rows)
        rows = values.shape[1]
        finite = np.isfinite(values)
        present = np.count_nonzero(finite, axis=1)
        if not finite.all():
            values = np.where(finite, values, np.nan)
        edges = self._edges
        above = np.zeros(edges.shape, dtype=np.int64)
        step = max(1, _CELLS // edges.size)
        for start in range(0, rows, step):
            part = values[:, None, start : start + step]
            above += np.count_nonzero(part > edges[:, :, None], axis=2)
        from_min = np.count_nonzero(values >= edges[:, :1], axis=1)
        differences = above.copy()
        differences[:, :-1] -= above[:, 1:]
        full = np.column_stack([present - from_min, from_min - above[:, 0], differences])
        return np.column_stack([full, rows - present]).ravel()[self._gather]

    def split(self, counts: np.ndarray) -> list[np.ndarray]:
        """The flat vector cut into per-feature vectors (missing bin last)."""
        return [counts[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


# ---- profiles ------------------------------------------------------------------------------


def skeleton(sketch: dict, *, bins: int = DEFAULT_BINS, top_k: int = DEFAULT_TOP_K) -> Profile:
    """A profile with bins from a merged sketch; numeric bin counts are still zero (pass 2
    fills them), categorical counts are final."""
    features: list[FeatureProfile] = []
    for name, part in sketch["numeric"].items():
        edges = numeric_edges(part, bins)
        n = part["n"]
        std = float(np.sqrt(part["m2"] / n)) if n else None
        features.append(
            FeatureProfile(
                name,
                "numeric",
                n,
                part["missing"],
                [0] * (_numeric_width(edges)),
                edges=edges,
                mean=part.get("mean"),
                std=std,
            )
        )
    for name, part in sketch["categorical"].items():
        ranked = sorted(part["counts"].items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        top = [count for _, count in ranked]
        counts = [*top, part["n"] - sum(top)]
        categories = [value for value, _ in ranked]
        features.append(
            FeatureProfile(
                name, "categorical", part["n"], part["missing"], counts, categories=categories
            )
        )
    return Profile(int(sketch["rows"]), features, bins=bins, top_k=top_k)


def with_counts(profile: Profile, counts: np.ndarray) -> Profile:
    """The profile with numeric bin counts from a flat `Binner` vector of the same rows."""
    binner = Binner(profile)
    for item, part in zip(profile.features, binner.split(counts), strict=True):
        if item.kind == "numeric":
            item.counts = [int(c) for c in part[:-1]]
    return profile


def profile_table(
    table: pa.Table,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
) -> Profile:
    """The profile of one in-memory table (the same two passes `profile_dataset` streams)."""
    profile = skeleton(sketch_table(table, numeric, categorical), bins=bins, top_k=top_k)
    return with_counts(profile, Binner(profile).count(table))


def profile_dataset(
    ds: Any,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str] = (),
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
    num_cpus: float = 0.5,
    batch_size: int = 262_144,
) -> Profile:
    """The profile of a Ray dataset's raw feature columns, in two streaming passes.

    Each batch becomes one small JSON row (its sketch, then its bin counts); the driver merges
    them as they arrive and never holds rows.

    Raises:
        DataError: the dataset is empty or a feature column has the wrong type.
    """
    columns = [*numeric, *categorical]
    sketches = ds.select_columns(columns).map_batches(
        partial(_sketch_batch, numeric=list(numeric), categorical=list(categorical)),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
    merged = _merge_stream((json.loads(r["part"]) for r in sketches.iter_rows()), merge_sketches)
    if merged is None or not merged["rows"]:
        raise DataError("the training split is empty: no rows to profile")
    profile = skeleton(merged, bins=bins, top_k=top_k)
    if not any(f.kind == "numeric" for f in profile.features):
        return profile
    counted = ds.select_columns(columns).map_batches(
        partial(_count_batch, profile=profile.to_dict()),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=num_cpus,
    )
    total = np.zeros(Binner(profile).size, dtype=np.int64)
    for row in counted.iter_rows():
        total += np.asarray(json.loads(row["part"]), dtype=np.int64)
    logger.info("profiled %d training rows over %d features", profile.rows, len(columns))
    return with_counts(profile, total)


def _sketch_batch(table: pa.Table, numeric: list[str], categorical: list[str]) -> pa.Table:
    return pa.table({"part": [json.dumps(sketch_table(table, numeric, categorical))]})


def _count_batch(table: pa.Table, profile: dict[str, Any]) -> pa.Table:
    counts = Binner(Profile.from_dict(profile)).count(table)
    return pa.table({"part": [json.dumps(counts.tolist())]})


def _merge_stream(parts: Iterable[dict], merge: Any) -> dict | None:
    merged: dict | None = None
    pending: list[dict] = []
    for part in parts:
        pending.append(part)
        if len(pending) >= _MERGE_EVERY:
            merged = merge(pending if merged is None else [merged, *pending])
            pending = []
    if pending:
        merged = merge(pending if merged is None else [merged, *pending])
    return merged


def merge_profiles(profiles: Sequence[Profile]) -> Profile:
    """Profiles with the same bins added together (e.g. two shards profiled apart).

    Raises:
        DataError: the profiles' features or bins differ.
    """
    first = profiles[0]
    for other in profiles[1:]:
        same = [(f.name, f.kind, f.edges, f.categories) for f in first.features] == [
            (f.name, f.kind, f.edges, f.categories) for f in other.features
        ]
        if not same:
            raise DataError("profiles with different features or bins cannot be merged")
    features = []
    for index, item in enumerate(first.features):
        parts = [p.features[index] for p in profiles]
        n = sum(p.count for p in parts)
        mean = (
            sum(p.count * (p.mean or 0.0) for p in parts) / n
            if n and item.kind == "numeric"
            else None
        )
        std = None
        if mean is not None:
            m2 = sum(p.count * ((p.std or 0.0) ** 2 + ((p.mean or 0.0) - mean) ** 2) for p in parts)
            std = float(np.sqrt(m2 / n))
        features.append(
            FeatureProfile(
                item.name,
                item.kind,
                n,
                sum(p.missing for p in parts),
                [int(sum(c)) for c in zip(*(p.counts for p in parts), strict=True)],
                edges=list(item.edges),
                categories=list(item.categories),
                mean=mean,
                std=std,
            )
        )
    return Profile(sum(p.rows for p in profiles), features, bins=first.bins, top_k=first.top_k)
