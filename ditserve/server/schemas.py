"""The HTTP API's shapes: the OpenAI image request and response, and the OpenAI error body.

Request fields follow OpenAI's `POST /v1/images/generations` (`model`, `prompt`, `n`, `size` as "WxH",
`response_format`, `output_format`, `output_compression`, `user`) plus ditserve's extensions
(`negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`). The schema is strict: a wrong type or an
unknown field fails validation (422), with no coercion of "2" to 2. OpenAI options that change the picture and
that ditserve does not implement (quality, style, background, ...) are declared so that a request setting them
gets a clear 400 naming the option, never a silently different image.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI options that have no meaning for a diffusion transformer here: setting any of them is a 400.
UNSUPPORTED_OPENAI_OPTIONS = ("quality", "style", "background", "moderation", "partial_images")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # API name -> PIL format
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageGenerationRequest(BaseModel):
    """The body of `POST /v1/images/generations`. Ranges (n, size, steps, ...) are checked by the server
    against the model and its limits, giving 400 rather than 422."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" (e.g. "1024x768"), or "auto" / unset '
                                                       "for the model's default size")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(default=None, description="0-100, jpeg and webp only: the encoder's "
                                                                     "quality (default 95)")
    user: str | None = None  # an end-user identifier (OpenAI); accepted and not used
    safety_identifier: str | None = None  # the same, OpenAI's newer name
    stream: bool | None = None  # only false: streaming partial images is not supported
    # ditserve extensions
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    # OpenAI options without an implementation here (400 when set)
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    partial_images: Any = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    """OpenAI's images response; `size` and `output_format` are OpenAI fields, `seed` is ditserve's (the seed
    used, so a request can be reproduced: image i of a request is row i of that seed's noise)."""

    created: int
    data: list[ImageData]
    size: str
    output_format: str
    seed: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
