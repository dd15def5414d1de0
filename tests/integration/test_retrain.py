"""`kiln retrain` for real on a local Ray: warm start from the registered weights, frozen layers,
the holdout gate, and the alias move (or not), through the CLI handler in this process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from kiln.cli import main as cli
from kiln.cli import train_cmd
from kiln.config import validate_spec
from kiln.registry import Registry
from kiln.train.run import run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def project(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A registry holding digits-mlp:1 (trained on half the training shards) at production,
    the other half as new data, the same half with its labels permuted, and the spec file."""
    root = tmp_path_factory.mktemp("retrain")
    shards = sorted((digits_dir / "train").glob("*.parquet"))
    old, new, corrupt = root / "old", root / "new", root / "corrupt"
    for folder in (old, new, corrupt):
        folder.mkdir()
    for shard in shards[:2]:
        (old / shard.name).write_bytes(shard.read_bytes())
    rng = np.random.default_rng(0)
    for shard in shards[2:]:
        (new / shard.name).write_bytes(shard.read_bytes())
        table = pq.read_table(shard)
        labels = table.column("label").to_numpy()
        permuted = pa.array(rng.permutation(labels), type=table.schema.field("label").type)
        index = table.schema.get_field_index("label")
        pq.write_table(table.set_column(index, "label", permuted), corrupt / shard.name)
    raw = {
        "name": "digits-mlp",
        "data": {"train": str(old), "validation": str(digits_dir / "test"), "label": "label"},
        "model": {"kind": "tabular_mlp", "hidden_sizes": [64, 32]},
        "train": {
            "epochs": 4,
            "batch_size": 64,
            "lr": 0.01,
            "warmup_steps": 5,
            "num_workers": 2,
            "storage": str(root / "runs"),
            "log_every": 1000,
        },
        "registry": str(root / "registry"),
    }
    outcome = run(validate_spec(raw))
    Registry(raw["registry"]).promote(outcome.model.ref, "production")
    spec_path = root / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    return {"root": root, "spec": spec_path, "registry": Registry(raw["registry"]), "raw": raw}


