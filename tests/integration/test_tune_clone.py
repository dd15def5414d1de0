"""PBT's exploit step through kiln's trainable, a real Optuna sweep, and the time budget, on a
local Ray with 2 CPUs.

On 2 CPUs a sweep runs one trial at a time, so Ray's PBT scheduler never finds two live trials
to compare and never clones. The clone test therefore drives `KilnTrial` the way Tune does when
PBT exploits (with `reuse_actors=False`, as kiln runs it): the donor trains and Tune saves its
checkpoint (kiln's pointer file); the clone is a new trainable built with its own, mutated
config, handed the donor's checkpoint through `load_checkpoint`, then stepped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from kiln.config import JobSpec
from kiln.data.source import check_data
from kiln.errors import TrainingError
from kiln.registry import Registry
from kiln.registry.model import load_model
from kiln.train import run as train_run
from kiln.train.engine import warmup_cosine
from kiln.tune import results, run, space, sweep
from kiln.tune.trial import DONOR_SUFFIX, KilnTrial, TrialSetup, _pin_donor, checkpoint_states
from tests.integration.test_tune import sweep_spec

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_session")]

METRIC = "val_accuracy"


def trial_setup(spec: JobSpec, sweep_dir: Path) -> TrialSetup:
    """What `kiln tune` hands every trial: the plan and the data prepared once."""
    plan = sweep.sweep_plan(spec)
    prepared = train_run.prepare(
        spec, plan.trial, check_data(spec.data), run_dir=str(sweep_dir), preprocessor=None
    )
    return TrialSetup(spec, str(sweep_dir), plan.cluster_cpus, plan.cluster_gpus, prepared)


def new_trial(setup: TrialSetup, trial_id: str, config: dict[str, Any]) -> Any:
    """A trainable as Tune builds one: with_parameters around KilnTrial, the trial's id in the
    config (Tune's TRIAL_INFO entry)."""
    from ray import tune
    from ray.tune.result import TRIAL_INFO

    trainable = tune.with_parameters(KilnTrial, setup=setup)
    return trainable(config={**config, TRIAL_INFO: SimpleNamespace(trial_id=trial_id)})


def as_result(trial_id: str, config: dict[str, Any], reports: list[dict[str, Any]]) -> Any:
    """A Tune Result holding the reports Tune logged for a trial (its metrics dataframe)."""
    from ray.tune import Result

    logged = [
        {**report, "trial_id": trial_id, "training_iteration": i + 1, "config": config}
        for i, report in enumerate(reports)
    ]
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "config"} for r in logged])
    return Result(
        metrics=logged[-1], checkpoint=None, error=None, path=trial_id, metrics_dataframe=frame
    )


