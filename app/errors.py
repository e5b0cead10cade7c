"""Domain exceptions: what a client can cause or observe, each with its status and stable code.

Code in every stage raises these; `app.http.errors` maps them, and every error the framework
raises itself, to the one JSON error shape. Nothing here knows about HTTP frameworks: the status is
a plain number, so the imaging and model stages can be used without FastAPI.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar


class ServiceError(Exception):
    """Base of the errors a client can cause or observe; each knows its status and code."""

    status_code: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    code: ClassVar[str] = "internal_error"
    # Whether the client should simply retry later: the answer then carries `Retry-After`.
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        headers: dict[str, str] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers
        # Sent as `Retry-After` (seconds) when the client should simply come back later.
        self.retry_after_s = retry_after_s


class InvalidImage(ServiceError):
    """The bytes claim a supported format but do not decode into a usable image."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_image"


class ImageTooSmall(InvalidImage):
    code = "image_too_small"


class ImageTooManyPixels(InvalidImage):
    """Decompression-bomb guard: the header declares more pixels than the configured limit."""

    code = "image_too_many_pixels"


class NotIntendedUse(InvalidImage):
    """A readable image the model was not made for (another modality, body part or view, a
    multi-frame or colour image, a patient outside the training population where refused)."""

    code = "not_intended_use"


class OutsideTrainingPopulation(NotIntendedUse):
    """The patient's age is outside the training population and the service refuses such cases."""

    code = "outside_training_population"


class ExplanationUnavailable(ServiceError):
    """An explanation was asked of a model whose graph has no class-activation-map output."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "explanation_unavailable"


class InvalidRequest(ServiceError):
    """The request itself is malformed (no `file` field, broken multipart framing, ...)."""

    status_code = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "invalid_request"


class UnsupportedMediaType(ServiceError):
    """A format (detected from the bytes) or a request Content-Type the service does not take."""

    status_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "payload_too_large"


class TooManyParts(PayloadTooLarge):
    """A STOW-RS request with more parts than `CXR_STOW_MAX_PARTS`, refused whole."""

    code = "too_many_parts"


class UploadTooSlow(ServiceError):
    """The body arrived slower than the minimum transfer rate: cut off, so that a slow sender
    cannot hold what other uploads need (answered with `Connection: close`)."""

    status_code = HTTPStatus.REQUEST_TIMEOUT
    code = "upload_too_slow"


class ModelNotReady(ServiceError):
    """No validated, warmed-up model is serving (still loading, broken, or shutting down)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"


class Unauthorized(ServiceError):
    """API keys are required and the request carried none, or one that is not configured."""

    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class Forbidden(ServiceError):
    """The API key is valid but its roles do not cover the operation."""

    status_code = HTTPStatus.FORBIDDEN
    code = "forbidden"


class ResultsStoreFull(ServiceError):
    """The results store holds as many results as it may (`CXR_RESULTS_MAX_STORED`): nothing new
    is stored until retention or an operator removes some; the caller may retry later."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "results_store_full"
    retryable = True


class ShuttingDown(ServiceError):
    """The instance is stopping and will not answer this request; another instance will."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "shutting_down"


class Overloaded(ServiceError):
    """The service already holds all the work it can finish in time: refused at once, before the
    upload is read, with `Retry-After`. Not a readiness failure: the service is healthy, just full.
    """

    status_code = HTTPStatus.TOO_MANY_REQUESTS
    code = "overloaded"
    retryable = True


class DeadlineExceeded(ServiceError):
    """The request's deadline (`X-Request-Timeout-Ms` or the configured default) passed before its
    image reached the model; the work is dropped instead of finishing for a client that gave up."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "deadline_exceeded"
    retryable = True


class ModelLoadError(Exception):
    """Why a model cannot be served; its message becomes the not-ready reason."""


class DeliveryNotConfigured(ServiceError):
    """DICOM result objects were asked for, but this instance keeps no state to deliver them
    from (`CXR_STATE_DIR` is not set)."""

    status_code = HTTPStatus.NOT_IMPLEMENTED
    code = "not_configured"


class ResultNotFound(ServiceError):
    """No result is stored for that SOP Instance UID (never produced, or purged after delivery)."""

    status_code = HTTPStatus.NOT_FOUND
    code = "result_not_found"


class MalformedRequest(ServiceError):
    """A DICOMweb request whose syntax is broken (STOW-RS answers 400 for it, per PS3.18)."""

    status_code = HTTPStatus.BAD_REQUEST
    code = "malformed_request"
