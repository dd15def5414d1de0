"""Multi-node storage checks and the `score` section that `jobs/score.py` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kiln.cluster.placement import check_shared_storage
from kiln.config import validate_spec
from kiln.errors import KilnError, SpecError
from kiln.jobs.entry import score_argv

BASE = {"name": "m", "data": {"train": "d", "validation_split": 0.2, "label": "y"}}


def _node(ip: str, cpus: float, alive: bool = True) -> dict[str, Any]:
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": cpus}}


def test_local_storage_refused_only_when_nodes_span_hosts() -> None:
    spec = validate_spec(BASE)
    one_host = [_node("10.0.0.1", 0), _node("10.0.0.1", 1), _node("10.0.0.1", 1)]
    check_shared_storage(spec, one_host)  # several nodes, one disk: fine
    # A head without CPUs and dead nodes elsewhere run no training: still one host.
    check_shared_storage(
        spec, [_node("10.0.0.9", 0), _node("10.0.0.1", 1), _node("10.0.0.2", 1, False)]
    )
    two_hosts = [_node("10.0.0.1", 1), _node("10.0.0.2", 1)]
    with pytest.raises(KilnError) as refused:
        check_shared_storage(spec, two_hosts)
    message = str(refused.value)
    assert "train.storage=./.kiln/runs" in message and "registry=./.kiln/registry" in message
    assert "2 hosts" in message and "train.shared_storage=true" in message
    with pytest.raises(KilnError, match="train.storage=file:///mnt/x"):
        check_shared_storage(
            validate_spec({**BASE, "train": {"storage": "file:///mnt/x"}, "registry": "s3://b/r"}),
            two_hosts,
        )


def test_shared_uris_or_a_declared_shared_path_pass() -> None:
    two_hosts = [_node("10.0.0.1", 1), _node("10.0.0.2", 1)]
    uris = {**BASE, "train": {"storage": "s3://b/runs"}, "registry": "gs://b/registry"}
    check_shared_storage(validate_spec(uris), two_hosts)
    declared = {**BASE, "train": {"shared_storage": True}}
    check_shared_storage(validate_spec(declared), two_hosts)


def test_score_section_validates_and_becomes_kiln_score_arguments(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"score\.concurrency"):
        validate_spec({**BASE, "score": {"input": "i", "output": "o", "concurrency": [3, 1]}})
    with pytest.raises(SpecError, match=r"score\.bogus: unknown key"):
        validate_spec({**BASE, "score": {"input": "i", "output": "o", "bogus": 1}})
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: digits\ndata: {train: d, validation_split: 0.2, label: y}\nregistry: /r\n"
        "score: {input: in, output: out, concurrency: 2, on_error: quarantine}\n"
    )
    argv = score_argv(str(spec), ["score.batch_size=256"])
    assert argv[:2] == ["score", "digits@production"]
    pairs = dict(zip(argv[2::2], argv[3::2], strict=False))
    assert pairs["--concurrency"] == "2:2" and pairs["--batch-size"] == "256"
    assert pairs["--on-error"] == "quarantine" and pairs["--registry"] == "/r"
    assert score_argv(str(spec), ["score.model=digits:3"])[1] == "digits:3"
    spec.write_text("name: digits\ndata: {train: d, validation_split: 0.2, label: y}\n")
    with pytest.raises(KilnError, match="no `score` section"):
        score_argv(str(spec))
