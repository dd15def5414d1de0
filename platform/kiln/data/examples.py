"""Example datasets written as sharded parquet: digits for demos, synthetic data for scale, and
the Python standard library's sources as a text corpus for language models.

Nothing is downloaded (scikit-learn ships digits inside its package; the sources are this
interpreter's own). digits and synth write `out/train/part-00000.parquet ...` and
`out/test/part-...`; python-stdlib writes `out/train/`, `out/validation/` and
`out/prompts.parquet`. Everything is written under `out/.tmp-<uuid>` and renamed into place so a
crash never leaves half a dataset behind.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import re
import shutil
import sysconfig
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kiln.errors import DataError
from kiln.progress import Progress

logger = logging.getLogger(__name__)

LABEL = "label"
SPLITS = ("train", "test")


def write_digits(
    out: str | Path,
    *,
    shards: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write scikit-learn's 8x8 digits (1797 rows, 10 classes) as a stratified train/test split.

    Features are `px_00`..`px_63`, raw pixel intensities 0..16 as float32 (scaling is left to
    preprocessing); `label` is int64.

    Returns:
        A summary: rows per split, feature names, classes, shard counts and split paths.

    Raises:
        DataError: A bad option, or `out` already holds data and `overwrite` is False.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _require(shards >= 1, "--shards must be >= 1")
    _require(0.0 < test_fraction < 1.0, "--test-fraction must be between 0 and 1 (exclusive)")
    out = Path(out)
    _check_target(out, overwrite)
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    names = [f"px_{i:02d}" for i in range(x.shape[1])]
    parts = {"train": (x_train, y_train), "test": (x_test, y_test)}
    progress = Progress("writing digits", total=len(y), unit="rows")
    with progress, _staging(out, overwrite) as staging:
        counts = {
            split: _write_array_shards(staging / split, names, features, labels, shards, progress)
            for split, (features, labels) in parts.items()
        }
    summary = _summary(out, "digits", {s: len(parts[s][1]) for s in SPLITS}, names, counts)
    summary.update(classes=10, task="classification", seed=seed)
    logger.info("wrote digits to %s: %s", out, summary["rows"])
    return summary


def _write_array_shards(
    directory: Path,
    names: list[str],
    features: np.ndarray,
    labels: np.ndarray,
    shards: int,
    progress: Progress,
) -> int:
    directory.mkdir(parents=True)
    pieces = np.array_split(np.arange(len(labels)), min(shards, len(labels)))
    for index, rows in enumerate(pieces):
        columns = {name: features[rows, j] for j, name in enumerate(names)}
        table = pa.table({**columns, LABEL: labels[rows]})
        pq.write_table(table, directory / f"part-{index:05d}.parquet")
        progress.advance(table.num_rows)
    return len(pieces)


# ---------------------------------------------------------------------------------------------
# Synthetic data


@dataclass(frozen=True)
class _Teacher:
    """A fixed random network that turns features into labels, so the task is learnable."""

    task: str
    scale: np.ndarray  # per-feature scale and shift of the raw columns
    shift: np.ndarray
    informative: np.ndarray  # feature indices the teacher reads
    linear: np.ndarray  # (informative, outputs)
    hidden_in: np.ndarray  # (informative, hidden)
    hidden_out: np.ndarray  # (hidden, outputs)
    levels: tuple[int, ...]  # categories per categorical column
    embeddings: tuple[np.ndarray, ...]  # (levels, outputs) per categorical column

    def outputs(self, z: np.ndarray, codes: list[np.ndarray]) -> np.ndarray:
        """Teacher logits (classification) or target (regression) for standardised features."""
        zi = z[:, self.informative]
        # A gain of 2 pushes tanh out of its linear range: a linear model leaves accuracy on
        # the table that an MLP can pick up.
        hidden = np.tanh(2.0 * (zi @ self.hidden_in) / math.sqrt(zi.shape[1]))
        out = zi @ self.linear + hidden @ self.hidden_out
        for table, code in zip(self.embeddings, codes, strict=True):
            out += table[code]
        return out


def write_synth(
    out: str | Path,
    *,
    rows: int,
    features: int,
    classes: int = 2,
    shards: int = 4,
    task: str = "classification",
    informative: int | None = None,
    categorical: int = 0,
    missing_fraction: float = 0.0,
    test_fraction: float = 0.1,
    seed: int = 0,
    rows_per_group: int = 64_000,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a large synthetic tabular dataset shard by shard, in bounded memory.

    A fixed random teacher (linear plus a tanh hidden layer, seeded by `seed`) maps features to
    classification logits (label = argmax) or a regression target (plus 10% noise). Numeric
    columns `feat_000..` are float32 with per-column scale and shift; `categorical` string
    columns `cat_00..` also feed the teacher. `missing_fraction` of feature values are then set
    to NaN/null (labels are never missing). Each shard draws from its own seeded generator, one
    row group of `rows_per_group` rows at a time, so the output is reproducible and memory stays
    around `rows_per_group * features * 8` bytes however many rows are written.

    Returns:
        A summary: rows and shards per split, feature names, classes, task and split paths.

    Raises:
        DataError: An option is out of range (the message names it as the CLI spells it), or
            `out` already holds data and `overwrite` is False.
    """
    _validate_synth(rows, features, classes, shards, task, informative, categorical)
    _require(0.0 <= missing_fraction < 1.0, "--missing-fraction must be in [0, 1)")
    _require(0.0 < test_fraction < 1.0, "--test-fraction must be between 0 and 1 (exclusive)")
    _require(rows_per_group >= 1, "--rows-per-group must be >= 1")
    n_test = max(1, round(rows * test_fraction))
    _require(rows - n_test >= 1, f"--rows must be >= 2 to leave rows for train and test: {rows}")
    out = Path(out)
    _check_target(out, overwrite)
    teacher = _make_teacher(seed, task, classes, features, informative, categorical)
    names = _synth_names(features, categorical)
    sizes = {"train": rows - n_test, "test": n_test}
    split_shards = {"train": shards, "test": max(1, math.ceil(shards * test_fraction))}
    progress = Progress("writing synth", total=rows, unit="rows")
    with progress, _staging(out, overwrite) as staging:
        counts = {}
        for split_id, split in enumerate(SPLITS):
            shard_rows = _even(sizes[split], min(split_shards[split], sizes[split]))
            for index, count in enumerate(shard_rows):
                path = staging / split / f"part-{index:05d}.parquet"
                rng = np.random.default_rng([seed, split_id, index])
                groups = _synth_groups(teacher, rng, count, rows_per_group, missing_fraction)
                _write_groups(path, groups, names, progress)
            counts[split] = len(shard_rows)
    summary = _summary(out, "synth", sizes, names, counts)
    summary.update(
        classes=classes if task == "classification" else None,
        task=task,
        seed=seed,
        informative=len(teacher.informative),
        categorical=[name for name in names if name.startswith("cat_")],
        missing_fraction=missing_fraction,
    )
    logger.info("wrote synth to %s: %s", out, summary["rows"])
    return summary


