"""Offline checks of deploy/k8s/keda: autoscaling the runners on active calls.

kubernetes-validate has no schema for KEDA's CRDs, so the ScaledObject is checked here against the
fields KEDA documents (keda.sh/v1alpha1 ScaledObject spec, Prometheus and CPU scalers, KEDA 2.15):
an unknown key is an error, as strict validation makes it for built-in kinds. The Prometheus query is
cross-checked against the metric names the runner really exports (imported from its metrics module),
so renaming a metric cannot silently leave the autoscaler reading nothing.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from voicebus.agent_runner import metrics

from .test_manifests import K8S, KUBERNETES_VERSIONS, NAMESPACE, _doc_id, _one, kustomization

KEDA = K8S / "keda"
EXPORTED = {metrics.ACTIVE_CALLS, metrics.CAPACITY, metrics.FREE_SLOTS, metrics.DRAINING, metrics.INFO,
            f"{metrics.CALLS_ACCEPTED}_total", f"{metrics.CALLS_ENDED}_total"}

# The documented ScaledObject fields: a dict is an object with exactly these optional keys, a list of a
# dict an array of such objects, ``None`` a leaf (its type checked separately).
BEHAVIOR = None  # an HPA behavior: validated by Kubernetes' own autoscaling/v2 schema below
SPEC_FIELDS: dict[str, Any] = {
    "scaleTargetRef": {"apiVersion": None, "kind": None, "name": None, "envSourceContainerName": None},
    "pollingInterval": None, "cooldownPeriod": None, "initialCooldownPeriod": None, "idleReplicaCount": None,
    "minReplicaCount": None, "maxReplicaCount": None,
    "fallback": {"failureThreshold": None, "replicas": None, "behavior": None},
    "advanced": {
        "restoreToOriginalReplicaCount": None,
        "horizontalPodAutoscalerConfig": {"name": None, "behavior": BEHAVIOR},
        "scalingModifiers": {"target": None, "activationTarget": None, "metricType": None, "formula": None},
    },
    "triggers": [{"type": None, "name": None, "metadata": None, "authenticationRef": {"name": None, "kind": None},
                  "metricType": None, "useCachedMetrics": None}],
}
INT_FIELDS = {"pollingInterval", "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount", "minReplicaCount",
              "maxReplicaCount", "failureThreshold", "replicas"}
ANNOTATIONS = {"scaledobject.keda.sh/transfer-hpa-ownership", "validations.keda.sh/hpa-ownership",
               "autoscaling.keda.sh/paused"}
TRIGGER_METADATA = {
    "prometheus": ({"serverAddress", "query", "threshold"},
                   {"serverAddress", "query", "threshold", "queryParameters", "activationThreshold", "namespace",
                    "customHeaders", "ignoreNullValues", "unsafeSsl", "authModes"}),
    "cpu": ({"value"}, {"value", "containerName"}),
}
TRIGGER_METRIC_TYPES = {"prometheus": {"AverageValue", "Value"}, "cpu": {"Utilization", "AverageValue"}}


def _load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _component() -> dict[str, Any]:
    return yaml.safe_load((KEDA / "kustomization.yaml").read_text())


def _scaled_object() -> dict[str, Any]:
    docs = [d for name in _component()["resources"] for d in _load(KEDA / name)]
    found = [d for d in docs if d["kind"] == "ScaledObject"]
    assert len(found) == 1, f"expected one ScaledObject in deploy/k8s/keda, found {len(found)}"
    return found[0]


def _check_fields(value: Any, shape: Any, where: str) -> None:
    if isinstance(shape, dict):
        assert isinstance(value, dict), f"{where} must be an object, got {value!r}"
        unknown = set(value) - set(shape)
        assert not unknown, f"{where}: unknown field(s) {sorted(unknown)} (KEDA ignores them: a typo does nothing)"
        for key, sub in value.items():
            _check_fields(sub, shape[key], f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list) and value, f"{where} must be a non-empty list"
        for i, item in enumerate(value):
            _check_fields(item, shape[0], f"{where}[{i}]")
    elif where.rsplit(".", 1)[-1] in INT_FIELDS:
        assert isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"{where} must be an int >= 0"


def check_scaled_object(so: dict[str, Any]) -> None:
    """Everything KEDA's CRD schema and admission webhook would refuse, as far as its docs state it."""
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
    assert set(so) <= {"apiVersion", "kind", "metadata", "spec"}, sorted(so)
    unknown = {k for k in so["metadata"].get("annotations", {}) if k.endswith("keda.sh") or ".keda.sh/" in k}
    assert unknown <= ANNOTATIONS, f"unknown KEDA annotations {sorted(unknown - ANNOTATIONS)}"
    spec = so["spec"]
    _check_fields(spec, SPEC_FIELDS, "spec")
    assert spec["scaleTargetRef"]["name"], "spec.scaleTargetRef.name is mandatory"
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    if "idleReplicaCount" in spec:
        assert spec["idleReplicaCount"] < spec.get("minReplicaCount", 0)
    if "fallback" in spec:
        assert {"failureThreshold", "replicas"} <= spec["fallback"].keys(), "fallback needs both fields"
    names = [t.get("name") for t in spec["triggers"]]
    assert len(names) == len(set(names)), f"trigger names must be unique: {names}"
    for i, trigger in enumerate(spec["triggers"]):
        where = f"spec.triggers[{i}]"
        kind = trigger["type"]
        assert kind in TRIGGER_METADATA, f"{where}: trigger type {kind!r} is not one this test knows the fields of"
        meta = trigger["metadata"]
        assert isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()), (
            f"{where}.metadata values must all be strings (KEDA reads a map of strings)"
        )
        required, allowed = TRIGGER_METADATA[kind]
        assert required <= meta.keys(), f"{where}.metadata misses {sorted(required - meta.keys())}"
        assert meta.keys() <= allowed, f"{where}.metadata: unknown field(s) {sorted(meta.keys() - allowed)}"
        metric_type = trigger.get("metricType", "AverageValue")
        assert metric_type in TRIGGER_METRIC_TYPES[kind], f"{where}: metricType {metric_type}"
        if "fallback" in spec and kind != "cpu":
            assert metric_type == "AverageValue", f"{where}: KEDA's fallback only works with AverageValue"
        if kind == "prometheus":
            assert float(meta["threshold"]) > 0
            assert re.fullmatch(r"https?://[^/\s]+(/\S*)?", meta["serverAddress"]), meta["serverAddress"]
            assert meta.get("ignoreNullValues", "true") in {"true", "false"}
        if kind == "cpu":
            assert 0 < int(meta["value"]) <= 100


