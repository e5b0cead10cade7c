"""The imaging stage's one error boundary: whatever reading an upload raises is the upload's fault.

Parsing, gating, decoding and rendering run attacker-controlled bytes through pydicom, Pillow, the
pylibjpeg / CharLS / OpenJPEG plugins and NumPy. Which exception types those can raise is not a
list anyone can keep: pydicom alone raises ValueError, KeyError, NotImplementedError,
AttributeError, struct.error... depending on which element is broken, and decoders written in Rust
report a malformed stream as a PyO3 `PanicException`, which derives from `BaseException`. So the
stage's entry points (`open_upload`, an opened upload's `decode`, `open_dicom`,
`OpenedDicom.render`, `to_model_input` as the classifier calls it) run inside `image_boundary`:
a `ServiceError` passes through unchanged, anything else becomes `InvalidImage` (422) naming only
the exception's type. Never its message: pydicom's messages quote header values, which are
patient data. Only what stops the process or the task (`KeyboardInterrupt`, `SystemExit`,
`GeneratorExit`, `asyncio.CancelledError`) passes through as itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import ParamSpec, TypeVar

from app.errors import InvalidImage, ServiceError

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# What ends the process or the task, never a property of an upload.
PASS_THROUGH: tuple[type[BaseException], ...] = (
    KeyboardInterrupt,
    SystemExit,
    GeneratorExit,
    asyncio.CancelledError,
)


def as_invalid_image(exc: BaseException, what: str) -> InvalidImage:
    """`exc` as the client's error: `what` (a phrase like "the DICOM header could not be read")
    and the exception's type name, never its message."""
    if isinstance(exc, InvalidImage):
        return exc
    # Logged so that a new failure mode of a library gets noticed; the type only, as the message
    # may quote a header value.
    logger.warning("upload refused by the imaging boundary", extra={"fields": {
        "stage": what, "error": type(exc).__name__,
    }})  # fmt: skip
    return InvalidImage(f"{what} ({type(exc).__name__})")


@contextmanager
def image_boundary(what: str) -> Iterator[None]:
    """Run the block as one imaging step: a `ServiceError` passes, anything else but the
    `PASS_THROUGH` types is raised again as `InvalidImage` (see the module docstring)."""
    try:
        yield
    except ServiceError:
        raise
    except BaseException as exc:
        if isinstance(exc, PASS_THROUGH):
            raise
        # `from None`: the original (and its message) stays out of any traceback that is logged.
        raise as_invalid_image(exc, what) from None


def guarded(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """`image_boundary(what)` around every call of the decorated function."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            with image_boundary(what):
                return function(*args, **kwargs)

        return call

    return decorate