def _validate_synth(
    rows: int,
    features: int,
    classes: int,
    shards: int,
    task: str,
    informative: int | None,
    categorical: int,
) -> None:
    _require(rows >= 1, f"--rows must be >= 1, got {rows}")
    _require(features >= 1, f"--features must be >= 1, got {features}")
    _require(shards >= 1, f"--shards must be >= 1, got {shards}")
    tasks = ("classification", "regression")
    _require(task in tasks, f"--task must be classification or regression, got {task!r}")
    if task == "classification":
        _require(classes >= 2, f"--classes must be >= 2 for classification, got {classes}")
    if informative is not None:
        _require(1 <= informative <= features, f"--informative must be 1..{features} (--features)")
    _require(categorical >= 0, f"--categorical must be >= 0, got {categorical}")


def _make_teacher(
    seed: int, task: str, classes: int, features: int, informative: int | None, categorical: int
) -> _Teacher:
    rng = np.random.default_rng([seed, 0x7EAC])
    outputs = classes if task == "classification" else 1
    k = informative if informative is not None else min(features, 32)
    hidden = 16

    def normal(shape: tuple[int, int], scale: float) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    levels = tuple(int(n) for n in rng.integers(3, 12, size=categorical))
    return _Teacher(
        task=task,
        scale=rng.uniform(0.5, 5.0, size=features).astype(np.float32),
        shift=rng.uniform(-3.0, 3.0, size=features).astype(np.float32),
        informative=np.sort(rng.choice(features, size=k, replace=False)),
        linear=normal((k, outputs), 1.0 / math.sqrt(k)),
        hidden_in=normal((k, hidden), 1.0),
        hidden_out=normal((hidden, outputs), 2.0 / math.sqrt(hidden)),
        levels=levels,
        embeddings=tuple(normal((n, outputs), 0.5) for n in levels),
    )


