"""The sweep's results: per-trial status and best metric from its epoch reports, the best trial,
the on-screen table, the CSV/Parquet files and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kiln.tune import results


def epochs(values: list[float], *, checkpoint_every: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "epoch": i + 1,
            "training_iteration": i + 1,
            "val_accuracy": v,
            "checkpoint_path": f"/runs/t/ckpt{i + 1}" if (i + 1) % checkpoint_every == 0 else None,
            "trial_run_dir": "/runs/t",
        }
        for i, v in enumerate(values)
    ]


def test_summarize_status_epochs_and_best() -> None:
    done = results.summarize(epochs([0.5, 0.9, 0.8]), "val_accuracy", "max", 3, failed=False)
    assert done["status"] == "completed" and done["epochs"] == 3
    assert done["val_accuracy"] == 0.9 and done["best_epoch"] == 2
    assert done["last_val_accuracy"] == 0.8 and done["checkpoint"] == "/runs/t/ckpt2"
    stopped = results.summarize(epochs([0.2]), "val_accuracy", "max", 3, failed=False)
    assert stopped["status"] == "stopped early" and stopped["epochs"] == 1
    failed = results.summarize([], "val_accuracy", "max", 3, failed=True)
    assert failed["status"] == "error" and failed["checkpoint"] is None
    # the best saved checkpoint, when the best epoch itself was not checkpointed
    sparse = results.summarize(
        epochs([0.5, 0.9, 0.8, 0.7], checkpoint_every=2), "val_accuracy", "max", 4, failed=False
    )
    assert sparse["val_accuracy"] == 0.9
    assert sparse["checkpoint"] == "/runs/t/ckpt2" and sparse["checkpoint_metric"] == 0.9
    loss = results.summarize(
        [{"epoch": 1, "val_loss": 0.3, "checkpoint_path": "a"}, {"epoch": 2, "val_loss": 0.1}],
        "val_loss",
        "min",
        2,
        failed=False,
    )
    assert loss["val_loss"] == 0.1 and loss["checkpoint"] == "a"


def rows() -> list[dict[str, Any]]:
    out = []
    for trial, lr, sizes, values in (
        ("t0", 0.001, [64], [0.5, 0.7]),
        ("t1", 0.01, [128, 64], [0.6, 0.95]),
        ("t2", 0.1, [64], [0.3]),
    ):
        row = {"trial": trial, "train.lr": lr, "model.hidden_sizes": sizes}
        row |= results.summarize(epochs(values), "val_accuracy", "max", 2, failed=False)
        row["per_epoch"] = values
        out.append(row)
    return out


def test_best_row_and_table() -> None:
    table = rows()
    assert results.best_row(table, "val_accuracy", "max")["trial"] == "t1"
    assert results.best_row(table, "val_accuracy", "min")["trial"] == "t2"
    assert results.best_row([{**table[0], "checkpoint": None}], "val_accuracy", "max") is None
    text = results.format_table(table, ["train.lr", "model.hidden_sizes"], "val_accuracy")
    lines = text.splitlines()
    assert lines[0].split() == [
        "trial",
        "train.lr",
        "model.hidden_sizes",
        "status",
        "epochs",
        "val_accuracy",
        "last_val_accuracy",
    ]
    assert lines[2].split()[:3] == ["t1", "0.01", "[128,"]
    assert "stopped early" in lines[3]


def test_tables_and_plots_are_written(tmp_path: Path) -> None:
    table = rows()
    files = results.write_tables(table, str(tmp_path))
    parquet = pq.read_table(files["results.parquet"]).to_pylist()
    assert [r["trial"] for r in parquet] == ["t0", "t1", "t2"]
    assert parquet[1]["val_accuracy"] == 0.95 and parquet[1]["model.hidden_sizes"] == "[128, 64]"
    csv = pacsv.read_csv(files["results.csv"]).to_pylist()
    assert [r["status"] for r in csv] == ["completed", "completed", "stopped early"]
    plots = results.write_plots(
        table,
        ["train.lr", "model.hidden_sizes"],
        "val_accuracy",
        str(tmp_path),
        log_params=["train.lr"],
    )
    for path in plots.values():
        data = Path(path).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert not list(tmp_path.glob("*.tmp*"))


def test_trial_run_dirs_for_fresh_restarted_and_cloned_trials(tmp_path: Path) -> None:
    from kiln.tune.trial import _run_dir

    sweep = str(tmp_path)
    own = str(tmp_path / "runs" / "abc_00001")
    assert _run_dir(sweep, "abc_00001", None) == (own, None)
    # restarted after the driver died: continue its own run (Ray Train resumes it)
    assert _run_dir(sweep, "abc_00001", {"run_dir": own, "checkpoint": "x"}) == (own, None)
    assert _run_dir(sweep, "abc_00001", {"run_dir": own + "-1", "checkpoint": "x"}) == (
        own + "-1",
        None,
    )
    # PBT handed it another trial's checkpoint: a new run of its own, starting from that
    other = {"run_dir": str(tmp_path / "runs" / "abc_00000"), "checkpoint": "/c/ckpt_3"}
    assert _run_dir(sweep, "abc_00001", other) == (own + "-1", "/c/ckpt_3")
    (tmp_path / "runs" / "abc_00001-1").mkdir(parents=True)
    assert _run_dir(sweep, "abc_00001", other) == (own + "-2", "/c/ckpt_3")
