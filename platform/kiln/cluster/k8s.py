"""Render a kiln spec as the KubeRay resources a user applies (`kiln k8s render`).

A job spec becomes a ConfigMap holding the validated spec, a NetworkPolicy that closes the Ray
cluster's ports to everything but its own pods, and a RayJob whose RayCluster is sized from the
spec: one worker pod per training worker (times `tune.max_concurrent_trials` for tune), the head
keeping `train.data_cpus` for Ray Data. A serve spec becomes a RayService whose `serveConfigV2` is
what `kiln serve build` writes, an autoscaling worker group sized from the models' replicas, and
the Serve port opened to the ingress controller only.

Every pod runs the project's image as uid 1000 under the Pod Security "restricted" profile; the
Ray token comes from the Secret `kiln-ray-auth` (key `auth_token`, KubeRay's `authOptions`
convention), and spec paths relative to the user's machine move onto the shared volume.
"""

from __future__ import annotations

import copy
import logging
import math
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from kiln import __version__
from kiln.config.spec import JobSpec, TrainSpec
from kiln.errors import KilnError
from kiln.storage import is_uri

logger = logging.getLogger(__name__)

Kind = Literal["train", "tune", "score", "serve"]
JOB_KINDS = ("train", "tune", "score")

RAY_VERSION = "2.60.0"
UID, GID = 1000, 100  # the `ray` user and `users` group of the rayproject/ray images
APP_DIR = "/home/ray/kiln"  # where the image keeps jobs/ (k8s/image/Dockerfile)
SPEC_DIR = "/etc/kiln"
SHARED_DIR = "/mnt/kiln"
AUTH_SECRET, AUTH_KEY = "kiln-ray-auth", "auth_token"
API_TOKEN_SECRET, API_TOKEN_KEY = "kiln-api-token", "token"
SERVE_PORT = 8000
METRICS_PORT = 8080  # Ray's Prometheus export port on every pod (docs/metrics.md)
GIB = 1024**3
MEMORY_PER_CPU = 4 * GIB
"""Pod memory per CPU when the spec gives no `memory` resource."""
SHM_BYTES = GIB
"""Size of the /dev/shm volume (Ray's object store); counted in the pod's memory limit."""
SHARED_LOCATIONS = (
    "data.train", "data.validation", "train.storage", "registry", "score.input", "score.output",
)  # fmt: skip
"""Spec fields that name files every pod must share."""
RUN_LOCATIONS = ("train.storage", "registry")
"""Where runs and models go: on the shared volume, the spec declares `train.shared_storage`."""
JOB_DEADLINES = {"train": 86_400, "tune": 172_800, "score": 21_600}
"""activeDeadlineSeconds per job kind."""


@dataclass(frozen=True)
class RenderOptions:
    image: str | None = None
    """Container image; default `kiln:<version>-cpu`, or `-cuda` when the spec uses GPUs."""
    namespace: str | None = None
    """Namespace written into every resource (default: none, `kubectl -n` decides)."""
    claim: str = "kiln-storage"
    """PersistentVolumeClaim mounted at /mnt/kiln on every pod: data, runs and the registry."""


@dataclass(frozen=True)
class PodShape:
    """What one pod asks for (requests equal limits)."""

    cpu: int
    memory: int
    gpu: int = 0

    def resources(self) -> dict[str, Any]:
        """Kubernetes resource requirements with requests equal to limits (Guaranteed QoS)."""
        amounts: dict[str, Any] = {"cpu": str(self.cpu), "memory": _quantity(self.memory)}
        if self.gpu:
            amounts["nvidia.com/gpu"] = str(self.gpu)
        return {"requests": dict(amounts), "limits": dict(amounts)}


