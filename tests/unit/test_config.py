"""The job spec: parsing, overrides and errors that name the dotted field."""

from pathlib import Path

import pytest

from kiln.config import apply_override, dump_spec, load_spec, spec_hash, validate_spec
from kiln.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "m", "data": {"train": "d", "validation_split": 0.2, "label": "y"}}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_example_configs_validate() -> None:
    from kiln.inference.serve_spec import load_serve_spec

    configs = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        if path.name.endswith("-serve.yaml"):
            assert load_serve_spec(path).models
        else:
            assert load_spec(path).name


def test_defaults_and_derived_metric() -> None:
    spec = validate_spec(MINIMAL)
    assert spec.train.deepspeed.zero_stage == 2
    assert spec.metric == "val_accuracy" and spec.mode == "max"
    regression = validate_spec({**MINIMAL, "data": {**MINIMAL["data"], "task": "regression"}})
    assert regression.metric == "val_loss" and regression.mode == "min"


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: m\ndata: {train: d, validation_split: 0.2, label: y}\n")
    spec = load_spec(
        path,
        [
            "train.num_workers=4",
            "train.deepspeed.zero_stage=3",
            "model.hidden_sizes=[8, 4]",
            "train.batch_size=64",
        ],
    )
    assert spec.train.num_workers == 4
    assert spec.train.deepspeed.zero_stage == 3
    assert spec.model.options["hidden_sizes"] == [8, 4]


def test_unknown_key_names_the_path(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "name: m\ndata: {train: d, validation_split: 0.2, label: y}\ntrain: {epoch: 3}\n"
    )
    with pytest.raises(SpecError, match=r"train\.epoch: unknown key"):
        load_spec(path)


def test_wrong_type_and_range_name_the_path() -> None:
    with pytest.raises(SpecError, match=r"train\.deepspeed\.zero_stage"):
        validate_spec({**MINIMAL, "train": {"deepspeed": {"zero_stage": 5}}})
    with pytest.raises(SpecError, match=r"train\.epochs: .*(got 'many')"):
        validate_spec({**MINIMAL, "train": {"epochs": "many"}})


def test_cross_field_checks_are_actionable() -> None:
    with pytest.raises(SpecError, match="must divide by num_workers"):
        validate_spec({**MINIMAL, "train": {"batch_size": 33, "num_workers": 2}})
    with pytest.raises(SpecError, match="give either data.validation"):
        validate_spec({"name": "m", "data": {"train": "d", "label": "y"}})
    with pytest.raises(SpecError, match="not reported for classification"):
        validate_spec({**MINIMAL, "train": {"metric": "val_r2"}})
    with pytest.raises(SpecError, match="fp16 needs train.use_gpu"):
        validate_spec({**MINIMAL, "train": {"deepspeed": {"precision": "fp16"}}})


def test_bad_override_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="expected dotted.key=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(SpecError, match="is a value, not a section"):
        apply_override({"train": 3}, "train.epochs=2")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(_write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_spec(tmp_path / "missing.yaml")


def test_dump_round_trips_and_hash_is_stable() -> None:
    import yaml

    spec = validate_spec(MINIMAL)
    again = validate_spec(yaml.safe_load(dump_spec(spec)))
    assert again == spec and spec_hash(again) == spec_hash(spec)
    other = validate_spec({**MINIMAL, "train": {"lr": 0.1}})
    assert spec_hash(other) != spec_hash(spec)
