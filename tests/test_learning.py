"""Learning tier: a tiny network really overfits a tiny image, and a seeded run repeats."""

import torch

from models import NoiseSchedule, UNet, denoise, load_image, psnr, train
from models.training import learning_rate_factor


def fit(image_path, steps, seed=0):
    torch.manual_seed(seed)
    model = UNet(3, 8, (1, 2))
    x0 = load_image(image_path, 16)
    losses = train(model, x0, NoiseSchedule(), train_steps=steps, lr=3e-3, batch_size=4,
                   generator=torch.Generator().manual_seed(seed), show_progress=False)
    return model, x0, losses


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
