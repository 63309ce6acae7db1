"""`POST /v1/images/edits`: OpenAI's image edit request (multipart/form-data), answered like generations.

    image | image[]   one or more input images (PNG, JPEG or WebP files; repeatable, in order)
    prompt            the edit instruction (required)
    n, size, response_format, output_format, output_compression, model, user, safety_identifier, stream
                      as `POST /v1/images/generations` takes them (size "auto" or unset: the family picks the
                      output size from the input image)
    negative_prompt, guidance_scale, num_inference_steps, seed   ditserve's extensions, as for generations
    lora              a JSON list `[{"name": ..., "weight": ...}]` (servers with LoRA adapters), as for generations
    mask              refused (400): no served family edits inside a mask

The multipart body is parsed in memory (python-multipart's streaming parser; nothing is spooled to disk) under its
own size cap, `ServerConfig.max_image_bytes` (`--max-image-bytes`, default 20 MiB), instead of the JSON routes'
`--max-body-bytes`. Each image is decoded in memory with Pillow, restricted to PNG, JPEG and WebP (no plugin that
calls out to another program), and refused before its pixels are decoded when its header states more than
`ServerConfig.max_input_pixels` (`--max-input-pixels`, default 4096 x 4096) pixels: a small compressed file
cannot make the server allocate a huge bitmap. Not an image, a truncated or corrupt file, too many pixels or
bytes, more images than the model takes, or a text-to-image model (it takes none): a 400 naming the problem.
Number fields arrive as text: they must be plain decimal numbers (else a 422, as a wrong JSON type is), then
every range check of generations applies (400 naming the field).
"""

from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from ditserve.server.schemas import ImageGenerationRequest, ImagesResponse, RequestLimits

