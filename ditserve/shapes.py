"""The default model's world: coloured shapes on coloured backgrounds, their prompts, and a judge.

    a {colour} {shape} on a {background} background        e.g. "a red circle on a blue background"

8 colours x 4 shapes x 7 other background colours = 224 prompts (`all_specs`). A fixed quarter of them is held
out of training (`is_held_out`): the default model is scored on combinations it never saw.

- `render(spec, size, rng)` draws one picture of a spec: the shape at a random position and size, anti-aliased
  (drawn at 4x, then box-filtered down).
- `judge(image)` reads a picture back: the background colour from the border, the shape colour from the
  dominant other colour inside, the shape class by template matching. `judge(image).matches(spec)` is the
  acceptance check of the default model (it is right on >= 99% of freshly rendered pictures; tests hold that).

Used by the training script (`scripts/train_default_model.py`), the tests and the benchmarks. Pure numpy + PIL.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ditserve.config import ConfigError

# Well-separated sRGB values: the closest pair (orange / yellow) is 92 apart, every other pair further.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 230),
    "yellow": (250, 225, 40),
    "orange": (250, 135, 20),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

PROMPT_TEMPLATE = "a {colour} {shape} on a {background} background"
_PROMPT_RE = re.compile(r"a (\w+) (\w+) on a (\w+) background")

# Shape size: the radius of the shape's circumscribed circle, as a fraction of the image side.
RADIUS_RANGE = (0.20, 0.35)
SUPERSAMPLE = 4  # drawn at 4x, then box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class ShapeSpec:
    """One picture description: a `colour` `shape` on a `background` background (colour != background)."""

    colour: str
    shape: str
    background: str

    def __post_init__(self):
        for what, value, valid in (("colour", self.colour, COLOUR_NAMES), ("shape", self.shape, SHAPES),
                                   ("background", self.background, COLOUR_NAMES)):
            if value not in valid:
                raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if self.colour == self.background:
            raise ConfigError(f"the shape and the background must differ in colour, both are {self.colour!r}")

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(colour=self.colour, shape=self.shape, background=self.background)


def all_specs() -> list[ShapeSpec]:
    """The 224 specs, in a fixed order (colour, then shape, then background, each in table order)."""
    return [ShapeSpec(c, s, b) for c in COLOUR_NAMES for s in SHAPES for b in COLOUR_NAMES if b != c]


def is_held_out(spec: ShapeSpec) -> bool:
    """The held-out rule: (colour index + background index + shape index) % 4 == 0 (indices in COLOUR_NAMES
    and SHAPES).

    For every (colour, background) pair exactly one of the 4 shapes is held out, so 56 of the 224 specs are
    (a quarter), and every pair of attributes still occurs in training: each (colour, background) with 3 shapes,
    each (colour, shape) and each (shape, background) with at least 5 of the 7 possible third colours.
    """
    return (COLOUR_NAMES.index(spec.colour) + COLOUR_NAMES.index(spec.background)
            + SHAPES.index(spec.shape)) % 4 == 0


def train_specs() -> list[ShapeSpec]:
    return [s for s in all_specs() if not is_held_out(s)]


def held_out_specs() -> list[ShapeSpec]:
    return [s for s in all_specs() if is_held_out(s)]


def parse_prompt(prompt: str) -> ShapeSpec:
    """The spec of a prompt of the template (surrounding spaces and letter case are ignored). Raises
    ConfigError for anything else."""
    m = _PROMPT_RE.fullmatch(" ".join(prompt.lower().split()))
    if m is None:
        raise ConfigError(f"prompt {prompt!r} does not follow the template {PROMPT_TEMPLATE!r}")
    return ShapeSpec(*m.groups())


# ------------------------------------------------------------------------------------------------ geometry


def _star_points(n: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / n  # the first point straight up
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


# Each shape as a polygon (None: an ellipse) in the unit circle, y pointing down, apex up.
_POLYGONS: dict[str, list[tuple[float, float]] | None] = {
    "circle": None,
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -1.0), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)],  # equilateral
    "star": _star_points(),
}


def _unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the shape's bounding box in unit-circle coordinates."""
    pts = _POLYGONS[shape]
    if pts is None:
        return (-1.0, -1.0, 1.0, 1.0)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw `shape` stretched to fill `box` = (x0, y0, x1, y1) (pixel edges)."""
    x0, y0, x1, y1 = box
    pts = _POLYGONS[shape]
    if pts is None:
        draw.ellipse(box, fill=fill)
        return
    ux0, uy0, ux1, uy1 = _unit_extent(shape)
    draw.polygon([(x0 + (px - ux0) / (ux1 - ux0) * (x1 - x0), y0 + (py - uy0) / (uy1 - uy0) * (y1 - y0))
                  for px, py in pts], fill=fill)


def render(spec: ShapeSpec, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """A size x size RGB picture of `spec`: the shape, of circumradius 20-35% of the side, at a random position
    fully inside the image with a margin of 2 pixels, drawn at 4x and box-filtered down (anti-aliased)."""
    rng = np.random.default_rng() if rng is None else rng
    s = SUPERSAMPLE
    r = rng.uniform(*RADIUS_RANGE) * size
    ux0, uy0, ux1, uy1 = _unit_extent(spec.shape)
    margin = 2.0
    # The centre ranges over positions that keep the shape's bounding box inside the margin.
    cx = rng.uniform(margin - ux0 * r, size - margin - ux1 * r)
    cy = rng.uniform(margin - uy0 * r, size - margin - uy1 * r)
    big = Image.new("RGB", (size * s, size * s), COLOURS[spec.background])
    box = ((cx + ux0 * r) * s, (cy + uy0 * r) * s, (cx + ux1 * r) * s, (cy + uy1 * r) * s)
    _draw(ImageDraw.Draw(big), spec.shape, box, COLOURS[spec.colour])
    return big.resize((size, size), Image.Resampling.BOX)


def render_batch(specs: list[ShapeSpec], size: int = 64, seed: int = 0) -> np.ndarray:
    """(N, size, size, 3) uint8: `render` of each spec, from one generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(spec, size, rng)) for spec in specs])


