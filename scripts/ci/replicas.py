"""What the service's replicas do together, checked on Docker (the CI stage after the smoke test).

    python -m scripts.ci.replicas match COMPOSE_JSON [--statefulset PATH]
    python -m scripts.ci.replicas run --compose-file F --project P --env-file E --url URL --key K

`match` compares the `api` service of deploy/replicas/compose.yml (as `docker compose config
--format json` resolves it) with the pod template of deploy/kubernetes/base/statefulset.yaml: every
environment variable of the StatefulSet with the same value (the stage's own additions listed in
`STAGE_ONLY`), the readiness probe's path, port, period, timeout and failures, the start-up
probe's budget as the start period, user and group, a read-only root with /tmp a 64 MiB tmpfs, no
capabilities and no privilege escalation, CPU and memory limits, and the grace period. Kubernetes
cannot run on these machines, so this is how the stage's replicas stand in for the pods.

`run` drives the replicas `scripts/ci/docker-replicas.sh` has started behind HAProxy with a shared
PostgreSQL outbox and a counting STOW-RS sink (scripts/ci/stow_sink.py), and asserts:

1. requests spread over every replica;
2. a result made through one replica is readable through each of them;
3. every result object reaches the sink exactly once;
4. `--scale api=4` adds a replica that serves as soon as it is healthy;
5. a replica stopped gracefully (SIGTERM) under load loses nothing: every request is answered
   200 (a client retrying a 503 with Retry-After, as the service asks), every result is delivered
   exactly once;
6. a replica killed (SIGKILL) while its delivery hangs in the sink leaves that delivery to another
   after its lease (CXR_RESULTS_LEASE_S), delivered exactly once.

Exit status 1 on any failure, with what failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydicom.uid import generate_uid

from app.testing.dicom_files import encode_dataset, make_dataset, ramp

REPO_ROOT = Path(__file__).resolve().parents[2]

STATEFULSET = REPO_ROOT / "deploy" / "kubernetes" / "base" / "statefulset.yaml"
SERVICE = "api"
# Variables the stage's compose service sets beyond the pod template, and why.
STAGE_ONLY = {
    "CXR_RESULTS_DICOMWEB_URL": "the counting STOW-RS sink as the PACS",
    "CXR_RESULTS_LEASE_S": "a short delivery lease, so that a killed replica's claim is taken "
    "over within seconds",
}
_PROBE = re.compile(
    r"HTTPConnection\('127\.0\.0\.1', (?P<port>\d+), timeout=(?P<timeout>\d+)\); "
    r"c\.request\('GET', '(?P<path>[^']+)'\)"
)

Manifest = dict[str, Any]


# -- match: compose service against the StatefulSet's pod template ---------------------------------


def seconds(value: str | int | float | None) -> float | None:
    """Compose durations (`5s`, `1m30s`, or nanoseconds as `config --format json` writes them)."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return value / 1e9 if value > 10_000_000 else float(value)
    total, found = 0.0, False
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(amount) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
        found = True
    if not found:
        raise ValueError(f"not a duration: {value!r}")
    return total


def memory_bytes(value: str | int) -> int:
    text = str(value).strip()
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3}
    for unit, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.lower().endswith(unit.lower()) and (len(unit) == 2 or text[-2:-1].isdigit()):
            return int(float(text[: -len(unit)]) * factor)
    text = text.removesuffix("b").removesuffix("B")
    return int(float(text))


