"""Unit tier: the formulas of ddpm/diffusion.py against numbers worked by hand."""

import math
import os
import re

import pytest
import torch

from conftest import REPO

from ddpm.diffusion import NoiseSchedule, ddim_step, denoise, loss_weights, timestep_grid, training_losses


def test_default_schedule_is_the_original_notes():
    schedule = NoiseSchedule()
    assert schedule.num_timesteps == 1000 and schedule.max_noise == 0.8
    # "t = 500: 40% noise, 60% signal"
    assert schedule.w(torch.tensor([0, 500, 1000])).tolist() == pytest.approx([0.0, 0.4, 0.8])


def test_single_pixel_example_of_the_readme():
    # x0 = 0.6, eps = 0.3, w = 0.5  ->  x_t = 0.5 * 0.6 + 0.5 * 0.3 = 0.45, at the code's scale
    schedule = NoiseSchedule()
    t = torch.tensor([625])  # w = 0.8 * 625 / 1000 = 0.5
    x_t = schedule.add_noise(torch.full((1, 1, 1, 1), 0.6), t, torch.full((1, 1, 1, 1), 0.3))
    assert x_t.item() == pytest.approx(0.45)


@pytest.mark.parametrize("name", ["README.md", "README.en.md"])
def test_single_pixel_table_of_the_readme(name):
    """Each row: a guess for x0, the noise it needs to give x_t = 0.45 at w = 0.5, and that noise's
    N(0, 1) density relative to eps = 0, recomputed with the code's own noising formula."""
    text = open(os.path.join(REPO, name), encoding="utf-8").read()
    rows = re.findall(r"^\| (-?[\d.]+) \| (-?[\d.]+) \| ([\d.]+) \|$", text, re.M)
    assert [float(guess) for guess, _, _ in rows] == [-1.0, 0.0, 0.6, 0.9, 1.0]
    schedule, t = NoiseSchedule(), torch.tensor([625])
    for guess, needed, density in rows:
        x0 = torch.full((1, 1, 1, 1), float(guess))
        eps = (0.45 - (1 - schedule.w(625)) * float(guess)) / schedule.w(625)  # solve x_t = (1 - w) x0 + w eps
        assert schedule.add_noise(x0, t, torch.full((1, 1, 1, 1), eps)).item() == pytest.approx(0.45)
        assert float(needed) == pytest.approx(eps, abs=0.005)
        assert float(density) == pytest.approx(math.exp(-eps**2 / 2), abs=0.005)


def test_add_noise_uses_one_weight_per_image():
    schedule = NoiseSchedule(max_noise=1.0)
    x0 = torch.ones(3, 2, 2, 2)
    eps = -torch.ones(3, 2, 2, 2)
    x_t = schedule.add_noise(x0, torch.tensor([0, 250, 1000]), eps)
    # (1 - w) * 1 + w * (-1) = 1 - 2w for w = 0, 0.25, 1
    assert x_t[:, 0, 0, 0].tolist() == pytest.approx([1.0, 0.5, -1.0])
    assert torch.all(x_t == x_t[:, :1, :1, :1])


def test_timestep_for_a_noise_weight():
    assert [NoiseSchedule().timestep_for(w) for w in (0.0, 0.4, 0.8, 1.0)] == [0, 500, 1000, 1250]
    assert NoiseSchedule(max_noise=1.0).timestep_for(0.37) == 370


