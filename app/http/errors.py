"""The one JSON error shape and the mapping of every exception to it.

`install_error_handlers` turns domain errors (`app.errors.ServiceError`), and every error the
framework raises itself (404, 405, request validation, anything unexpected), into the single JSON
shape `{"error": {"code": ..., "message": ...}}` that `ErrorResponse` declares in OpenAPI.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import InvalidRequest, ServiceError
from app.ops.observability import request_context

logger = logging.getLogger(__name__)


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


def _answer(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    # The access log line and the request counter name the code.
    request_context(request).error_code = code
    return error_json(status, code, message, headers)


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
        retry_after = exc.retry_after_s
        if retry_after is None and exc.retryable:
            retry_after = request.app.state.settings.retry_after_s
        headers = dict(exc.headers or {})
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return _answer(request, exc.status_code, exc.code, exc.message, headers or None)

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        # Keep the framework's headers (405 carries `Allow`).
        return _answer(request, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors()
        )
        return _answer(request, HTTPStatus.UNPROCESSABLE_ENTITY, InvalidRequest.code, problems)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: log the traceback server-side, never send it to the client.
        logger.exception("unhandled error", exc_info=exc)
        # Starlette raises the exception again once this answer is sent, and uvicorn then closes
        # the socket: `Connection: close` says so, so a keep-alive client opens a new connection
        # for its next request instead of writing it into one that is going away.
        return _answer(
            request,
            HTTPStatus.INTERNAL_SERVER_ERROR,
            ServiceError.code,
            "internal server error",
            {"Connection": "close"},
        )

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)
