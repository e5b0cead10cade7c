"""Service configuration: one pydantic-settings class read from `CXR_*` environment variables.

Every knob is validated when the process starts, so a typo in a deployment fails loudly at boot
instead of surfacing as odd behaviour under load. The field descriptions are the documentation:
`scripts/dev/config_docs.py` writes `.env.example` and the README/DEPLOYMENT tables from them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from PIL import Image
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, SettingsConfigDict

# The directory that holds the `app` package: the repository checkout, or the copy of it that is
# the container's working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

MiB = 1024 * 1024

# Pillow warns above its own MAX_IMAGE_PIXELS and refuses twice that. Capping our limit at Pillow's
# keeps every accepted image below both, so the decoder never has to juggle warning filters (which
# are process-global and not thread-safe) while decodes run concurrently.
_PILLOW_PIXEL_CEILING = Image.MAX_IMAGE_PIXELS or 89_478_485


@dataclass(frozen=True)
class SettingGroup:
    """A heading of the configuration reference: the settings of one concern, read together."""

    key: str
    title: str
    purpose: str


# The groups in the order the reference lists them. Every setting names its group in its
# `json_schema_extra` (through `in_group`); the environment variable stays CXR_<FIELD NAME>.
MODEL = SettingGroup(
    "model", "Model", "Which model answers, on which device, and how its runs are batched."
)
THREADS = SettingGroup(
    "threads",
    "CPUs and threads",
    "One CPU figure, from which the model's and the decoders' thread counts follow.",
)
HTTP = SettingGroup(
    "http",
    "HTTP server",
    "Where `pneumonia-serve` listens, over what, and what one request may carry.",
)
HEALTH = SettingGroup(
    "health",
    "Health probes and shutdown",
    "When the probes answer 503, where they are answered, and how a stopping replica drains.",
)
IMAGES = SettingGroup(
    "images",
    "Images",
    "Which uploads are decoded at all, and how much memory decoding may take.",
)
ADMISSION = SettingGroup(
    "admission",
    "Admission and overload",
    "How much work is taken at once, and how the service refuses the rest (429, 408, 503).",
)
SECURITY = SettingGroup(
    "security",
    "Access control",
    "Who may call the API, from which pages and under which host names.",
)
OBSERVABILITY = SettingGroup(
    "observability",
    "Logs, audit and drift",
    "What the service logs, where its DICOM audit messages go, and how /metrics watches drift.",
)
STATE = SettingGroup(
    "state",
    "Durable state and the results store",
    "Where results and received images are kept, for how long, and how many.",
)
PACS = SettingGroup(
    "pacs",
    "Results to PACS",
    "The DICOM destinations of the result objects (STOW-RS, C-STORE) and how they are retried.",
)
RIS = SettingGroup(
    "ris",
    "Results to the RIS",
    "HL7 v2.5.1 ORU^R01 over MLLP and FHIR R4 transactions for the reporting systems.",
)
DICOM = SettingGroup(
    "dicom",
    "DICOM intake",
    "The C-STORE listener, the STOW-RS endpoint and the spool between them and the model.",
)
SETTING_GROUPS = (
    MODEL, THREADS, HTTP, HEALTH, IMAGES, ADMISSION, SECURITY, OBSERVABILITY, STATE, PACS, RIS,
    DICOM,
)  # fmt: skip


def in_group(group: SettingGroup, *, readme: bool = False) -> JsonDict:
    """A field's `json_schema_extra`: its group and, with `readme`, a place in the README's table
    of the settings a first reader needs (every setting is in docs/DEPLOYMENT.md and
    .env.example)."""
    return {"group": group.key, "readme": True} if readme else {"group": group.key}


def group_of(name: str) -> SettingGroup:
    """The group of the `Settings` field `name` (KeyError: it has none)."""
    extra = Settings.model_fields[name].json_schema_extra
    key = extra.get("group") if isinstance(extra, dict) else None
    for group in SETTING_GROUPS:
        if group.key == key:
            return group
    raise KeyError(f"Settings.{name} names no group of SETTING_GROUPS")


# The HL7 results' choices (the renderer in app.pacs.hl7 reads the same names)
_MLLP = re.compile(r"(?:mllp://)?([^:/@\s\[\]]+|\[[0-9a-fA-F:]+\]):([0-9]{1,5})/?")
_HL7_CHOICES = {
    "results_hl7_accession_in": ("placer", "filler", "obr18"),
    "results_hl7_priority_fields": ("TQ1-9", "OBR-27", "ORC-7"),
}
_HL7_PRIORITIES = ("S", "A", "R", "P", "C", "T")


def _is_postgresql_url(url: str) -> bool:
    """Whether `url` is a postgresql:// URL that names a host (and a numeric port, if any)."""
    if any(c.isspace() for c in url) or re.search(r"%(?![0-9A-Fa-f]{2})", url):
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("postgresql", "postgres") and bool(parts.hostname)


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ANY_AE = "*"
# Every address, for the AE titles of the deprecated CXR_DICOM_ALLOWED_AETS.
_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@dataclass(frozen=True)
class DicomPeer:
    """A caller the C-STORE listener admits: a calling AE title (`*`: any) from a network."""

    ae_title: str
    network: IpNetwork

    def admits(self, ae_title: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return (self.ae_title in (ANY_AE, ae_title)) and address in self.network

    def __str__(self) -> str:
        host = self.network.num_addresses == 1
        return f"{self.ae_title}@{self.network.network_address if host else self.network}"


def parse_dicom_peers(text: str) -> tuple[DicomPeer, ...]:
    """`AE@address[/prefix],...` as CXR_DICOM_PEERS writes it; ValueError naming the bad entry.

    The address is an IP address or a network (CIDR), never a host name: a name would be trusted
    as whatever DNS says at the moment of the check. An AE title is 1-16 characters of the DICOM
    default repertoire without a backslash; `*` stands for any calling AE title."""
    peers = []
    for entry in _listed(text):
        ae_title, at, address = entry.rpartition("@")
        ae_title = ae_title.strip()
        if not at or not ae_title:
            raise ValueError(f"{entry!r}: write each peer as AE@address or AE@network/prefix")
        if ae_title != ANY_AE and (
            len(ae_title) > 16 or not all(" " <= c <= "~" and c != "\\" for c in ae_title)
        ):
            raise ValueError(
                f"{entry!r}: an AE title is 1-16 printable ASCII characters without a backslash "
                "(or * for any)"
            )
        try:
            network = ipaddress.ip_network(address.strip().strip("[]"), strict=True)
        except ValueError as exc:
            raise ValueError(
                f"{entry!r}: {address.strip()!r} is not an IP address or network in CIDR form "
                f"({exc}); host names are not accepted"
            ) from None
        peers.append(DicomPeer(ae_title, network))
    if not peers:
        raise ValueError("names no peer; write AE@address[/prefix], comma-separated")
    return tuple(peers)


def _listed(value: str | None, *, lower: bool = False) -> tuple[str, ...]:
    items = (v.strip() for v in (value or "").split(","))
    return tuple(v.lower() if lower else v for v in items if v)


# Where the CPU quota of the process's cgroup is read (a container sees its own cgroup here).
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path | None = None) -> float | None:
    """The CPUs the cgroup's CFS quota allows (quota / period), or None without a quota.

    cgroup v2: `cpu.max` ("max 100000" or "200000 100000"); v1: `cpu.cfs_quota_us` (-1: none)
    over `cpu.cfs_period_us` in the `cpu` (or `cpu,cpuacct`) controller."""
    root = CGROUP_ROOT if root is None else root
    try:
        quota, _, period = (root / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((root / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    return None


Provider = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class Settings(BaseSettings):
    """All runtime configuration. Construct explicitly in tests; from the environment in prod."""

    model_config = SettingsConfigDict(
        env_prefix="CXR_",
        env_file=".env",
        extra="ignore",
        frozen=True,
        # `model_metadata` is our name, not pydantic's `model_` namespace.
        protected_namespaces=(),
        # A refused value is named, never quoted: it may be a key or a database password, and
        # the message goes to the log.
        hide_input_in_errors=True,
    )

    model_metadata: Path = Field(
        json_schema_extra=in_group(MODEL, readme=True),
        default=Path("models/pneumonia_cxr.json"),
        description="Metadata JSON of the model to serve; its `onnx_file` is resolved next to it "
        "and its sha256 must match. A relative path is looked up in the working directory, then "
        "under the project root. Missing or invalid: live but not ready (503 with the reason).",
    )
    provider: Provider = Field(
        json_schema_extra=in_group(MODEL, readme=True),
        default="auto",
        description="ONNX Runtime provider: `auto` (CUDA when the installed onnxruntime offers "
        "it, else CPU) | `cpu` | `cuda` (CUDA or not ready: never a silent fall back to CPU).",
    )
    max_upload_bytes: int = Field(
        json_schema_extra=in_group(IMAGES, readme=True),
        default=32 * MiB,
        gt=0,
        description="Largest accepted upload (413 above it), enforced while the body streams in.",
    )
    max_image_pixels: int = Field(
        json_schema_extra=in_group(IMAGES, readme=True),
        default=50_000_000,
        gt=0,
        le=_PILLOW_PIXEL_CEILING,
        description="Decompression-bomb guard: width*height above this is refused (422) from the "
        "header, before any pixel is decoded. At most Pillow's own limit (89478485).",
    )
    min_image_side: int = Field(
        json_schema_extra=in_group(IMAGES),
        default=64,
        ge=1,
        description="Smallest accepted width or height in pixels (422 below it).",
    )
    outside_population: Literal["warn", "refuse"] = Field(
        json_schema_extra=in_group(MODEL, readme=True),
        default="warn",
        description="A DICOM patient whose age is outside the model's training population: "
        "`warn` classifies it with a `warnings` entry, `refuse` answers 422 "
        "`outside_training_population`.",
    )
    cpus: float | None = Field(
        json_schema_extra=in_group(THREADS),
        default=None,
        gt=0,
        le=1024,
        description="CPUs the service sizes its threads by (a fraction counts as the whole CPUs "
        "in it, at least 1). From it, unless set themselves: CXR_ORT_INTRA_OP_THREADS and "
        "CXR_CODEC_THREADS are one per CPU, CXR_DECODE_CONCURRENCY one more than the CPUs (at "
        "most 4 counted); on 2 CPUs that is 2, 2 and 3 (3 decoders beside 2 ONNX Runtime "
        "threads answered 1-6% more uploads than 2 beside 1). Unset: the container's CPU limit "
        "(the cgroup's CPU quota: `limits.cpu` under Kubernetes, `cpus` in compose) when it "
        "has one, else the cores the process may run on. Compose and the Kubernetes manifests "
        "set only this.",
    )
    ort_intra_op_threads: int = Field(
        json_schema_extra=in_group(THREADS),
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads; 0: one per CPU of CXR_CPUS.",
    )
    max_batch_size: int = Field(
        json_schema_extra=in_group(MODEL),
        default=16,
        ge=1,
        description="Most images in one model run. Requests that arrive while the model is busy "
        "are run together, up to this many.",
    )
    max_batch_wait_ms: float = Field(
        json_schema_extra=in_group(MODEL),
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="How long a model run may wait for its batch to fill; 0 runs whatever is "
        "queued as soon as the model is free (an idle service never delays a lone request).",
    )
    max_in_flight_images: int = Field(
        json_schema_extra=in_group(ADMISSION),
        default=48,
        ge=1,
        description="Admission limit: images being received, decoded, queued or run at once. "
        "Past it, requests are refused at once with 429 and Retry-After. Size it as the "
        "images/s the machine sustains times the queueing an answer may add (docs/PERFORMANCE.md "
        "has the measurements behind the default, on 2 CPU cores).",
    )
    max_in_flight_upload_bytes: int = Field(
        json_schema_extra=in_group(ADMISSION),
        default=96 * MiB,
        gt=0,
        description="Admission limit on upload bytes held at once: HTTP uploads are charged for "
        "the bytes that have arrived, other intakes for what they hold; past it, 429.",
    )
    adaptive_limit_target_ms: float = Field(
        json_schema_extra=in_group(ADMISSION),
        default=0.0,
        ge=0.0,
        description="Adaptive admission (CoDel-like): when the shortest time an image held its "
        "slot over half a second stays above this many ms, the image limit shrinks by a tenth; "
        "while uploads are refused at or under it, it grows by one, up to "
        "CXR_MAX_IN_FLIGHT_IMAGES. 0: the fixed limit only.",
    )
    ready_stall_s: float = Field(
        json_schema_extra=in_group(HEALTH),
        default=10.0,
        ge=0.0,
        description="Readiness turns 503 (`stalled`) while images are in flight and none has "
        "finished for this many seconds: the service is up but cannot take work, so load "
        "balancers should send it elsewhere. Being full is not unready. 0: never.",
    )
    upload_min_bytes_per_s: int = Field(
        json_schema_extra=in_group(ADMISSION),
        default=16 * 1024,
        ge=0,
        description="Minimum transfer rate of an upload body, in bytes/s, after "
        "CXR_UPLOAD_GRACE_S: a body that falls behind is cut off with 408 `upload_too_slow` and "
        "the connection closed, so that slow senders cannot hold the service. 0: no minimum.",
    )
    upload_grace_s: float = Field(
        json_schema_extra=in_group(ADMISSION),
        default=2.0,
        gt=0.0,
        description="Seconds an upload body may take before CXR_UPLOAD_MIN_BYTES_PER_S applies "
        "(a body of N bytes must be complete within this plus N / the rate). Each upload gets "
        "this stretched by a random share of up to half, so that slow senders that started "
        "together are not all cut off at once.",
    )
    max_client_share: float = Field(
        json_schema_extra=in_group(ADMISSION),
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Share of CXR_MAX_IN_FLIGHT_IMAGES one client address may hold in uploads "
        "(receiving or in flight); past it, 429. 1: no per-client limit. Behind a proxy or load "
        "balancer every client has its address: keep 1 there.",
    )
    decode_memory_budget_bytes: int = Field(
        json_schema_extra=in_group(IMAGES),
        default=512 * MiB,
        ge=16 * MiB,
        description="Memory that decodes in progress may hold together, estimated from each "
        "image's header before decoding; a large image waits for room.",
    )
    request_timeout_ms: int = Field(
        json_schema_extra=in_group(ADMISSION),
        default=0,
        ge=0,
        description="Default deadline from a request's arrival to its model run, in ms; past it "
        "the image is dropped with 503 `deadline_exceeded`. 0: none. A client may send a shorter "
        "one in `X-Request-Timeout-Ms`.",
    )
    retry_after_s: int = Field(
        json_schema_extra=in_group(ADMISSION),
        default=1,
        ge=1,
        description="`Retry-After` seconds sent with 429 and 503 refusals.",
    )
    refusals_per_s: float = Field(
        json_schema_extra=in_group(ADMISSION),
        default=50.0,
        ge=0.0,
        description="Refusals (429 from the admission gate) answered at once per second, on "
        "average; past that rate, under sustained overload, a refusal is held unanswered (its "
        "body unread) until its turn, at most CXR_REFUSAL_MAX_HOLD_S, so that clients retrying "
        "at once cannot spend the cores on refusals. 0: never held.",
    )
    refusal_max_hold_s: float = Field(
        json_schema_extra=in_group(ADMISSION),
        default=2.0,
        ge=0.0,
        le=30.0,
        description="Longest a paced refusal is held before its 429 is sent. With N clients "
        "that retry as soon as they are refused, refusals come at most N / this per second.",
    )
    header_timeout_s: float = Field(
        json_schema_extra=in_group(HTTP),
        default=5.0,
        gt=0.0,
        description="Seconds a connection may take to send a request's headers, from its first "
        "byte (or from connecting); past it, 408 and the connection closed, so that connections "
        "trickling their headers do not stay open. Applies when the service is run by "
        "`pneumonia-serve` (the container's command).",
    )
    max_images_per_request: int = Field(
        json_schema_extra=in_group(HTTP),
        default=16,
        ge=1,
        le=256,
        description="Most `file` parts in one POST /predict/batch.",
    )
    decode_concurrency: int = Field(
        json_schema_extra=in_group(THREADS),
        default=0,
        ge=0,
        description="Uploads decoded at once; 0: one more than the CPUs of CXR_CPUS (at most 4 "
        "of them counted).",
    )
    codec_threads: int = Field(
        json_schema_extra=in_group(THREADS),
        default=0,
        ge=0,
        le=64,
        description="Threads one JPEG 2000 DICOM decode may use (OpenJPEG); 0: one per CPU of "
        "CXR_CPUS. A 2500x2048 lossless frame decoded in 476 ms on one thread and 277 ms on two "
        "(2 cores, nothing else running).",
    )
    host: str = Field(
        json_schema_extra=in_group(HTTP),
        default="127.0.0.1",
        description="Bind address for `pneumonia-serve`.",
    )
    port: int = Field(
        json_schema_extra=in_group(HTTP),
        default=8000,
        ge=1,
        le=65535,
        description="Port for `pneumonia-serve`.",
    )
    probe_port: int | None = Field(
        json_schema_extra=in_group(HEALTH),
        default=None,
        ge=0,
        le=65535,
        description="A second port that answers only GET/HEAD /health/live and /health/ready, "
        "from a thread of its own: point liveness and readiness probes at it, so that they are "
        "answered in milliseconds even when the main port's event loop is saturated by "
        "overload. Unset: the probes are on the main port only (still answered before any "
        "upload work, but in turn with everything else).",
    )
    loop_stall_s: float = Field(
        json_schema_extra=in_group(HEALTH),
        default=10.0,
        gt=0.0,
        description="Seconds without a heartbeat from the event loop after which both probes "
        "answer 503 `event_loop_stalled` (so that liveness answered from CXR_PROBE_PORT's thread "
        "still fails when the loop that serves the API is stuck).",
    )
    probe_host: str = Field(
        json_schema_extra=in_group(HEALTH),
        default="127.0.0.1",
        description="Bind address of CXR_PROBE_PORT (0.0.0.0 in a container, for the kubelet).",
    )
    log_level: LogLevel = Field(
        json_schema_extra=in_group(OBSERVABILITY, readme=True),
        default="INFO",
        description="DEBUG | INFO | WARNING | ERROR. Logs are JSON lines on stderr and never "
        "carry patient data, image content, file names or API keys.",
    )
    tls_cert_file: Path | None = Field(
        json_schema_extra=in_group(HTTP),
        default=None,
        description="PEM certificate (chain) for HTTPS on `port` (`pneumonia-serve`, with "
        "`tls_key_file`); unset: plain HTTP, for a TLS-terminating proxy or ingress in front. "
        "The probe port stays plain HTTP on its own socket.",
    )
    tls_key_file: Path | None = Field(
        json_schema_extra=in_group(HTTP),
        default=None,
        description="PEM private key of `tls_cert_file`.",
    )
    audit_syslog: str | None = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default=None,
        description="host:port of the site's audit record repository: DICOM audit messages "
        "(PS3.15 A.5, the IHE ATNA schema: images received, results exported and read, refused "
        "keys and peers) as RFC 5424 syslog over TCP, or TLS with `audit_tls_ca_file`. Unset: no "
        "audit messages. A collector that is down costs nothing but the dropped messages "
        "(counted in `cxr_audit_messages_total`).",
    )
    audit_tls_ca_file: Path | None = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default=None,
        description="CA bundle that signs the audit collector's certificate: audit messages then "
        "go over TLS (RFC 5425), the collector's name checked against `audit_syslog`'s host.",
    )
    audit_tls_cert_file: Path | None = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default=None,
        description="Client certificate (PEM, with `audit_tls_key_file`) for a collector that "
        "asks for one.",
    )
    audit_tls_key_file: Path | None = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default=None,
        description="Private key of `audit_tls_cert_file` (PEM).",
    )
    audit_source_id: str = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default="CXR_AI",
        max_length=64,
        description="AuditSourceID of the audit messages: how the repository names this service.",
    )
    drain_seconds: float = Field(
        json_schema_extra=in_group(HEALTH),
        default=5.0,
        ge=0,
        le=600,
        description="After SIGTERM: seconds during which readiness answers 503 while the socket "
        "stays open and requests are still served; what is unanswered at the end gets a 503.",
    )
    api_keys: SecretStr | None = Field(
        json_schema_extra=in_group(SECURITY, readme=True),
        default=None,
        description="Comma-separated API keys. When this or `api_keys_file` names at least one "
        "key, /predict and /model (and /metrics) need `Authorization: Bearer <key>` or "
        "`X-API-Key: <key>`; health probes and the docs stay open.",
    )
    api_keys_file: Path | None = Field(
        json_schema_extra=in_group(SECURITY, readme=True),
        default=None,
        description="File of SHA-256 hex digests of API keys, one per line (the first field; "
        "`sha256sum` output works); `#` starts a comment. Read once at start-up.",
    )
    trusted_hosts: str | None = Field(
        json_schema_extra=in_group(SECURITY),
        default=None,
        description="Comma-separated host names the service answers to (the `Host` header; "
        "`*.example.org` matches subdomains); any other gets 400 `invalid_host`, against DNS "
        "rebinding. The health probes are exempt. Unset: any host.",
    )
    allowed_origins: str | None = Field(
        json_schema_extra=in_group(SECURITY),
        default=None,
        description="Comma-separated origins (`https://viewer.example.org`) besides the service's "
        "own whose browser pages may POST to it. A POST (or PUT, PATCH, DELETE) whose `Origin` is "
        "another site's is refused with 403 `cross_origin`, so that a web page cannot make a "
        "visitor's browser deliver into the PACS; a client that sends no `Origin` (curl, a "
        "PACS router) is not affected.",
    )
    site_profile: Path | None = Field(
        json_schema_extra=in_group(MODEL),
        default=None,
        description="A site profile (`site_profile.json` from `pneumonia-validate-site`): its "
        "recalibration is applied after the model's own calibration and its threshold gives the "
        "label; answers then carry `calibration` and GET /model `site_calibration`. Invalid, or "
        "fitted for another model sha256: live but not ready (503 with the reason). Unset: the "
        "model's own calibration and threshold.",
    )
    drift_window: int = Field(
        json_schema_extra=in_group(OBSERVABILITY),
        default=500,
        ge=10,
        le=100_000,
        description="Answers in the sliding window over which /metrics scores drift "
        "(`cxr_drift_psi`: the population stability index of P(positive) against the model's "
        "validation reference).",
    )

    @field_validator("site_profile", mode="before")
    @classmethod
    def _empty_profile_is_unset(cls, value: object) -> object:
        # As for the key file: an unset variable passed on as "" means no profile.
        return None if isinstance(value, str) and not value.strip() else value

    # -- DICOM networking: result objects for PACS, their delivery, and DICOM intake ----------
    state_dir: Path | None = Field(
        json_schema_extra=in_group(STATE, readme=True),
        default=None,
        description="Directory for the durable state of DICOM networking: the results outbox "
        "(SQLite, unless `state_url` is set) and the intake spool. Needed by `POST "
        "/predict?deliver=true`, the STOW-RS endpoint and the C-STORE listener; mount a volume.",
    )
    state_url: SecretStr | None = Field(
        json_schema_extra=in_group(STATE, readme=True),
        default=None,
        description="`postgresql://user:password@host/db` to keep the results outbox in "
        "PostgreSQL, shared safely by several replicas (the intake spool stays in `state_dir`).",
    )
    results_dicomweb_url: str | None = Field(
        json_schema_extra=in_group(PACS, readme=True),
        default=None,
        description="DICOMweb base URL of the PACS that receives the result objects by STOW-RS "
        "(`{base}/studies`), e.g. `http://pacs:8042/dicom-web`.",
    )
    results_dicomweb_auth: SecretStr | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="The `Authorization` header value for the STOW-RS destination, e.g. "
        "`Bearer <token>` or `Basic <base64>`. Never logged.",
    )
    results_dicomweb_ca_file: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM bundle of the CAs trusted for the STOW-RS destination (a site CA), "
        "instead of the system's; its name or address is checked against the certificate.",
    )
    results_dicomweb_client_cert: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM client certificate for mutual TLS to the STOW-RS destination (with "
        "`results_dicomweb_client_key`).",
    )
    results_dicomweb_client_key: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM private key of `results_dicomweb_client_cert`.",
    )
    refuse_clear_credentials: bool = Field(
        json_schema_extra=in_group(SECURITY),
        default=False,
        description="Refuse to start when a destination's credentials (`results_dicomweb_auth`, "
        "`results_fhir_auth`) would go to an `http://` URL, in clear; false: start, with a "
        "WARNING in the log for each.",
    )
    results_dimse: str | None = Field(
        json_schema_extra=in_group(PACS, readme=True),
        default=None,
        description="`AET@host:port` of a DICOM node that receives the result objects by C-STORE.",
    )
    results_dimse_tls_ca: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM bundle of the CAs that sign the `results_dimse` node's certificate: with "
        "it, C-STORE deliveries go over DICOM TLS (TLS 1.2 or later), the peer's certificate "
        "verified against it and against the host name or IP address of `results_dimse`.",
    )
    results_dimse_tls_cert: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM client certificate for mutual TLS to the `results_dimse` node (with "
        "`results_dimse_tls_key`).",
    )
    results_dimse_tls_key: Path | None = Field(
        json_schema_extra=in_group(PACS),
        default=None,
        description="PEM private key of `results_dimse_tls_cert` (unencrypted).",
    )
    results_heatmap: bool = Field(
        json_schema_extra=in_group(PACS),
        default=False,
        description="Also send a Secondary Capture beside each SR: the source X-ray at its own "
        "resolution with the positive class's activation map over it, the headline, legend and "
        "disclaimer in a band below (see `results_heatmap_answers`); `deliver=true` answers then "
        "carry the `explanation` it was drawn from (of the positive class unless `explain_class` "
        "names another, which makes no heat map).",
    )
    results_heatmap_answers: Literal["all", "positive"] = Field(
        json_schema_extra=in_group(PACS),
        default="all",
        description="With `results_heatmap`: which answers get the heat map, `all` (each one, "
        "showing where the model saw evidence for the positive class whatever the answer) or "
        "`positive` (only answers at or above the operating threshold).",
    )
    results_max_backoff_s: float = Field(
        json_schema_extra=in_group(PACS),
        default=30.0,
        gt=0,
        le=3600,
        description="Longest wait between two delivery attempts to a destination that is down "
        "(backoff doubles from 1 s up to this), so a PACS that comes back is served soon.",
    )
    results_give_up_after_s: float = Field(
        json_schema_extra=in_group(PACS),
        default=7 * 24 * 3600.0,
        gt=0,
        description="Age after which an undelivered result stops being retried; it is then kept "
        "as failed (visible in `/results/...` and the metrics) for `results_retention_s`.",
    )
    results_lease_s: float = Field(
        json_schema_extra=in_group(PACS),
        default=120.0,
        gt=0,
        le=3600,
        description="Seconds a delivery worker holds the deliveries it claimed from the outbox; "
        "a replica that dies holding some leaves them to another after this long. Keep it well "
        "above the slowest delivery batch (a STOW-RS request may take up to 30 s), or a slow "
        "send is claimed and sent again by another replica.",
    )
    results_retention_s: float = Field(
        json_schema_extra=in_group(STATE),
        default=7 * 24 * 3600.0,
        gt=0,
        description="How long a result (the answer, its objects, its deliveries: patient data) is "
        "kept once every delivery of it ended, delivered or failed, or, with no destination, "
        "once it was stored; then it is purged (checked at least every 10 minutes), whether or "
        "not a destination is configured. A delivery still being tried is never purged.",
    )
    results_max_stored: int = Field(
        json_schema_extra=in_group(STATE),
        default=20_000,
        ge=1,
        description="Most results the store holds (an SR is about 10 KB; a heat-map SC beside it "
        "as much as the X-ray's pixels). Past it nothing new is stored: `deliver=true` and "
        "STOW-RS answer 503 `results_store_full` (Retry-After), C-STORE 0xA700, until retention "
        "or an operator (`DELETE /results/...`) makes room.",
    )
    # -- results to the RIS: HL7 v2.5.1 ORU^R01 over MLLP, FHIR R4 transactions ---------------
    results_hl7: str | None = Field(
        json_schema_extra=in_group(RIS, readme=True),
        default=None,
        description="`mllp://host:port` (or `host:port`) of the RIS or interface engine that "
        "takes each result as an HL7 v2.5.1 ORU^R01 over MLLP, through the same outbox as the "
        "DICOM objects (no PACS destination needed).",
    )
    results_hl7_sending_application: str = Field(
        json_schema_extra=in_group(RIS),
        default="CXR_AI",
        description="MSH-3, the sending application of the ORU^R01.",
    )
    results_hl7_sending_facility: str = Field(
        json_schema_extra=in_group(RIS), default="", description="MSH-4, sending facility."
    )
    results_hl7_receiving_application: str = Field(
        json_schema_extra=in_group(RIS),
        default="",
        description="MSH-5, the receiving application (the RIS's name for itself).",
    )
    results_hl7_receiving_facility: str = Field(
        json_schema_extra=in_group(RIS), default="", description="MSH-6, receiving facility."
    )
    results_hl7_accession_in: str = Field(
        json_schema_extra=in_group(RIS),
        default="filler,obr18",
        description="Where the image's Accession Number goes, comma-separated: `placer` "
        "(ORC-2/OBR-2), `filler` (ORC-3/OBR-3), `obr18` (OBR-18, as IHE Scheduled Workflow "
        "sends it). An order number the image itself carries (Placer/Filler Order Number "
        "Imaging Service Request) takes its own field first.",
    )
    results_hl7_priority_fields: str = Field(
        json_schema_extra=in_group(RIS),
        default="TQ1-9",
        description="The fields that carry the worklist priority of a result, comma-separated: "
        "`TQ1-9` (v2.5 and later), `OBR-27` and/or `ORC-7` (the older quantity/timing, "
        "priority in component 6), whichever the RIS reads; empty: none.",
    )
    results_hl7_positive_priority: str = Field(
        json_schema_extra=in_group(RIS),
        default="A",
        description="Priority (HL7 table 0485: `S` stat, `A` ASAP, `R` routine, ...) a PNEUMONIA "
        "answer sets, so that the RIS moves the study up its reading worklist.",
    )
    results_hl7_negative_priority: str = Field(
        json_schema_extra=in_group(RIS),
        default="",
        description="Priority a NORMAL answer sets; empty (the default) leaves the order's own "
        "priority alone, so an AI negative never demotes a stat order.",
    )
    results_hl7_ack_timeout_s: float = Field(
        json_schema_extra=in_group(RIS),
        default=30.0,
        gt=0,
        le=600,
        description="How long to wait for the ACK of an ORU^R01 before the connection is dropped "
        "and the message retried.",
    )
    results_fhir_url: str | None = Field(
        json_schema_extra=in_group(RIS, readme=True),
        default=None,
        description="Base URL of a FHIR R4 server that takes each result as a transaction Bundle "
        "(DiagnosticReport, Observation, ImagingStudy, ServiceRequest, Patient, Device, each a "
        "conditional create), e.g. `https://fhir.example/r4`.",
    )
    results_fhir_auth: SecretStr | None = Field(
        json_schema_extra=in_group(RIS),
        default=None,
        description="The `Authorization` header value for the FHIR server, e.g. "
        "`Bearer <token>`. Never logged.",
    )
    results_fhir_client_cert: Path | None = Field(
        json_schema_extra=in_group(RIS),
        default=None,
        description="PEM client certificate (with its key, or see `results_fhir_client_key`) "
        "for mutual TLS to the FHIR server.",
    )
    results_fhir_client_key: Path | None = Field(
        json_schema_extra=in_group(RIS),
        default=None,
        description="PEM private key of `results_fhir_client_cert`.",
    )
    results_fhir_ca_file: Path | None = Field(
        json_schema_extra=in_group(RIS),
        default=None,
        description="PEM bundle of the CAs trusted for the FHIR server, instead of the system's.",
    )
    results_fhir_patient_id_system: str = Field(
        json_schema_extra=in_group(RIS),
        default="urn:local:patient-id",
        description="Identifier system of the DICOM Patient ID in FHIR (the site's MRN system, "
        "e.g. `urn:oid:1.2.3.4`): the Patient is found, or made, by it.",
    )
    results_fhir_accession_system: str = Field(
        json_schema_extra=in_group(RIS),
        default="urn:local:accession",
        description="Identifier system of accession numbers in FHIR: the ServiceRequest is "
        "found, or made, by it.",
    )
    dicom_port: int | None = Field(
        json_schema_extra=in_group(DICOM, readme=True),
        default=None,
        ge=1,
        le=65535,
        description="Port of the DICOM C-STORE listener (SCP); unset: no listener.",
    )
    dicom_host: str = Field(
        json_schema_extra=in_group(DICOM),
        default="127.0.0.1",
        description="Bind address of the C-STORE listener (`0.0.0.0` in the container).",
    )
    dicom_ae_title: str = Field(
        json_schema_extra=in_group(DICOM, readme=True),
        default="CXR_AI",
        min_length=1,
        max_length=16,
        description="AE title of the C-STORE listener, and the calling AE title of C-STORE "
        "deliveries.",
    )
    dicom_peers: str | None = Field(
        json_schema_extra=in_group(DICOM, readme=True),
        default=None,
        description="Who the C-STORE listener admits: comma-separated `AE@address` pairs, the "
        "address an IP address or a network in CIDR form, e.g. "
        "`MODALITY1@10.1.2.0/24,PACS@192.168.5.7` (`*@10.1.2.0/24`: any calling AE title from "
        "that network). Any other caller, and a listed AE title from another address, is "
        "rejected (A-ASSOCIATE-RJ, calling AE title not recognised), logged and counted. Unset: "
        "the listener does not start (the HTTP API serves; `dicom_listener_down` says why) "
        "unless `dicom_open` is true.",
    )
    dicom_open: bool = Field(
        json_schema_extra=in_group(DICOM),
        default=False,
        description="Run the C-STORE listener without `dicom_peers`, admitting any caller from "
        "anywhere: for a network where something else admits callers. Logged as a WARNING at "
        "start-up and shown in `GET /model` (`dicom_listener.admits`: `anyone`).",
    )
    dicom_allowed_aets: str | None = Field(
        json_schema_extra=in_group(DICOM),
        default=None,
        description="Deprecated: use `dicom_peers`. Comma-separated calling AE titles, read as "
        "peers from any address (`AE@0.0.0.0/0`, `AE@::/0`) with a WARNING at start-up: a title "
        "is only what a caller says it is. Not allowed together with `dicom_peers`.",
    )
    dicom_max_associations: int = Field(
        json_schema_extra=in_group(DICOM),
        default=10,
        ge=1,
        le=256,
        description="Concurrent associations the listener accepts.",
    )
    dicom_max_pending_connections: int = Field(
        json_schema_extra=in_group(DICOM),
        default=32,
        ge=1,
        le=1024,
        description="Connections the listener keeps open beyond `dicom_max_associations`, "
        "waiting for their A-ASSOCIATE-RQ (a connection takes an association slot only once its "
        "request is read); the next connection is closed at once, logged and counted.",
    )
    dicom_read_deadline_s: float = Field(
        json_schema_extra=in_group(DICOM),
        default=30.0,
        gt=0,
        le=600,
        description="Seconds a PDU on the DICOM port may take from its first byte to its last "
        "(one deadline per PDU, however the bytes trickle in); past it the association is "
        "aborted, logged and counted.",
    )
    dicom_max_instance_bytes: int = Field(
        json_schema_extra=in_group(DICOM),
        default=128 * MiB,
        gt=0,
        description="Largest data set of a CR/DX the listener takes (held in memory while it "
        "arrives); a larger one aborts its association, logged and counted. Instances of other "
        "SOP classes are read and dropped as they arrive, whatever their size.",
    )
    dicom_max_buffered_bytes: int = Field(
        json_schema_extra=in_group(DICOM),
        default=256 * MiB,
        gt=0,
        description="Bytes of CR/DX data sets the listener holds in memory while they arrive, "
        "all associations together; a fragment that does not fit aborts its association "
        "(logged and counted), so concurrent senders cannot add up past it.",
    )
    dicom_tls_cert: Path | None = Field(
        json_schema_extra=in_group(DICOM),
        default=None,
        description="PEM certificate (chain) of the C-STORE listener: with it (and "
        "`dicom_tls_key`) the listener speaks DICOM TLS only (TLS 1.2 or later; PS3.15 B.1), "
        "and a caller without TLS cannot associate.",
    )
    dicom_tls_key: Path | None = Field(
        json_schema_extra=in_group(DICOM),
        default=None,
        description="PEM private key of `dicom_tls_cert` (unencrypted).",
    )
    dicom_tls_client_ca: Path | None = Field(
        json_schema_extra=in_group(DICOM),
        default=None,
        description="PEM bundle of the CAs whose client certificates the TLS listener accepts: "
        "with it a caller must present one (and still be in `dicom_peers`); without, any "
        "caller may connect over TLS without a certificate.",
    )
    stow_max_parts: int = Field(
        json_schema_extra=in_group(DICOM),
        default=1000,
        ge=1,
        le=100_000,
        description="Most body parts (instances) in one STOW-RS request, counted while the body "
        "is parsed; past it the request is refused whole with 413 `too_many_parts`, nothing "
        "stored.",
    )
    intake_max_pending: int = Field(
        json_schema_extra=in_group(DICOM),
        default=2000,
        ge=1,
        description="Images received by STOW-RS or C-STORE and not yet read that the spool holds; "
        "past it, STOW-RS answers 503 (Retry-After) and C-STORE 0xA700 (out of resources).",
    )
    intake_max_pending_bytes: int = Field(
        json_schema_extra=in_group(DICOM),
        default=4096 * MiB,
        ge=MiB,
        description="Bytes of images the intake spool holds, with the same refusals past it.",
    )
    study_stable_seconds: float | None = Field(
        json_schema_extra=in_group(DICOM),
        default=None,
        ge=0,
        le=24 * 3600,
        description="One verdict per study on the intake path (STOW-RS, C-STORE): a study is read "
        "once no image of it has arrived for this many seconds (as Orthanc's StableAge), and gets "
        "one study-level SR: its frontal chest images each read, the most positive one deciding, "
        "laterals and other images set aside by name with the reason. Empty: each image gets its "
        "own result, as `deliver=true` does (see docs/CONFORMANCE.md).",
    )

    @model_validator(mode="after")
    def _networking_needs_state(self) -> Settings:
        wanted = [
            name
            for name in (
                "results_dicomweb_url",
                "results_dimse",
                "results_hl7",
                "results_fhir_url",
                "dicom_port",
            )
            if getattr(self, name) is not None
        ]
        if wanted and self.state_dir is None:
            names = ", ".join(f"CXR_{name.upper()}" for name in wanted)
            raise ValueError(f"{names} need CXR_STATE_DIR (where results and images are kept)")
        return self

    @field_validator("dicom_peers")
    @classmethod
    def _dicom_peers(cls, value: str | None) -> str | None:
        if value is not None:
            parse_dicom_peers(value)
        return value

    @model_validator(mode="after")
    def _dicom_tls_pairs(self) -> Settings:
        if (self.dicom_tls_cert is None) != (self.dicom_tls_key is None):
            raise ValueError("CXR_DICOM_TLS_CERT and CXR_DICOM_TLS_KEY go together: set both")
        if (self.results_dimse_tls_cert is None) != (self.results_dimse_tls_key is None):
            raise ValueError(
                "CXR_RESULTS_DIMSE_TLS_CERT and CXR_RESULTS_DIMSE_TLS_KEY go together: set both"
            )
        if self.results_dimse_tls_cert is not None and self.results_dimse_tls_ca is None:
            raise ValueError(
                "a client certificate for C-STORE results needs CXR_RESULTS_DIMSE_TLS_CA, the CA "
                "that signs the peer's certificate"
            )
        if self.dicom_tls_client_ca is not None and self.dicom_tls_cert is None:
            raise ValueError(
                "CXR_DICOM_TLS_CLIENT_CA verifies callers of a TLS listener: set "
                "CXR_DICOM_TLS_CERT and CXR_DICOM_TLS_KEY too"
            )
        return self

    @model_validator(mode="after")
    def _one_peer_list(self) -> Settings:
        if self.dicom_peers is not None and self.dicom_allowed_aets is not None:
            raise ValueError(
                "CXR_DICOM_ALLOWED_AETS is replaced by CXR_DICOM_PEERS: set only CXR_DICOM_PEERS "
                "(AE@address, ...)"
            )
        if self.dicom_open and (self.dicom_peers or self.dicom_allowed_aets) is not None:
            raise ValueError(
                "CXR_DICOM_OPEN=true admits anyone, CXR_DICOM_PEERS lists who is admitted: set one"
            )
        return self

    @field_validator("state_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        # Checked here, at start-up, so that a malformed URL never reaches the driver, whose
        # messages quote the connection string (password included).
        if value is not None and not _is_postgresql_url(value.get_secret_value()):
            raise ValueError(
                "write the outbox database as postgresql://user:password@host[:port]/database "
                "(the value is not shown: it holds a password)"
            )
        return value

    @field_validator("results_hl7")
    @classmethod
    def _mllp_address(cls, value: str | None) -> str | None:
        if value is not None and not _MLLP.fullmatch(value.strip()):
            raise ValueError("write the HL7 destination as mllp://host:port or host:port")
        return None if value is None else value.strip()

    @field_validator("results_hl7_accession_in", "results_hl7_priority_fields")
    @classmethod
    def _known_choices(cls, value: str, info: ValidationInfo) -> str:
        allowed = _HL7_CHOICES[str(info.field_name)]
        chosen = [c.strip() for c in value.split(",") if c.strip()]
        unknown = [c for c in chosen if c not in allowed]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: choose from {', '.join(allowed)}")
        return ",".join(chosen)

    @field_validator("results_hl7_positive_priority", "results_hl7_negative_priority")
    @classmethod
    def _priority_code(cls, value: str) -> str:
        value = value.strip().upper()
        if value and value not in _HL7_PRIORITIES:
            raise ValueError(f"use an HL7 table 0485 code: {', '.join(_HL7_PRIORITIES)}")
        return value

    @property
    def hl7_accession_in(self) -> tuple[str, ...]:
        return tuple(c for c in self.results_hl7_accession_in.split(",") if c)

    @property
    def hl7_priority_fields(self) -> tuple[str, ...]:
        return tuple(c for c in self.results_hl7_priority_fields.split(",") if c)

    @property
    def trusted_host_names(self) -> tuple[str, ...]:
        return _listed(self.trusted_hosts, lower=True)

    @property
    def allowed_origin_names(self) -> tuple[str, ...]:
        return tuple(o.rstrip("/") for o in _listed(self.allowed_origins, lower=True))

    @property
    def allowed_calling_aets(self) -> set[str] | None:
        if self.dicom_allowed_aets is None:
            return None
        return {a.strip() for a in self.dicom_allowed_aets.split(",") if a.strip()} or None

    @property
    def dicom_peer_list(self) -> tuple[DicomPeer, ...] | None:
        """Who the C-STORE listener admits: `dicom_peers`, or the deprecated
        `dicom_allowed_aets` from any address; None when neither is set."""
        if self.dicom_peers is not None:
            return parse_dicom_peers(self.dicom_peers)
        titles = self.allowed_calling_aets
        if titles is None:
            return None
        return tuple(DicomPeer(t, network) for t in sorted(titles) for network in _ANYWHERE)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("audit_syslog")
    @classmethod
    def _audit_address(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        host, _, port = value.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("give the audit collector as host:port, e.g. audit.example.org:6514")
        return value.strip()

    @model_validator(mode="after")
    def _transport_pairs(self) -> Settings:
        for cert, key, names in (
            (self.tls_cert_file, self.tls_key_file, "CXR_TLS_CERT_FILE and CXR_TLS_KEY_FILE"),
            (
                self.results_dicomweb_client_cert,
                self.results_dicomweb_client_key,
                "CXR_RESULTS_DICOMWEB_CLIENT_CERT and CXR_RESULTS_DICOMWEB_CLIENT_KEY",
            ),
        ):
            if (cert is None) != (key is None):
                raise ValueError(f"{names} go together")
        clear = self.clear_credentials
        if clear and self.refuse_clear_credentials:
            raise ValueError(
                f"{', '.join(clear)}: credentials would go over http:// in clear "
                "(CXR_REFUSE_CLEAR_CREDENTIALS=true); use an https:// URL"
            )
        return self

    @property
    def clear_credentials(self) -> list[str]:
        """The credential settings whose destination URL is plain `http://`."""
        pairs = (
            ("CXR_RESULTS_DICOMWEB_AUTH", self.results_dicomweb_auth, self.results_dicomweb_url),
            ("CXR_RESULTS_FHIR_AUTH", self.results_fhir_auth, self.results_fhir_url),
        )
        return [
            name
            for name, auth, url in pairs
            if auth is not None and url is not None and url.lower().startswith("http://")
        ]

    @model_validator(mode="after")
    def _audit_tls_pairs(self) -> Settings:
        if (self.audit_tls_cert_file is None) != (self.audit_tls_key_file is None):
            raise ValueError("CXR_AUDIT_TLS_CERT_FILE and CXR_AUDIT_TLS_KEY_FILE go together")
        if self.audit_tls_cert_file is not None and self.audit_tls_ca_file is None:
            raise ValueError("a client certificate for the audit collector needs TLS: set "
                             "CXR_AUDIT_TLS_CA_FILE")  # fmt: skip
        return self

    @property
    def audit_address(self) -> tuple[str, int] | None:
        """(host, port) of the audit collector, or None."""
        if self.audit_syslog is None:
            return None
        host, _, port = self.audit_syslog.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator(
        "api_keys",
        "api_keys_file",
        "state_dir",
        "state_url",
        "results_dicomweb_url",
        "results_dicomweb_auth",
        "results_dimse",
        "results_hl7",
        "results_fhir_url",
        "results_fhir_auth",
        "results_fhir_client_cert",
        "results_fhir_client_key",
        "results_fhir_ca_file",
        "dicom_port",
        "dicom_peers",
        "dicom_allowed_aets",
        "dicom_tls_cert",
        "dicom_tls_key",
        "dicom_tls_client_ca",
        "results_dimse_tls_ca",
        "results_dimse_tls_cert",
        "results_dimse_tls_key",
        "probe_port",
        "audit_syslog",
        "tls_cert_file",
        "tls_key_file",
        "results_dicomweb_ca_file",
        "results_dicomweb_client_cert",
        "results_dicomweb_client_key",
        "audit_tls_ca_file",
        "audit_tls_cert_file",
        "audit_tls_key_file",
        "study_stable_seconds",
        "cpus",
        "trusted_hosts",
        "allowed_origins",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose and Kubernetes pass an unset variable as "": that means "no keys", not ".".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("provider", mode="before")
    @classmethod
    def _lower_provider(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def cpu_count(self) -> int:
        """The whole CPUs the thread counts follow: `cpus`, or the cgroup's CPU quota (at most
        the cores the process may run on), or those cores; at least 1."""
        usable = len(os.sched_getaffinity(0))
        if self.cpus is not None:
            return max(1, int(self.cpus))
        quota = cgroup_cpu_quota()
        return usable if quota is None else max(1, min(int(quota), usable))

    @property
    def decode_slots(self) -> int:
        """Decodes at once: `decode_concurrency`, or one more than the CPUs (at most 4 counted).
        A decode thread spends part of each image holding or waiting for the GIL (its Python
        steps, the event loop's turns); the extra one keeps a core decoding meanwhile."""
        return self.decode_concurrency or min(self.cpu_count, 4) + 1

    @property
    def ort_threads(self) -> int:
        """ONNX Runtime intra-op threads: `ort_intra_op_threads`, or one per CPU. The pool and
        the decoders share the cores; a batch finishes sooner when the decoders are waiting
        (measured on 2 cores, docs/PERFORMANCE.md, "Thread split")."""
        return self.ort_intra_op_threads or self.cpu_count

    @property
    def codec_thread_count(self) -> int:
        """Threads of one JPEG 2000 decode: `codec_threads`, or one per CPU."""
        return self.codec_threads or self.cpu_count

    def resolved_model_metadata(self) -> Path:
        """The metadata path to load.

        A relative path is looked up in the working directory first (an operator pointing at their
        own file), then under the project root (the shipped default, wherever the process starts).
        If neither exists, the project-root candidate is returned so the not-ready reason names it.
        """
        path = self.model_metadata.expanduser()
        if path.is_absolute():
            return path
        from_cwd = Path.cwd() / path
        return from_cwd if from_cwd.is_file() else PROJECT_ROOT / path
