"""Synthetic video for codecs: a camera-like scene, and a smooth one like a diffusion model's output.

The counter bars (tests/support/frames.py) are nearly free to encode and flatter a frame path. `textured_scene` is
what a codec sees from a camera that moves: fine detail, smooth colour and edges, all in motion (about 3 px a frame).
`smooth_scene` is what it sees from the model: no grain and no hard edges, soft shapes drifting over soft gradients.
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


BLOB_COLOURS = np.array([[90, -40, -30], [-50, 70, -20], [-30, -30, 90]], dtype=np.float32)  # [blob, RGB]


def smooth_scene(index: int, height: int, width: int) -> np.ndarray:
    """Frame `index` [height, width, 3] uint8: slow colour gradients with three soft blobs circling (about 2 px a
    frame), nothing finer than a few pixels.

    Built from rows and columns (the blobs are Gaussians, separable in y and x): a few ms a 512² frame, since the
    benchmark's client draws reference frames on the cores the server is measured on.
    """
    ys = (np.arange(height, dtype=np.float32) / height)[:, None]  # [H, 1]
    xs = (np.arange(width, dtype=np.float32) / width)[None, :]  # [1, W]
    phase = index / 30.0
    angles = 0.35 * phase + 2.1 * np.arange(3)
    blob_y = np.exp(-((ys - (0.5 + 0.25 * np.sin(angles))) ** 2) / (2 * 0.12**2))  # [H, blob]
    blob_x = np.exp(-((xs.T - (0.5 + 0.3 * np.cos(angles))) ** 2) / (2 * 0.12**2))  # [W, blob]
    image = np.einsum("hk,wk,kc->hwc", blob_y, blob_x, BLOB_COLOURS, optimize=True)
    image[..., 0] += 110 + 60 * np.sin(2.0 * xs + 0.3 * phase)
    image[..., 1] += 120 + 50 * np.cos(1.5 * ys - 0.2 * phase)
    image[..., 2] += 140 + 40 * np.sin(1.2 * (xs + ys) + 0.1 * phase)
    return np.clip(image, 0, 255).round().astype(np.uint8)