@pytest.mark.slow
def test_pbt_clone_continues_the_donor_with_its_own_lr(digits_dir: Path, tmp_path: Path) -> None:
    lr_space = {"train.lr": {"sample": "loguniform", "low": 0.001, "high": 0.03}}
    spec = sweep_spec(
        digits_dir,
        tmp_path,
        {"space": lr_space, "scheduler": {"kind": "pbt", "perturbation_interval": 2}},
        epochs=4,
        warmup_steps=5,
    )
    sweep_dir = tmp_path / "runs" / "digits-sweep-test-sweep"
    setup = trial_setup(spec, sweep_dir)

    # The donor trains two epochs; PBT takes its latest Tune checkpoint (kiln's pointer).
    donor_config, clone_config = {"train.lr": 0.01}, {"train.lr": 0.002}
    donor = new_trial(setup, "donor_00000", donor_config)
    try:
        donor_reports = [donor.step(), donor.step()]
        pointer_dir = tmp_path / "tune-checkpoint"
        pointer_dir.mkdir()
        donor.save_checkpoint(str(pointer_dir))
    finally:
        donor.cleanup()
    first, second = donor_reports
    assert [r["epoch"] for r in donor_reports] == [1, 2]
    assert second["checkpoint_path"] and not second["done"]

    # The clone: a new trainable with the mutated config, restored from the donor's pointer.
    clone = new_trial(setup, "clone_00001", clone_config)
    try:
        clone.load_checkpoint(str(pointer_dir))
        clone_reports = [clone.step(), clone.step()]
    finally:
        clone.cleanup()
    third, fourth = clone_reports

    # It continues the donor's run at epoch 3 (not epoch 1), as a run of its own.
    assert [r["epoch"] for r in clone_reports] == [3, 4]
    assert third["resumed_from_epoch"] == 2 and fourth["done"]
    assert third["trial_run_dir"] == str(sweep_dir / "runs" / "clone_00001-1")
    steps_per_epoch = first["step"]
    assert second["step"] == 2 * steps_per_epoch and third["step"] == 3 * steps_per_epoch
    # Its learning rate is its own lr at the donor's position in the warm-up/cosine schedule.
    assert setup.prepared is not None  # the schedule's length, as `kiln train` computes it
    schedule = warmup_cosine(5, spec.train.epochs * math.ceil(setup.prepared.train_rows / 64))
    for report, lr in ((first, 0.01), (second, 0.01), (third, 0.002), (fourth, 0.002)):
        assert report["lr"] == pytest.approx(lr * schedule(report["step"]), rel=1e-5)
    assert third[METRIC] > 0.5  # the donor's weights came along: no restart from scratch
    # the donor's own run still holds the checkpoint the clone started from
    assert second["checkpoint_path"] in [
        path for path, _ in checkpoint_states(first["trial_run_dir"])
    ]

    # The sweep's results: Tune's log of a clone can lose its reports from before the clone
    # (it is copied back from storage when the trial restarts); kiln's table still shows the
    # clone's model epoch by epoch: the donor's two epochs, then its own two.
    grid = [
        as_result("donor_00000", donor_config, donor_reports),
        as_result("clone_00001", clone_config, clone_reports),
    ]
    rows = {row["trial"]: row for row in results.trial_rows(grid, ["train.lr"], METRIC, "max", 4)}
    donor_row, clone_row = rows["donor_00000"], rows["clone_00001"]
    assert (donor_row["status"], donor_row["epochs"]) == ("stopped early", 2)
    assert donor_row["per_epoch"] == [first[METRIC], second[METRIC]]
    assert (clone_row["status"], clone_row["epochs"], clone_row["train.lr"]) == (
        "completed",
        4,
        0.002,
    )
    expected = [first[METRIC], second[METRIC], third[METRIC], fourth[METRIC]]
    assert clone_row["per_epoch"] == pytest.approx(expected)
    # the copy of the donor's checkpoint went once the clone saved checkpoints of its own
    assert not Path(third["trial_run_dir"] + DONOR_SUFFIX).exists()
    assert clone_row["run_dir"] == third["trial_run_dir"]
    assert clone_row["checkpoint"] in (third["checkpoint_path"], fourth["checkpoint_path"])
    files = results.write_plots(list(rows.values()), ["train.lr"], METRIC, str(tmp_path))
    assert all(Path(path).stat().st_size > 0 for path in files.values())

    # Registered like `kiln train` registers: the clone's spec, its full history, loadable.
    model = sweep.register_best(spec, clone_row, str(sweep_dir), num_trials=2)
    registry = Registry(spec.registry)
    documents = registry.show(model.ref)["documents"]
    assert documents["lineage.json"]["sweep"]["trial"] == "clone_00001"
    assert documents["lineage.json"]["spec"]["train"]["lr"] == 0.002
    assert [e["epoch"] for e in documents["metrics.json"]["history"]] == [1, 2, 3, 4]
    assert load_model(registry, model.ref).module is not None


