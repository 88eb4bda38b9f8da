"""Small named policies of the chunk loop (models.md §3). Each is plain arithmetic, tested against its formula."""

from __future__ import annotations

import math

import torch
from torch import Tensor

MOTION_NORMALISER = 0.2  # RMS frame difference (pixels in [-1, 1]) that counts as full motion
# s = (0.8 − 0.2·d)·0.9 + 0.1·s_prev with d in [0, 1]: the new strength lies in [LOW + 0.1·s_prev, HIGH + 0.1·s_prev].
STRENGTH_AT_FULL_MOTION = (0.8 - 0.2) * 0.9
STRENGTH_AT_NO_MOTION = 0.8 * 0.9


class NoiseController:
    """StreamDiffusionV2's motion-aware noise level, in Scope's form.

    d = clamp(max_f RMS(x_f − x_{f−1}) / 0.2, 0, 1) over the chunk's pixel frames, the previous chunk's last frame
    standing in for x_{−1}; s = (0.8 − 0.2·d)·0.9 + 0.1·s_prev. More motion → less noise → more of the input kept.
    The first denoising timestep becomes int(1000·s) − 100.

    s lives on the device (a 0-d float64 tensor): reading it would stall the chunk loop on the GPU. What the host
    needs to plan the chunk, which listed steps may fall below the first timestep, comes from `bounds`, an interval
    that always holds s, advanced with the same formula at d = 1 and d = 0 without reading the device.
    """

    def __init__(self, initial_strength: float) -> None:
        self.reset(initial_strength)

    def reset(self, initial_strength: float) -> None:
        self.strength: Tensor | float = initial_strength
        self.bounds = (initial_strength, initial_strength)  # (lowest, highest) s can be: host floats
        self._last_frame: Tensor | None = None

    def motion(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, T, H, W] in [-1, 1] → d in [0, 1], a 0-d tensor on the pixels' device."""
        frames = pixels if self._last_frame is None else torch.cat([self._last_frame, pixels], dim=2)
        self._last_frame = pixels[:, :, -1:].clone()
        if frames.shape[2] < 2:
            return pixels.new_zeros(())
        rms = (frames[:, :, 1:] - frames[:, :, :-1]).pow(2).mean(dim=(0, 1, 3, 4)).sqrt()  # per frame pair
        return (rms.max() / MOTION_NORMALISER).clamp(0, 1)

    def update(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """→ (noise strength s, first timestep), both 0-d float64 tensors on the pixels' device; no host sync."""
        d = self.motion(pixels).double()
        self.strength = (0.8 - 0.2 * d) * 0.9 + 0.1 * self.strength
        low, high = self.bounds
        self.bounds = (STRENGTH_AT_FULL_MOTION + 0.1 * low, STRENGTH_AT_NO_MOTION + 0.1 * high)
        return self.strength, torch.floor(1000 * self.strength) - 100

    def first_timestep_bounds(self) -> tuple[float, float]:
        """The interval the last `update`'s first timestep lies in, known on the host."""
        low, high = self.bounds
        return float(math.floor(1000 * low) - 100), float(math.floor(1000 * high) - 100)
