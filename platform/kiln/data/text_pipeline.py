"""Ray Data glue for language modeling: fit the tokenizer, pack documents, count tokens.

Like the tabular pipeline, nothing here materialises the corpus on the driver: packing is a
`map_batches` over the documents (whole blocks, so it fuses into the read tasks), token counts
come back as one small row per block, and a BPE tokenizer trains on a stream of the training
split capped at `data.tokenizer.train_sample_mb`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np
import pyarrow as pa
import ray.data

from kiln.config.spec import DataSpec
from kiln.data.text import TextPreprocessor, build_tokenizer, take_megabytes, token_counts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenStats:
    """Packed sequences, target tokens and per-id target counts of one split."""

    sequences: int
    tokens: int
    counts: np.ndarray


def fit_text_preprocessor(ds: ray.data.Dataset, spec: DataSpec) -> TextPreprocessor:
    """The tokenizer `data.tokenizer` asks for (a BPE one trained on `ds`), with the packing
    settings of `spec`."""
    texts = None
    if spec.tokenizer.kind == "bpe":
        texts = _text_sample(ds, spec.text, spec.tokenizer.train_sample_mb)
    tokenizer = build_tokenizer(spec.tokenizer, texts)
    logger.info("tokenizer %s: %d ids", spec.tokenizer.kind, tokenizer.vocab_size)
    return TextPreprocessor(tokenizer, block_size=spec.block_size, text_column=spec.text)


def _text_sample(ds: ray.data.Dataset, column: str, megabytes: float) -> Iterator[str]:
    """Documents of `ds` in order until `megabytes` (10^6 bytes) of UTF-8 text were yielded;
    the driver sees one batch at a time, and the stream stops there."""
    return take_megabytes(_texts(ds, column), megabytes)


def _texts(ds: ray.data.Dataset, column: str) -> Iterator[str | None]:
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=512):
        yield from cast(pa.Table, batch).column(column).to_pylist()


def pack_dataset(
    ds: ray.data.Dataset, pre: TextPreprocessor, *, num_cpus: float = 0.5
) -> ray.data.Dataset:
    """Documents -> packed blocks of `input_ids` and `labels` (int32, block_size wide).

    Whole Ray blocks are packed at once, so only the last sequence of each block is padded.
    """
    return ds.map_batches(
        partial(_pack, pre=pre), batch_format="pyarrow", batch_size=None, num_cpus=num_cpus
    )


def _pack(table: pa.Table, pre: TextPreprocessor) -> dict[str, np.ndarray]:
    return pre.transform_batch(table)


def token_statistics(ds: ray.data.Dataset, vocab_size: int, *, num_cpus: float = 0.5) -> TokenStats:
    """Count the packed sequences and target tokens of a packed dataset, streaming."""
    partials = ds.map_batches(
        partial(_count, vocab_size=vocab_size),
        batch_format="numpy",
        batch_size=None,
        num_cpus=num_cpus,
    )
    sequences, counts = 0, np.zeros(vocab_size, dtype=np.int64)
    for row in partials.iter_rows():
        sequences += int(row["sequences"])
        counts += np.asarray(row["counts"], dtype=np.int64)
    return TokenStats(sequences, int(counts.sum()), counts)


def _count(batch: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    labels = batch["labels"]
    counts = token_counts(labels, vocab_size) if len(labels) else np.zeros(vocab_size, np.int64)
    return {"sequences": np.array([len(labels)]), "counts": counts[np.newaxis, :]}
