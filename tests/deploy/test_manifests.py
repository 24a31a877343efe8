"""Offline checks of deploy/k8s: schema validity, and the cross-references a schema cannot see.

There is no cluster here, so every mistake that ``kubectl apply`` or a rollout would reveal has to be
caught by reading the manifests: a misspelt field (strict schema validation), a Service that selects no
pod or targets a port nobody listens on, probes on the wrong path or port, an HPA pointing at nothing, a
runner grace period shorter than its drain (calls cut mid-sentence), a pod that the namespace's
"restricted" Pod Security admission would refuse.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"

# Pinned Kubernetes versions: the oldest we claim to support and the one the dev tools (kubectl) speak.
KUBERNETES_VERSIONS = ("1.29.0", "1.32.0")

NAMESPACE = "voicebus"
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}
CLUSTER_SCOPED = {"Namespace"}

# The four voicebus services: Deployment name -> (port env var, default port, console script, service dir).
SERVICES: dict[str, tuple[str, int, str, str]] = {
    "ingress": ("VOICEBUS_INGRESS_PORT", 8080, "voicebus-ingress", "services/ingress"),
    "config": ("VOICEBUS_CONFIG_PORT", 8081, "voicebus-config", "services/config"),
    "agent-runner": ("VOICEBUS_RUNNER_PORT", 8082, "voicebus-agent-runner", "services/agent-runner"),
    "call-control": ("VOICEBUS_CALL_CONTROL_PORT", 8083, "voicebus-call-control", "services/call-control"),
}


# --------------------------------------------------------------------------------------- loading ----
def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    """Every manifest in deploy/k8s, examples included: an example that does not validate is a trap."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != KUSTOMIZATION.name)


def kustomization() -> dict[str, Any]:
    return yaml.safe_load(KUSTOMIZATION.read_text())


def applied_docs() -> list[dict[str, Any]]:
    """The resources ``kubectl apply -k deploy/k8s`` creates (before kustomize's own edits)."""
    docs: list[dict[str, Any]] = []
    for name in kustomization()["resources"]:
        docs.extend(_load(K8S / name))
    return docs