def default_image(gpu: bool) -> str:
    """The image `k8s/image/Dockerfile` builds for this version."""
    return f"kiln:{__version__}-{'cuda' if gpu else 'cpu'}"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (an embedded spec, serveConfigV2) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_manifests(documents: list[dict[str, Any]]) -> str:
    """Documents as one multi-document YAML stream."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=100)


# ---- job specs: RayJob ------------------------------------------------------------------------


def render_job(
    spec: JobSpec, kind: str, options: RenderOptions = RenderOptions()
) -> list[dict[str, Any]]:
    """ConfigMap (the spec), NetworkPolicy and RayJob that run `jobs/<kind>.py` on a new cluster.

    Raises:
        KilnError: an unknown kind.
    """
    if kind not in JOB_KINDS:
        raise KilnError(f"--kind {kind!r}: a job spec renders as one of {', '.join(JOB_KINDS)}")
    name = _resource_name(f"{spec.name}-{kind}")
    image = options.image or default_image(spec.train.use_gpu)
    spec_file = f"{spec.name}.yaml"
    config_map = _meta("ConfigMap", "v1", f"{name}-spec", name, options)
    config_map["data"] = {spec_file: yaml.safe_dump(shared_spec(spec, kind), sort_keys=False)}
    cluster = _job_cluster(spec, kind, name, image, options, config_map)
    job = _meta("RayJob", "ray.io/v1", name, name, options)
    job["spec"] = {
        "entrypoint": f"python {APP_DIR}/jobs/{kind}.py {SPEC_DIR}/{spec_file}",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 3600,
        # One fresh cluster after an infrastructure failure; training retries within a cluster
        # come from train.max_failures.
        "backoffLimit": 1,
        "activeDeadlineSeconds": JOB_DEADLINES[kind],
        "submitterConfig": {"backoffLimit": 2},
        "submitterPodTemplate": _submitter(name, image),
        "rayClusterSpec": cluster,
    }
    return [config_map, network_policy(name, options), job]


def _job_cluster(
    spec: JobSpec,
    kind: str,
    name: str,
    image: str,
    options: RenderOptions,
    config_map: dict[str, Any],
) -> dict[str, Any]:
    """The RayCluster a job runs on: fixed size (a job knows what it needs), so no autoscaler."""
    workers = worker_replicas(spec, kind)
    shape = score_shape(spec) if kind == "score" else worker_shape(spec.train)
    group = "gpu-workers" if shape.gpu else "cpu-workers"
    replicas = (workers, workers, workers)
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "headGroupSpec": _head_group(name, image, head_shape(spec.train), options, config_map),
        "workerGroupSpecs": [
            _worker_group(name, group, image, shape, replicas, options, config_map)
        ],
    }


def shared_spec(spec: JobSpec, kind: str) -> dict[str, Any]:
    """The spec as the user wrote it (defaults are filled in again where it runs), with every
    storage location written out and moved onto the shared volume when it is relative to the
    user's machine, so every pod reads and writes the same files."""
    full = spec.model_dump(mode="json")
    raw = spec.model_dump(mode="json", exclude_unset=True)
    for dotted in SHARED_LOCATIONS:
        value = _lookup(full, dotted)
        if isinstance(value, str):
            _assign(raw, dotted, on_shared_volume(value))
    on_volume = [_lookup(raw, key).startswith(SHARED_DIR + "/") for key in RUN_LOCATIONS]
    if any(on_volume) and "shared_storage" in TrainSpec.model_fields:
        # Every pod mounts the volume: multi-node runs may keep runs and models there.
        _assign(raw, "train.shared_storage", True)
    logger.debug("rendered %s spec for %s", kind, spec.name)
    return raw


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _assign(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def on_shared_volume(location: str) -> str:
    """A URI or absolute path as given; a path relative to the user's machine under /mnt/kiln."""
    if is_uri(location) or location.startswith("/"):
        return location
    return posixpath.join(SHARED_DIR, posixpath.normpath(location))


def worker_shape(train: TrainSpec) -> PodShape:
    """One training worker's pod: its Ray resources rounded up to whole CPUs and GPUs."""
    wanted = train.resources_per_worker or {}
    cpu = max(1, math.ceil(wanted.get("CPU", 1.0)))
    gpu = math.ceil(wanted.get("GPU", 1.0 if train.use_gpu else 0.0)) if train.use_gpu else 0
    memory = int(wanted.get("memory", cpu * MEMORY_PER_CPU)) + SHM_BYTES
    return PodShape(cpu=cpu, memory=memory, gpu=gpu)


def score_shape(spec: JobSpec) -> PodShape:
    """One scoring actor's pod: `score.cpus_per_worker` rounded up when the spec has a score
    section, GPUs as training uses them; otherwise a training worker's pod."""
    shape = worker_shape(spec.train)
    cpus = getattr(getattr(spec, "score", None), "cpus_per_worker", None)
    if not isinstance(cpus, int | float):
        return shape
    cpu = max(1, math.ceil(cpus))
    return PodShape(cpu=cpu, memory=cpu * MEMORY_PER_CPU + SHM_BYTES, gpu=shape.gpu)


def head_shape(train: TrainSpec) -> PodShape:
    """The head: `train.data_cpus` for Ray Data plus one CPU for GCS, dashboard and driver."""
    cpu = math.ceil(train.data_cpus) + 1
    return PodShape(cpu=cpu, memory=cpu * MEMORY_PER_CPU + SHM_BYTES)


def worker_replicas(spec: JobSpec, kind: str) -> int:
    """Worker pods: one per training worker; times the concurrent trials for tune; the scoring
    actor pool's largest size for score (default: as many as training workers)."""
    workers = spec.train.num_workers
    if kind == "tune":
        trials = getattr(getattr(spec, "tune", None), "max_concurrent_trials", None)
        return workers * (trials if isinstance(trials, int) and trials > 0 else 1)
    if kind == "score":
        return _score_concurrency(getattr(spec, "score", None)) or workers
    return workers


def _score_concurrency(score: Any) -> int | None:
    """The largest actor pool of a `score` section (`concurrency: 4`, `[1, 4]` or `"1:4"`)."""
    value = getattr(score, "concurrency", None)
    if isinstance(value, str):
        value = [int(part) for part in value.split(":") if part.strip().isdigit()]
    if isinstance(value, list | tuple) and value:
        value = max(int(v) for v in value)
    return value if isinstance(value, int) and value > 0 else None


# ---- serve specs: RayService --------------------------------------------------------------------


def render_service(spec: Any, options: RenderOptions = RenderOptions()) -> list[dict[str, Any]]:
    """NetworkPolicies and the RayService for a serve spec (`kiln.inference.serve_spec`)."""
    config = service_serve_config(spec)
    name = _resource_name(f"{spec.name}-serve")
    gpus = max(model.ray_actor_options.num_gpus for model in spec.models)
    image = options.image or default_image(gpus > 0)
    shape, replicas = serve_workers(spec)
    head = _head_group(name, image, PodShape(cpu=2, memory=8 * GIB), options, None, serve=True)
    head["rayStartParams"]["num-cpus"] = "0"  # replicas on workers; the head keeps control
    cluster = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": _autoscaler_options(),
        "headGroupSpec": head,
        "workerGroupSpecs": [
            _worker_group(name, "serve-workers", image, shape, replicas, options, None, serve=True)
        ],
    }
    _add_api_token(cluster, spec)
    _add_serve_environment(cluster, spec)
    service = _meta("RayService", "ray.io/v1", name, name, options)
    service["spec"] = {
        "serveConfigV2": yaml.safe_dump(config, sort_keys=False, width=100),
        "excludeHeadPodFromServeSvc": True,
        "rayClusterConfig": cluster,
    }
    return [network_policy(name, options), serve_ingress_policy(name, options), service]


