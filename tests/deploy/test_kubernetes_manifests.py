"""The consistency checks that scripts/ci/kubernetes-check.sh runs on the rendered manifests
(`python -m scripts.ci.check_kubernetes`): clean on the manifests as shipped, and each one fails
when the property it guards is broken. (Rendering and schema validation need kustomize and
kubernetes-validate; CI runs that script.)"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.ci import check_kubernetes

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = REPO_ROOT / "deploy" / "kubernetes" / "base"
GPU_PATCH = REPO_ROOT / "deploy" / "kubernetes" / "gpu" / "statefulset-gpu.yaml"

GRACEFUL_S = check_kubernetes.graceful_timeout_s()


def base_objects() -> list[dict[str, Any]]:
    """The base as kustomize renders it, minus the name hashing: its resources, the generated
    Secret, and the image tag from `images`."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = [yaml.safe_load((BASE / name).read_text()) for name in kustomization["resources"]]
    generator = kustomization["secretGenerator"][0]
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": generator["name"]},
            "data": {name: "" for name in generator["files"]},
        }
    )
    tag = kustomization["images"][0]["newTag"]
    api(docs)["image"] = f"{api(docs)['image']}:{tag}"
    return docs


def api(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(c for c in pod_spec(docs)["containers"] if c["name"] == "api")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return workload(docs)["spec"]["template"]["spec"]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "StatefulSet")


def set_env(docs: list[dict[str, Any]], name: str, value: str) -> None:
    env = api(docs)["env"]
    for entry in env:
        if entry["name"] == name:
            entry["value"] = value
            return
    env.append({"name": name, "value": value})


def test_the_base_as_shipped_is_consistent():
    assert check_kubernetes.check_variant(base_objects(), GRACEFUL_S) == []


def test_the_gpu_patch_applied_to_the_base_is_consistent():
    docs = base_objects()
    patch = yaml.safe_load(GPU_PATCH.read_text())["spec"]["template"]["spec"]
    pod_spec(docs)["tolerations"] = patch["tolerations"]
    patched = patch["containers"][0]
    for entry in patched["env"]:
        set_env(docs, entry["name"], entry["value"])
    api(docs)["resources"] = patched["resources"]
    api(docs)["image"] = api(docs)["image"].replace(":cpu", ":gpu")
    assert check_kubernetes.check_variant(docs, GRACEFUL_S) == []
    # ... and the same deployment without its GPU is not.
    del api(docs)["resources"]["limits"]["nvidia.com/gpu"]
    assert check_kubernetes.check_variant(docs, GRACEFUL_S) == [
        "CXR_PROVIDER=cuda without an nvidia.com/gpu"
    ]


def _no_prestop(docs):
    del api(docs)["lifecycle"]


def _short_grace(docs):
    pod_spec(docs)["terminationGracePeriodSeconds"] = 10


def _threads_beside_the_cpu_figure(docs):
    set_env(docs, "CXR_ORT_INTRA_OP_THREADS", "8")


def _decoders_beside_the_cpu_figure(docs):
    set_env(docs, "CXR_DECODE_CONCURRENCY", "4")


def _cpus_from_the_request_of_memory(docs):
    cpus = next(e for e in api(docs)["env"] if e["name"] == "CXR_CPUS")
    cpus["valueFrom"]["resourceFieldRef"]["resource"] = "requests.memory"


def _cpus_above_the_limit(docs):
    env = api(docs)["env"]
    env[:] = [e for e in env if e["name"] != "CXR_CPUS"]
    set_env(docs, "CXR_CPUS", "4")


def _cpus_missing(docs):
    env = api(docs)["env"]
    env[:] = [e for e in env if e["name"] != "CXR_CPUS"]


def _unknown_setting(docs):
    set_env(docs, "CXR_INFERENCE_CONCURRENCY", "1")


def _dicom_port_elsewhere(docs):
    set_env(docs, "CXR_DICOM_PORT", "104")


def _readiness_on_liveness(docs):
    api(docs)["readinessProbe"]["httpGet"]["path"] = "/health/live"


def _liveness_on_the_api_port(docs):
    api(docs)["livenessProbe"]["httpGet"]["port"] = "http"


def _probe_port_elsewhere(docs):
    set_env(docs, "CXR_PROBE_PORT", "9000")


def _probes_on_loopback(docs):
    set_env(docs, "CXR_PROBE_HOST", "127.0.0.1")


def _root(docs):
    pod_spec(docs)["securityContext"]["runAsUser"] = 0


def _writable(docs):
    api(docs)["securityContext"]["readOnlyRootFilesystem"] = False


def _keys_elsewhere(docs):
    set_env(docs, "CXR_API_KEYS_FILE", "/etc/somewhere/keys")


def _burstable(docs):
    api(docs)["resources"]["limits"]["memory"] = "2Gi"


def _service_selects_nothing(docs):
    service = next(d for d in docs if d["kind"] == "Service")
    service["spec"]["selector"] = {"app": "other"}