def test_clone_falls_back_to_the_donors_next_checkpoint_once_its_pick_is_deleted(
    tmp_path: Path,
) -> None:
    # The donor trains on while the clone starts, and its Ray Train run deletes checkpoints
    # beyond train.keep_checkpoints: the one PBT picked (epoch 2) is gone, epoch 3 is kept.
    donor = tmp_path / "runs" / "donor_00000"
    for name, epoch in (("checkpoint_2", 3), ("checkpoint_3", 4)):
        (donor / name / "deepspeed").mkdir(parents=True)
        (donor / name / "deepspeed" / "latest").write_text("kiln")
        history = [{"epoch": e, METRIC: 0.1 * e} for e in range(1, epoch + 1)]
        state = {"epoch": epoch, "step": 10 * epoch, METRIC: 0.1 * epoch, "history": history}
        (donor / name / "kiln_state.json").write_text(json.dumps(state))
    pointer = {
        "run_dir": str(donor),
        "checkpoint": str(donor / "checkpoint_1"),
        "metrics": {"epoch": 2},
    }
    clone_run = tmp_path / "runs" / "clone_00001-1"
    copy = Path(_pin_donor(pointer, str(clone_run)))
    assert copy == Path(str(clone_run) + DONOR_SUFFIX)
    assert json.loads((copy / "kiln_state.json").read_text())["epoch"] == 3
    assert (copy / "deepspeed").is_dir()
    # once every checkpoint from that epoch on is gone, the trial fails with the reason
    for name in ("checkpoint_2", "checkpoint_3"):
        shutil.rmtree(donor / name)
    with pytest.raises(TrainingError, match="train.keep_checkpoints"):
        _pin_donor(pointer, str(clone_run))


@pytest.mark.slow
def test_optuna_sweep_samples_inside_the_space_and_registers_the_best(
    digits_dir: Path, tmp_path: Path
) -> None:
    tune = {
        "search": "optuna",
        "num_samples": 2,
        "seed": 3,
        "space": {
            "train.lr": {"sample": "loguniform", "low": 0.002, "high": 0.03},
            "model.dropout": {"sample": "uniform", "low": 0.0, "high": 0.3},
        },
    }
    spec = sweep_spec(digits_dir, tmp_path, tune, epochs=1)
    outcome = run(spec)

    assert len(outcome.rows) == 2
    for row in outcome.rows:
        assert 0.002 <= row["train.lr"] <= 0.03 and 0.0 <= row["model.dropout"] <= 0.3
        assert (row["status"], row["epochs"], len(row["per_epoch"])) == ("completed", 1, 1)
    assert outcome.rows[0]["train.lr"] != outcome.rows[1]["train.lr"]
    assert outcome.best[METRIC] == max(row[METRIC] for row in outcome.rows)
    registry = Registry(spec.registry)
    lineage = registry.show(outcome.model.ref)["documents"]["lineage.json"]
    assert lineage["sweep"]["search"] == "optuna" and lineage["sweep"]["trials"] == 2
    assert lineage["spec"]["train"]["lr"] == pytest.approx(outcome.best["train.lr"])
    assert load_model(registry, outcome.model.ref).module is not None


def test_time_budget_ends_the_sweep_and_says_so(digits_dir: Path, tmp_path: Path) -> None:
    import ray

    lr = {"train.lr": {"sample": "loguniform", "low": 0.001, "high": 0.03}}
    spec = sweep_spec(digits_dir, tmp_path, {"space": lr, "num_samples": 4, "time_budget_s": 2})
    space.check_space(spec)
    before = set(ray.util.placement_group_table())  # earlier tests' groups are not this one's
    start = time.monotonic()
    with pytest.raises(TrainingError, match=r"tune.time_budget_s=2"):
        run(spec)
    assert time.monotonic() - start < 60  # four trials would take minutes

    # the stopped trial's training run does not keep its workers' CPUs
    def held() -> list[dict[str, Any]]:
        table = ray.util.placement_group_table()
        return [g for key, g in table.items() if key not in before and g["state"] != "REMOVED"]

    deadline = time.monotonic() + 20
    while held() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert held() == []