def service_serve_config(spec: Any) -> dict[str, Any]:
    """What `kiln serve build` writes for the spec as it runs in a pod: the proxy on 0.0.0.0 and
    local paths on the shared volume."""
    from kiln.inference.serve import absolute_paths, serve_config

    update: dict[str, Any] = {
        "http": spec.http.model_copy(update={"host": "0.0.0.0"}),
        "registry": on_shared_volume(spec.registry),
    }
    if spec.auth.token_file:
        update["auth"] = spec.auth.model_copy(
            update={"token_file": on_shared_volume(spec.auth.token_file)}
        )
    return serve_config(absolute_paths(spec.model_copy(update=update)))


def serve_workers(spec: Any) -> tuple[PodShape, tuple[int, int, int]]:
    """Worker pod shape and (min, initial, max) pods that fit the ingress plus every version's
    replicas, from the models' min and max replicas."""
    options = [m.ray_actor_options for m in spec.models]
    cpu = max(2, *(math.ceil(o.num_cpus) for o in options))
    gpu = max(math.ceil(o.num_gpus) for o in options)
    ingress = spec.ingress.num_replicas * spec.ingress.num_cpus

    def pods(field: str) -> int:
        replicas = [
            (getattr(m.autoscaling, field) or m.autoscaling.min_replicas, m.ray_actor_options)
            for m in spec.models
            for _ in m.variants
        ]
        cpus = ingress + sum(count * o.num_cpus for count, o in replicas)
        gpus = sum(count * o.num_gpus for count, o in replicas)
        return max(1, math.ceil(cpus / cpu), math.ceil(gpus / gpu) if gpu else 0)

    memory = cpu * MEMORY_PER_CPU + SHM_BYTES
    counts = (pods("min_replicas"), pods("initial_replicas"), pods("max_replicas"))
    return PodShape(cpu=cpu, memory=memory, gpu=gpu), counts


