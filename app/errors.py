"""Domain exceptions and their one mapping to HTTP.

Code below the routes raises these; `install_error_handlers` turns them, and every error the
framework raises itself (404, 405, request validation, anything unexpected), into the single JSON
shape `{"error": {"code": ..., "message": ...}}` that `ErrorResponse` declares in OpenAPI.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the errors a client can cause or observe; each knows its status and code."""

    status_code: ClassVar[int] = HTTPStatus.INTERNAL_SERVER_ERROR
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


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


class ModelNotReady(ServiceError):
    """No validated, warmed-up model is serving (still loading, broken, or shutting down)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "not_ready"


class Unauthorized(ServiceError):
    """API keys are required and the request carried none, or one that is not configured."""

    status_code = HTTPStatus.UNAUTHORIZED
    code = "unauthorized"


class ShuttingDown(ServiceError):
    """The instance is stopping and will not answer this request; another instance will."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE
    code = "shutting_down"


class ModelLoadError(Exception):
    """Why a model cannot be served; its message becomes the not-ready reason."""


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. `invalid_image`.")
    message: str = Field(description="Human-readable explanation; never contains image data.")


class ErrorResponse(BaseModel):
    """The body of every non-2xx response."""

    error: ErrorDetail


def error_json(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A response in the one error shape (also an ASGI app, for middleware that answers itself)."""
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` entry that documents the error shape for the given statuses in OpenAPI."""
    return {
        status: {"model": ErrorResponse, "description": HTTPStatus(status).phrase}
        for status in statuses
    }


_HTTP_CODES: dict[int, str] = {
    HTTPStatus.NOT_FOUND: "not_found",
    HTTPStatus.METHOD_NOT_ALLOWED: "method_not_allowed",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception to the one error shape. Call once from the app factory."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_json(exc.status_code, exc.code, exc.message, exc.headers)

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        # Keep the framework's headers (405 carries `Allow`).
        return error_json(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return error_json(HTTPStatus.UNPROCESSABLE_ENTITY, InvalidRequest.code, problems)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log the traceback server-side, never send it to the client.
        logger.exception("unhandled error", exc_info=exc)
        return error_json(
            HTTPStatus.INTERNAL_SERVER_ERROR, ServiceError.code, "internal server error"
        )

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
