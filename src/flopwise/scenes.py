"""A synthetic visual question task that can rank token-dropping methods: scenes of a few coloured shapes.

Each 256x256 image holds 1-4 shapes (square, circle, triangle; red, green, blue, yellow) on a dark
background, and each question needs different image tokens:

* ``colour`` — "What colour is the circle?" (the one shape of that kind): the tokens of one object;
* ``shape`` — "What shape is the red one?": one object's outline, not just its colour;
* ``count`` — "How many shapes?": a token of every object;
* ``relation`` — "Is the red shape left of the blue shape?": two objects *and* where they are;
* ``odd`` — "What colour is the odd one out?" (all shapes alike but one): every object, to find the
  exception.

Most tokens are background, so a method that keeps only salient tokens can do well, and a method that
spreads its budget evenly misses small objects. Deterministic per seed, so a benchmark's test set is fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
NUMBERS = ("one", "two", "three", "four")
KINDS = ("colour", "shape", "count", "relation", "odd")
SIZE = 256  # image side in pixels
OBJECT = 40  # object side in pixels: about 9 of the image's 256 16-pixel patches


@dataclass
class Obj:
    shape: str
    colour: str
    y: int  # top-left corner
    x: int


@dataclass
class Example:
    image: np.ndarray  # [H, W, 3] uint8
    kind: str
    question: str
    answer: str
    objects: list[Obj]

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def _mask(shape: str, side: int) -> np.ndarray:
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        c = side / 2
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    # an upright triangle: apex at the top centre, base along the bottom
    return np.abs(xx - side / 2) <= yy / 2


def _place(rng: random.Random, n: int, size: int, side: int) -> list[tuple[int, int]]:
    """``n`` top-left corners of non-overlapping objects (4 pixels apart at least)."""
    while True:
        placed: list[tuple[int, int]] = []
        for _ in range(200):
            y, x = rng.randrange(0, size - side), rng.randrange(0, size - side)
            if all(abs(y - py) > side + 4 or abs(x - px) > side + 4 for py, px in placed):
                placed.append((y, x))
                if len(placed) == n:
                    return placed


def _render(rng: random.Random, objects: list[Obj], size: int, side: int) -> np.ndarray:
    image = np.full((size, size, 3), 16, dtype=np.uint8)
    image += np.asarray([rng.randrange(0, 12) for _ in range(3)], dtype=np.uint8)  # a varied background
    for o in objects:
        region = image[o.y : o.y + side, o.x : o.x + side]
        region[_mask(o.shape, side)] = COLOURS[o.colour]
    return image


def _scene(rng: random.Random, specs: list[tuple[str, str]], size: int, side: int) -> list[Obj]:
    corners = _place(rng, len(specs), size, side)
    return [Obj(s, c, y, x) for (s, c), (y, x) in zip(specs, corners)]


def make(rng: random.Random, kind: str, size: int = SIZE, side: int = OBJECT) -> Example:
    colours, shapes = list(COLOURS), list(SHAPES)
    if kind == "colour":  # the asked shape appears once; the others are other shapes
        target = rng.choice(shapes)
        others = [s for s in shapes if s != target]
        specs = [(target, rng.choice(colours))] + [
            (rng.choice(others), rng.choice(colours)) for _ in range(rng.randint(0, 2))
        ]
        objects = _scene(rng, specs, size, side)
        question, answer = f"What colour is the {target}?", specs[0][1]
    elif kind == "shape":  # the asked colour appears once
        target = rng.choice(colours)
        others = [c for c in colours if c != target]
        specs = [(rng.choice(shapes), target)] + [
            (rng.choice(shapes), rng.choice(others)) for _ in range(rng.randint(0, 2))
        ]
        objects = _scene(rng, specs, size, side)
        question, answer = f"What shape is the {target} one?", specs[0][0]
    elif kind == "count":
        n = rng.randint(1, 4)
        objects = _scene(rng, [(rng.choice(shapes), rng.choice(colours)) for _ in range(n)], size, side)
        question, answer = "How many shapes?", NUMBERS[n - 1]
    elif kind == "relation":  # two (or three) objects of distinct colours, clearly apart on the asked axis
        axis = rng.choice(("left of", "above"))
        picked = rng.sample(colours, rng.randint(2, 3))
        while True:
            objects = _scene(rng, [(rng.choice(shapes), c) for c in picked], size, side)
            a, b = objects[0], objects[1]
            da, db = (a.x, b.x) if axis == "left of" else (a.y, b.y)
            if abs(da - db) >= side:
                break
        question = f"Is the {a.colour} shape {axis} the {b.colour} shape?"
        answer = "yes" if da < db else "no"
    elif kind == "odd":  # n-1 alike (same shape and colour), one of another colour
        n = rng.randint(3, 4)
        shape, common, odd = rng.choice(shapes), *rng.sample(colours, 2)
        specs = [(shape, common)] * (n - 1) + [(shape, odd)]
        rng.shuffle(specs)
        objects = _scene(rng, specs, size, side)
        question, answer = "What colour is the odd one out?", odd
    else:
        raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")
    return Example(_render(rng, objects, size, side), kind, question, answer, objects)


def dataset(n: int, seed: int, size: int = SIZE, side: int = OBJECT) -> list[Example]:
    """``n`` examples, the kinds in turn (so every kind gets ``n / len(KINDS)``)."""
    rng = random.Random(seed)
    return [make(rng, KINDS[i % len(KINDS)], size, side) for i in range(n)]


def is_correct(text: str, example: Example) -> bool:
    words = text.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == example.answer
