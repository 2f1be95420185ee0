"""Learning tier: a tiny network really overfits a tiny image, and a seeded run repeats."""

import pytest
import torch

from conftest import train
from ddpm import NoiseSchedule, denoise, load_image, psnr
from models import UNet
from ddpm.training import learning_rate_factor


def fit(image_path, steps, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 8, (1, 2))
    x0 = load_image(image_path, 16)
    losses = train(model, x0, NoiseSchedule(), train_steps=steps, lr=3e-3, batch_size=4,
                   generator=torch.Generator().manual_seed(seed), show_progress=False)
    return model, x0, losses


@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_image(tiny_image):
    model, x0, losses = fit(tiny_image, steps=300)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 20, (first, last)

    schedule = NoiseSchedule()
    t = torch.tensor([500])
    x_t = schedule.add_noise(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    assert psnr(denoise(model, x_t, 500, schedule), x0) > psnr(x_t.clamp(-1, 1), x0) + 10


def test_a_seeded_run_repeats_exactly(tiny_image):
    _, _, losses_a = fit(tiny_image, steps=5, seed=3)
    _, _, losses_b = fit(tiny_image, steps=5, seed=3)
    _, _, losses_c = fit(tiny_image, steps=5, seed=4)
    assert losses_a == losses_b and losses_a != losses_c


def test_learning_rate_warms_up_then_decays_to_zero():
    factors = [learning_rate_factor(step, 3000) for step in range(3000)]
    assert factors[0] == 0.01 and factors[99] == 1.0  # 100 warm-up steps
    assert all(a <= b for a, b in zip(factors[:100], factors[1:100]))
    assert all(a >= b for a, b in zip(factors[100:], factors[101:]))
    assert factors[1550] == 0.5 and factors[-1] < 1e-5
    assert learning_rate_factor(0, 20) == 0.5  # short runs warm up for 10% of the steps


def test_the_trainers_fused_adam_and_foreach_clipping_take_the_plain_per_tensor_step(tiny_image):
    """On the CPU the Trainer uses fused Adam and one multi-tensor norm for clipping; that must be
    the same algorithm as torch's plain per-tensor Adam and clipping, to rounding."""
    from ddpm.diffusion import training_losses
    from ddpm.training import GRAD_CLIP_NORM, Trainer

    x0 = load_image(tiny_image, 16)
    torch.manual_seed(0)
    # Width 16, two channels per GroupNorm group. (At width 8 every group is one channel, so the
    # biases just before a norm get exactly zero gradient in exact arithmetic; Adam turns the
    # rounding noise there into full-size steps, and any two implementations drift apart.)
    fused_model = UNet(3, 16, (1, 2))
    plain_model = UNet(3, 16, (1, 2))
    plain_model.load_state_dict(fused_model.state_dict())
    steps = 20
    trainer = Trainer(fused_model, x0, NoiseSchedule(), steps, lr=3e-3, generator=torch.Generator().manual_seed(0))
    assert trainer.optimizer.defaults["fused"]
    trainer.run(show_progress=False)

    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(plain_model.parameters(), lr=3e-3, foreach=False)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, steps))
    for _ in range(steps):
        losses, _ = training_losses(plain_model, x0, NoiseSchedule(), generator=generator)
        optimizer.zero_grad()
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(plain_model.parameters(), GRAD_CLIP_NORM, foreach=False)
        optimizer.step()
        lr_schedule.step()
    for fused, plain in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.allclose(fused, plain, atol=1e-6)


def test_snr_gamma_weights_the_gradient_and_the_run_still_reports_the_plain_x0_error(tiny_image):
    from ddpm.diffusion import loss_weights, training_losses
    from ddpm.training import GRAD_CLIP_NORM, Trainer

    x0 = load_image(tiny_image, 16).expand(8, -1, -1, -1)  # one image, 8 noise levels a step
    torch.manual_seed(0)
    model, replay = UNet(3, 8, (1, 2)), UNet(3, 8, (1, 2))
    replay.load_state_dict(model.state_dict())
    schedule = NoiseSchedule(max_noise=1.0)
    trainer = Trainer(model, x0, schedule, 2, lr=1e-3, batch_size=8, generator=torch.Generator().manual_seed(3),
                      snr_gamma=5.0)
    trainer.train_step()

    losses, t = training_losses(replay, x0, schedule, generator=torch.Generator().manual_seed(3))
    weights = loss_weights(schedule, t, 5.0)
    assert weights.min() == 1 and weights.max() > 1  # the draw holds both kinds of step
    (weights * losses).mean().backward()
    torch.nn.utils.clip_grad_norm_(replay.parameters(), GRAD_CLIP_NORM)
    for trained, replayed in zip(model.parameters(), replay.parameters()):
        assert torch.allclose(trained.grad, replayed.grad, rtol=1e-4, atol=1e-7)
    assert trainer.loss_history() == pytest.approx([losses.mean().item()])  # the x0 error, unweighted
    with pytest.raises(ValueError, match="at least 1"):
        Trainer(UNet(3, 8, (1, 2)), x0, schedule, 2, lr=1e-3, snr_gamma=0.5)
