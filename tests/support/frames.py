"""Synthetic video whose frames carry their own index, readable after VP8 coding and resizing."""

from __future__ import annotations

import numpy as np

COUNTER_BITS = 10  # frame indices up to 1023; bars are wide enough to survive VP8 at low bitrate and resizing


def draw_counter(index: int, height: int, width: int) -> np.ndarray:
    """RGB frame: COUNTER_BITS vertical bars, white for a 1 bit (most significant first), black for 0."""
    frame = np.zeros((height, width, 3), np.uint8)
    bar = width // COUNTER_BITS
    for bit in range(COUNTER_BITS):
        if (index >> (COUNTER_BITS - 1 - bit)) & 1:
            frame[:, bit * bar : (bit + 1) * bar] = 255
    return frame


def read_counter(frame: np.ndarray) -> int:
    """Inverse of draw_counter on an RGB frame of any size (bars scale with the width)."""
    height, width = frame.shape[:2]
    bar = width / COUNTER_BITS
    value = 0
    for bit in range(COUNTER_BITS):
        x = int((bit + 0.5) * bar)
        patch = frame[height // 4 : 3 * height // 4, max(x - 2, 0) : x + 3]
        value = (value << 1) | int(patch.mean() > 127)
    return value