def match(compose_service: Manifest, statefulset: Manifest) -> list[str]:
    """Differences between the compose service and the StatefulSet's pod template; [] if none."""
    failures: list[str] = []
    pod = statefulset["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == SERVICE)
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}

    # Environment: the same names with the same values; a Secret's value must be set.
    env = {
        str(k): "" if v is None else str(v)
        for k, v in compose_service.get("environment", {}).items()
    }
    for item in container.get("env", []):
        name = item["name"]
        if name not in env:
            failures.append(f"env {name}: set by the StatefulSet, missing in compose")
        elif "value" in item and env[name] != str(item["value"]):
            failures.append(
                f"env {name}: {env[name]!r} in compose, {item['value']!r} in the StatefulSet"
            )
        elif "valueFrom" in item and not env[name]:
            failures.append(f"env {name}: from a Secret in the StatefulSet, empty in compose")
    pod_names = {item["name"] for item in container.get("env", [])}
    for name in sorted(set(env) - pod_names - set(STAGE_ONLY)):
        failures.append(
            f"env {name}: set in compose only (not in the StatefulSet, not in STAGE_ONLY)"
        )

    # Probes: Docker's healthcheck is the readiness probe; its start period the start-up budget.
    health = compose_service.get("healthcheck") or {}
    readiness = container.get("readinessProbe", {})
    startup = container.get("startupProbe", {})
    test = " ".join(str(part) for part in health.get("test") or [])
    probe = _PROBE.search(test)
    if health.get("disable") or probe is None:
        failures.append("healthcheck: not the service's readiness probe (http.client on 127.0.0.1)")
    else:
        get = readiness.get("httpGet", {})
        port = get.get("port")
        port = ports.get(port, port)
        if probe["path"] != get.get("path"):
            failures.append(f"healthcheck path {probe['path']} != readinessProbe {get.get('path')}")
        if int(probe["port"]) != port:
            failures.append(f"healthcheck port {probe['port']} != readinessProbe port {port}")
        if int(probe["timeout"]) != readiness.get("timeoutSeconds"):
            failures.append(f"healthcheck HTTP timeout {probe['timeout']} s != readinessProbe's")
    pairs = (
        ("interval", seconds(health.get("interval")), readiness.get("periodSeconds")),
        ("timeout", seconds(health.get("timeout")), readiness.get("timeoutSeconds")),
        ("retries", health.get("retries"), readiness.get("failureThreshold")),
        (
            "start_period",
            seconds(health.get("start_period")),
            startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3),
        ),
    )
    for name, ours, theirs in pairs:
        if ours is None or float(ours) != float(theirs):
            failures.append(f"healthcheck {name} {ours} != the StatefulSet's {theirs}")

    # Who runs it, and what it may write.
    context = pod.get("securityContext", {}) | container.get("securityContext", {})
    user = f"{context.get('runAsUser')}:{context.get('runAsGroup')}"
    if str(compose_service.get("user")) != user:
        failures.append(f"user {compose_service.get('user')!r} != the StatefulSet's {user}")
    if not context.get("runAsNonRoot") or context.get("runAsUser") == 0:
        failures.append("the StatefulSet does not run as non-root")
    if compose_service.get("read_only") is not True or not context.get("readOnlyRootFilesystem"):
        failures.append("root file system: not read-only in both")
    drops = context.get("capabilities", {}).get("drop", [])
    if "ALL" not in (compose_service.get("cap_drop") or []) or "ALL" not in drops:
        failures.append("capabilities: not all dropped in both")
    no_new = "no-new-privileges:true" in (compose_service.get("security_opt") or [])
    if not no_new or context.get("allowPrivilegeEscalation") is not False:
        failures.append("privilege escalation: not refused in both")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    tmp_limit = volumes.get(mounts.get("/tmp", ""), {}).get("emptyDir", {}).get("sizeLimit")
    tmpfs = {
        entry.split(":", 1)[0]: entry.partition(":")[2]
        for entry in compose_service.get("tmpfs") or []
    }
    size = re.search(r"size=(\w+)", tmpfs.get("/tmp", ""))
    if tmp_limit is None or size is None or memory_bytes(size[1]) != memory_bytes(tmp_limit):
        failures.append(f"/tmp: tmpfs {tmpfs.get('/tmp')!r} != emptyDir sizeLimit {tmp_limit}")
    state_dir = env.get("CXR_STATE_DIR", "")
    if state_dir not in tmpfs and not any(
        v.get("target") == state_dir for v in compose_service.get("volumes") or []
    ):
        failures.append(f"CXR_STATE_DIR {state_dir}: not a writable mount of each replica")
    keys = env.get("CXR_API_KEYS_FILE", "")
    if not any(v.get("target") == keys for v in compose_service.get("volumes") or []):
        failures.append(f"CXR_API_KEYS_FILE {keys}: no file mounted there")

    # Resources and the shutdown budget.
    limits = ((compose_service.get("deploy") or {}).get("resources") or {}).get("limits") or {}
    pod_limits = container.get("resources", {}).get("limits", {})
    if float(limits.get("cpus", 0)) != float(pod_limits.get("cpu", -1)):
        failures.append(f"cpus {limits.get('cpus')} != limits.cpu {pod_limits.get('cpu')}")
    if "memory" not in limits or memory_bytes(limits["memory"]) != memory_bytes(
        pod_limits.get("memory", "0")
    ):
        failures.append(
            f"memory {limits.get('memory')} != limits.memory {pod_limits.get('memory')}"
        )
    grace = seconds(compose_service.get("stop_grace_period"))
    if grace != pod.get("terminationGracePeriodSeconds"):
        failures.append(
            f"stop_grace_period {grace} s != terminationGracePeriodSeconds "
            f"{pod.get('terminationGracePeriodSeconds')}"
        )
    return failures


