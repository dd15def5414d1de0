"""Helper of test_multinode.py, run in its own process (the pytest process already has a Ray).

Starts a 3-node `ray.cluster_utils.Cluster` on this machine (a head with 0 CPUs and two 1-CPU
workers), trains digits with 2 workers on SPREAD through `kiln.train.run.run`, and prints one JSON
line: the worker node ids per rank, the cluster's node ids and the registered model's path.
SIGTERM shuts the cluster down before exiting, so a timeout leaves no Ray process behind.

    python tests/integration/multinode_train.py DIGITS_DIR WORK_DIR
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

# Before `import ray`: keeps Ray's token auth from writing a token under ~/.ray.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def _stop(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(digits: Path, work: Path) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    from kiln.config import validate_spec
    from kiln.train.run import run

    temp_dir = tempfile.mkdtemp(prefix="kmn-", dir="/tmp")  # short: socket paths are capped
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp_dir})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        spec = validate_spec(
            {
                "name": "digits-multinode",
                "data": {
                    "train": str(digits / "train"),
                    "validation": str(digits / "test"),
                    "label": "label",
                },
                "model": {"hidden_sizes": [32]},
                "train": {
                    "epochs": 1,
                    "lr": 0.01,
                    "batch_size": 64,
                    "num_workers": 2,
                    "placement": "SPREAD",
                    "storage": str(work / "runs"),
                    "deepspeed": {"zero_stage": 2},
                },
                "registry": str(work / "registry"),
            }
        )
        outcome = run(spec)
        return {
            "worker_nodes": str(outcome.metrics["worker_nodes"]).split(","),
            "cpu_nodes": [node.node_id for node in workers],
            "model": outcome.model.ref,
            "model_path": outcome.model.uri,
            "val_accuracy": outcome.metrics["val_accuracy"],
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    result = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print("RESULT " + json.dumps(result), flush=True)