@pytest.fixture()
def kiln(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """The `kiln` CLI in this process, on the session's Ray (which it must not shut down)."""
    monkeypatch.setattr(train_cmd, "_shutdown_ray", lambda: None)

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def lineage(registry: Registry, ref: str) -> dict[str, Any]:
    return registry.read_document(registry.resolve(ref), "lineage.json")


def test_same_distribution_promotes_and_frozen_layer_stays_identical(
    project: dict[str, Any], kiln: Any
) -> None:
    registry: Registry = project["registry"]
    before = registry.resolve("digits-mlp@production")
    code, out, err = kiln(
        "retrain",
        str(project["spec"]),
        "train.epochs=2",
        "train.deepspeed.zero_stage=3",  # frozen parameters partitioned too, gathered at export
        "--from",
        "digits-mlp@production",
        "--data",
        str(project["root"] / "new"),
        "--margin",
        "0.02",
        "--freeze",
        "blocks.0",
    )
    assert code == 0, err[-3000:]
    new = registry.resolve("digits-mlp@latest")
    assert new.version == before.version + 1
    assert registry.resolve("digits-mlp@production") == new
    assert f"promoted digits-mlp@production -> {new.ref}" in out
    decision = lineage(registry, new.ref)["retrain"]
    print("same distribution:", decision["old_score"], "->", decision["new_score"])
    assert decision["decision"] == "promoted" and decision["from"] == before.ref
    assert decision["metric"] == "val_accuracy" and decision["margin"] == 0.02
    assert decision["new_score"] >= decision["old_score"] - 0.02
    assert decision["old_score"] > 0.85
    assert decision["holdout"]["rows"] == 360 and len(decision["holdout"]["sha256"]) == 64
    assert sorted(decision["frozen_parameters"]) == ["blocks.0.0.bias", "blocks.0.0.weight"]
    # The training data recorded is the new data; the weights under blocks.0 are the old ones.
    assert lineage(registry, new.ref)["data"]["train"]["files"][0]["path"].startswith(
        str(project["root"] / "new")
    )
    old_weights = registry.load(before.ref).tensors
    new_weights = registry.load(new.ref).tensors
    for name in ("blocks.0.0.weight", "blocks.0.0.bias"):
        assert torch.equal(old_weights[name], new_weights[name]), name
    for name in ("blocks.1.0.weight", "head.weight", "head.bias"):
        assert not torch.equal(old_weights[name], new_weights[name]), name
    # Same preprocessing, byte for byte: the new version maps inputs exactly like the old.
    assert registry.read_document(new, "preprocessing.json") == registry.read_document(
        before, "preprocessing.json"
    )
    out = kiln("models", "show", new.ref, "--registry", str(registry.root))[1]
    shown = json.loads(out[out.index('{\n  "ref"') :])  # Ray may print worker lines first
    assert shown["documents"]["lineage.json"]["retrain"]["decision"] == "promoted"


def test_corrupted_labels_are_refused_and_the_alias_stays(
    project: dict[str, Any], kiln: Any
) -> None:
    registry: Registry = project["registry"]
    before = registry.resolve("digits-mlp@production")
    code, out, err = kiln(
        "retrain",
        str(project["spec"]),
        "train.epochs=2",
        "train.lr=0.01",
        "--from",
        "digits-mlp@production",
        "--data",
        str(project["root"] / "corrupt"),
        "--margin",
        "0.02",
    )
    assert code == 3, err[-3000:]
    new = registry.resolve("digits-mlp@latest")
    assert new.version == before.version + 1  # registered, so the failed attempt is auditable
    assert f"registered {new.ref}" in out
    assert registry.resolve("digits-mlp@production") == before
    decision = lineage(registry, new.ref)["retrain"]
    print("corrupted labels:", decision["old_score"], "->", decision["new_score"])
    assert decision["decision"] == "refused" and not decision["promoted"]
    assert decision["new_score"] < decision["old_score"] - 0.02
    assert decision["alias_before"] == before.version
    refused = [line for line in err.splitlines() if line.startswith("kiln: retrain refused")]
    assert len(refused) == 1, err[-3000:]
    line = refused[0]
    assert f"{decision['new_score']:.4f}" in line and f"{decision['old_score']:.4f}" in line
    assert "margin 0.02" in line and "new >= old - margin" in line
    assert f"digits-mlp@production stays on {before.ref}" in line
    # The tracked run says the same (the store is the test's own: tests/conftest.py).
    from kiln.tracking import open_store

    run = open_store().list(kind="retrain", limit=1)[0]
    assert (run.status, run.model) == ("FINISHED", new.ref)
    assert run.tags["kiln.retrain.decision"] == "refused"
    assert run.tags["kiln.retrain.from"] == before.ref
    assert run.last("holdout_new_val_accuracy") == pytest.approx(decision["new_score"])
    assert run.last("holdout_old_val_accuracy") == pytest.approx(decision["old_score"])


def test_architecture_mismatch_and_unknown_prefix_fail_before_training(
    project: dict[str, Any], kiln: Any
) -> None:
    registry: Registry = project["registry"]
    count = len(registry.versions("digits-mlp"))
    code, _, err = kiln(
        "retrain",
        str(project["spec"]),
        "model.hidden_sizes=[128]",
        "--from",
        "digits-mlp@production",
    )
    assert code == 2
    assert "model.hidden_sizes: [128] in the spec, [64, 32]" in err
    code, _, err = kiln(
        "retrain", str(project["spec"]), "--from", "digits-mlp@production", "--freeze", "block"
    )
    assert code == 2
    assert "retrain.freeze: 'block' matches no parameter" in err and "head.weight" in err
    assert len(registry.versions("digits-mlp")) == count
