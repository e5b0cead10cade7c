"""Every dependency the routes use, and the only place that reads `app.state` per request.

Dependencies are `async def` on purpose: they only read app.state or headers, and FastAPI would
otherwise send each of them to the thread pool.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.audit import AuditEvent, AuditTrail, Participant
from app.errors import (
    DeliveryNotConfigured,
    Forbidden,
    InvalidRequest,
    ModelNotReady,
    Unauthorized,
)
from app.http.auth import API_KEY_HEADER, DEFAULT_ROLES, OPERATE, ApiKeys, Roles, key_digest
from app.http.uploads import Framing
from app.model.classifier import Classifier
from app.ops.metrics import ServiceMetrics
from app.ops.observability import RequestContext, request_context
from app.pacs.pipeline import ResultsPipeline
from app.serving.prediction import PredictionStep
from app.serving.state import ServiceState
from app.settings import Settings

TIMEOUT_HEADER = "X-Request-Timeout-Ms"


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_service_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceStateDep = Annotated[ServiceState, Depends(get_service_state)]


async def get_classifier(state: ServiceStateDep) -> Classifier:
    """The serving classifier, or 503 with the reason it cannot serve. While draining after a
    termination signal it still serves: readiness is what tells load balancers to go away."""
    reason = state.unavailable_reason
    if reason is not None or state.classifier is None:
        raise ModelNotReady(reason or "model is not loaded")
    return state.classifier


ClassifierDep = Annotated[Classifier, Depends(get_classifier)]


async def get_prediction_step(state: ServiceStateDep, _: ClassifierDep) -> PredictionStep:
    """The prediction step; depends on `get_classifier` so it is only handed out when ready."""
    step = state.step
    if step is None:
        raise ModelNotReady(state.unavailable_reason or "model is not loaded")
    return step


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def get_request_context(request: Request) -> RequestContext:
    return request_context(request)


async def get_framing(request: Request) -> Framing:
    """The request body's framing (media type, boundary, declared length), parsed once."""
    return Framing.of(request)


StepDep = Annotated[PredictionStep, Depends(get_prediction_step)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
ContextDep = Annotated[RequestContext, Depends(get_request_context)]
FramingDep = Annotated[Framing, Depends(get_framing)]


async def get_deadline(
    request: Request, context: ContextDep, settings: SettingsDep
) -> float | None:
    """The `time.perf_counter()` by which the request's images must reach the model, if any: the
    shorter of `CXR_REQUEST_TIMEOUT_MS` and the client's `X-Request-Timeout-Ms`."""
    budgets_ms = [settings.request_timeout_ms] if settings.request_timeout_ms else []
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        if not header.isdigit() or int(header) == 0:
            raise InvalidRequest(f"{TIMEOUT_HEADER} must be a positive number of milliseconds")
        budgets_ms.append(int(header))
    return context.timer.started + min(budgets_ms) / 1000.0 if budgets_ms else None


DeadlineDep = Annotated[float | None, Depends(get_deadline)]


# -- API keys --------------------------------------------------------------------------------

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="`Authorization: Bearer <key>` with one of the configured API keys.",
)
_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="api_key",
    description=f"`{API_KEY_HEADER}: <key>`, the same keys as the bearer scheme.",
)


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_header)],
) -> Roles:
    """401 unless API keys are off or the request carries a configured one (either header); the
    roles of the key (`DEFAULT_ROLES` when keys are off), also kept on `request.state`."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys.required:
        request.state.key_roles = DEFAULT_ROLES
        return DEFAULT_ROLES
    presented = [key for key in (bearer and bearer.credentials, header_key) if key]
    if not presented:
        audit_refused_key(request, "no key")
        raise Unauthorized(
            f"an API key is required: send `Authorization: Bearer <key>` or `{API_KEY_HEADER}`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    found = [keys.roles_of(key) for key in presented]  # every key compared, no short cut
    accepted = [roles for roles in found if roles is not None]
    if not accepted:
        audit_refused_key(request, "unknown key")
        raise Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    roles = frozenset().union(*accepted)
    request.state.key_roles = roles
    # Who asked, for the access log and the audit trail: the key by an id, never the key.
    key_id = request.state.key_id = "key-" + key_digest(presented[0]).hex()[:8]
    request_context(request).fields["key_id"] = key_id
    return roles


def client_address(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def audit_refused_key(request: Request, user: str) -> None:
    """The audit trail's "authentication failed" (a minor failure), when the service keeps one."""
    audit: AuditTrail | None = getattr(request.app.state, "audit", None)
    if audit is not None:
        audit.record(
            AuditEvent(
                "authentication_failed",
                outcome="minor_failure",
                participants=(Participant(user, True, client_address(request)),),
            )
        )


def audit_read(request: Request, sop_instance_uid: str) -> None:
    """The audit trail's "DICOM instances accessed" for a stored result read; the access log
    names the UID read too."""
    request_context(request).fields["uid"] = sop_instance_uid
    audit: AuditTrail | None = getattr(request.app.state, "audit", None)
    if audit is not None:
        user = getattr(request.state, "key_id", None) or "anonymous"
        audit.record(
            AuditEvent(
                "results_read",
                participants=(Participant(user, True, client_address(request)),),
                sop_instance_uids=(sop_instance_uid,),
            )
        )


def demand_role(request: Request, role: str) -> None:
    """403 unless the request's key (read by `require_api_key`) has `role`."""
    roles: Roles = getattr(request.state, "key_roles", frozenset())
    if role not in roles:
        if role == OPERATE and not request.app.state.api_keys.required:
            raise Forbidden(
                "this needs an API key with the operate role, and the service has no keys: "
                "configure CXR_API_KEYS_FILE with a line ending roles=operate"
            )
        raise Forbidden(f"this API key lacks the `{role}` role this needs")


def require_role(role: str) -> list[Any]:
    """For route decorators: a configured key (401 otherwise) that has `role` (403 otherwise)."""

    async def check(request: Request, _: Annotated[Roles, Depends(require_api_key)]) -> None:
        demand_role(request, role)

    return [Depends(check)]


# For route decorators: `@router.get(..., dependencies=REQUIRE_API_KEY)`, any role.
REQUIRE_API_KEY = [Depends(require_api_key)]


# -- DICOM networking ------------------------------------------------------------------------


async def get_pipeline(request: Request, _: StepDep) -> ResultsPipeline:
    """The results pipeline (outbox, intake spool), or 501 when this instance has no state dir."""
    pipeline: ResultsPipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise DeliveryNotConfigured(
            "this instance keeps no DICOM results: set CXR_STATE_DIR (and a destination, "
            "CXR_RESULTS_DICOMWEB_URL or CXR_RESULTS_DIMSE) to have them made and delivered"
        )
    return pipeline


PipelineDep = Annotated[ResultsPipeline, Depends(get_pipeline)]


async def get_optional_pipeline(request: Request) -> ResultsPipeline | None:
    pipeline: ResultsPipeline | None = getattr(request.app.state, "pipeline", None)
    return pipeline


OptionalPipelineDep = Annotated[ResultsPipeline | None, Depends(get_optional_pipeline)]