# ------------------------------------------------------------------------------------ structure ----
def test_component_is_optional_and_lists_only_existing_files() -> None:
    kz = _component()
    assert (kz["apiVersion"], kz["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    assert all((KEDA / r).is_file() for r in kz["resources"])
    base = kustomization()
    assert not any(r.startswith("keda") for r in base["resources"]), (
        "deploy/k8s must not include the KEDA component: apply -k fails where KEDA's CRDs are absent"
    )
    assert not any("keda" in c for c in base.get("components", []))


def test_scaled_object_has_only_documented_keda_fields() -> None:
    check_scaled_object(_scaled_object())


def test_structure_check_catches_typos_and_wrong_types() -> None:
    """Guard the guard, as for the built-in kinds: a misspelt KEDA field is silently ignored by KEDA."""
    so = _scaled_object()
    for mutate in (
        lambda s: s["spec"].__setitem__("minReplicas", 2),  # HPA spelling, not KEDA's
        lambda s: s["spec"]["triggers"][0]["metadata"].__setitem__("threshold", 1),  # not a string
        lambda s: s["spec"]["triggers"][0]["metadata"].__setitem__("querry", "x"),
        lambda s: s["spec"].__setitem__("maxReplicaCount", "20"),
        lambda s: s["spec"]["triggers"][0]["metadata"].pop("serverAddress"),
    ):
        broken = copy.deepcopy(so)
        mutate(broken)
        with pytest.raises(AssertionError):
            check_scaled_object(broken)


def test_scaled_object_targets_the_runner_deployment_like_the_fallback_hpa() -> None:
    so, hpa = _scaled_object(), _one("HorizontalPodAutoscaler", "agent-runner")
    assert so["metadata"]["namespace"] == NAMESPACE
    ref = so["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment"), ref["name"]) == (
        "apps/v1", "Deployment", "agent-runner")
    deployment = _one("Deployment", ref["name"])
    spec = so["spec"]
    assert spec["minReplicaCount"] >= 2, "at least two runners: one can drain or die while the other takes calls"
    assert spec["minReplicaCount"] <= deployment["spec"]["replicas"] <= spec["maxReplicaCount"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (hpa["spec"]["minReplicas"],
                                                                  hpa["spec"]["maxReplicas"])
    hpa_config = spec["advanced"]["horizontalPodAutoscalerConfig"]
    assert hpa_config["behavior"] == hpa["spec"]["behavior"], "KEDA's HPA and the fallback HPA must behave alike"
    # KEDA takes over an HPA left by `kubectl apply -k deploy/k8s` only under its own name and with this annotation.
    assert hpa_config["name"] == hpa["metadata"]["name"]
    assert so["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"
    # The behavior KEDA copies into its HPA must be one Kubernetes accepts.
    as_hpa = copy.deepcopy(hpa)
    as_hpa["spec"]["behavior"] = hpa_config["behavior"]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(as_hpa, version, strict=True)
    assert spec.get("fallback") is None, "a fixed fallback replica count would shrink a busy pool when Prometheus fails"


def test_cpu_trigger_has_a_cpu_request_to_measure_against() -> None:
    (container,) = _one("Deployment", "agent-runner")["spec"]["template"]["spec"]["containers"]
    triggers = {t["type"] for t in _scaled_object()["spec"]["triggers"]}
    assert "cpu" in triggers and "cpu" in container["resources"]["requests"]


# --------------------------------------------------------------------------------- the metric ----
def _prometheus_trigger() -> dict[str, Any]:
    (trigger,) = [t for t in _scaled_object()["spec"]["triggers"] if t["type"] == "prometheus"]
    return trigger


def test_query_reads_metrics_the_runner_exports() -> None:
    query = _prometheus_trigger()["metadata"]["query"]
    used = set(re.findall(r"\b(voicebus_[a-z0-9_]+)", query))
    assert used, "the query reads no voicebus metric"
    assert used <= EXPORTED, f"the query reads metrics no runner exports: {sorted(used - EXPORTED)}"
    assert {metrics.ACTIVE_CALLS, metrics.CAPACITY, metrics.DRAINING} <= used
    # Each selector is limited to the stack's namespace, or another stack's runners would scale this one.
    selectors = re.findall(r"voicebus_[a-z0-9_]+(\{[^}]*\})?", query)
    assert all(s == f'{{namespace="{NAMESPACE}"}}' for s in selectors), selectors
    depth = 0
    for ch in query:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        assert depth >= 0, "unbalanced parentheses"
    assert depth == 0, "unbalanced parentheses"


def test_query_keeps_headroom_and_asks_for_replicas() -> None:
    """threshold 1 with AverageValue: the HPA wants ceil(query) replicas, so the query must be a runner count."""
    trigger = _prometheus_trigger()
    assert trigger["metricType"] == "AverageValue" and float(trigger["metadata"]["threshold"]) == 1
    query = " ".join(trigger["metadata"]["query"].split())
    m = re.search(r"/ avg\(" + metrics.CAPACITY + r"\{[^}]*\}\) \) / (0\.\d+)$", query)
    assert m, f"expected (calls / slots per runner) / target utilization, got {query}"
    target = float(m.group(1))
    assert 0.5 <= target <= 0.85, f"target utilization {target}: no headroom for a burst, or too much idle"


def test_runner_pods_are_scraped_on_the_metrics_port_and_path() -> None:
    deployment = _one("Deployment", "agent-runner")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}
    assert annotations["prometheus.io/path"] == metrics.METRICS_PATH


# ------------------------------------------------------------------------------------- rendering ----
KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_overlay_with_the_component_renders_without_the_cpu_hpa(tmp_path: Path) -> None:
    """The overlay the README shows: the stack, plus the ScaledObject, minus the HPA KEDA replaces."""
    assert KUBECTL is not None
    rel = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel)], "components": [str(rel / "keda")],
    }))
    proc = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"kubectl kustomize failed: {proc.stderr}"
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    ids = {_doc_id(d) for d in built}
    assert "ScaledObject/agent-runner" in ids
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in built), "two autoscalers would fight"
    assert {"Deployment/agent-runner", "PodDisruptionBudget/agent-runner"} <= ids
    for doc in built:
        if doc["kind"] == "ScaledObject":
            check_scaled_object(doc)
            assert doc["metadata"]["namespace"] == NAMESPACE
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