def _synth_names(features: int, categorical: int) -> list[str]:
    width = max(3, len(str(features - 1)))
    cat_width = max(2, len(str(max(categorical - 1, 0))))
    numeric = [f"feat_{i:0{width}d}" for i in range(features)]
    return numeric + [f"cat_{i:0{cat_width}d}" for i in range(categorical)]


def _even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _synth_groups(
    teacher: _Teacher, rng: np.random.Generator, count: int, group: int, missing: float
) -> Iterator[list[pa.Array]]:
    """Yield one row group at a time as arrays: numeric features, categoricals, label."""
    for start in range(0, count, group):
        n = min(group, count - start)
        z = rng.standard_normal((n, len(teacher.scale)), dtype=np.float32)
        codes = [rng.integers(0, levels, size=n) for levels in teacher.levels]
        label = _synth_label(teacher, rng, teacher.outputs(z, codes))
        x = z * teacher.scale + teacher.shift
        if missing > 0:
            x[rng.random(x.shape) < missing] = np.nan
        arrays = [pa.array(x[:, j]) for j in range(x.shape[1])]
        for code in codes:
            mask = rng.random(n) < missing if missing > 0 else None
            words = np.array([f"v{i}" for i in range(int(code.max(initial=0)) + 1)])[code]
            arrays.append(pa.array(words, type=pa.string(), mask=mask))
        yield [*arrays, pa.array(label)]


def _synth_label(teacher: _Teacher, rng: np.random.Generator, out: np.ndarray) -> np.ndarray:
    if teacher.task == "classification":
        return np.argmax(out, axis=1).astype(np.int64)
    target = out[:, 0]
    noise = 0.1 * float(np.std(target) or 1.0) * rng.standard_normal(len(target))
    return (target + noise).astype(np.float32)


