"""The OpenAPI document tells the truth about this start-up's limits and this model's classes.

The routes' static declarations cannot know them: the batch's file count is a setting
(`CXR_MAX_IMAGES_PER_REQUEST`) and `explain_class` takes the served model's class names, known
only once the model has loaded. `document_limits` hooks `app.openapi` (as `document_api_keys` does)
and writes them into the cached document on every call, so a document fetched before the model
is ready simply has no enum yet, and one fetched after has the served model's.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from app.http.uploads import FILE_FIELD

BATCH_PATH = "/predict/batch"
PREDICT_PATH = "/predict"
EXPLAIN_CLASS = "explain_class"


def _batch_files(schema: dict[str, Any]) -> dict[str, Any] | None:
    operation = schema.get("paths", {}).get(BATCH_PATH, {}).get("post", {})
    content = operation.get("requestBody", {}).get("content", {})
    properties = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {})
    files: dict[str, Any] | None = properties.get(FILE_FIELD)
    return files


def _string_schemas(parameter: dict[str, Any]) -> list[dict[str, Any]]:
    """The string branch(es) of a parameter's schema (`str | None` is an `anyOf`)."""
    schema = parameter.get("schema", {})
    branches = schema.get("anyOf", [schema])
    return [branch for branch in branches if branch.get("type") == "string"]


def document_limits(app: FastAPI) -> None:
    """Make `/predict/batch` declare 1..`max_images_per_request` files and `explain_class` the
    served model's classes (an enum while a model is loaded). Call once from the app factory."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI after the first call; the edits are idempotent
        files = _batch_files(schema)
        if files is not None:
            files["minItems"] = 1
            files["maxItems"] = app.state.settings.max_images_per_request
        classifier = app.state.service.classifier
        classes = list(classifier.metadata.classes) if classifier is not None else None
        operation = schema.get("paths", {}).get(PREDICT_PATH, {}).get("post", {})
        for parameter in operation.get("parameters", []):
            if parameter.get("name") != EXPLAIN_CLASS:
                continue
            for branch in _string_schemas(parameter):
                if classes:
                    branch["enum"] = classes
                else:
                    branch.pop("enum", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