def test_timesteps_cover_zero_to_T_inclusive():
    schedule = NoiseSchedule(num_timesteps=3)
    t = schedule.sample_timesteps(2000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and set(t.tolist()) == {0, 1, 2, 3}


def test_the_linear_density_draws_t_in_proportion_to_t():
    schedule = NoiseSchedule()
    t = schedule.sample_timesteps(200_000, generator=torch.Generator().manual_seed(0), density="linear")
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() == 1000
    share = torch.histc(t.float(), bins=4, min=0, max=1000) / len(t)  # p(t) ~ t: 1/16, 3/16, 5/16, 7/16
    assert share.tolist() == pytest.approx([1 / 16, 3 / 16, 5 / 16, 7 / 16], abs=0.005)
    again = schedule.sample_timesteps(5, generator=torch.Generator().manual_seed(0), density="linear")
    assert torch.equal(again, t[:5])
    with pytest.raises(ValueError, match="uniform, linear"):
        schedule.sample_timesteps(5, density="cubic")


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


def test_training_losses_are_the_mse_of_each_image():
    schedule = NoiseSchedule()
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    # a model that returns zeros: each image's loss is mean(x0^2), whatever t and eps were drawn
    zero_model = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    losses, t = training_losses(zero_model, x0, schedule, generator=generator)
    assert losses.shape == (2,) and t.shape == (2,)
    assert losses.tolist() == pytest.approx((x0 ** 2).mean(dim=(1, 2, 3)).tolist())


def test_training_losses_are_zero_for_the_oracle():
    schedule = NoiseSchedule()
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    # the same draws as training_losses makes: first t, then eps
    replay = torch.Generator().manual_seed(7)
    t = schedule.sample_timesteps(1, generator=replay)
    eps = torch.randn(x0.shape, generator=replay)
    losses, drawn_t = training_losses(Oracle(schedule, eps), x0, schedule, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn_t, t) and losses.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("max_noise", [0.8, 1.0])
@pytest.mark.parametrize("gamma", [1.0, 5.0, 25.0])
def test_snr_weighted_loss_is_the_x0_error_or_the_noise_error_capped_at_gamma(max_noise, gamma):
    schedule = NoiseSchedule(max_noise=max_noise)
    t = torch.tensor([0, 1, 100, 300, 400, 500, 625, 900, 1000])
    w = schedule.w(t).view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    x0, eps, x0_hat = (torch.rand(len(t), 3, 4, 4, generator=generator, dtype=torch.float64) * 2 - 1 for _ in "abc")
    x_t = (1 - w) * x0 + w * eps
    eps_hat = (x_t - (1 - w) * x0_hat) / w  # the noise the prediction implies (inf/nan at w = 0: not used there)
    x0_error, eps_error = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3)), ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3))
    expected = torch.maximum(x0_error, torch.minimum(eps_error, gamma * x0_error))
    expected[0] = gamma * x0_error[0]  # w = 0: SNR is infinite, so the cap
    weighted = loss_weights(schedule, t, gamma).double() * x0_error
    assert torch.allclose(weighted, expected, rtol=1e-5)
    if gamma == 1:
        assert torch.equal(loss_weights(schedule, t, gamma), torch.ones(len(t)))


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
    out = denoise(model, x_t, 500, NoiseSchedule(), steps=1)
    assert not model.training
    assert torch.allclose(out, torch.tensor([0.3, -0.6, 1.0]).expand_as(out))  # 2.7 clamped to 1
    assert not out.requires_grad