def _write_groups(
    path: Path, groups: Iterator[list[pa.Array]], names: list[str], progress: Progress
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    try:
        for arrays in groups:
            table = pa.Table.from_arrays(arrays, names=[*names, LABEL])
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            progress.advance(table.num_rows)
    finally:
        if writer is not None:
            writer.close()


# ---------------------------------------------------------------------------------------------
# Python standard library sources: a text corpus for language modeling


STDLIB_SPLITS = ("train", "validation", "prompts.parquet")
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Directories under the standard library that are not part of it (or hold no sources)."""
_SIGNATURE = re.compile(r"^def [A-Za-z_]\w*\(.*\).*:[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class _SourceFile:
    path: str  # relative to the standard library root, with forward slashes
    text: str


def write_python_stdlib(
    out: str | Path,
    *,
    shards: int = 4,
    validation_fraction: float = 0.05,
    prompts: int = 16,
    seed: int = 0,
    root: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the `.py` sources of this interpreter's standard library as a text corpus.

    Every `.py` file under `sysconfig.get_paths()["stdlib"]` is one row, `path` (relative, with
    `/`) and `text` (the whole file), in path order. Directories named site-packages,
    dist-packages and __pycache__ are skipped; the standard library's own test suite (`test/`,
    `idlelib/idle_test/`, ...) and large generated modules (`pydoc_data/topics.py`) are kept,
    as they are Python too. Files that are not valid UTF-8 (a few deliberately mis-encoded test
    fixtures) are skipped and listed in the summary. A file goes to validation when a hash of
    its path and `seed` falls below `validation_fraction`, so the split is the same on every
    run with the same interpreter and seed and a file never lands on both sides.

    Output: `out/train/part-*.parquet` (`shards` files of about equal size),
    `out/validation/part-*.parquet` (shards in proportion) and `out/prompts.parquet`, a
    `prompt` column of `prompts` top-level function signatures (`def name(...):` plus a
    newline, at most `MAX_PROMPT_BYTES` bytes) taken from validation files, for batch
    generation.

    Args:
        root: Read this directory instead of the standard library (tests).

    Returns:
        A summary: files found and skipped, documents and bytes per split, shards, paths.

    Raises:
        DataError: A bad option, no source files, or existing output without `overwrite`.
    """
    _require(shards >= 1, f"--shards must be >= 1, got {shards}")
    _require(0.0 < validation_fraction < 1.0, "validation_fraction must be between 0 and 1")
    _require(prompts >= 0, f"prompts must be >= 0, got {prompts}")
    source = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    out = Path(out)
    _check_target(out, overwrite, STDLIB_SPLITS)
    with Progress("reading python-stdlib", unit="files") as progress:
        files, skipped = _read_sources(source, progress)
    _require(len(files) >= 2, f"need at least 2 readable .py files under {source}")
    parts = _split_files(files, seed, validation_fraction)
    split_shards = {"train": shards, "validation": max(1, math.ceil(shards * validation_fraction))}
    chosen = _signature_prompts(parts["validation"], parts["train"], prompts, seed)
    with _staging(out, overwrite, STDLIB_SPLITS) as staging:
        counts = {
            split: _write_text_shards(staging / split, rows, split_shards[split])
            for split, rows in parts.items()
        }
        pq.write_table(
            pa.table({"prompt": pa.array(chosen, pa.string())}), staging / "prompts.parquet"
        )
    summary = _stdlib_summary(out, source, parts, counts, skipped, len(chosen), seed)
    logger.info("wrote python-stdlib to %s: %s", out, summary["documents"])
    return summary


def _read_sources(root: Path, progress: Progress) -> tuple[list[_SourceFile], list[str]]:
    """Every `.py` file under root in path order, and the paths skipped as not UTF-8."""
    _require(root.is_dir(), f"{root} is not a directory")
    files: list[_SourceFile] = []
    skipped: list[str] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_SKIP_DIRS)
        for name in sorted(names):
            path = Path(directory) / name
            if not name.endswith(".py") or not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            try:
                files.append(_SourceFile(relative, path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError:
                skipped.append(relative)
            progress.advance()
    files.sort(key=lambda f: f.path)
    return files, sorted(skipped)


def _path_hash(text: str, seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big")


def _write_text_shards(directory: Path, files: list[_SourceFile], shards: int) -> int:
    """Contiguous runs of files (in path order) of about equal total size, one Parquet each."""
    directory.mkdir(parents=True)
    sizes = np.array([len(f.text) for f in files], dtype=np.float64)
    starts = np.cumsum(sizes) - sizes
    owner = np.minimum((starts / max(sizes.sum(), 1.0) * shards).astype(np.int64), shards - 1)
    groups = [[f for f, o in zip(files, owner, strict=True) if o == i] for i in range(shards)]
    groups = [rows for rows in groups if rows]  # fewer files than shards: no empty files
    for index, rows in enumerate(groups):
        table = pa.table(
            {
                "path": pa.array([f.path for f in rows], pa.string()),
                "text": pa.array([f.text for f in rows], pa.string()),
            }
        )
        pq.write_table(table, directory / f"part-{index:05d}.parquet")
    return len(groups)


def _split_files(
    files: list[_SourceFile], seed: int, fraction: float
) -> dict[str, list[_SourceFile]]:
    """train/validation by a hash of the path; validation gets at least the lowest-hash file."""
    hashes = [_path_hash(f.path, seed) for f in files]
    chosen = {i for i, h in enumerate(hashes) if h < fraction * 2**64}
    if not chosen:
        chosen = {min(range(len(files)), key=hashes.__getitem__)}
    return {
        "train": [f for i, f in enumerate(files) if i not in chosen],
        "validation": [f for i, f in enumerate(files) if i in chosen],
    }


MAX_PROMPT_BYTES = 60
"""Longest prompt kept: with the end-of-text id and 64 generated tokens it fits a 128-token
byte-level context (jobs/configs/tiny-gpt.yaml)."""


def _signature_prompts(
    preferred: list[_SourceFile], fallback: list[_SourceFile], count: int, seed: int
) -> list[str]:
    """`count` distinct top-level `def` lines, from `preferred` files first, picked by hash."""
    chosen: list[str] = []
    for files in (preferred, fallback):
        found = {
            line
            for f in files
            for m in _SIGNATURE.finditer(f.text)
            if len((line := m.group(0).rstrip() + "\n").encode("utf-8")) <= MAX_PROMPT_BYTES
        }
        fresh = sorted(found - set(chosen), key=lambda s: (_path_hash(s, seed), s))
        chosen.extend(fresh[: count - len(chosen)])
    return chosen


def _stdlib_summary(
    out: Path,
    source: Path,
    parts: dict[str, list[_SourceFile]],
    shards: dict[str, int],
    skipped: list[str],
    prompts: int,
    seed: int,
) -> dict[str, Any]:
    documents = {split: len(rows) for split, rows in parts.items()}
    return {
        "dataset": "python-stdlib",
        "source": str(source),
        "python": platform.python_version(),
        "files": sum(documents.values()) + len(skipped),
        "skipped_not_utf8": skipped,
        "documents": documents,
        "bytes": {
            split: sum(len(f.text.encode("utf-8")) for f in rows) for split, rows in parts.items()
        },
        "columns": ["path", "text"],
        "text": "text",
        "shards": shards,
        "prompts": prompts,
        "seed": seed,
        "paths": {
            "train": str(out / "train"),
            "validation": str(out / "validation"),
            "prompts": str(out / "prompts.parquet"),
        },
    }


# ---------------------------------------------------------------------------------------------
# Atomic output


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(message)


def _check_target(out: Path, overwrite: bool, names: Sequence[str] = SPLITS) -> None:
    """Refuse to replace existing output without `overwrite`: split directories, and single
    files (names ending in `.parquet`)."""
    for name in names:
        existing = out / name
        if name.endswith(".parquet"):
            if existing.is_dir():
                raise DataError(f"{existing} exists and is a directory")
            if not overwrite and existing.exists():
                raise DataError(f"{existing} already exists; pass --overwrite to replace it")
            continue
        if not overwrite and existing.is_dir() and any(existing.iterdir()):
            raise DataError(
                f"{existing} already exists and is not empty; pass --overwrite to replace it"
            )
        if existing.exists() and not existing.is_dir():
            raise DataError(f"{existing} exists and is not a directory")


@contextmanager
def _staging(out: Path, overwrite: bool, names: Sequence[str] = SPLITS) -> Iterator[Path]:
    """Yield `out/.tmp-<uuid>` to write into; on success move each of `names` from it into
    `out`."""
    tmp = out / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _check_target(out, overwrite, names)  # nobody wrote there meanwhile
        for split in names:
            target = out / split
            if target.exists():
                target.rename(tmp / f"old-{split}")  # deleted with the staging dir
            (tmp / split).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(
    out: Path, name: str, rows: dict[str, int], names: list[str], shards: dict[str, int]
) -> dict[str, Any]:
    return {
        "dataset": name,
        "rows": rows,
        "features": names,
        "label": LABEL,
        "shards": shards,
        "paths": {split: str(out / split) for split in SPLITS},
    }
