"""ditserve.shapes: the default model's prompt grammar, its held-out split, the renderer and the judge."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from ditserve import shapes
from ditserve.config import ConfigError
from ditserve.shapes import COLOUR_NAMES, SHAPES, ShapeSpec


def test_grammar_has_every_combination_once():
    specs = shapes.all_specs()
    assert len(specs) == 8 * 4 * 7 == 224
    assert len({s.prompt for s in specs}) == 224
    assert set(COLOUR_NAMES) == {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}
    assert SHAPES == ("circle", "square", "triangle", "star")
    assert all(s.colour != s.background for s in specs)
    assert specs[0].prompt == "a red circle on a green background"


def test_palette_is_well_separated():
    palette = np.array(list(shapes.COLOURS.values()), dtype=float)
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(palette, 2))
    assert closest > 90


def test_held_out_split():
    train, held = shapes.train_specs(), shapes.held_out_specs()
    assert len(held) == 56 and len(train) == 168
    assert not set(train) & set(held) and set(train) | set(held) == set(shapes.all_specs())
    assert all(shapes.is_held_out(s) for s in held) and not any(shapes.is_held_out(s) for s in train)
    # Every pair of attributes of a held-out spec still occurs in training, so held-out prompts are new
    # combinations of things the model has seen together.
    for pair in (lambda s: (s.colour, s.shape), lambda s: (s.shape, s.background), lambda s: (s.colour, s.background)):
        assert {pair(s) for s in held} <= {pair(s) for s in train}
    # Each (colour, background) pair: exactly one of its 4 shapes held out.
    per_pair = {}
    for s in held:
        per_pair.setdefault((s.colour, s.background), []).append(s.shape)
    assert len(per_pair) == 56 and all(len(v) == 1 for v in per_pair.values())


def test_parse_prompt_round_trip_and_forgiving_spacing():
    for spec in shapes.all_specs():
        assert shapes.parse_prompt(spec.prompt) == spec
    assert shapes.parse_prompt("  A Red  circle on a BLUE background ") == ShapeSpec("red", "circle", "blue")


@pytest.mark.parametrize("prompt, message", [
    ("a red circle", "does not follow the template"),
    ("a red circle on a blue background please", "does not follow the template"),
    ("a pink circle on a blue background", "unknown colour 'pink'"),
    ("a red hexagon on a blue background", "unknown shape 'hexagon'"),
    ("a red circle on a teal background", "unknown background 'teal'"),
    ("a red circle on a red background", "must differ"),
])
def test_parse_prompt_errors(prompt, message):
    with pytest.raises(ConfigError, match=message):
        shapes.parse_prompt(prompt)


def test_render_size_determinism_and_border():
    spec = ShapeSpec("yellow", "star", "purple")
    a = shapes.render(spec, 64, np.random.default_rng(3))
    b = shapes.render(spec, 64, np.random.default_rng(3))
    c = shapes.render(spec, 64, np.random.default_rng(4))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    batch = shapes.render_batch([spec] * 20, 64, seed=1)
    assert batch.shape == (20, 64, 64, 3) and batch.dtype == np.uint8
    # The shape stays inside a 2-pixel margin: the frame is pure background; the shape covers 5-45% of the image.
    frame = np.ones((64, 64), bool)
    frame[2:-2, 2:-2] = False
    assert (batch[:, frame] == shapes.COLOURS["purple"]).all()
    shape_fraction = (batch == shapes.COLOURS["yellow"]).all(-1).mean(axis=(1, 2))
    assert shape_fraction.min() > 0.03 and shape_fraction.max() < 0.45
    # Anti-aliased: edge pixels mix the two colours.
    assert not ((batch == shapes.COLOURS["yellow"]).all(-1) | (batch == shapes.COLOURS["purple"]).all(-1)).all()


def test_judge_reads_rendered_pictures():
    specs = shapes.all_specs() * 2
    rng = np.random.default_rng(0)
    judgements = [shapes.judge(shapes.render(s, 64, rng)) for s in specs]
    correct = sum(j.matches(s) for s, j in zip(specs, judgements))
    assert correct / len(specs) >= 0.99, [(s.prompt, j) for s, j in zip(specs, judgements) if not j.matches(s)][:5]


def test_judge_tolerates_noise_and_blur():
    """Generated pictures are not clean renders: pixel noise and soft edges must not change the verdict."""
    specs = shapes.all_specs()
    rng = np.random.default_rng(1)
    correct = 0
    for s in specs:
        img = shapes.render(s, 64, rng).resize((32, 32), Image.Resampling.BILINEAR).resize((64, 64))
        noisy = np.clip(np.asarray(img, float) + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
        correct += shapes.judge(noisy).matches(s)
    assert correct / len(specs) >= 0.95


def test_judge_rejects_wrong_pictures():
    rng = np.random.default_rng(2)
    spec = ShapeSpec("red", "square", "blue")
    j = shapes.judge(shapes.render(spec, 64, rng))
    assert (j.background, j.colour, j.shape) == ("blue", "red", "square") and j.matches(spec)
    assert not j.matches(ShapeSpec("blue", "square", "red"))  # roles swapped
    assert not j.matches(ShapeSpec("orange", "square", "blue"))  # a neighbouring colour
    assert not j.matches(ShapeSpec("red", "circle", "blue"))
    # Every other shape of the same colours is told apart.
    for other in SHAPES:
        img = shapes.render(ShapeSpec("red", other, "blue"), 64, rng)
        assert shapes.judge(img).matches(spec) == (other == "square")
    # A plain background has no shape; pure noise is not a shape either.
    plain = shapes.judge(Image.new("RGB", (64, 64), shapes.COLOURS["green"]))
    assert (plain.background, plain.colour, plain.shape) == ("green", None, None)
    noise = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    assert shapes.judge(noise).shape is None


def test_judge_on_a_hand_drawn_picture():
    """Not a `render` output: an axis-aligned block of exact colours is a square; a wide bar is no shape."""
    img = np.zeros((64, 64, 3), np.uint8) + np.array(shapes.COLOURS["white"], np.uint8)
    img[20:44, 10:34] = shapes.COLOURS["black"]
    j = shapes.judge(img)
    assert (j.background, j.colour, j.shape) == ("white", "black", "square") and j.iou["square"] == 1.0
    img[20:44, 10:34] = shapes.COLOURS["white"]
    img[30:34, 4:60] = shapes.COLOURS["black"]  # 4 x 56 bar: fills its bounding box as a square would
    j = shapes.judge(img)
    assert j.colour == "black" and j.iou["square"] == 1.0 and j.shape is None
