"""Reading the uploaded X-ray from a request without ever buffering an unbounded body.

Two ways in, as the API documents: a multipart form field named `file`, or the raw body with an
image Content-Type. Either way the body is read chunk by chunk and abandoned with 413 the moment
it passes the limit. A declared Content-Length over the limit is refused before reading at all,
but it is never trusted on its own: chunked bodies have none, and a client can lie.

A request's framing (media type, boundary, declared length) is parsed once, into `Framing`, by
the dependency that hands it to the route; admission and reading both use that one parse.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.http.slow_bodies import incoming_chunks

FILE_FIELD = "file"
RAW_CONTENT_TYPES = frozenset(
    {"image/jpeg", "image/png", "application/dicom", "application/octet-stream"}
)
MULTIPART = "multipart/form-data"
# Boundaries, part headers and small extra fields around the file in a multipart body.
MULTIPART_ENVELOPE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Framing:
    """How a request's body is framed, from its headers alone."""

    media: str  # lower-case media type, "" when absent
    boundary: bytes | None  # the multipart boundary parameter, if any
    declared_length: int | None  # Content-Length when present and numeric

    @classmethod
    def of(cls, request: Request) -> Framing:
        media_type, params = parse_options_header(request.headers.get("content-type", ""))
        declared = request.headers.get("content-length")
        return cls(
            media=media_type.decode("latin-1").lower(),
            boundary=params.get(b"boundary") or None,
            # The server (h11/httptools) has already rejected a non-numeric Content-Length.
            declared_length=int(declared) if declared is not None and declared.isdigit() else None,
        )

    @property
    def multipart(self) -> bool:
        return self.media == MULTIPART

    def body_limit(self, max_bytes: int) -> int:
        """The most body bytes a file of `max_bytes` may come in."""
        return max_bytes + (MULTIPART_ENVELOPE_BYTES if self.multipart else 0)

    def refuse_declared_length(self, limit: int) -> None:
        if self.declared_length is not None and self.declared_length > limit:
            raise _too_large(limit)

    def multipart_boundary(self) -> bytes:
        if not self.boundary:
            raise InvalidRequest("multipart body without a boundary parameter")
        return self.boundary


async def read_upload(request: Request, framing: Framing, max_bytes: int) -> bytes:
    """The uploaded file's bytes, at most `max_bytes` of them.

    Raises `PayloadTooLarge` (413), `UnsupportedMediaType` (415) for a Content-Type that is
    neither multipart nor one of `RAW_CONTENT_TYPES`, and `InvalidRequest` (422) for a multipart
    body without exactly one `file` part. The declared type never decides how the bytes are
    decoded; `decoding.detect_format` does, from the bytes.
    """
    media = framing.media
    if framing.multipart:
        boundary = framing.multipart_boundary()
        body_limit = framing.body_limit(max_bytes)
        framing.refuse_declared_length(body_limit)
        return await _read_multipart_file(_bounded(request, body_limit), boundary, max_bytes)
    if media in RAW_CONTENT_TYPES:
        framing.refuse_declared_length(max_bytes)
        return await _read_raw(_bounded(request, max_bytes))
    accepted = ", ".join(sorted(RAW_CONTENT_TYPES))
    raise UnsupportedMediaType(
        f"Content-Type {media or '(none)'!r} is not accepted: send the image as the multipart "
        f"form field '{FILE_FIELD}', or as the raw body with Content-Type one of: {accepted}"
    )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")


async def _bounded(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The body's chunks, raising 413 as soon as their running total passes `limit`."""
    received = 0
    async for chunk in incoming_chunks(request):  # held to the minimum rate, charged as it comes
        received += len(chunk)
        if received > limit:
            raise _too_large(limit)
        if chunk:
            yield chunk


async def _read_raw(chunks: AsyncIterator[bytes]) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
    return bytes(body)


class _FilePartCollector:
    """python-multipart callbacks that keep only the `file` part's bytes, up to a limit."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.files: list[bytearray] = []
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._current: bytearray | None = None
        self.complete = False

    def on_part_begin(self) -> None:
        self._current = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            _, params = parse_options_header(bytes(self._header_value))
            if params.get(b"name") == FILE_FIELD.encode():
                self._current = bytearray()
                self.files.append(self._current)
        self._header_field.clear()
        self._header_value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is None:
            return  # another form field: the body limit already bounds it
        self._current += data[start:end]
        if len(self._current) > self.max_bytes:
            raise _too_large(self.max_bytes)

    def on_end(self) -> None:
        self.complete = True

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_part_data": self.on_part_data,
            "on_end": self.on_end,
        }


async def read_body(request: Request, framing: Framing, max_bytes: int) -> bytes:
    """The whole body, whatever its media type (the caller checks it), at most `max_bytes`
    (413 past it, declared or counted while streaming; chunked bodies are read the same way)."""
    framing.refuse_declared_length(max_bytes)
    return await _read_raw(_bounded(request, max_bytes))


async def read_upload_parts(
    request: Request, framing: Framing, max_bytes: int, max_parts: int
) -> list[bytes]:
    """The bytes of every `file` part of a multipart body, in order: 1 to `max_parts` of them,
    `max_bytes` in all (the whole body is bounded, not each part). Same refusals as
    `read_upload`, plus `InvalidRequest` for no `file` part or more than `max_parts`."""
    if not framing.multipart:
        raise UnsupportedMediaType(
            f"send the images as {MULTIPART} with one form field '{FILE_FIELD}' per image"
        )
    boundary = framing.multipart_boundary()
    body_limit = framing.body_limit(max_bytes)
    framing.refuse_declared_length(body_limit)
    files = await _read_multipart_files(_bounded(request, body_limit), boundary, max_bytes)
    if not 1 <= len(files) <= max_parts:
        raise InvalidRequest(
            f"expected 1 to {max_parts} multipart fields named '{FILE_FIELD}', got {len(files)}"
        )
    return files


def declared_upload_bytes(framing: Framing, max_bytes: int) -> int:
    """What an upload will hold in memory, for admission: its declared Content-Length, or the
    body limit when the length is not declared (a chunked body). A declared length past the limit
    is `PayloadTooLarge` here already: no amount of waiting makes that request acceptable, so it
    must get its 413, not a 429."""
    limit = framing.body_limit(max_bytes)
    framing.refuse_declared_length(limit)
    return framing.declared_length if framing.declared_length is not None else limit


async def _read_multipart_file(
    chunks: AsyncIterator[bytes], boundary: bytes, max_bytes: int
) -> bytes:
    files = await _read_multipart_files(chunks, boundary, max_bytes)
    if len(files) != 1:
        raise InvalidRequest(
            f"expected exactly one multipart field named '{FILE_FIELD}', got {len(files)}"
        )
    return files[0]


async def _read_multipart_files(
    chunks: AsyncIterator[bytes], boundary: bytes, max_bytes: int
) -> list[bytes]:
    collector = _FilePartCollector(max_bytes)
    try:
        parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from exc
    if not collector.complete:
        # Otherwise a cut-off upload would reach the decoder as a plausible truncated image.
        raise InvalidRequest("multipart body ended before its closing boundary")
    return [bytes(part) for part in collector.files]
