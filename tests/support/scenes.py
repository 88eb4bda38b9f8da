"""Camera-like synthetic video: a detailed texture panning across the frame, so every frame differs everywhere.

The counter bars (tests/support/frames.py) are nearly free to encode and flatter a frame path; this is what a codec
sees from a camera that moves: fine detail, smooth colour and edges, all in motion (about 3 px a frame).
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _texture(height: int, width: int) -> np.ndarray:
    """[2·height, 2·width, 3] uint8: colour gradients, edges (a rotated checkerboard) and seeded fine grain."""
    ys, xs = np.mgrid[0 : 2 * height, 0 : 2 * width].astype(np.float32)
    rng = np.random.default_rng(0)
    red = 128 + 90 * np.sin(xs / 23.0) * np.cos(ys / 31.0)
    green = 128 + 90 * np.sin((xs + ys) / 17.0)
    blue = 255 * ((xs * 0.7 + ys * 0.3) / (2 * width + 2 * height))
    image = np.stack([red, green, blue], axis=-1)
    checker = ((xs * 0.8 + ys * 0.6) // 24 + (ys * 0.8 - xs * 0.6) // 24) % 2 == 0
    image[checker] *= 0.6
    image += rng.normal(0.0, 6.0, image.shape)  # sensor-like grain that moves with the scene
    return np.clip(image, 0, 255).astype(np.uint8)


def textured_scene(index: int, height: int, width: int) -> np.ndarray:
    """Frame `index` [height, width, 3] uint8: a window onto the texture, moving 3 px down and 2 px right a frame
    (wrapping after one texture size)."""
    texture = _texture(height, width)
    top, left = (3 * index) % height, (2 * index) % width
    return np.ascontiguousarray(texture[top : top + height, left : left + width])
