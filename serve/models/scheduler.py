"""Flow matching with shift, as the distilled Wan pipelines use it (Self-Forcing's FlowMatchScheduler with
`sigma_min=0, extra_one_step=True`, `set_timesteps(1000)`; models.md §2).

Convention: x_t = (1 − σ)·x0 + σ·ε, the model predicts the flow v = ε − x0, so x0 = x_t − σ·v.
"""

from __future__ import annotations

import torch
from torch import Tensor

from serve.models.transfer import to_device

TRAIN_TIMESTEPS = 1000


class FlowMatchScheduler:
    def __init__(self, shift: float) -> None:
        self.shift = shift
        # σ_i = 1 − i/1000 for i = 0..999 (extra_one_step drops the final σ = 0), then shifted.
        sigmas = 1.0 - torch.arange(TRAIN_TIMESTEPS, dtype=torch.float64) / TRAIN_TIMESTEPS
        self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = self.sigmas * TRAIN_TIMESTEPS
        self._device_tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def model_timesteps(self, step_list: list[int], *, warp: bool = False) -> list[float]:
        """The t fed to the model for each entry of a `denoising_step_list`.

        `warp=True` (Self-Forcing, LongLive, Reward Forcing, MemFlow, Krea: the levels their generators were
        distilled at): entry k becomes `timesteps[1000 − k]`, with 0 appended at index 1000, i.e.
        t = 1000·shift(k/1000), so [1000, 750, 500, 250] at shift 5 is [1000, 937.5, 833.3, 625].
        `warp=False` (StreamDiffusionV2's original, and Scope for every pipeline): the raw values.
        """
        if not warp:
            return [float(k) for k in step_list]
        table = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float64)])
        return [float(table[TRAIN_TIMESTEPS - k]) for k in step_list]

    def sigma(self, timestep: Tensor) -> Tensor:
        """σ of the nearest grid timestep (t = 0 maps to the last grid point, σ ≈ 0.005 at shift 5), float64."""
        t = timestep.to(torch.float64)
        grid, sigmas = self._tables_on(t.device)
        index = (t.reshape(-1, 1) - grid[None, :]).abs().argmin(dim=1)
        return sigmas[index].reshape(t.shape)

    def _tables_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(timesteps, sigmas) on `device`, copied there once: the chunk loop's lookups stay on the device."""
        tables = self._device_tables.get(device)
        if tables is None:
            tables = self._device_tables[device] = (to_device(self.timesteps, device), to_device(self.sigmas, device))
        return tables

    def add_noise(self, x0: Tensor, noise: Tensor, timestep: Tensor) -> Tensor:
        """timestep is per frame [B, F]; x0/noise [B, C, F, H, W]."""
        sigma = self.sigma(timestep)[:, None, :, None, None]
        return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)

    def to_x0(self, x_t: Tensor, flow: Tensor, timestep: Tensor) -> Tensor:
        """x0 = x_t − σ·v, in float64 as the distilled pipelines do."""
        sigma = self.sigma(timestep)[:, None, :, None, None]
        return (x_t.double() - sigma * flow.double()).to(x_t.dtype)
