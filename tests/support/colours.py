"""A tiny real-file manifest: noisy solid-colour PNG patches captioned with their colour's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "purple": (140, 30, 160),
    "orange": (250, 140, 20),
}


def colour_rows(folder: Path, n_per_colour: int, seed: int) -> list[dict[str, str]]:
    """Write ``n_per_colour`` 16 px patches per colour under ``folder``; the rows, colour by colour.

    Each row: ``image`` (file name), ``caption`` (``"<a|one|this|the> <colour> patch"``), ``colour``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for name, rgb in COLOURS.items():
        for i in range(n_per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype("uint8")
            path = folder / f"{name}-{seed}-{i}.png"
            Image.fromarray(pixels).save(path)
            shade = rng.choice(["a", "one", "this", "the"])
            rows.append({"image": path.name, "caption": f"{shade} {name} patch", "colour": name})
    return rows
