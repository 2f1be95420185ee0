"""Unit tier: the formulas of models/diffusion.py against numbers worked by hand."""

import pytest
import torch

from models.diffusion import NoiseSchedule, denoise_one_step, training_loss


def test_default_schedule_is_the_original_notes():
    schedule = NoiseSchedule()
    assert schedule.num_timesteps == 1000 and schedule.max_noise == 0.8
    # "t = 500: 40% noise, 60% signal"
    assert schedule.w(torch.tensor([0, 500, 1000])).tolist() == pytest.approx([0.0, 0.4, 0.8])


def test_single_pixel_example_of_the_readme():
    # x0 = 100, eps = 10, w = 0.5  ->  x_t = 0.5 * 100 + 0.5 * 10 = 55
    schedule = NoiseSchedule()
    t = torch.tensor([625])  # w = 0.8 * 625 / 1000 = 0.5
    x_t = schedule.add_noise(torch.full((1, 1, 1, 1), 100.0), t, torch.full((1, 1, 1, 1), 10.0))
    assert x_t.item() == pytest.approx(55.0)


def test_add_noise_uses_one_weight_per_image():
    schedule = NoiseSchedule(max_noise=1.0)
    x0 = torch.ones(3, 2, 2, 2)
    eps = -torch.ones(3, 2, 2, 2)
    x_t = schedule.add_noise(x0, torch.tensor([0, 250, 1000]), eps)
    # (1 - w) * 1 + w * (-1) = 1 - 2w for w = 0, 0.25, 1
    assert x_t[:, 0, 0, 0].tolist() == pytest.approx([1.0, 0.5, -1.0])
    assert torch.all(x_t == x_t[:, :1, :1, :1])


def test_timesteps_cover_zero_to_T_inclusive():
    schedule = NoiseSchedule(num_timesteps=3)
    t = schedule.sample_timesteps(2000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and set(t.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("max_noise", [0.0, -0.1, 1.5])
def test_bad_max_noise_is_refused(max_noise):
    with pytest.raises(ValueError, match="max_noise"):
        NoiseSchedule(max_noise=max_noise)


class Oracle(torch.nn.Module):
    """Knows x0 and eps; returns (x_t - w * eps) / (1 - w), the exact inverse of add_noise."""

    def __init__(self, schedule, eps):
        super().__init__()
        self.schedule, self.eps = schedule, eps

    def forward(self, x_t, t):
        w = self.schedule.w(t).view(-1, 1, 1, 1)
        return (x_t - w * self.eps) / (1 - w)


def test_training_loss_is_mse_to_x0():
    schedule = NoiseSchedule()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    # a model that returns zeros: the loss is mean(x0^2), whatever t and eps were drawn
    zero_model = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    loss = training_loss(zero_model, x0, schedule, generator=generator)
    assert loss.item() == pytest.approx((x0 ** 2).mean().item())


def test_training_loss_is_zero_for_the_oracle():
    schedule = NoiseSchedule()
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    # the same draws as training_loss makes: first t, then eps
    replay = torch.Generator().manual_seed(7)
    schedule.sample_timesteps(1, generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    loss = training_loss(Oracle(schedule, eps), x0, schedule, generator=torch.Generator().manual_seed(7))
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


class TripleWithDropout(torch.nn.Module):
    """3 * x_t, through a dropout layer that only stays out of the way in eval mode."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x_t, t):
        return 3 * self.dropout(x_t)


def test_one_step_denoising_clamps_and_runs_in_eval_mode():
    model = TripleWithDropout().train()
    x_t = torch.tensor([[[[0.1, -0.2, 0.9]]]]).repeat(1, 1, 50, 1)
    out = denoise_one_step(model, x_t, torch.tensor([500]))
    assert not model.training
    assert torch.allclose(out, torch.tensor([0.3, -0.6, 1.0]).expand_as(out))  # 2.7 clamped to 1
    assert not out.requires_grad