class TimeScaledConv(torch.nn.Module):
    """A small stand-in network whose output depends on both x and t."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (1 + t.float()[:, None, None, None] / 1000)


def test_one_step_is_the_original_demo():
    torch.manual_seed(0)
    model = TimeScaledConv()
    x_t = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x_t, torch.tensor([300, 300])).clamp(-1, 1)  # clamp(unet(x_t, t), -1, 1)
    assert torch.equal(denoise(model, x_t, 300, NoiseSchedule(), steps=1), expected)


@pytest.mark.parametrize(
    "t_start, steps, grid",
    [(500, 1, [500, 0]), (500, 2, [500, 250, 0]), (1000, 4, [1000, 750, 500, 250, 0]), (10, 3, [10, 7, 3, 0]),
     (0, 1, [0, 0]), (3, 3, [3, 2, 1, 0])],
)
def test_timestep_grid(t_start, steps, grid):
    assert timestep_grid(t_start, steps) == grid


@pytest.mark.parametrize("t_start, steps", [(5, 6), (0, 2), (100, 0)])
def test_timestep_grid_refuses_more_steps_than_timesteps(t_start, steps):
    with pytest.raises(ValueError, match="steps"):
        timestep_grid(t_start, steps)


class Constant(torch.nn.Module):
    """Predicts the same x0_hat whatever it is given, and records the timesteps it was asked at."""

    def __init__(self, value):
        super().__init__()
        self.value, self.seen = value, []

    def forward(self, x, t):
        self.seen.append(t.tolist())
        return torch.full_like(x, self.value)


def test_two_steps_worked_by_hand():
    # max_noise 0.8, T = 1000, from t = 1000 in two steps: grid 1000 -> 500 -> 0, w = 0.8 -> 0.4 -> 0
    # start x = 0.5; the model always answers x0_hat = 0.2
    #   step 1 (t=1000, w=0.8): eps_hat = (0.5 - 0.2 * 0.2) / 0.8 = 0.575
    #                           x = 0.6 * 0.2 + 0.4 * 0.575 = 0.35
    #   step 2 (t=500):         x0_hat = 0.2, and s_0 = 0: the answer
    model = Constant(0.2)
    trajectory = []
    out = denoise(model, torch.full((1, 1, 1, 1), 0.5), 1000, NoiseSchedule(), steps=2, trajectory=trajectory)
    assert model.seen == [[1000], [500]]
    assert out.item() == pytest.approx(0.2)
    assert [(t, round(w, 6)) for t, w, _, _ in trajectory] == [(1000, 0.8), (500, 0.4)]
    assert trajectory[0][2].item() == pytest.approx(0.5) and trajectory[1][2].item() == pytest.approx(0.35)


def test_multi_step_update_is_an_euler_step_of_the_flow():
    # x_next = x + (w_next - w_k) * (eps_hat - x0_hat): the same line, seen as an ODE step
    schedule = NoiseSchedule(max_noise=1.0)
    x = torch.tensor([[[[0.7]]]])
    trajectory = []
    denoise(Constant(-0.3), x, 900, schedule, steps=3, trajectory=trajectory)
    (t0, w0, x0_, pred0), (t1, w1, x1_, _) = trajectory[:2]
    eps_hat = (x0_ - (1 - w0) * pred0) / w0
    assert x1_.item() == pytest.approx((x0_ + (w1 - w0) * (eps_hat - pred0)).item())


def test_multi_step_clamps_x0_before_renoising():
    trajectory = []
    denoise(Constant(5.0), torch.zeros(1, 1, 1, 1), 1000, NoiseSchedule(), steps=2, trajectory=trajectory)
    assert trajectory[0][3].item() == 1.0  # x0_hat clamped to [-1, 1]
    # eps_hat = (0 - 0.2 * 1) / 0.8 = -0.25;  x = 0.6 * 1 + 0.4 * (-0.25) = 0.5
    assert trajectory[1][2].item() == pytest.approx(0.5)


def deterministic_sampler_before_eta(model, x_t, t_start, schedule, steps):
    """The sampler as it was before --eta existed, copied here as the reference for eta = 0."""
    x = x_t
    grid = timestep_grid(t_start, steps)
    with torch.no_grad():
        for s_k, s_next in zip(grid[:-1], grid[1:]):
            x0_hat = model(x, torch.full((x.shape[0],), s_k)).clamp(-1.0, 1.0)
            w_k, w_next = schedule.w(s_k), schedule.w(s_next)
            if s_next == 0:
                break
            eps_hat = (x - (1 - w_k) * x0_hat) / w_k
            x = (1 - w_next) * x0_hat + w_next * eps_hat
    return x0_hat


@pytest.mark.parametrize("max_noise, t_start, steps", [(0.8, 500, 1), (0.8, 1000, 10), (1.0, 1000, 7)])
def test_eta_zero_is_the_deterministic_sampler_exactly(max_noise, t_start, steps):
    torch.manual_seed(0)
    model, schedule = TimeScaledConv(), NoiseSchedule(max_noise=max_noise)
    x_t = torch.randn(2, 3, 8, 8)
    expected = deterministic_sampler_before_eta(model, x_t, t_start, schedule, steps)
    assert torch.equal(denoise(model, x_t, t_start, schedule, steps), expected)
    assert torch.equal(denoise(model, x_t, t_start, schedule, steps, eta=0.0,
                               generator=torch.Generator().manual_seed(5)), expected)


def test_eta_above_zero_is_reproducible_for_a_seed():
    torch.manual_seed(0)
    model, schedule = TimeScaledConv(), NoiseSchedule(max_noise=1.0)
    x_t = torch.randn(1, 3, 8, 8)
    run = lambda eta, seed: denoise(model, x_t, 1000, schedule, 10, eta=eta,  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1.0, 3), run(1.0, 3))
    assert not torch.allclose(run(1.0, 3), run(1.0, 4))
    assert not torch.allclose(run(0.5, 3), run(0.0, 3))


@pytest.mark.parametrize("w_t, w_s", [(0.9, 0.5), (0.4, 0.1), (1.0, 0.3), (0.02, 0.01)])
def test_eta_one_adds_the_variance_of_ddpms_posterior(w_t, w_s):
    """With eta = 1, c^2 is Var(x_s | x_t, x0) of the Markov chain with marginals x_t = (1 - w) x0 + w eps,
    worked out here by Gaussian conditioning: q(x_t | x_s) = N(a x_s, w_t^2 - a^2 w_s^2), a = (1-w_t)/(1-w_s),
    so Cov(x_s, x_t) = a w_s^2 and Var(x_s | x_t) = w_s^2 - (a w_s^2)^2 / w_t^2."""
    a = (1 - w_t) / (1 - w_s)
    posterior_variance = w_s**2 - (a * w_s**2) ** 2 / w_t**2
    x, x0_hat = torch.zeros(1), torch.zeros(1)
    # with x = x0_hat = 0, eps_hat = 0, so the step returns c * z: c is its answer for z = 1
    c = ddim_step(x, x0_hat, w_t, w_s, eta=1.0, noise=torch.ones(1)).item()
    assert c**2 == pytest.approx(posterior_variance, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_every_eta_keeps_the_noise_level_of_the_next_timestep(eta):
    """Given the true x0, a step from x_t = (1 - w_t) x0 + w_t eps lands on (1 - w_s) x0 + w_s * (unit noise):
    the fresh noise replaces part of the old, it does not add to it. Checked over a million pixels."""
    w_t, w_s = 0.7, 0.3
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1_000_000, generator=g) * 2 - 1
    x_t = (1 - w_t) * x0 + w_t * torch.randn(x0.shape, generator=g)
    x_s = ddim_step(x_t, x0, w_t, w_s, eta, noise=torch.randn(x0.shape, generator=g))
    noise = (x_s - (1 - w_s) * x0) / w_s
    assert abs(noise.mean().item()) < 0.005 and noise.std().item() == pytest.approx(1.0, abs=0.005)


def test_eta_one_from_pure_noise_forgets_the_start():
    """At w_t = 1 the posterior does not depend on x_t: DDPM's step re-draws all of the noise."""
    x0_hat, z = torch.full((4,), 0.2), torch.randn(4, generator=torch.Generator().manual_seed(0))
    one, other = (ddim_step(torch.randn(4, generator=torch.Generator().manual_seed(s)), x0_hat, 1.0, 0.6, 1.0, z)
                  for s in (1, 2))
    assert torch.allclose(one, other) and torch.allclose(one, 0.4 * x0_hat + 0.6 * z)


def test_negative_eta_is_refused():
    with pytest.raises(ValueError, match="eta must be at least 0"):
        denoise(Constant(0.0), torch.zeros(1, 1, 1, 1), 10, NoiseSchedule(), 2, eta=-0.1)