EDITS_PATH = "/v1/images/edits"
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow formats an input image may have (OpenAI's png, jpg, webp)
MAX_FORM_FIELDS = 64  # parts of one request, images included
IMAGE_FIELDS = ("image", "image[]")
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER_FIELDS = ("n", "num_inference_steps", "seed", "output_compression")
_NUMBER_FIELDS = ("guidance_scale",)
_TEXT_FIELDS = ("prompt", "model", "size", "response_format", "output_format", "user", "safety_identifier",
                "negative_prompt")
# OpenAI edit options that change the picture and that ditserve does not implement: a 400 naming the option.
UNSUPPORTED_EDIT_OPTIONS = ("quality", "style", "background", "moderation", "partial_images", "input_fidelity",
                            "markup", "svg", "complexity", "frame_count", "frame_duration_ms")


def _api_error(*args, **kwargs):
    from ditserve.server.app import APIError  # app imports this module

    return APIError(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ parsing


@dataclass
class Part:
    """One multipart part: its field name, file name (None for a plain field) and bytes."""

    name: str
    filename: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/form-data `body`, in memory. Raises APIError(400) for a body that is not
    multipart/form-data or is malformed, or that has more than MAX_FORM_FIELDS parts."""
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    ctype, options = parse_options_header(content_type or "")
    if ctype == b"application/x-www-form-urlencoded":  # a form without files (so without an image)
        from urllib.parse import parse_qsl

        try:
            fields = parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
        except (UnicodeDecodeError, ValueError) as e:
            raise _api_error(400, f"the form body is malformed: {e}", code="invalid_multipart") from None
        return [Part(name, None, value.encode("utf-8", "surrogatepass")) for name, value in fields]
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise _api_error(400, "the request body must be multipart/form-data (with a boundary), as OpenAI's image "
                              "edit request is", code="invalid_content_type")
    parts: list[Part] = []
    state: dict[str, Any] = {"headers": {}, "field": b"", "value": b"", "data": []}

    def on_part_begin():
        state.update(headers={}, data=[])

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state.update(field=b"", value=b"")

    def on_part_data(data, start, end):
        state["data"].append(bytes(data[start:end]))

    def on_part_end():
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            raise _api_error(400, "a multipart part has no Content-Disposition name", code="invalid_multipart")
        filename = disposition.get(b"filename")
        parts.append(Part(name.decode("utf-8", "replace"), None if filename is None else
                          filename.decode("utf-8", "replace"), b"".join(state["data"])))
        if len(parts) > MAX_FORM_FIELDS:
            raise _api_error(400, f"the request has more than {MAX_FORM_FIELDS} form fields",
                             code="invalid_multipart")

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except HTTPException:  # an APIError of a callback
        raise
    except Exception as e:  # python-multipart's parse errors
        raise _api_error(400, f"the multipart body is malformed: {e}", code="invalid_multipart") from None
    if parser.state != MultipartState.END:
        raise _api_error(400, "the multipart body is truncated: it ends before its closing boundary",
                         code="invalid_multipart")
    return parts


def decode_image(data: bytes, param: str, max_pixels: int):
    """An input image's bytes -> an RGB PIL image, decoded in memory. Raises APIError(400), `param` naming
    the field ("image[1]"), for an empty file, a file that is not a PNG, JPEG or WebP image, one whose header
    states more than `max_pixels` pixels (checked before the pixels are decoded), or a truncated or corrupt
    one."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise _api_error(400, f"{param}: the file is empty", param=param, code="invalid_image")
    try:
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:  # reads the header only
            width, height = image.size
            if width * height > max_pixels:
                raise _api_error(400, f"{param}: the image is {width}x{height} = {width * height} pixels, more than "
                                      f"this server's --max-input-pixels {max_pixels}", param=param,
                                 code="image_too_large")
            image.load()  # decodes: a truncated or corrupt file raises here
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise _api_error(400, f"{param}: not an image this server reads (PNG, JPEG or WebP)", param=param,
                         code="invalid_image") from None
    except Image.DecompressionBombError as e:
        raise _api_error(400, f"{param}: the image has too many pixels ({e})", param=param,
                         code="image_too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _api_error(400, f"{param}: the image is truncated or corrupt ({e})", param=param,
                         code="invalid_image") from None


def _field_value(part: Part) -> Any:
    """A plain field's value, typed: integers and numbers parse strictly from their text (422 otherwise)."""
    if part.filename is not None:
        raise _api_error(422, f"{part.name}: expected a text field, got a file", param=part.name,
                         code="invalid_type")
    try:
        text = part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise _api_error(400, f"{part.name} is not valid UTF-8 text", param=part.name, code="invalid_value") from None
    if part.name in _INTEGER_FIELDS:
        if not _INTEGER.fullmatch(text):
            raise _api_error(422, f"{part.name}: expected an integer, got {text[:40]!r}", param=part.name,
                             code="int_type")
        return int(text)
    if part.name in _NUMBER_FIELDS:
        if not _NUMBER.fullmatch(text):
            raise _api_error(422, f"{part.name}: expected a number, got {text[:40]!r}", param=part.name,
                             code="float_type")
        return float(text)
    if part.name == "stream":
        if text not in ("true", "false"):
            raise _api_error(422, f"stream: expected true or false, got {text[:40]!r}", param="stream",
                             code="bool_type")
        return text == "true"
    if part.name == "lora":
        try:
            return json.loads(text)
        except ValueError:
            raise _api_error(422, 'lora: expected a JSON list of {"name": ..., "weight": ...}', param="lora",
                             code="json_invalid") from None
    return text


def edit_request(parts: list[Part]) -> tuple[ImageGenerationRequest, list[tuple[str, bytes]]]:
    """The request's fields as generations' body model (every field check of generations applies), and its
    image files as (param, bytes) in order. Raises APIError: 400 for a mask or an unsupported option, 422 for an
    unknown or repeated field or a wrong type."""
    fields: dict[str, Any] = {}
    images: list[tuple[str, bytes]] = []
    for part in parts:
        if part.name in IMAGE_FIELDS:
            images.append((f"image[{len(images)}]", part.data))
        elif part.name == "mask":
            raise _api_error(400, "mask is not supported: the served model edits the whole image (no family served "
                                  "by ditserve takes a mask); leave it unset", param="mask",
                             code="unsupported_parameter")
        elif part.name in UNSUPPORTED_EDIT_OPTIONS:
            raise _api_error(400, f"{part.name!r} is not supported by ditserve; leave it unset", param=part.name,
                             code="unsupported_parameter")
        elif part.name in fields:
            raise _api_error(422, f"{part.name}: given more than once", param=part.name, code="duplicate_field")
        elif part.name in (*_TEXT_FIELDS, *_INTEGER_FIELDS, *_NUMBER_FIELDS, "stream", "lora"):
            fields[part.name] = _field_value(part)
        else:
            raise _api_error(422, f"{part.name}: unknown field", param=part.name, code="extra_forbidden")
    if not images:
        raise _api_error(400, "image: an edit needs at least one input image ('image' or 'image[]' file field)",
                         param="image", code="missing_image")
    try:
        body = ImageGenerationRequest(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first.get("loc", ())) or None
        raise _api_error(422, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", param=param,
                         code=first.get("type")) from None
    return body, images


# ------------------------------------------------------------------------------------------------- schema


def edit_request_schema(limits: RequestLimits, generation_properties: dict[str, Any]) -> dict[str, Any]:
    """The multipart request body's OpenAPI schema: generations' fields with this server's ranges
    (`generation_properties`, from `RequestLimits.openapi_properties` and the body model), the image files,
    and the refused options typed null-only."""
    properties = {name: prop for name, prop in generation_properties.items()
                  if name not in ("quality", "style", "background", "moderation", "partial_images")}
    if properties.get("lora", {}).get("type") != "null":  # a form field is text: the list as JSON
        properties["lora"] = {"type": "string", "contentMediaType": "application/json",
                              "description": "LoRA adapters as generations takes them, as JSON text: "
                                             '[{"name": ..., "weight": ...}]'}
    image = {"type": "string", "format": "binary", "description": "an input image: a PNG, JPEG or WebP file"}
    properties["image"] = image
    properties["image[]"] = {"type": "array", "items": image, "description": "input images, in order"}
    for option in ("mask", *UNSUPPORTED_EDIT_OPTIONS):
        properties[option] = {"type": "null", "description": f"OpenAI's `{option}`: not supported by ditserve; a "
                                                             f"400 when set"}
    return {"type": "object", "required": ["prompt"], "properties": properties, "additionalProperties": False,
            "description": "OpenAI's image edit request: `image` or `image[]` (one or more files) and the fields "
                           "of an image generation request"}


# -------------------------------------------------------------------------------------------------- route


def edits_router(answer, responses: dict[int | str, Any]) -> APIRouter:
    """The edits route. `answer(body, images, request, arrival)` is the app's shared request path (checks,
    LoRA, queue, encode and response), as generations uses it; `responses`: the route's error statuses."""
    router = APIRouter()

    @router.post(EDITS_PATH, response_model=ImagesResponse, response_model_exclude_none=True, responses=responses,
                 openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                     "schema": {"type": "object", "properties": {}}}}}})
    async def edits(request: Request) -> ImagesResponse:
        arrival = time.monotonic()
        state = request.app.state
        state.require_ready()
        config = state.config
        body = await request.body()  # bounded by the body limit of this route (--max-image-bytes)
        parts = await run_in_threadpool(parse_multipart, body, request.headers.get("content-type", ""))
        del body
        fields, files = edit_request(parts)
        max_images = state.worker.engine.capabilities.max_input_images
        if max_images == 0:
            raise _api_error(400, f"image: the served model {state.worker.model_name!r} makes images from text "
                                  f"only (it takes no input image); use /v1/images/generations", param="image",
                             code="unsupported_parameter")
        if len(files) > max_images:
            raise _api_error(400, f"image: the served model takes at most {max_images} input image(s), got "
                                  f"{len(files)}", param="image", code="too_many_images")
        images = []
        for param, data in files:
            images.append(await run_in_threadpool(decode_image, data, param, config.max_input_pixels))
        return await answer(fields, images, request, arrival)

    return router