def _add_api_token(cluster: dict[str, Any], spec: Any) -> None:
    """The serving processes read kiln's bearer token from `auth.token_env`: set it from the
    Secret kiln-api-token on every Ray container."""
    if not spec.auth.token_env:
        return
    variable = _secret_env(spec.auth.token_env, API_TOKEN_SECRET, API_TOKEN_KEY)
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        group["template"]["spec"]["containers"][0]["env"].append(copy.deepcopy(variable))


def _add_serve_environment(cluster: dict[str, Any], spec: Any) -> None:
    """Ray Serve's ingress switches (`http.proxy`, `http.throughput_optimized`, `http.drain_s`)
    on every Ray container: Serve reads them at import, in the controller, proxies and replicas."""
    from kiln.inference.serve_env import serve_environment

    variables = [
        {"name": key, "value": value}
        for key, value in serve_environment(spec.http, local=False).items()
    ]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        # Copies: a dict shared between containers would dump as a YAML anchor and alias.
        group["template"]["spec"]["containers"][0]["env"].extend(dict(v) for v in variables)


# ---- network policies ---------------------------------------------------------------------------


def network_policy(name: str, options: RenderOptions) -> dict[str, Any]:
    """Ray's ports open only to the pods of this cluster (and its job submitter), plus the
    dashboard port to the KubeRay operator, which polls jobs and deploys Serve configs, and the
    metrics port to Prometheus in the `monitoring` namespace (docs/metrics.md)."""
    policy = _meta("NetworkPolicy", "networking.k8s.io/v1", f"{name}-ray", name, options)
    operator = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    }
    policy["spec"] = {
        "podSelector": {"matchLabels": _instance(name)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": _instance(name)}}]},
            {"from": [operator], "ports": [{"protocol": "TCP", "port": 8265}]},
            {"from": [prometheus], "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
        ],
    }
    return policy


def serve_ingress_policy(name: str, options: RenderOptions) -> dict[str, Any]:
    """The Serve port, and only it, open to the ingress controller's namespace."""
    policy = _meta("NetworkPolicy", "networking.k8s.io/v1", f"{name}-ingress", name, options)
    controller = {"kubernetes.io/metadata.name": "ingress-nginx"}
    policy["spec"] = {
        "podSelector": {"matchLabels": _instance(name)},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [{"namespaceSelector": {"matchLabels": controller}}],
                "ports": [{"protocol": "TCP", "port": SERVE_PORT}],
            }
        ],
    }
    return policy


# ---- pods -------------------------------------------------------------------------------------


