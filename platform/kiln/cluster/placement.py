"""Multi-node checks: a run whose storage lives on one node's disk must not start on a cluster.

Checkpoints are written by every training worker and the registry entry by the driver; on nodes
on different hosts a local path means each writes to its own disk and the run cannot be put back
together (Ray Train fails at the first checkpoint, or worse, registers a partial model). Nodes
that share one host (`cluster/local.sh`, `ray.cluster_utils.Cluster`) also share its disk, so they
count as one host.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from kiln import storage
from kiln.config.spec import JobSpec
from kiln.errors import KilnError

logger = logging.getLogger(__name__)

_LOCAL_SCHEMES = ("file://", "local://")


def compute_hosts(nodes: Iterable[dict[str, Any]]) -> set[str]:
    """Distinct host addresses of the alive nodes that can run work (CPUs or GPUs).

    Args:
        nodes: `ray.nodes()` entries.
    """
    hosts = set()
    for node in nodes:
        resources = node.get("Resources") or {}
        if node.get("Alive") and (resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0):
            hosts.add(str(node.get("NodeManagerAddress", "")))
    return hosts


def is_node_local(location: str) -> bool:
    """True for a plain path or a file:// URI: storage that lives on one machine's disk."""
    return not storage.is_uri(location) or location.lower().startswith(_LOCAL_SCHEMES)


def check_shared_storage(spec: JobSpec, nodes: Iterable[dict[str, Any]]) -> None:
    """Refuse a run on a multi-host cluster whose train.storage or registry is a local path.

    Raises:
        KilnError: naming the fields, the hosts and the two ways out (a URI, or
            `train.shared_storage: true` for a filesystem every node mounts).
    """
    hosts = compute_hosts(nodes)
    if len(hosts) <= 1:
        return
    local = [
        f"{field}={value}"
        for field, value in (("train.storage", spec.train.storage), ("registry", spec.registry))
        if is_node_local(value)
    ]
    if not local:
        return
    if spec.train.shared_storage:
        logger.info("train.shared_storage: trusting that %s is mounted on every node", local)
        return
    raise KilnError(
        f"{', '.join(local)}: a local path, but the cluster's nodes are on {len(hosts)} hosts "
        f"({', '.join(sorted(hosts))}), so checkpoints and the model would land on different "
        "disks. Use a location every node reaches (s3://..., gs://...), or set "
        "train.shared_storage=true if that path is a filesystem all nodes mount"
    )