def _state_on_an_emptydir(docs):
    workload(docs)["spec"]["volumeClaimTemplates"] = []
    pod_spec(docs)["volumes"].append({"name": "state", "emptyDir": {}})


def _state_dir_unmounted(docs):
    set_env(docs, "CXR_STATE_DIR", "/var/lib/elsewhere")


def _network_policy(docs):
    return next(d for d in docs if d["kind"] == "NetworkPolicy")


def _no_network_policy(docs):
    docs.remove(_network_policy(docs))


def _policy_selects_nothing(docs):
    _network_policy(docs)["spec"]["podSelector"] = {"matchLabels": {"app": "other"}}


def _policy_without_ingress(docs):
    _network_policy(docs)["spec"]["policyTypes"] = ["Egress"]


def _dicom_from_anyone(docs):
    rules = _network_policy(docs)["spec"]["ingress"]
    rules.append({"ports": [{"port": 11112, "protocol": "TCP"}]})


def _dicom_from_every_namespace(docs):
    (rule,) = [r for r in _network_policy(docs)["spec"]["ingress"] if "from" in r]
    rule["from"].append({"namespaceSelector": {}})


def _dicom_from_everywhere(docs):
    (rule,) = [r for r in _network_policy(docs)["spec"]["ingress"] if "from" in r]
    rule["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})


def _every_port_from_peers(docs):
    (rule,) = [r for r in _network_policy(docs)["spec"]["ingress"] if "from" in r]
    del rule["ports"]


def _api_closed(docs):
    rules = _network_policy(docs)["spec"]["ingress"]
    rules[:] = [r for r in rules if "from" in r]


def _pdb_blocks_all(docs):
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    pdb["spec"]["maxUnavailable"] = 2


@pytest.mark.parametrize(
    ("break_it", "fragment"),
    [
        (_no_prestop, "preStop is not a sleep"),
        (_short_grace, "terminationGracePeriodSeconds 10 < preStop 5 + drain 5.0 + graceful"),
        (_threads_beside_the_cpu_figure, "CXR_ORT_INTRA_OP_THREADS is set: leave it to follow"),
        (_decoders_beside_the_cpu_figure, "CXR_DECODE_CONCURRENCY is set: leave it to follow"),
        (_cpus_from_the_request_of_memory, "CXR_CPUS is not the CPU limit (2)"),
        (_cpus_above_the_limit, "CXR_CPUS is not the CPU limit (2)"),
        (_cpus_missing, "CXR_CPUS is not the CPU limit (2)"),
        (_unknown_setting, "settings the service does not have: ['CXR_INFERENCE_CONCURRENCY']"),
        (_dicom_port_elsewhere, "CXR_DICOM_PORT=104 but container port `dicom` is 11112"),
        (_readiness_on_liveness, "readinessProbe must GET /health/ready"),
        (_liveness_on_the_api_port, "livenessProbe must GET /health/live on the probes port"),
        (_probe_port_elsewhere, "CXR_PROBE_PORT=9000 but container port `probes` is 8081"),
        (_probes_on_loopback, "CXR_PROBE_HOST is 127.0.0.1"),
        (_root, "runAsUser is 0"),
        (_writable, "root file system is not read-only"),
        (_keys_elsewhere, "CXR_API_KEYS_FILE=/etc/somewhere/keys is not a key of a mounted Secret"),
        (_burstable, "memory request and limit differ"),
        (_service_selects_nothing, "Service selects no pod"),
        (_pdb_blocks_all, "PodDisruptionBudget maxUnavailable 2 leaves no pod of minReplicas 2"),
        (_no_network_policy, "expected one NetworkPolicy, found 0"),
        (_policy_selects_nothing, "NetworkPolicy selects no pod"),
        (_policy_without_ingress, "NetworkPolicy does not restrict ingress"),
        (_dicom_from_anyone, "NetworkPolicy opens port `dicom` to every source"),
        (_dicom_from_every_namespace, "NetworkPolicy opens port `dicom` to every source"),
        (_dicom_from_everywhere, "NetworkPolicy opens port `dicom` to every source"),
        (_every_port_from_peers, "NetworkPolicy opens port `probes` beyond the kubelet"),
        (_api_closed, "NetworkPolicy lets no one reach port `http`"),
        (_state_on_an_emptydir, "CXR_STATE_DIR=/var/lib/pneumonia is not on a volumeClaimTemplate"),
        (_state_dir_unmounted, "CXR_STATE_DIR=/var/lib/elsewhere is not on a volumeClaimTemplate"),
    ],
)
def test_each_check_fails_when_its_property_is_broken(break_it, fragment):
    docs = copy.deepcopy(base_objects())
    break_it(docs)
    failures = check_kubernetes.check_variant(docs, GRACEFUL_S)
    assert len(failures) == 1 and fragment in failures[0], failures
