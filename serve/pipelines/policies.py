"""Small named policies of the chunk loop (models.md §3). Each is plain arithmetic, tested against its formula."""

from __future__ import annotations

import torch
from torch import Tensor

MOTION_NORMALISER = 0.2  # RMS frame difference (pixels in [-1, 1]) that counts as full motion


class NoiseController:
    """StreamDiffusionV2's motion-aware noise level, in Scope's form.

    d = clamp(max_f RMS(x_f − x_{f−1}) / 0.2, 0, 1) over the chunk's pixel frames, the previous chunk's last frame
    standing in for x_{−1}; s = (0.8 − 0.2·d)·0.9 + 0.1·s_prev. More motion → less noise → more of the input kept.
    The first denoising timestep becomes int(1000·s) − 100.
    """

    def __init__(self, initial_strength: float) -> None:
        self.strength = initial_strength
        self._last_frame: Tensor | None = None

    def reset(self, initial_strength: float) -> None:
        self.strength = initial_strength
        self._last_frame = None

    def motion(self, pixels: Tensor) -> float:
        """pixels [B, 3, T, H, W] in [-1, 1] → d in [0, 1]."""
        frames = pixels if self._last_frame is None else torch.cat([self._last_frame, pixels], dim=2)
        self._last_frame = pixels[:, :, -1:].clone()
        if frames.shape[2] < 2:
            return 0.0
        rms = (frames[:, :, 1:] - frames[:, :, :-1]).pow(2).mean(dim=(0, 1, 3, 4)).sqrt()  # per frame pair
        return float((rms.max() / MOTION_NORMALISER).clamp(0, 1))

    def update(self, pixels: Tensor) -> tuple[float, float]:
        """→ (noise strength s, first timestep)."""
        self.strength = (0.8 - 0.2 * self.motion(pixels)) * 0.9 + 0.1 * self.strength
        return self.strength, float(int(1000 * self.strength) - 100)
