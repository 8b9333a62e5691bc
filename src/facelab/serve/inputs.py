"""Request bodies: images as multipart uploads or base64 JSON, parsed in memory and validated.

Each endpoint declares its options (a pydantic model of the non-image fields) and its image
fields; one `BodySpec` gives both the OpenAPI request body (multipart with binary parts, or
JSON with base64 strings) and the parser, so the document and the server cannot disagree.

Uploads never touch the disk: the body (already capped by the size limit) is parsed from
memory, unlike form parsers that spool large parts to temporary files.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

MULTIPART = "multipart/form-data"
JSON = "application/json"
# Part content types accepted as images besides image/*: what clients send when they do not
# know the file's type.
GENERIC_TYPES = ("application/octet-stream", "")
MAX_FIELDS = 32
# Identity names: letters, digits, space, _ . ' - ; starting and ending with a letter, digit or
# one of _ . ' (so never "", ".", "..", a path separator or surrounding blanks).
NAME_PATTERN = r"^\w(?:[\w .'-]{0,98}[\w.'-])?$"
# A 12x12 PNG: the documented example of a base64 image (and a real one for API fuzzers).
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAwAAAAMCAIAAADZF8uwAAAAHUlEQVR42mNkYGAQYeDCj1gYRLgYGAigUUX0VgQAHjsHfH"
    "V6BlYAAAAASUVORK5CYII="
)


class ApiError(Exception):
    """A refused request: HTTP status, a short machine-readable code and a sentence."""

    def __init__(
        self, status: int, error: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class ImageField:
    name: str
    description: str
    many: bool = False  # a list of images (enrollment)
    required: bool = True


@dataclass(frozen=True)
class Upload:
    """One image as received: the field it came in, the client's file name, and its bytes."""

    field: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class BodySpec:
    options: type[BaseModel]
    images: tuple[ImageField, ...]

    def openapi(self, max_images: int) -> dict[str, Any]:
        """The OpenAPI requestBody: the same fields as multipart parts or as JSON."""

        def schema(binary: bool) -> dict[str, Any]:
            base = self.options.model_json_schema()
            props = dict(base.get("properties", {}))
            required = list(base.get("required", []))
            for f in self.images:
                one: dict[str, Any] = (
                    {"type": "string", "format": "binary"}
                    if binary
                    else {
                        "type": "string",
                        "contentEncoding": "base64",
                        "minLength": 1,
                        "examples": [EXAMPLE_PNG],
                    }
                )
                prop = (
                    {"type": "array", "items": one, "minItems": 1, "maxItems": max_images}
                    if f.many
                    else one
                )
                props[f.name] = {**prop, "description": f.description}
                if f.required:
                    required.append(f.name)
            out = {"type": "object", "properties": props, "additionalProperties": False}
            return out | ({"required": required} if required else {})

        return {
            "required": True,
            "content": {MULTIPART: {"schema": schema(True)}, JSON: {"schema": schema(False)}},
        }

    async def parse(
        self, request: Request, max_images: int, max_bytes: int, seconds: float
    ) -> tuple[Any, list[Upload]]:
        """(validated options, images in field order); ApiError 408/413/415/422 when refused."""
        media, params = parse_options_header(request.headers.get("content-type", ""))
        body = await read_body(request, max_bytes, seconds)
        media_type = media.decode("latin-1").lower()
        if media_type == MULTIPART:
            image_names = {f.name for f in self.images}
            fields, uploads = _parse_multipart(body, params.get(b"boundary", b""), image_names)
        elif media_type == JSON:
            fields, uploads = self._parse_json(body)
        else:
            raise ApiError(415, "unsupported_media_type", f"send {MULTIPART} or {JSON}")
        names = {f.name for f in self.images}
        for upload in uploads:
            if upload.field not in names:
                raise ApiError(422, "invalid_request", f"unexpected image field {upload.field!r}")
        for f in self.images:
            count = sum(u.field == f.name for u in uploads)
            if f.required and count == 0:
                raise ApiError(422, "invalid_request", f"missing image field {f.name!r}")
            if count > (max_images if f.many else 1):
                limit = max_images if f.many else 1
                raise ApiError(422, "invalid_request", f"{f.name!r}: at most {limit} image(s)")
        if media_type == MULTIPART:
            fields = {k: self._form_value(k, v) for k, v in fields.items()}
        try:
            options = self.options.model_validate(fields, strict=True)
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", _describe(exc)) from None
        order = {f.name: i for i, f in enumerate(self.images)}
        return options, sorted(uploads, key=lambda u: order[u.field])

    @cached_property
    def _text_fields(self) -> set[str]:
        """Option fields whose values are strings (the others come as JSON in form text)."""
        props = self.options.model_json_schema().get("properties", {})
        return {
            name
            for name, prop in props.items()
            if {alt.get("type") for alt in prop.get("anyOf", [prop])} <= {"string", "null"}
        }

    def _form_value(self, name: str, text: str) -> Any:
        """A form field as typed as its JSON counterpart: `5`, `0.5`, `true` are JSON numbers and
        booleans; anything else stays text, for validation to refuse ("1" is no boolean)."""
        if name in self._text_fields:
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text

    def _parse_json(self, body: bytes) -> tuple[dict[str, Any], list[Upload]]:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise ApiError(422, "invalid_json", f"body is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ApiError(422, "invalid_json", "body must be a JSON object")
        uploads = []
        for f in self.images:
            if f.name not in data:
                continue
            value = data.pop(f.name)
            values = value if f.many and isinstance(value, list) else [value]
            for i, text in enumerate(values):
                if not isinstance(text, str):
                    raise ApiError(422, "invalid_request", f"{f.name!r}: expected base64 text")
                uploads.append(Upload(f.name, f"{f.name}[{i}]", _b64decode(f.name, text)))
        return data, uploads


async def read_body(request: Request, max_bytes: int, seconds: float) -> bytes:
    """The whole body, refused as soon as it grows past `max_bytes` (413) or when it has not
    all arrived within `seconds` (408: a client trickling bytes would hold a connection)."""
    body = bytearray()
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise ApiError(413, "payload_too_large", f"request body over {max_bytes} bytes")
    except TimeoutError:  # the rest of the body may still come: the connection cannot be reused
        detail = f"body not received within {seconds:g} s"
        raise ApiError(408, "request_timeout", detail, {"Connection": "close"}) from None
    return bytes(body)


def _b64decode(name: str, text: str) -> bytes:
    """Standard base64, or a data URL (`data:image/png;base64,...`) as browsers make them."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"{name!r}: not valid base64") from None
    if not data:
        raise ApiError(422, "invalid_image", f"{name!r}: empty image")
    return data


def _parse_multipart(
    body: bytes, boundary: bytes, image_names: set[str]
) -> tuple[dict[str, Any], list[Upload]]:
    """Text fields and image parts of a multipart/form-data body, all in memory. An empty
    image part (a browser's file input left empty) counts as not given."""
    if not boundary:
        raise ApiError(422, "invalid_multipart", "multipart body without a boundary")
    parts: list[dict[str, Any]] = []
    header = {"field": b"", "value": b""}

    def on_part_begin() -> None:
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header["field"].decode("latin-1").lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"] += data[start:end]

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise ApiError(422, "invalid_multipart", f"malformed multipart body ({exc})") from None
    if len(parts) > MAX_FIELDS:
        raise ApiError(422, "invalid_multipart", f"more than {MAX_FIELDS} parts")
    fields: dict[str, Any] = {}
    uploads: list[Upload] = []
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get("content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ApiError(422, "invalid_multipart", "a part has no name")
        if name in image_names or b"filename" in disposition:
            media, _ = parse_options_header(part["headers"].get("content-type", b""))
            content_type = media.decode("latin-1").lower()
            if not (content_type.startswith("image/") or content_type in GENERIC_TYPES):
                raise ApiError(
                    415, "unsupported_media_type", f"{name!r}: {content_type} is not an image"
                )
            filename = disposition.get(b"filename", b"").decode("utf-8", "replace") or name
            if part["data"]:
                uploads.append(Upload(name, filename, bytes(part["data"])))
            continue
        try:
            text = bytes(part["data"]).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid_multipart", f"{name!r}: not UTF-8 text") from None
        if name in fields:
            raise ApiError(422, "invalid_multipart", f"{name!r} given twice")
        if text != "":  # an empty form input means "not given"
            fields[name] = text
    return fields, uploads


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors()
    )
