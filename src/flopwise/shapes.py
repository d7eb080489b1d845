"""A synthetic image task whose answers depend on image content: coloured squares on a dark background.

Two questions: the colour of the (single) square, and how many squares there are (1-3). Small squares
on a large image are the hard case for token dropping: most tokens are background, and a keep ratio
that misses a square changes the answer. Deterministic per seed, so a benchmark's test set is fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
QUESTIONS = {"colour": "What colour is the square?", "count": "How many squares?"}
NUMBERS = ["one", "two", "three"]
SQUARE = 48  # side in pixels: 9 to 16 of a 256-pixel image's 256 16-pixel patches


@dataclass
class Example:
    image: np.ndarray  # [H, W, 3] uint8
    kind: str  # "colour" or "count"
    answer: str

    @property
    def question(self) -> str:
        return QUESTIONS[self.kind]

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def make(rng: random.Random, kind: str, size: int = 256, square: int = SQUARE) -> Example:
    image = np.full((size, size, 3), 16, dtype=np.uint8)
    # a slightly varied background
    image += np.asarray([rng.randrange(0, 12) for _ in range(3)], dtype=np.uint8)
    count = 1 if kind == "colour" else rng.randint(1, 3)
    placed: list[tuple[int, int]] = []
    colour = rng.choice(list(COLOURS))
    while len(placed) < count:
        y, x = rng.randrange(0, size - square), rng.randrange(0, size - square)
        if all(abs(y - py) > square + 4 or abs(x - px) > square + 4 for py, px in placed):
            placed.append((y, x))
            c = colour if kind == "colour" else rng.choice(list(COLOURS))
            image[y : y + square, x : x + square] = COLOURS[c]
    answer = colour if kind == "colour" else NUMBERS[count - 1]
    return Example(image, kind, answer)


def dataset(n: int, seed: int, size: int = 256, square: int = SQUARE) -> list[Example]:
    """``n`` examples, alternating colour and count questions."""
    rng = random.Random(seed)
    return [make(rng, "colour" if i % 2 == 0 else "count", size, square) for i in range(n)]


def is_correct(text: str, example: Example) -> bool:
    words = text.strip().lower().replace(".", " ").split()
    return bool(words) and words[0] == example.answer