# --------------------------------------------------------------------------------------------------- judge

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float64)  # (8, 3)
MIN_SHAPE_FRACTION = 0.02  # a shape covers at least 2% of the image (the smallest rendered: ~5%)
MIN_IOU = 0.7  # a shape class needs at least this template overlap (a right one scores > 0.85 on a render)
MAX_ASPECT_ERROR = 1.5  # and a bounding box within 1.5x of the shape's own width / height ratio


@dataclass(frozen=True)
class Judgement:
    """What `judge` read from a picture. colour and shape are None where no shape was found; iou holds each
    shape template's overlap with the found shape."""

    background: str
    colour: str | None
    shape: str | None
    iou: dict[str, float] = field(default_factory=dict)

    def matches(self, spec: ShapeSpec) -> bool:
        return (self.background, self.colour, self.shape) == (spec.background, spec.colour, spec.shape)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (all False for an empty mask)."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack, count = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            count += 1
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        if count > best_size:
            best, best_size = n, count
    return labels == best if best else np.zeros_like(mask)


def _template(shape: str, box: tuple[int, int, int, int], H: int, W: int) -> np.ndarray:
    """(H, W) boolean mask of `shape` filling the pixel box (x0, y0, x1, y1) (inclusive pixel indices)."""
    s = SUPERSAMPLE
    x0, y0, x1, y1 = box
    big = Image.new("L", (W * s, H * s), 0)
    _draw(ImageDraw.Draw(big), shape, (x0 * s, y0 * s, (x1 + 1) * s, (y1 + 1) * s), 255)
    return np.asarray(big.resize((W, H), Image.Resampling.BOX)) >= 128


def judge(image: Image.Image | np.ndarray) -> Judgement:
    """Read (background colour, shape colour, shape class) from an RGB picture (PIL or (H, W, 3) array).

    Background: the palette colour nearest to the median of the border pixels (a 2-pixel frame). Shape colour:
    the most frequent nearest-palette colour among the pixels that are not the background's and whose 3x3
    neighbourhood all share it (interior pixels: anti-aliased edges between two colours can look like a third
    one). Shape: the pixels closer to the shape colour than to the background's, largest connected component;
    each shape template is drawn at that component's bounding box and the best intersection-over-union wins,
    if it is at least MIN_IOU and the box has about the shape's proportions (else the shape is None).
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    H, W, _ = rgb.shape  # (H, W, 3)
    frame = np.ones((H, W), dtype=bool)
    frame[2:-2, 2:-2] = False
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 8)
    bg = int(np.argmin(np.linalg.norm(_PALETTE - np.median(rgb[frame], axis=0), axis=1)))
    background = COLOUR_NAMES[bg]

    nearest = np.argmin(dist, axis=-1)  # (H, W)
    padded = np.pad(nearest, 1, mode="edge")
    uniform = np.ones((H, W), dtype=bool)
    for dy in range(3):
        for dx in range(3):
            uniform &= padded[dy:dy + H, dx:dx + W] == nearest
    counts = np.bincount(nearest[uniform & (nearest != bg)], minlength=len(COLOUR_NAMES))
    if counts.sum() < MIN_SHAPE_FRACTION * H * W / 4:
        return Judgement(background, None, None)
    fg = int(np.argmax(counts))

    mask = _largest_component(dist[:, :, fg] < dist[:, :, bg])
    if mask.sum() < MIN_SHAPE_FRACTION * H * W:
        return Judgement(background, COLOUR_NAMES[fg], None)
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    iou = {}
    for shape in SHAPES:
        t = _template(shape, box, H, W)
        iou[shape] = float((t & mask).sum() / max((t | mask).sum(), 1))
    best = max(iou, key=iou.get)
    # A template is stretched to the box, so also ask for the shape's own proportions (a bar is no square).
    ux0, uy0, ux1, uy1 = _unit_extent(best)
    aspect = ((box[2] - box[0] + 1) / (box[3] - box[1] + 1)) / ((ux1 - ux0) / (uy1 - uy0))
    ok = iou[best] >= MIN_IOU and 1 / MAX_ASPECT_ERROR <= aspect <= MAX_ASPECT_ERROR
    return Judgement(background, COLOUR_NAMES[fg], best if ok else None, iou)


def generate_and_judge(pipeline, specs: list[ShapeSpec], seed: int = 0, batch_size: int = 64,
                       **sampling) -> tuple[list[Image.Image], list[Judgement]]:
    """Generate one image per spec with a ditserve pipeline (the model's defaults unless `sampling` sets
    SamplingParams fields), in batches of `batch_size` prompts, batch k seeded with seed + k; judge each.
    Returns (images, judgements), in the order of `specs`."""
    from ditserve.config import SamplingParams

    images: list[Image.Image] = []
    for k, start in enumerate(range(0, len(specs), batch_size)):
        prompts = [s.prompt for s in specs[start:start + batch_size]]
        result = pipeline.generate(SamplingParams(prompt=prompts, seed=seed + k, **sampling), progress=False)
        images += result.images
    return images, [judge(image) for image in images]
