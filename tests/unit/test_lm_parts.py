"""Language-modeling pieces that need no Ray: the spec, text-file checks, the token loss and
meter, and how the predictor cuts stop sequences."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kiln.config import validate_spec
from kiln.data.source import check_text_files, resolve_files
from kiln.errors import DataError, SpecError
from kiln.inference.lm import _first_stop, _partial_stop
from kiln.train.lm import IGNORE, token_loss
from kiln.train.metrics import LanguageModelMeter


def lm_raw(**data: object) -> dict[str, object]:
    return {
        "name": "lm",
        "data": {"train": "corpus", "validation_split": 0.1, "task": "language_modeling", **data},
        "model": {"kind": "causal_lm"},
    }


def test_language_modeling_spec_defaults_and_refusals() -> None:
    spec = validate_spec(lm_raw())
    assert (spec.metric, spec.mode) == ("val_loss", "min")
    assert (spec.data.text, spec.data.tokenizer.kind, spec.data.block_size) == ("text", "byte", 128)

    raw = lm_raw()
    raw["train"] = {"metric": "val_perplexity"}
    assert validate_spec(raw).mode == "min"
    raw["train"] = {"metric": "val_accuracy"}
    with pytest.raises(SpecError, match="val_accuracy.*language_modeling"):
        validate_spec(raw)
    with pytest.raises(SpecError, match=r"data\.label and data\.features do not apply"):
        validate_spec(lm_raw(label="y"))
    with pytest.raises(SpecError, match=r"needs data\.tokenizer\.path"):
        validate_spec(lm_raw(tokenizer={"kind": "file"}))
    with pytest.raises(SpecError, match=r"data\.label: required for task classification"):
        validate_spec({"name": "t", "data": {"train": "x", "validation_split": 0.1}})


def test_text_files_are_checked_naming_file_and_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "a.parquet")
    info = check_text_files(resolve_files(str(tmp_path), "parquet"), column="text")
    assert (info.features, info.num_rows) == (("text",), 2)

    pq.write_table(pa.table({"body": ["c"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"'text' \(data\.text\) not found in \S*b\.parquet"):
        check_text_files(resolve_files(str(tmp_path), "parquet"), column="text")

    (tmp_path / "b.parquet").unlink()
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"text column 'text' is int64 in \S*c\.parquet"):
        check_text_files(resolve_files(str(tmp_path), "parquet"), column="text")


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


def test_token_loss_ignores_padding_and_counts_targets() -> None:
    torch.manual_seed(0)
    model = Bigram(5)
    ids = torch.tensor([[1, 2, 3, 0]])
    labels = torch.tensor([[2, 3, 4, IGNORE]])
    loss, count = token_loss(model, {"input_ids": ids, "labels": labels})
    assert count == 3
    logits = model(ids)[0, :3]
    expected = torch.nn.functional.cross_entropy(logits, labels[0, :3])
    assert torch.allclose(loss, expected)
    total, _ = token_loss(model, {"input_ids": ids, "labels": labels}, reduction="sum")
    assert torch.allclose(total, expected * 3)


def test_meter_gives_per_token_loss_and_perplexity() -> None:
    meter = LanguageModelMeter()
    meter.update(6.0, 4)
    meter.update(2.0, 4)
    assert meter.compute() == {"loss": 1.0, "perplexity": math.e}
    assert LanguageModelMeter().compute() == {}


def test_stop_sequences_are_found_and_partial_ones_held_back() -> None:
    assert _first_stop("a = 1\nreturn", ["\n\n", "return"]) == 6
    assert _first_stop("abc", ["x"]) is None
    assert _first_stop("abc", []) is None
    # "\ndef" could still become "\ndef ", so those 4 characters wait.
    assert _partial_stop("x = 1\ndef", ["\ndef "]) == 4
    assert _partial_stop("x = 1\n", ["\ndef ", "\n\n"]) == 1
    assert _partial_stop("x = 1", ["\ndef "]) == 0
