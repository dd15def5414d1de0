"""`kiln retrain` without Ray: the gate rule, spec and CLI errors, freezing, holdout scoring."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from torch import nn

from kiln.cli.main import main
from kiln.config import validate_spec
from kiln.data.preprocess import LabelState, NumericColumn, Preprocessor
from kiln.data.source import resolve_files
from kiln.errors import SpecError
from kiln.models import build_model
from kiln.registry import ModelVersion, Registry
from kiln.train.export import model_document
from kiln.train.retrain import (
    check_compatible,
    describe_decision,
    passes_gate,
    score_holdout,
    with_retrain_options,
)
from kiln.train.warmstart import freeze_parameters, frozen_names


def spec(**retrain: Any) -> Any:
    raw: dict[str, Any] = {
        "name": "digits-mlp",
        "data": {"train": "old", "validation": "test", "label": "label"},
        "model": {"kind": "tabular_mlp", "hidden_sizes": [64, 32]},
    }
    if retrain:
        raw["retrain"] = retrain
    return validate_spec(raw)


@pytest.mark.parametrize(
    ("old", "new", "mode", "margin", "passes"),
    [
        (0.90, 0.95, "max", 0.0, True),  # better
        (0.90, 0.90, "max", 0.0, True),  # equal is not worse
        (0.90, 0.89, "max", 0.0, False),
        (0.90, 0.89, "max", 0.02, True),  # worse, within the margin
        (0.90, 0.87, "max", 0.02, False),  # worse by more than the margin
        (0.30, 0.25, "min", 0.0, True),  # loss went down
        (0.30, 0.31, "min", 0.0, False),
        (0.30, 0.31, "min", 0.05, True),
        (0.30, 0.40, "min", 0.05, False),
        (0.90, math.nan, "max", 1.0, False),  # a NaN score never passes
        (math.nan, 0.5, "min", 1.0, False),
    ],
)
def test_gate_rule(old: float, new: float, mode: Any, margin: float, passes: bool) -> None:
    assert passes_gate(old, new, mode=mode, margin=margin) is passes


def test_cli_options_override_the_spec_section() -> None:
    base = spec(margin=0.1, freeze=["blocks.0"], holdout="spec-holdout")
    merged = with_retrain_options(base, data="new", margin=0.01, alias="staging")
    assert merged.data.train == "new" and merged.data.validation == "test"
    assert merged.retrain is not None
    assert merged.retrain.margin == 0.01 and merged.retrain.promote_to == "staging"
    assert merged.retrain.freeze == ["blocks.0"] and merged.retrain.holdout == "spec-holdout"
    defaults = with_retrain_options(spec()).retrain
    assert defaults is not None
    assert (defaults.margin, defaults.promote_to, defaults.holdout) == (0.0, "production", None)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"margin": -0.1}, r"retrain\.margin: .*greater than or equal to 0"),
        ({"alias": "9bad"}, r"retrain\.promote_to"),
        ({"freeze": ["blocks."]}, r"retrain\.freeze: .*dotted parameter-name prefix"),
    ],
)
def test_bad_retrain_options_name_the_field(options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        with_retrain_options(spec(), **options)


def test_unknown_retrain_key_is_refused() -> None:
    with pytest.raises(SpecError, match=r"retrain\.threshold: unknown key"):
        spec(threshold=0.1)


def test_freeze_matches_whole_dotted_parts_and_lists_parameters_when_unknown() -> None:
    names = ["blocks.1.0.weight", "blocks.10.0.weight", "head.weight", "head.bias"]
    assert frozen_names(names, ["blocks.1"]) == ["blocks.1.0.weight"]
    assert frozen_names(names, ["head.bias"]) == ["head.bias"]
    with pytest.raises(SpecError, match=r"'block' matches no parameter.*head\.weight.*blocks\.10"):
        frozen_names(names, ["block"])
    with pytest.raises(SpecError, match="freezes every parameter"):
        frozen_names(names, ["blocks", "head"])


def test_freeze_parameters_sets_requires_grad() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert freeze_parameters(model, ["0"]) == ["0.bias", "0.weight"]
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True]


def test_architecture_and_name_mismatches_name_each_difference() -> None:
    pre = _preprocessor(["a", "b"], classes=(0, 1))
    src = ModelVersion("digits-mlp", 3, "/r/digits-mlp/3", "now")
    doc = {"kind": "tabular_mlp", "options": {"hidden_sizes": [64, 32]}, "task": "classification"}
    check_compatible(spec(), src, doc, pre)  # the same model: no error
    changed = {**doc, "options": {"hidden_sizes": [128], "dropout": 0.1}}
    with pytest.raises(SpecError) as info:
        check_compatible(spec(), src, changed, pre)
    message = str(info.value)
    assert "model.hidden_sizes: [64, 32] in the spec, [128]" in message
    assert "model.dropout: (unset) in the spec, 0.1" in message and "digits-mlp:3" in message
    other = ModelVersion("other", 1, "/r/other/1", "now")
    with pytest.raises(SpecError, match=r"name: 'digits-mlp' differs from --from other:1"):
        check_compatible(spec(), other, doc, pre)


def test_holdout_scores_both_models_on_the_same_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for part in range(3):  # three files, streamed one after another
        a = rng.normal(size=50).astype(np.float32)
        table = pa.table({"a": a, "b": np.zeros(50, np.float32), "label": (a > 0).astype(int)})
        pq.write_table(table, tmp_path / f"part-{part}.parquet")
    pre = _preprocessor(["a", "b"], classes=(0, 1))
    right = nn.Linear(2, 2)
    with torch.no_grad():
        right.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        right.bias.zero_()
    wrong = nn.Linear(2, 2)
    with torch.no_grad():
        wrong.weight.copy_(-right.weight)
        wrong.bias.zero_()
    files = resolve_files(str(tmp_path), "parquet", "retrain.holdout")
    (good, bad), rows = score_holdout([right, wrong], pre, files)
    assert rows == 150
    assert good["val_accuracy"] == 1.0 and bad["val_accuracy"] == 0.0
    assert good["val_loss"] < bad["val_loss"]


def test_decision_message_has_both_scores_margin_rule_and_alias() -> None:
    decision = {
        "from": "digits-mlp:1",
        "metric": "val_accuracy",
        "old_score": 0.95,
        "new_score": 0.31,
        "margin": 0.02,
        "rule": "new >= old - margin",
        "promoted": False,
        "alias": "production",
        "alias_before": 1,
    }
    line = describe_decision(decision, "digits-mlp:2")
    for part in ("0.3100", "0.9500", "margin 0.02", "new >= old - margin", "by 0.6400"):
        assert part in line
    assert line.startswith("not promoted") and "digits-mlp@production stays on digits-mlp:1" in line
    promoted = describe_decision({**decision, "new_score": 0.96, "promoted": True}, "digits-mlp:2")
    assert promoted.startswith("promoted digits-mlp@production -> digits-mlp:2")


def test_cli_needs_from(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["retrain", "spec.yaml"])
    assert info.value.code == 2
    assert "--from" in capsys.readouterr().err


def test_cli_bad_margin_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spec.yaml").write_text("name: m\ndata: {train: x, validation: y, label: label}\n")
    code = main(["retrain", str(tmp_path / "spec.yaml"), "--from", "m:1", "--margin", "-1"])
    assert code == 2
    assert "retrain.margin" in capsys.readouterr().err


def test_refusals_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Against a real registry, without data or Ray: each mistake is one line, exit 2."""
    registry = str(tmp_path / "registry")
    job = validate_spec(
        {
            "name": "m",
            "data": {"train": "nowhere", "validation_split": 0.2, "label": "label"},
            "model": {"kind": "tabular_mlp", "hidden_sizes": [4]},
            "registry": registry,
        }
    )
    pre = _preprocessor(["a", "b"], classes=(0, 1))
    module = build_model(job.model, pre.input_schema())
    documents = {
        "model.json": model_document(job, pre),
        "preprocessing.json": pre.to_dict(),
        "lineage.json": {},
    }
    Registry(registry).register("m", module.state_dict(), documents)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(job.model_dump(mode="json")))
    cases = [  # (overrides, flags, the error)
        ([], [], r"retrain\.holdout: required when the spec holds out data\.validation_split"),
        ([], ["--freeze", "blocks.1"], r"'blocks\.1' matches no parameter.*blocks\.0\.0\.weight"),
        (["model.hidden_sizes=[8]"], [], r"model\.hidden_sizes: \[8\] in the spec, \[4\] in m:1"),
        (["name=other"], [], r"name: 'other' differs from --from m:1"),
    ]
    for overrides, flags, pattern in cases:
        spec_file = str(tmp_path / "spec.yaml")
        assert main(["retrain", spec_file, *overrides, "--from", "m@latest", *flags]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("kiln: error")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), (overrides, flags, errors)
    assert [v.version for v in Registry(registry).versions("m")] == [1]


def _preprocessor(features: list[str], classes: tuple[Any, ...]) -> Preprocessor:
    return Preprocessor(
        task="classification",
        features=features,
        numeric=[NumericColumn(name, 0.0, 0.0, 1.0) for name in features],
        categorical=[],
        encoding="onehot",
        missing="mean",
        label=LabelState("label", classes),
    )
