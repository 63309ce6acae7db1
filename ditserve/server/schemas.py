"""The HTTP API's shapes: the OpenAI image request and response, and the OpenAI error body.

Request fields follow OpenAI's `POST /v1/images/generations` (`model`, `prompt`, `n`, `size` as "WxH",
`response_format`, `output_format`, `output_compression`, `user`) plus ditserve's extensions
(`negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`). The schema is strict: a wrong type or an
unknown field fails validation (422), with no coercion of "2" to 2. OpenAI options that change the picture and
that ditserve does not implement (quality, style, background, ...) are declared so that a request setting them
gets a clear 400 naming the option, never a silently different image.

Ranges (n, size, steps, guidance, seed, ...) are checked by the server, giving a 400 naming the field and its range;
they depend on the server's settings and the served model, so the OpenAPI schema states them through
`RequestLimits.openapi_properties` (built once the model is loaded), which types every refused option null-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

from ditserve.config import REQUEST_RANGES

# OpenAI options that have no meaning for a diffusion transformer here: setting any of them is a 400.
UNSUPPORTED_OPENAI_OPTIONS = ("quality", "style", "background", "moderation", "partial_images")
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # API name -> PIL format
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _integral(v: Any) -> Any:
    """2.0 -> 2: JSON Schema's "integer" includes numbers with a zero fraction, so the schema's integers accept
    them too; 2.5, "2" and true stay what they are (a 422 under the strict schema)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# An integer field: strict (no "2" -> 2, no true -> 1), except that 2.0 is the integer 2.
Integer = Annotated[int, BeforeValidator(_integral)]


class LoRAChoice(BaseModel):
    """One LoRA adapter a request selects: its name and weight (range checked by the server: 400)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    weight: float = 1.0


class ImageGenerationRequest(BaseModel):
    """The body of `POST /v1/images/generations`. Ranges (n, size, steps, ...) are checked by the server
    against the model and its limits (`RequestLimits`), giving 400 rather than 422."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    n: Integer = 1
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: Integer | None = None
    user: str | None = None  # an end-user identifier (OpenAI); accepted and not used
    safety_identifier: str | None = None  # the same, OpenAI's newer name
    stream: bool | None = None  # only false: streaming partial images is not supported
    # ditserve extensions
    negative_prompt: str | None = None
    num_inference_steps: Integer | None = None
    guidance_scale: float | None = None
    seed: Integer | None = None
    lora: list[LoRAChoice] | None = None  # LoRA adapters (servers with adapters; `ditserve.server.lora`)
    # OpenAI options without an implementation here (400 when set)
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    partial_images: Any = None


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of this server and its model: the server checks these where the request is
    parsed (400 naming the field and the range) and the OpenAPI schema states them.

    max_n: images per request. max_steps: denoise steps. Sizes: multiples of size_multiple in
    [min_size, max_size] pixels, each side. max_guidance: guidance_scale's upper bound (0: the model has no
    guidance). negative_prompt: whether the model takes one. output_formats: what this Pillow can write.
    """

    max_n: int
    max_steps: int
    size_multiple: int
    min_size: int
    max_size: int
    max_guidance: float
    negative_prompt: bool
    output_formats: tuple[str, ...]

    def sizes(self) -> range:
        """Every accepted width (and height), ascending."""
        first = math.ceil(self.min_size / self.size_multiple) * self.size_multiple
        return range(first, self.max_size + 1, self.size_multiple)

    def accepts_size(self, width: int, height: int) -> bool:
        return width in self.sizes() and height in self.sizes()

    def size_text(self) -> str:
        return (f'"WIDTHxHEIGHT" in ASCII digits without leading zeros (e.g. "{self.sizes()[0]}x{self.sizes()[0]}"), '
                f"each a multiple of {self.size_multiple} between {self.min_size} and {self.max_size}, or \"auto\" "
                f"/ unset for the model's default size")

    def openapi_properties(self) -> dict[str, dict[str, Any]]:
        """JSON schemas of the request fields whose accepted values depend on the server and the model (they
        replace the types pydantic derives): each states exactly what the server accepts."""
        sizes = "|".join(str(v) for v in self.sizes())
        seed_low, seed_high = REQUEST_RANGES["seed"]
        refused = {o: {"type": "null", "description": f"OpenAI's `{o}`: not supported by ditserve; a 400 when set"}
                   for o in UNSUPPORTED_OPENAI_OPTIONS}
        return {
            "prompt": {"type": "string", "description": "the prompt: valid Unicode (a lone surrogate is a 400)"},
            "n": {"type": "integer", "minimum": 1, "maximum": self.max_n, "default": 1,
                  "description": f"images to make, 1-{self.max_n} (the server's --max-batch-size)"},
            "size": _nullable({"type": "string", "pattern": f"^(auto|({sizes})x({sizes}))$"}, self.size_text()),
            "output_format": {"type": "string", "enum": list(self.output_formats), "default": "png"},
            "output_compression": _nullable(
                {"type": "integer", "minimum": 0, "maximum": 100},
                "0-100: jpeg and webp: the encoder's quality (default 95); png: the zlib effort, 0-100 mapped to "
                "levels 0-9 (lossless either way)"),
            "stream": _nullable({"type": "boolean", "enum": [False]}, "only false: streaming is not supported"),
            "negative_prompt": (_nullable({"type": "string"}, "what classifier-free guidance steers away from")
                                if self.negative_prompt else
                                {"type": "null", "description": "not supported by the served model (it has no "
                                                                "classifier-free guidance); a 400 when set"}),
            "num_inference_steps": _nullable({"type": "integer", "minimum": 1, "maximum": self.max_steps},
                                             f"denoise steps, 1-{self.max_steps} (default: the model's)"),
            "guidance_scale": _nullable({"type": "number", "minimum": 0, "maximum": self.max_guidance},
                                        f"the model's guidance scale, 0-{self.max_guidance:g} (default: the model's)"),
            "seed": _nullable({"type": "integer", "minimum": seed_low, "maximum": seed_high},
                              "the noise seed (default: drawn, and returned in the answer)"),
            **refused,
        }


def _nullable(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "description": description}


class Health(BaseModel):
    status: Literal["ok"]
    state: str


class ReadyInfo(BaseModel):
    """`GET /ready` once the model is loaded and warmed up."""

    status: Literal["ready"]
    model: str
    default_size: str
    default_steps: int
    default_guidance: float
    max_n: int
    api_key_required: bool
    quantization: str | None
    fp8_attention: bool
    fp8_fast_accum: bool
    cuda_graph_mib: float  # device memory the captured CUDA graphs reserve (0 without any)
    output_formats: list[str]
    output: Literal["image", "video"]  # what the model makes
    max_input_images: int  # input images a request may send (edits, image-to-video)
    default_num_frames: int | None  # a video model's defaults (None for images)
    default_fps: float | None
    sizes: list[str]  # "WIDTHxHEIGHT" sizes the model draws well and this server accepts, the default first


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


class LoRACard(BaseModel):
    """A LoRA adapter a request may select (`lora: [{"name", "weight"}]`): `loaded` false for one of the
    --lora-dir folder's files not loaded yet (loaded on first use); `default_weight` for the adapters given at
    start, which requests that name no adapter get."""

    name: str
    loaded: bool
    rank: int | None = None
    default_weight: float | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditserve"
    lora_adapters: list[LoRACard] | None = None  # servers with LoRA adapters: those requests may select


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
