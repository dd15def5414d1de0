"""Offline validation of Kubernetes manifests, shared by the k8s tests.

Core kinds are checked against the Kubernetes API's JSON schemas (the strict variant shipped by
kubernetes-validate, which refuses unknown fields); RayCluster, RayJob and RayService against the
KubeRay v1.7.0 CRDs' openAPIV3Schema, made structural the way the API server treats them
(unknown fields are errors here, where the server would silently prune them). Every pod template
inside a Ray resource is also checked as a core PodTemplate, and against Pod Security "restricted".
Each problem names the resource and the dotted path of the field.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

K8S_VERSION = "1.37.0"
ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}


def crd_dir() -> Path:
    """`$KILN_KUBERAY_CRDS`, or `shared/kuberay-crds` in the repository root or any parent.

    Raises:
        FileNotFoundError: naming every place looked at.
    """
    looked: list[str] = []
    if os.environ.get("KILN_KUBERAY_CRDS"):
        candidates = [Path(os.environ["KILN_KUBERAY_CRDS"])]
    else:
        candidates = [folder / "shared" / "kuberay-crds" for folder in (ROOT, *ROOT.parents)]
    for candidate in candidates:
        looked.append(str(candidate))
        if all((candidate / name).is_file() for name in CRD_FILES.values()):
            return candidate
    raise FileNotFoundError(
        "KubeRay v1.7.0 CRDs ("
        + ", ".join(CRD_FILES.values())
        + ") not found; looked in "
        + ", ".join(looked)
        + " (set KILN_KUBERAY_CRDS to their folder)"
    )


# ---- schemas -----------------------------------------------------------------------------------


def structural(schema: Any) -> Any:
    """An openAPIV3Schema as jsonschema should read it: int-or-string as a union, nullable as
    null allowed, and unknown fields refused wherever the API server would prune them."""
    if isinstance(schema, list):
        return [structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: structural(value) for key, value in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    """The validator of a KubeRay kind's served, stored version (ray.io/v1)."""
    crd = yaml.safe_load((crd_dir() / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(structural(version["schema"]["openAPIV3Schema"]))


@functools.cache
def core_validator(kind: str, api_version: str) -> jsonschema.Validator:
    """A core kind's strict schema from kubernetes-validate (as its `validate` builds it)."""
    group = api_version.split("/")[0].split(".")[0] + "-" if "/" in api_version else ""
    version = api_version.split("/")[-1]
    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{kind.lower()}-{group}{version}.json", K8S_VERSION)
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry: Registry = Resource.from_contents(definitions) @ (
        Resource.from_contents(schema) @ Registry()
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


# ---- checks ------------------------------------------------------------------------------------


def _errors(validator: jsonschema.Validator, document: Any, where: str) -> list[str]:
    found = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        path = ".".join(str(part) for part in error.absolute_path) or "(top level)"
        found.append(f"{where}: {path}: {error.message[:300]}")
    return found


def name_of(document: dict[str, Any]) -> str:
    return f"{document.get('kind')}/{document.get('metadata', {}).get('name')}"


def schema_problems(document: dict[str, Any]) -> list[str]:
    """Problems of one manifest against the Kubernetes or KubeRay schemas."""
    kind, where = document.get("kind"), name_of(document)
    if kind in CRD_FILES:
        found = []
        if document.get("apiVersion") != "ray.io/v1":
            found.append(f"{where}: apiVersion: expected ray.io/v1")
        name = document.get("metadata", {}).get("name", "")
        if not _dns_label(name):
            found.append(f"{where}: metadata.name: {name!r} is not a DNS-1123 label")
        found += _errors(crd_validator(kind), document, where)
        for path, template in pod_templates(document):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
            wrapped["template"] = template
            found += [
                problem.replace(": template.", f": {path}.", 1)
                for problem in _errors(core_validator("PodTemplate", "v1"), wrapped, where)
            ]
        return found
    try:
        validator = core_validator(str(kind), str(document.get("apiVersion")))
    except FileNotFoundError:
        return [f"{where}: no Kubernetes schema for {document.get('apiVersion')} {kind}"]
    return _errors(validator, document, where)


def _dns_label(name: str) -> bool:
    return (
        0 < len(name) <= 63
        and name.replace("-", "a").isalnum()
        and name == name.lower()
        and (name[0].isalnum() and name[-1].isalnum())
    )


def ray_clusters(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, RayCluster spec) inside a RayCluster, RayJob or RayService."""
    spec = document.get("spec", {})
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    if document.get("kind") not in key:
        return
    field = key[document["kind"]]
    if field is None:
        yield "spec", spec
    elif isinstance(spec.get(field), dict):
        yield f"spec.{field}", spec[field]


def pod_templates(document: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(path, pod template) of every pod a Ray resource creates: head, worker groups and, for a
    RayJob, the submitter."""
    for path, cluster in ray_clusters(document):
        if isinstance(cluster.get("headGroupSpec"), dict):
            yield f"{path}.headGroupSpec.template", cluster["headGroupSpec"].get("template", {})
        for index, group in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{path}.workerGroupSpecs.{index}.template", group.get("template", {})
    submitter = document.get("spec", {}).get("submitterPodTemplate")
    if document.get("kind") == "RayJob" and isinstance(submitter, dict):
        yield "spec.submitterPodTemplate", submitter


def restricted_problems(document: dict[str, Any]) -> list[str]:
    """Pod Security "restricted" (and requests equal to limits) on every pod template and on
    the autoscaler sidecar of a Ray resource."""
    where = name_of(document)
    found = []
    for path, template in pod_templates(document):
        found += [f"{where}: {path}.{p}" for p in _pod_problems(template.get("spec", {}))]
    for path, cluster in ray_clusters(document):
        if cluster.get("enableInTreeAutoscaling"):
            sidecar = cluster.get("autoscalerOptions") or {}
            prefix = f"{where}: {path}.autoscalerOptions"
            found += [f"{prefix}.{p}" for p in _container_problems(sidecar, {})]
    return found


def _pod_problems(pod: dict[str, Any]) -> list[str]:
    found = []
    context = pod.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            found.append(f"spec.{flag}: must not be set")
    for index, volume in enumerate(pod.get("volumes") or []):
        if "hostPath" in volume:
            found.append(f"spec.volumes.{index}.hostPath: not allowed")
    for field in ("containers", "initContainers"):
        for index, container in enumerate(pod.get(field) or []):
            found += [f"spec.{field}.{index}.{p}" for p in _container_problems(container, context)]
    if not pod.get("containers"):
        found.append("spec.containers: no container")
    return found


def _container_problems(container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    context = container.get("securityContext") or {}
    found = []
    if context.get("allowPrivilegeEscalation") is not False:
        found.append("securityContext.allowPrivilegeEscalation: must be false")
    if context.get("privileged"):
        found.append("securityContext.privileged: must not be true")
    capabilities = context.get("capabilities") or {}
    if "ALL" not in (capabilities.get("drop") or []):
        found.append("securityContext.capabilities.drop: must include ALL")
    if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
        found.append("securityContext.capabilities.add: only NET_BIND_SERVICE is allowed")
    if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
        found.append("securityContext.runAsNonRoot: must be true (container or pod)")
    if context.get("runAsUser", pod.get("runAsUser")) == 0:
        found.append("securityContext.runAsUser: must not be 0")
    seccomp = (context.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        found.append("securityContext.seccompProfile.type: must be RuntimeDefault or Localhost")
    resources = container.get("resources") or {}
    if not resources.get("limits") or resources.get("requests") != resources.get("limits"):
        found.append("resources: requests must equal limits (and be set)")
    return found


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML stream, deep-copied so tests may break them."""
    return [copy.deepcopy(doc) for doc in yaml.safe_load_all(text) if doc]
