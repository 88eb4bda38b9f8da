"""Flow-matching scheduler values against models.md §2's table."""

from __future__ import annotations

import pytest
import torch

from serve.models.scheduler import FlowMatchScheduler


@pytest.mark.parametrize(
    ("shift", "steps", "expected"),
    [
        (5, [1000, 750, 500, 250], [1000.0, 937.5, 833.33, 625.0]),
        (8, [1000, 750, 500, 250], [1000.0, 960.0, 888.9, 727.3]),
    ],
)
def test_warped_step_lists_match_the_original_repos(shift: int, steps: list[int], expected: list[float]) -> None:
    assert FlowMatchScheduler(shift).model_timesteps(steps, warp=True) == pytest.approx(expected, abs=0.05)


def test_scope_feeds_raw_values_and_sigma_uses_the_nearest_grid_point() -> None:
    scheduler = FlowMatchScheduler(5)
    assert scheduler.model_timesteps([1000, 750, 500, 250]) == [1000.0, 750.0, 500.0, 250.0]
    sigmas = scheduler.sigma(torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5006, 0.2516], abs=2e-4)
    sdv2 = FlowMatchScheduler(8).sigma(torch.tensor([750.0, 250.0]))
    assert sdv2.tolist() == pytest.approx([0.7503, 0.2500], abs=2e-4)


def test_t_zero_maps_to_the_last_grid_point() -> None:
    assert FlowMatchScheduler(5).sigma(torch.tensor(0.0)).item() == pytest.approx(0.00498, abs=1e-5)
    assert FlowMatchScheduler(8).sigma(torch.tensor(0.0)).item() == pytest.approx(0.00794, abs=1e-5)


def test_add_noise_and_x0_invert_each_other() -> None:
    scheduler = FlowMatchScheduler(5)
    x0, noise = torch.randn(1, 16, 3, 4, 4), torch.randn(1, 16, 3, 4, 4)
    t = torch.tensor([[1000.0, 750.0, 250.0]])
    x_t = scheduler.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[:, :, 0], noise[:, :, 0])  # σ = 1: pure noise
    flow = noise - x0  # the model's target
    torch.testing.assert_close(scheduler.to_x0(x_t, flow, t), x0, atol=1e-5, rtol=1e-5)
