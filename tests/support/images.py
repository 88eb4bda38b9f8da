"""Image files for tests, written without an imaging library: PNG is zlib-compressed rows plus CRC'd chunks."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np


def _png(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_bytes(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 → an 8-bit RGB PNG."""
    height, width, _ = rgb.shape
    rows = b"".join(b"\x00" + np.ascontiguousarray(row).tobytes() for row in rgb.astype(np.uint8))
    return _png(width, height, 8, 2, rows)


def black_png_bytes(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of a black picture: a few kilobytes per megapixel, like a decompression bomb."""
    return _png(width, height, 1, 0, (b"\x00" * (1 + (width + 7) // 8)) * height)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.write_bytes(png_bytes(rgb))
    return path


def gradient(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with a seeded tint, [H, W, 3] uint8."""
    tint = np.random.default_rng(seed).uniform(0.2, 1.0, 3)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    return (np.stack([x, y, 1 - (x + y) / 2], axis=-1) * tint * 255).round().astype(np.uint8)
