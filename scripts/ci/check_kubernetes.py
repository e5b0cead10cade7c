"""Consistency checks of the rendered Kubernetes manifests against the service and its image.

    python -m scripts.ci.check_kubernetes .k8s-ci/rendered/base.yaml .k8s-ci/rendered/gpu.yaml

The JSON-schema validation (kubernetes-validate, run by scripts/ci/kubernetes-check.sh) says that
each object is well formed; this says that they fit together and fit the service: probes on the
health endpoints, thread settings by the service's rule for the CPU limit, a shutdown budget that
covers the preStop delay, the drain window and uvicorn's graceful timeout in `pneumonia-serve`, the
API-key file where the Secret is mounted, the DICOM state directory on a claim of the pod's own (not
a volume that dies with the pod), selectors that match the pods, a NetworkPolicy that lets the
C-STORE port be reached only from listed sources and the probe port by the kubelet only, a non-root
read-only container, and for the GPU variant a GPU, the gpu image and CXR_PROVIDER=cuda. Exit status
1 on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from app.settings import Settings

# Every CXR_* variable the service reads; a manifest naming another one is a typo or a leftover.
KNOWN_SETTINGS = {f"CXR_{name.upper()}" for name in Settings.model_fields}
SERVICE_UID = 10001  # the Dockerfile's USER
MARGIN_S = 5  # between the last expected second of shutdown and SIGKILL
PROBES = {
    "startupProbe": "/health/live",
    "readinessProbe": "/health/ready",
    "livenessProbe": "/health/live",
}

Manifest = dict[str, Any]


def graceful_timeout_s() -> int:
    """uvicorn's graceful-shutdown timeout in `pneumonia-serve` (the image's command)."""
    from app.main import GRACEFUL_SHUTDOWN_S

    return GRACEFUL_SHUTDOWN_S


def cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def one(docs: list[Manifest], kind: str, failures: list[str]) -> Manifest:
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        failures.append(f"expected one {kind}, found {len(found)}")
        return {}
    return found[0]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _lets_through(rule: Manifest, name: str, ports: dict[str, int]) -> bool:
    """Whether a NetworkPolicy ingress rule covers the container port `name` (a rule without
    `ports` covers them all)."""
    listed = rule.get("ports")
    return not listed or any(p.get("port") in (None, name, ports.get(name)) for p in listed)


def _from_anyone(rule: Manifest) -> bool:
    """Whether a NetworkPolicy ingress rule admits every source: no `from`, or a peer that is
    every namespace, every pod, or every address."""
    peers = rule.get("from")
    if not peers:
        return True
    for peer in peers:
        cidr = peer.get("ipBlock", {}).get("cidr", "")
        everywhere = cidr.endswith("/0")
        every_pod = "podSelector" in peer and not peer["podSelector"]
        every_namespace = peer.get("namespaceSelector") == {} and not peer.get("podSelector")
        if everywhere or (every_pod and "namespaceSelector" not in peer) or every_namespace:
            return True
    return False


def check_variant(docs: list[Manifest], graceful_s: int) -> list[str]:
    """Every inconsistency found in one rendered variant (an empty list when there is none)."""
    failures: list[str] = []
    workload = one(docs, "StatefulSet", failures)
    service = one(docs, "Service", failures)
    hpa = one(docs, "HorizontalPodAutoscaler", failures)
    pdb = one(docs, "PodDisruptionBudget", failures)
    policy = one(docs, "NetworkPolicy", failures)
    secrets = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "Secret"}
    if failures:
        return failures

    pod = workload["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    containers = {c["name"]: c for c in spec["containers"]}
    if "api" not in containers:
        return [f"no container named api (found {sorted(containers)})"]
    api = containers["api"]
    env = {e["name"]: e.get("value") for e in api.get("env", [])}
    ports = {p.get("name"): p["containerPort"] for p in api.get("ports", [])}

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    # Selectors and references.
    expect(
        selects(workload["spec"]["selector"]["matchLabels"], pod_labels),
        "StatefulSet selector does not match its pod labels",
    )
    expect(selects(service["spec"].get("selector", {}), pod_labels), "Service selects no pod")
    expect(
        selects(pdb["spec"]["selector"].get("matchLabels", {}), pod_labels),
        "PodDisruptionBudget selects no pod",
    )
    target = hpa["spec"]["scaleTargetRef"]
    expect(
        (target["kind"], target["name"]) == ("StatefulSet", workload["metadata"]["name"]),
        f"HorizontalPodAutoscaler scales {target['kind']}/{target['name']}",
    )
    for port in service["spec"]["ports"]:
        expect(
            port["targetPort"] in ports or port["targetPort"] in ports.values(),
            f"Service targetPort {port['targetPort']} is not a container port",
        )
    expect(ports.get("http") == 8000, "container port `http` is not 8000 (the image's port)")
    if env.get("CXR_DICOM_PORT") is not None:
        expect(
            str(ports.get("dicom")) == str(env["CXR_DICOM_PORT"]),
            f"CXR_DICOM_PORT={env['CXR_DICOM_PORT']} but container port `dicom` is "
            f"{ports.get('dicom')}",
        )

    # Who reaches which port: the API from the cluster, the C-STORE listener only from listed
    # sources, the probe port from no one but the kubelet on the pod's node (which network
    # plugins let through whatever a policy says).
    policy_spec = policy.get("spec", {})
    expect(
        selects(policy_spec.get("podSelector", {}).get("matchLabels", {}), pod_labels),
        "NetworkPolicy selects no pod",
    )
    expect(
        "Ingress" in policy_spec.get("policyTypes", []),
        "NetworkPolicy does not restrict ingress (policyTypes)",
    )
    rules = policy_spec.get("ingress", [])
    expect(
        any(_lets_through(rule, "http", ports) for rule in rules),
        "NetworkPolicy lets no one reach port `http`",
    )
    expect(
        not any(_lets_through(rule, "dicom", ports) and _from_anyone(rule) for rule in rules),
        "NetworkPolicy opens port `dicom` to every source",
    )
    expect(
        not any(_lets_through(rule, "probes", ports) for rule in rules),
        "NetworkPolicy opens port `probes` beyond the kubelet",
    )

    # Probes on the health endpoints, on the probe port (served from a thread of its own, so
    # that a saturated API does not fail its probes and get the pod restarted at peak load).
    probe_port = env.get("CXR_PROBE_PORT")
    expect(
        probe_port is not None and str(ports.get("probes")) == str(probe_port),
        f"CXR_PROBE_PORT={probe_port} but container port `probes` is {ports.get('probes')}",
    )
    expect(
        env.get("CXR_PROBE_HOST") == "0.0.0.0",
        f"CXR_PROBE_HOST is {env.get('CXR_PROBE_HOST')}: the kubelet cannot reach the probes",
    )
    for probe, path in PROBES.items():
        got = api.get(probe, {}).get("httpGet", {})
        expect(
            got.get("path") == path and got.get("port") in ("probes", ports.get("probes")),
            f"{probe} must GET {path} on the probes port (has {got or 'none'})",
        )

    # A non-root, read-only container.
    pod_security, security = spec.get("securityContext", {}), api.get("securityContext", {})
    expect(pod_security.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot is not true")
    expect(
        pod_security.get("runAsUser") == SERVICE_UID,
        f"runAsUser is {pod_security.get('runAsUser')}, the image's user is {SERVICE_UID}",
    )
    expect(security.get("readOnlyRootFilesystem") is True, "root file system is not read-only")
    expect(security.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
    expect(security.get("capabilities", {}).get("drop") == ["ALL"], "capabilities not dropped")

    # Resources, and thread settings matched to the CPU limit.
    resources = api.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for name in ("cpu", "memory"):
        expect(
            name in limits and str(requests.get(name)) == str(limits.get(name)),
            f"{name} request and limit differ or are missing ({requests.get(name)} vs "
            f"{limits.get(name)})",
        )
    if "cpu" in limits:
        # The threads follow one CPU figure, CXR_CPUS (Settings.cpu_count; the rule is in its
        # description): it must be the CPU limit, taken from limits.cpu (or the same number), and
        # the thread settings must be left to follow it.
        cpu_limit = cores(limits["cpu"])
        cpus_entry: dict[str, Any] = next(
            (e for e in api.get("env", []) if e["name"] == "CXR_CPUS"), {}
        )
        ref = cpus_entry.get("valueFrom", {}).get("resourceFieldRef", {})
        from_limit = (
            ref.get("resource") == "limits.cpu"
            and ref.get("containerName", "api") == "api"
            and cores(ref.get("divisor", "1")) == 1
        )
        cpus = env.get("CXR_CPUS")
        expect(
            from_limit or (cpus is not None and float(cpus) == cpu_limit),
            f"CXR_CPUS is not the CPU limit ({limits['cpu']}): take it from limits.cpu "
            "(resourceFieldRef)",
        )
        for name in ("CXR_DECODE_CONCURRENCY", "CXR_ORT_INTRA_OP_THREADS", "CXR_CODEC_THREADS"):
            expect(
                name not in env,
                f"{name} is set: leave it to follow CXR_CPUS (the CPU limit)",
            )
    unknown = sorted(v for v in env if v.startswith("CXR_") and v not in KNOWN_SETTINGS)
    expect(not unknown, f"environment names settings the service does not have: {unknown}")

    # The shutdown budget: preStop, then the drain window, then uvicorn's graceful timeout.
    command = api.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep_s = int(command[1]) if len(command) == 2 and command[0] == "sleep" else None
    expect(sleep_s is not None and sleep_s > 0, f"preStop is not a sleep (has {command})")
    drain_s = float(env.get("CXR_DRAIN_SECONDS") or 0)
    expect(drain_s > 0, "CXR_DRAIN_SECONDS is not set above 0")
    grace = spec.get("terminationGracePeriodSeconds", 30)
    needed = (sleep_s or 0) + drain_s + graceful_s + MARGIN_S
    expect(
        grace >= needed,
        f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} + drain {drain_s} + graceful "
        f"{graceful_s} + margin {MARGIN_S}",
    )

    # API keys: the file the service reads is the mounted Secret's key.
    keys_file = env.get("CXR_API_KEYS_FILE")
    mounted = False
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in api.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        secret_name = volume.get("secret", {}).get("secretName")
        if secret_name is None or not keys_file:
            continue
        key = keys_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
        secret = secrets.get(secret_name, {})
        mounted = key != keys_file and key in secret.get("data", {}) | secret.get("stringData", {})
    expect(mounted, f"CXR_API_KEYS_FILE={keys_file} is not a key of a mounted Secret")

    # DICOM state (intake spool, outbox) on the pod's own claim, which outlives the pod: images the
    # intake has acknowledged are not sent again, so a volume deleted with the pod loses them.
    state_dir = env.get("CXR_STATE_DIR")
    if state_dir is not None:
        claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
        on = [m["name"] for m in api.get("volumeMounts", []) if m["mountPath"] == state_dir]
        expect(
            len(on) == 1 and on[0] in claims and on[0] not in volumes,
            f"CXR_STATE_DIR={state_dir} is not on a volumeClaimTemplate of the StatefulSet "
            f"(mounted from {on or 'nothing'}; claims {sorted(claims)})",
        )

    # Scale-out: the autoscaler's floor survives one voluntary disruption.
    max_unavailable = pdb["spec"].get("maxUnavailable")
    expect(
        isinstance(max_unavailable, int) and max_unavailable < hpa["spec"].get("minReplicas", 1),
        f"PodDisruptionBudget maxUnavailable {max_unavailable} leaves no pod of "
        f"minReplicas {hpa['spec'].get('minReplicas', 1)}",
    )

    # CPU or GPU, consistently.
    gpus = limits.get("nvidia.com/gpu")
    image_tag = api["image"].rsplit(":", 1)[-1] if ":" in api["image"] else ""
    if env.get("CXR_PROVIDER") == "cuda":
        expect(gpus is not None and int(gpus) >= 1, "CXR_PROVIDER=cuda without an nvidia.com/gpu")
        expect(image_tag == "gpu", f"GPU variant runs image {api['image']}, not the gpu image")
    else:
        expect(env.get("CXR_PROVIDER") == "cpu", f"CXR_PROVIDER={env.get('CXR_PROVIDER')}")
        expect(gpus is None, "CPU variant requests a GPU")
        expect(image_tag == "cpu", f"CPU variant runs image {api['image']}, not the cpu image")
    return failures


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    graceful_s = graceful_timeout_s()
    failed = False
    for path in map(Path, argv):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        failures = check_variant(docs, graceful_s)
        kinds = ", ".join(sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs))
        if failures:
            failed = True
            for failure in failures:
                print(f"[k8s] FAIL {path.name}: {failure}")
        else:
            print(f"[k8s] ok   {path.name}: consistent ({kinds})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