def container_security_context() -> dict[str, Any]:
    """Pod Security "restricted" for one container."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """Pod Security "restricted" for a pod; fsGroup makes the shared volume writable."""
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": GID,
        "fsGroup": GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _head_group(
    name: str,
    image: str,
    shape: PodShape,
    options: RenderOptions,
    config_map: dict[str, Any] | None,
    *,
    serve: bool = False,
) -> dict[str, Any]:
    ports = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": METRICS_PORT}
    if serve:
        ports["serve"] = SERVE_PORT
    container = _ray_container("ray-head", image, shape, config_map)
    container["ports"] = [{"name": key, "containerPort": port} for key, port in ports.items()]
    template = _pod_template(name, "ray-head", container, shape, options, config_map)
    # Losing the head loses the cluster (or, with GCS fault tolerance, stalls it): never evict.
    template["metadata"]["annotations"] = {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"
    }
    # The autoscaler sidecar talks to the Kubernetes API with the head's service account token.
    template["spec"]["automountServiceAccountToken"] = serve
    start = {"dashboard-host": "0.0.0.0"}
    if config_map is not None:
        start["num-cpus"] = str(shape.cpu - 1)  # what Ray Data may use: train.data_cpus
    return {"rayStartParams": start, "template": template}


def _worker_group(
    name: str,
    group: str,
    image: str,
    shape: PodShape,
    replicas: tuple[int, int, int],
    options: RenderOptions,
    config_map: dict[str, Any] | None,
    *,
    serve: bool = False,
) -> dict[str, Any]:
    low, initial, high = replicas
    container = _ray_container("ray-worker", image, shape, config_map)
    if serve:
        container["ports"] = [{"name": "serve", "containerPort": SERVE_PORT}]
    template = _pod_template(name, "ray-worker", container, shape, options, config_map)
    template["spec"]["automountServiceAccountToken"] = False
    return {
        "groupName": group,
        "replicas": initial,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {},
        "template": template,
    }


def _ray_container(
    name: str, image: str, shape: PodShape, config_map: dict[str, Any] | None
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": "shared", "mountPath": SHARED_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if config_map is not None:
        mounts.append({"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": auth_env(),
        "resources": shape.resources(),
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
    }


def _pod_template(
    name: str,
    component: str,
    container: dict[str, Any],
    shape: PodShape,
    options: RenderOptions,
    config_map: dict[str, Any] | None,
) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": options.claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(SHM_BYTES)}},
    ]
    if config_map is not None:
        volumes.append({"name": "spec", "configMap": {"name": config_map["metadata"]["name"]}})
    spec: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if shape.gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    labels = {**_instance(name), "app.kubernetes.io/component": component}
    return {"metadata": {"labels": labels}, "spec": spec}


def _submitter(name: str, image: str) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills in the command)."""
    shape = PodShape(cpu=1, memory=GIB)
    container = {
        "name": "ray-job-submitter",
        "image": image,
        "env": auth_env(),
        "resources": shape.resources(),
        "securityContext": container_security_context(),
    }
    labels = {**_instance(name), "app.kubernetes.io/component": "ray-job-submitter"}
    return {
        "metadata": {"labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": pod_security_context(),
            "containers": [container],
        },
    }


def _autoscaler_options() -> dict[str, Any]:
    shape = PodShape(cpu=1, memory=GIB)
    return {
        "version": "v2",
        "upscalingMode": "Default",
        "idleTimeoutSeconds": 120,
        "env": auth_env(),
        "resources": shape.resources(),
        "securityContext": container_security_context(),
    }


def auth_env() -> list[dict[str, Any]]:
    """Ray token authentication: the token from the Secret kiln-ray-auth."""
    return [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        _secret_env("RAY_AUTH_TOKEN", AUTH_SECRET, AUTH_KEY),
    ]


def _secret_env(variable: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


# ---- helpers ----------------------------------------------------------------------------------


def _meta(
    kind: str, api_version: str, name: str, instance: str, options: RenderOptions
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": _instance(instance)}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def _instance(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kiln", "app.kubernetes.io/instance": name}


def _resource_name(name: str) -> str:
    """A DNS-1123 label from a spec name (`digits_mlp.v2` -> `digits-mlp-v2`); KubeRay derives
    pod and service names from it, so it stays short."""
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    if len(cleaned) > 40:
        raise KilnError(
            f"name {name!r} is too long for KubeRay resources ({len(cleaned)} > 40 characters); "
            "shorten the spec's name"
        )
    return cleaned


def _quantity(amount: int) -> str:
    """Bytes as a Kubernetes quantity: whole GiB or MiB when exact, bytes otherwise."""
    for unit, size in (("Gi", GIB), ("Mi", 1024**2)):
        if amount % size == 0:
            return f"{amount // size}{unit}"
    return str(amount)