def main_match(args: argparse.Namespace) -> int:
    compose = json.loads(Path(args.compose_json).read_text(encoding="utf-8"))
    statefulset = yaml.safe_load(Path(args.statefulset).read_text(encoding="utf-8"))
    failures = match(compose["services"][SERVICE], statefulset)
    for failure in failures:
        print(f"[replicas] compose vs StatefulSet: {failure}", file=sys.stderr)
    if failures:
        return 1
    print(
        "[replicas] compose service `api` matches the StatefulSet's pod template (env, probes, "
        f"user, read-only root, capabilities, /tmp, limits, grace period); stage-only env: "
        f"{', '.join(sorted(STAGE_ONLY))}"
    )
    return 0


# -- run: the replicas together --------------------------------------------------------------------


class CheckFailed(Exception):
    pass


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


@dataclass
class Made:
    """A result made through the load balancer: the source UID, its objects, who answered."""

    source_uid: str
    object_uids: list[str]
    served_by: str
    label: str


@dataclass
class Stage:
    compose: list[str]
    url: str
    key: str
    lease_s: float
    started: float = field(default_factory=time.monotonic)
    made: list[Made] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[replicas {time.monotonic() - self.started:5.1f}s] {text}", flush=True)

    # docker ------------------------------------------------------------------------------------

    def docker(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise CheckFailed(f"{' '.join(args[:4])}...: {done.stderr.strip()[-400:]}")
        return done.stdout

    def addresses(self, service: str = SERVICE) -> dict[str, str]:
        """Address on the compose network -> container ID, of the running containers."""
        ids = self.docker(*self.compose, "ps", "-q", service).split()
        if not ids:
            return {}
        template = "{{.Id}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        found = {}
        for line in self.docker("docker", "inspect", "-f", template, *ids).splitlines():
            cid, _, ip = line.partition(" ")
            if ip:
                found[ip] = cid[:12]
        return found

    @property
    def sink(self) -> str:
        (ip,) = self.addresses("sink")
        return f"http://{ip}:8080"

    def counts(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.sink}/counts", timeout=5).json()
        return answer

    # HTTP --------------------------------------------------------------------------------------

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def make(self, client: httpx.Client, index: int, retries: int = 0) -> tuple[Made | None, int]:
        """POST a fresh DICOM with deliver=true through the load balancer; retry a 503 (the
        service's Retry-After) up to `retries` times. (result or None, 503s retried)."""
        data = dicom(index)
        retried = 0
        while True:
            response = client.post(
                f"{self.url}/predict?deliver=true",
                content=data,
                headers=self.headers | {"Content-Type": "application/dicom"},
            )
            if response.status_code == 503 and retried < retries:
                retried += 1
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.status_code != 200:
                return None, retried
            body = response.json()
            made = Made(
                source_uid=body["dicom"]["sop_instance_uid"],
                object_uids=[o["sop_instance_uid"] for o in body["result"]["objects"]],
                served_by=response.headers.get("X-Served-By", "?"),
                label=body["label"],
            )
            return made, retried

    def wait_delivered(self, timeout_s: float = 30.0) -> dict[str, list[dict[str, Any]]]:
        """Wait until every object made so far is at the sink; then each must be there once."""
        expected = {uid for made in self.made for uid in made.object_uids}
        deadline = time.monotonic() + timeout_s
        stored: dict[str, list[dict[str, Any]]] = {}
        while time.monotonic() < deadline:
            stored = self.counts()["stored"]
            if expected <= set(stored):
                break
            time.sleep(0.25)
        missing = expected - set(stored)
        check(
            not missing, f"{len(missing)} of {len(expected)} result objects never reached the sink"
        )
        twice = {uid: len(v) for uid, v in stored.items() if len(v) != 1}
        check(not twice, f"delivered more than once: {twice}")
        extra = set(stored) - expected
        check(not extra, f"the sink got {len(extra)} objects no answer named")
        return stored

    # the checks --------------------------------------------------------------------------------

    def spread_and_deliver(self, client: httpx.Client, n: int) -> None:
        replicas = self.addresses()
        check(len(replicas) == 3, f"3 replicas running, found {len(replicas)}")
        for index in range(n):
            made, _ = self.make(client, index)
            check(made is not None, f"request {index} through HAProxy failed")
            assert made is not None
            self.made.append(made)
        served = Counter(m.served_by for m in self.made)
        self.say(f"{n} results through HAProxy, served by {dict(served)}")
        check(
            set(served) == set(replicas),
            f"every replica serves: {dict(served)} of {sorted(replicas)}",
        )
        check(min(served.values()) >= n // 6, f"requests spread: {dict(served)}")

        for made in self.made:
            for ip in replicas:
                response = client.get(
                    f"http://{ip}:8000/results/{made.source_uid}", headers=self.headers
                )
                check(
                    response.status_code == 200,
                    f"result via {made.served_by} read via {ip}: {response.status_code}",
                )
                body = response.json()
                check(
                    body["answer"]["label"] == made.label
                    and [o["sop_instance_uid"] for o in body["result"]["objects"]]
                    == made.object_uids,
                    f"result via {made.served_by} read via {ip}: another answer",
                )
        self.say(
            f"each of the {n} results read through each of the {len(replicas)} replicas: "
            "the same answer"
        )

        t0 = time.monotonic()
        stored = self.wait_delivered()
        senders = Counter(entry[0]["sender"] for entry in stored.values())
        self.say(
            f"{len(stored)} result objects at the sink, each exactly once, "
            f"{time.monotonic() - t0:.1f} s later; sent by {dict(senders)}"
        )

    def scale_up(self, client: httpx.Client) -> None:
        before = set(self.addresses())
        t0 = time.monotonic()
        self.docker(
            *self.compose,
            "up",
            "-d",
            "--no-recreate",
            "--wait",
            "--scale",
            f"{SERVICE}=4",
            SERVICE,
            timeout=150,
        )
        healthy = time.monotonic() - t0
        new = set(self.addresses()) - before
        check(len(new) == 1, f"one replica added, found {sorted(new)}")
        (ip,) = new
        t1 = time.monotonic()
        served: Counter[str] = Counter()
        for index in range(1000, 1040):
            made, _ = self.make(client, index)
            check(made is not None, f"request {index} failed after scaling")
            assert made is not None
            self.made.append(made)
            served[made.served_by] += 1
            if made.served_by == ip:
                break
        first = time.monotonic() - t1
        check(served[ip] == 1, f"the new replica {ip} never served through HAProxy: {dict(served)}")
        check(first <= 5.0, f"the new replica served only {first:.1f} s after it was healthy")
        response = client.get(
            f"http://{ip}:8000/results/{self.made[0].source_uid}", headers=self.headers
        )
        check(
            response.status_code == 200,
            f"the new replica reads an earlier result: {response.status_code}",
        )
        self.say(
            f"scaled 3 -> 4: healthy in {healthy:.1f} s, served through HAProxy "
            f"{first:.1f} s later (request {sum(served.values())} after), reads results made "
            "before it"
        )

    def graceful_stop_under_load(self, threads: int = 4) -> None:
        replicas = self.addresses()
        stopping = threading.Event()
        lock = threading.Lock()
        outcomes: Counter[str] = Counter()
        served: Counter[str] = Counter()

        def load(worker: int) -> None:
            index = 10_000 * (worker + 2)
            with httpx.Client(timeout=30) as client:
                while not stopping.is_set():
                    index += 1
                    try:
                        made, retried = self.make(client, index, retries=5)
                    except httpx.HTTPError as error:
                        with lock:
                            outcomes[f"error {type(error).__name__}"] += 1
                        continue
                    with lock:
                        outcomes["retried 503"] += retried
                        if made is None:
                            outcomes["failed"] += 1
                        else:
                            outcomes["ok"] += 1
                            served[made.served_by] += 1
                            self.made.append(made)

        workers = [threading.Thread(target=load, args=(w,)) for w in range(threads)]
        for worker in workers:
            worker.start()
        time.sleep(2.0)
        with lock:
            victim = (
                max(served, key=lambda ip: (served[ip], ip)) if served else next(iter(replicas))
            )
            before = served[victim]
        t0 = time.monotonic()
        self.docker("docker", "stop", "-t", "30", replicas[victim], timeout=60)
        stop_s = time.monotonic() - t0
        time.sleep(2.0)
        stopping.set()
        for worker in workers:
            worker.join(60)
        self.say(
            f"under load ({threads} clients), replica {victim} stopped by SIGTERM in "
            f"{stop_s:.1f} s (it had served {before}, {served[victim]} in all); answers: "
            f"{dict(outcomes)}; "
            f"served by {dict(served)}"
        )
        check(before > 0, f"the stopped replica {victim} served nothing under load before its stop")
        check(outcomes["ok"] > 0, "no request succeeded under load")
        lost = {k: v for k, v in outcomes.items() if k not in ("ok", "retried 503")}
        check(not lost, f"requests lost while a replica stopped: {lost}")
        check(victim not in self.addresses(), f"replica {victim} still running after docker stop")
        t1 = time.monotonic()
        stored = self.wait_delivered()
        self.say(
            f"all {len(stored)} result objects so far at the sink exactly once "
            f"({time.monotonic() - t1:.1f} s more)"
        )

    def killed_replica_lease(self, client: httpx.Client) -> None:
        replicas = self.addresses()
        httpx.post(f"{self.sink}/hold", timeout=5)
        try:
            made, _ = self.make(client, 90_000)
            check(made is not None, "the request for the held delivery failed")
            assert made is not None
            self.made.append(made)
            deadline = time.monotonic() + 10
            held: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not held:
                held = [h for h in self.counts()["held"] if h["uid"] in made.object_uids]
                time.sleep(0.1)
            check(bool(held), "no replica tried to deliver the result while the sink held it")
            sender = held[0]["sender"]
            check(sender in replicas, f"the held delivery came from {sender}, not a replica")
            self.docker("docker", "kill", "-s", "KILL", replicas[sender])
            killed_at = time.time()
        finally:
            httpx.post(f"{self.sink}/release", timeout=5)
        self.say(
            f"replica {sender} killed (SIGKILL) {killed_at - held[0]['at']:.1f} s into delivering "
            f"{made.object_uids[0]}, its STOW-RS request held by the sink; lease {self.lease_s:g} s"
        )
        deadline = time.monotonic() + self.lease_s + 20
        stored: dict[str, list[dict[str, Any]]] = {}
        while time.monotonic() < deadline:
            stored = self.counts()["stored"]
            if all(uid in stored for uid in made.object_uids):
                break
            time.sleep(0.2)
        for uid in made.object_uids:
            check(uid in stored, f"the killed replica's delivery {uid} was never taken over")
            check(len(stored[uid]) == 1, f"{uid} delivered {len(stored[uid])} times")
            after = stored[uid][0]["at"] - held[0]["at"]
            check(
                after >= self.lease_s - 1.0,
                f"{uid} delivered again {after:.1f} s after the first claim, before its lease",
            )
            self.say(
                f"taken over and delivered once, by {stored[uid][0]['sender']}, "
                f"{after:.1f} s after the first replica's claim (lease {self.lease_s:g} s)"
            )
        outcomes: Counter[str] = Counter()
        for index in range(95_000, 95_006):
            after_kill, _ = self.make(client, index)
            outcomes["ok" if after_kill is not None else "failed"] += 1
            if after_kill is not None:
                self.made.append(after_kill)
        check(outcomes["ok"] == 6, f"requests after the kill: {dict(outcomes)}")
        self.wait_delivered()
        self.say(
            f"after the kill 6 more requests answered 200; all {len(self.made)} results "
            "delivered once"
        )


def dicom(index: int) -> bytes:
    """A small DX chest image with its own UIDs and pixels."""
    stored = ramp(96, 80)
    stored[index % 96, :] = (index * 7) % 4096
    dataset = make_dataset(stored)
    uid = generate_uid()
    dataset.SOPInstanceUID = uid
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    dataset.SeriesInstanceUID = generate_uid()
    return encode_dataset(dataset)


def main_run(args: argparse.Namespace) -> int:
    compose = ["docker", "compose", "-f", args.compose_file, "-p", args.project]
    if args.env_file:
        compose += ["--env-file", args.env_file]
    stage = Stage(compose=compose, url=args.url.rstrip("/"), key=args.key, lease_s=args.lease)
    try:
        with httpx.Client(timeout=30) as client:
            stage.spread_and_deliver(client, args.requests)
            stage.scale_up(client)
            stage.graceful_stop_under_load()
            stage.killed_replica_lease(client)
    except CheckFailed as failure:
        stage.say(f"FAILED: {failure}")
        return 1
    stage.say(f"all checks passed ({len(stage.made)} results)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    matching = commands.add_parser("match", help="compose service vs the StatefulSet")
    matching.add_argument("compose_json", help="`docker compose config --format json` output")
    matching.add_argument("--statefulset", default=str(STATEFULSET))
    running = commands.add_parser("run", help="the checks against running replicas")
    running.add_argument("--compose-file", required=True)
    running.add_argument("--project", required=True)
    running.add_argument("--env-file")
    running.add_argument("--url", required=True, help="HAProxy, e.g. http://127.0.0.1:8090")
    running.add_argument("--key", required=True, help="an API key of the replicas")
    running.add_argument("--lease", type=float, required=True, help="CXR_RESULTS_LEASE_S")
    running.add_argument("--requests", type=int, default=30)
    args = parser.parse_args(argv)
    return main_match(args) if args.command == "match" else main_run(args)


if __name__ == "__main__":
    sys.exit(main())