def _all(kind: str, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (docs if docs is not None else applied_docs()) if d["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in applied_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name} in the kustomization, found {len(found)}"
    return found[0]


def _workloads(docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (docs if docs is not None else applied_docs()) if d["kind"] in WORKLOAD_KINDS]


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _configmap_data() -> dict[str, str]:
    return _one("ConfigMap", "voicebus")["data"]


def _container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Literal environment of a container: its envFrom ConfigMaps, then its own literal env values."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            env.update(_one("ConfigMap", src["configMapRef"]["name"])["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def _resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by name, must be one the container declares."""
    declared = container.get("ports", [])
    for p in declared:
        if port in (p["containerPort"], p.get("name")):
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is not declared by container {container['name']}: {declared}")


def _doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _file_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in _load(path):
            yield path, doc


# ------------------------------------------------------------------------------ schema validation ----
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = _load(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{path.name} {_doc_id(doc)} is invalid for Kubernetes {version} at {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:  # an unknown kind/apiVersion is an error too
            pytest.fail(f"{path.name}: {e.message}")


def test_strict_validation_catches_typos_and_wrong_types() -> None:
    """Guard the guard: if strictness were lost, every manifest test above would pass vacuously."""
    deployment = _one("Deployment", "agent-runner")
    kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 630  # misspelt: silently ignored by a lax check
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[-1], strict=True)

    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------- kustomization ----
def test_kustomization_lists_every_manifest_and_only_existing_files() -> None:
    kz = kustomization()
    assert kz["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kz["kind"] == "Kustomization"
    assert kz["namespace"] == NAMESPACE
    resources = kz["resources"]
    assert len(resources) == len(set(resources)), f"duplicate entries in kustomization resources: {resources}"
    missing = [r for r in resources if not (K8S / r).is_file()]
    assert not missing, f"kustomization lists files that do not exist: {missing}"
    expected = {p.name for p in manifest_files() if not p.name.endswith(".example.yaml")}
    unlisted = expected - set(resources)
    assert not unlisted, f"manifests not in kustomization.yaml (name them *.example.yaml if optional): {unlisted}"


def test_kustomization_covers_the_required_resources() -> None:
    have = {_doc_id(d) for d in applied_docs()}
    required = {
        "Namespace/voicebus", "ConfigMap/voicebus", "Secret/voicebus-secrets",
        "StatefulSet/nats", "Service/nats", "Deployment/redis", "Service/redis",
        "StatefulSet/postgres", "Service/postgres",
        "HorizontalPodAutoscaler/agent-runner", "PodDisruptionBudget/agent-runner",
        *(f"{kind}/{name}" for name in SERVICES for kind in ("Deployment", "Service")),
    }
    assert required <= have, f"missing from the kustomization: {sorted(required - have)}"


def test_resource_ids_are_unique() -> None:
    ids = [_doc_id(d) for d in applied_docs()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    assert not dupes, f"the same resource is defined twice: {dupes}"


def test_kustomize_images_match_the_containers() -> None:
    """``kustomize edit set image`` only rewrites images that the images: block names."""
    names = {i["name"] for i in kustomization()["images"]}
    for deployment in SERVICES:
        (container,) = _one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        image = container["image"].rsplit(":", 1)[0]
        assert image == f"voicebus/{deployment}", f"{deployment} runs unexpected image {container['image']}"
        assert image in names, f"{image} is missing from the kustomization images: block"


def test_everything_namespaced_in_voicebus() -> None:
    for path, doc in _file_docs():
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{path.name} {_doc_id(doc)} is cluster-scoped"
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, (
            f"{path.name} {_doc_id(doc)} would land outside the {NAMESPACE} namespace with kubectl apply -f"
        )


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_build_renders_and_validates() -> None:
    """What is actually applied is kustomize's output: build it offline and validate that too."""
    assert KUBECTL is not None
    proc = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"kubectl kustomize failed: {proc.stderr}"
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    # plus what the kustomization generates (the NATS permissions ConfigMap, named with a content hash)
    generated = {f"ConfigMap/{g['name']}" for g in kustomization().get("configMapGenerator", [])}
    built_ids = [re.sub(r"-[a-z0-9]{10}$", "", _doc_id(d)) if d["kind"] == "ConfigMap" else _doc_id(d) for d in built]
    assert sorted(built_ids) == sorted([*(_doc_id(d) for d in applied_docs()), *generated])
    tags = {i["name"]: i["newTag"] for i in kustomization()["images"]}
    for doc in built:
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == NAMESPACE, _doc_id(doc)
    for workload in _workloads(built):
        for container in _containers(workload):
            name = container["image"].rsplit(":", 1)[0]
            if name in tags:
                assert container["image"] == f"{name}:{tags[name]}"


# ------------------------------------------------------------------------------ cross-references ----
def test_workload_selectors_match_their_pod_labels() -> None:
    for workload in _workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), f"{_doc_id(workload)} selector does not match its pods"


def test_workload_selectors_do_not_overlap() -> None:
    """Two workloads whose selectors match each other's pods fight over them (and so do their Services)."""
    workloads = _workloads()
    for a in workloads:
        for b in workloads:
            if a is b:
                continue
            sel = a["spec"]["selector"]["matchLabels"]
            assert not sel.items() <= b["spec"]["template"]["metadata"]["labels"].items(), (
                f"{_doc_id(a)} selects the pods of {_doc_id(b)}"
            )


@pytest.mark.parametrize("service", _all("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_selects_one_workload_and_targets_declared_ports(service: dict[str, Any]) -> None:
    selector = service["spec"]["selector"]
    matched = [w for w in _workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert len(matched) == 1, f"Service/{service['metadata']['name']} selects {[_doc_id(w) for w in matched]}"
    (workload,) = matched
    containers = workload["spec"]["template"]["spec"]["containers"]
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        hits = [c for c in containers if any(target in (p["containerPort"], p.get("name")) for p in c.get("ports", []))]
        assert hits, f"Service/{service['metadata']['name']} port {port['name']} targets {target!r}, undeclared"


def test_statefulsets_name_an_existing_headless_service() -> None:
    for sts in _all("StatefulSet"):
        svc = _one("Service", sts["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{_doc_id(sts)} needs a headless governing Service"
        assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def test_env_references_resolve() -> None:
    """A missing ConfigMap, Secret or key keeps the pod in CreateContainerConfigError."""
    for workload in _workloads():
        for container in _containers(workload):
            for src in container.get("envFrom", []):
                if "configMapRef" in src:
                    _one("ConfigMap", src["configMapRef"]["name"])
                if "secretRef" in src:
                    _one("Secret", src["secretRef"]["name"])
            for item in container.get("env", []):
                ref = item.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    secret = _one("Secret", ref["secretKeyRef"]["name"])
                    keys = {**secret.get("data", {}), **secret.get("stringData", {})}
                    assert ref["secretKeyRef"]["key"] in keys, f"{_doc_id(workload)}: {item['name']} has no key"
                if "configMapKeyRef" in ref:
                    cm = _one("ConfigMap", ref["configMapKeyRef"]["name"])
                    assert ref["configMapKeyRef"]["key"] in cm["data"], f"{_doc_id(workload)}: {item['name']}"


def test_configmap_points_services_at_in_cluster_servers() -> None:
    data = _configmap_data()
    services = {d["metadata"]["name"]: d for d in _all("Service")}
    # NATS_URL is built per pod from these and the pod's own NATS user (test_nats_permissions.py).
    assert data["NATS_SCHEME"] == "nats", "plain in the base; the nats-tls component switches it to tls"
    nats_address = f"nats://{data['NATS_ADDRESS']}"
    for key, url, scheme, svc in (("NATS_ADDRESS", nats_address, "nats", "nats"),
                                  ("REDIS_URL", data["REDIS_URL"], "redis", "redis")):
        m = re.fullmatch(rf"{scheme}://([a-z0-9.-]+):(\d+)(/\d+)?", url)
        assert m, f"{key}={data[key]!r} is not a {scheme}:// address"
        host, port = m.group(1).split(".")[0], int(m.group(2))
        assert host == svc and port in {p["port"] for p in services[svc]["spec"]["ports"]}, f"{key} -> {data[key]}"
    assert data["VOICEBUS_HTTP_HOST"] == "0.0.0.0", "services must listen on the pod IP for probes and Services"
    assert data["OTEL_TRACES_EXPORTER"] in {"none", "console", "otlp"}
    assert data["VOICEBUS_SUBJECT_PREFIX"].replace("-", "").replace("_", "").isalnum()
    for key in ("VOICEBUS_HANDSHAKE_TIMEOUT_S", "VOICEBUS_OFFER_TIMEOUT_S", "VOICEBUS_RUNNER_CAPACITY",
                "VOICEBUS_RUNNER_DRAIN_TIMEOUT_S", "VOICEBUS_DEFAULT_CONCURRENT_CALLS", "VOICEBUS_QUOTA_LEASE_TTL_S"):
        assert float(data[key]) > 0, key


def test_secret_holds_placeholders_not_real_keys() -> None:
    """The committed Secret must never carry a usable Fernet key: it would be public."""
    secret = _one("Secret", "voicebus-secrets")
    values = secret["stringData"]
    assert {"VOICEBUS_SECRET_KEY", "DATABASE_URL", "POSTGRES_PASSWORD"} <= values.keys()
    key = values["VOICEBUS_SECRET_KEY"]
    try:
        usable = len(base64.urlsafe_b64decode(key.encode())) == 32
    except (binascii.Error, ValueError):
        usable = False
    assert not usable, "secret.yaml holds a real Fernet key; keep only placeholders in git"
    assert "REPLACE-ME" in key and "REPLACE-ME" in values["POSTGRES_PASSWORD"]
    assert values["DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert f":{values['POSTGRES_PASSWORD']}@" in values["DATABASE_URL"], "DATABASE_URL and POSTGRES_PASSWORD disagree"


# ------------------------------------------------------------------------------ voicebus services ----
def _pyproject(service_dir: str) -> dict[str, Any]:
    return tomllib.loads((REPO / service_dir / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_probes_hit_health_endpoints_on_the_declared_port(name: str) -> None:
    port_env, default_port, _script, _dir = SERVICES[name]
    workload = _one("Deployment", name)
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    env = _container_env(workload, container)
    assert int(env[port_env]) == default_port, f"{port_env} differs from the documented default"
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {default_port}, f"{name} declares {ports}, the service listens on {default_port}"

    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz", f"{name} liveness must be /healthz (process alive), not {live['path']}"
    assert ready["path"] == "/readyz", f"{name} readiness must be /readyz (dependencies up), not {ready['path']}"
    assert _resolve_port(container, live["port"]) == default_port
    assert _resolve_port(container, ready["port"]) == default_port
    if "startupProbe" in container:
        start = container["startupProbe"]["httpGet"]
        assert start["path"] == "/healthz" and _resolve_port(container, start["port"]) == default_port


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_and_image_agree_with_the_python_package(name: str) -> None:
    _port_env, default_port, script, service_dir = SERVICES[name]
    assert script in _pyproject(service_dir)["project"]["scripts"], f"{service_dir} has no console script {script}"
    service = _one("Service", name)
    assert [p["port"] for p in service["spec"]["ports"]] == [default_port]
    dockerfile = (REPO / service_dir / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {default_port}$", dockerfile, re.M), f"{service_dir}/Dockerfile EXPOSE"


def test_config_gets_its_secrets_from_the_secret() -> None:
    workload = _one("Deployment", "config")
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    assert container.get("args") == ["serve"], "config must run `voicebus-config serve` (migrate, then serve)"
    from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert {"VOICEBUS_SECRET_KEY", "DATABASE_URL"} <= from_secret
    assert "VOICEBUS_SECRET_KEY" not in _configmap_data()
    # only config may read the encryption key
    for other in _workloads():
        if other["metadata"]["name"] == "config":
            continue
        for c in _containers(other):
            refs = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            assert "VOICEBUS_SECRET_KEY" not in refs, f"{_doc_id(other)} must not see the encryption key"


def _prestop_sleep_s(container: dict[str, Any]) -> int:
    pre = container.get("lifecycle", {}).get("preStop")
    if not pre:
        return 0
    if "sleep" in pre:
        return int(pre["sleep"]["seconds"])
    cmd = pre.get("exec", {}).get("command", [])
    assert cmd[:1] == ["sleep"] and len(cmd) == 2, f"unexpected preStop hook {pre}: cannot bound its duration"
    return int(cmd[1])


def test_runner_grace_period_outlasts_its_drain() -> None:
    workload = _one("Deployment", "agent-runner")
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    drain = float(_container_env(workload, container)["VOICEBUS_RUNNER_DRAIN_TIMEOUT_S"])
    grace = spec["terminationGracePeriodSeconds"]
    # The grace period starts with preStop; SIGTERM (and with it the drain) only comes after the hook.
    assert grace > drain + _prestop_sleep_s(container), f"grace {grace}s <= drain {drain}s: live calls get killed"
    assert drain == 600, "VOICEBUS_RUNNER_DRAIN_TIMEOUT_S default is 600 s"


def test_ingress_grace_period_lets_live_sockets_finish() -> None:
    workload = _one("Deployment", "ingress")
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    pre = _prestop_sleep_s(container)
    assert pre > 0, "ingress needs a preStop pause so load balancers stop sending new sockets before SIGTERM"
    assert spec["terminationGracePeriodSeconds"] > pre + float(_configmap_data()["VOICEBUS_RUNNER_DRAIN_TIMEOUT_S"])


def test_hpa_scales_the_agent_runner_deployment() -> None:
    hpa = _one("HorizontalPodAutoscaler", "agent-runner")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", "agent-runner")
    target = _one("Deployment", ref["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= target["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    (container,) = target["spec"]["template"]["spec"]["containers"]
    for resource in resources:  # utilization is computed against requests; without one the HPA is blind
        assert resource in container["resources"]["requests"], f"HPA scales on {resource} but no request is set"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 300, "scale-down must be slow: every removed runner drains"


def test_pdb_covers_the_runner_pods() -> None:
    pdb = _one("PodDisruptionBudget", "agent-runner")
    assert pdb["apiVersion"] == "policy/v1"
    runner = _one("Deployment", "agent-runner")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= runner["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")


def test_datastores_are_persistent_where_it_matters() -> None:
    for name, mount in (("nats", "/data"), ("postgres", "/var/lib/postgresql/data")):
        sts = _one("StatefulSet", name)
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get(mount) in claims, f"{name} keeps {mount} on a volume that does not survive restarts"
    nats = _one("StatefulSet", "nats")["spec"]["template"]["spec"]["containers"][0]
    args = " ".join([*nats.get("command", []), *nats.get("args", [])])
    assert "--jetstream" in args and "--store_dir=/data" in args, "NATS must run JetStream on its volume"


# ----------------------------------------------------------------------------------- pod security ----
@pytest.mark.parametrize("workload", _workloads(), ids=_doc_id)
def test_pods_meet_restricted_pod_security(workload: dict[str, Any]) -> None:
    """The namespace enforces 'restricted'; a pod that breaks it would be refused at admission."""
    ns = _one("Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    spec = workload["spec"]["template"]["spec"]
    pod_sc = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, "no service talks to the Kubernetes API"
    assert spec.get("enableServiceLinks") is False, "injected *_PORT/*_HOST variables can shadow settings"
    for c in _containers(workload):
        sc = c.get("securityContext", {})
        where = f"{_doc_id(workload)} container {c['name']}"
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, f"{where}: runs as root"
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in {"RuntimeDefault", "Localhost"}, f"{where}: seccomp profile"
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
        assert sc.get("privileged", False) is False, f"{where}: privileged"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities.drop must be [ALL]"
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, f"{where}: capabilities"
        assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        res = c.get("resources", {})
        assert {"cpu", "memory"} <= res.get("requests", {}).keys(), f"{where}: cpu/memory requests"
        assert "memory" in res.get("limits", {}), f"{where}: memory limit"
        assert c.get("imagePullPolicy") == "IfNotPresent", f"{where}: imagePullPolicy"
        assert ":" in c["image"] and not c["image"].endswith(":latest"), f"{where}: pin the image tag"
    for volume in spec.get("volumes", []):
        assert not {"hostPath"} & volume.keys(), f"{_doc_id(workload)}: hostPath volumes are not allowed"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_voicebus_pods_run_as_the_image_user_with_writable_tmp(name: str) -> None:
    """The images run as uid 10001 and only write to /tmp, which must be a volume on a read-only root."""
    workload = _one("Deployment", name)
    spec = workload["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 10001
    dockerfile = (REPO / SERVICES[name][3] / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    (container,) = spec["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]]
