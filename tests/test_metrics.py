"""Unit tier: PSNR and SSIM against cases worked by hand."""

import math

import pytest
import torch

from ddpm.metrics import SSIM_K1, SSIM_K2, gaussian_window_1d, psnr, ssim


def gaussian_window():
    """(11, 11) Gaussian weights summing to 1: the 2-D window of SSIM, as the outer product that ssim() applies
    as a column pass and a row pass."""
    g = gaussian_window_1d()
    return g[:, None] * g[None, :]


def signed(x01):
    return x01 * 2 - 1  # the metrics take [-1, 1] images


def test_psnr_of_identical_images_is_infinite():
    x = torch.rand(3, 8, 8) * 2 - 1
    assert psnr(x, x) == math.inf


def test_psnr_of_a_constant_offset():
    # a 0.1 offset on the [0, 1] scale: MSE = 0.01, PSNR = 10 log10(1 / 0.01) = 20 dB
    x = torch.full((3, 8, 8), 0.3)
    assert psnr(signed(x + 0.1), signed(x)) == pytest.approx(20.0)


def test_psnr_of_known_noise():
    # Gaussian noise of standard deviation 0.05 on [0, 1]: PSNR = -10 log10(0.05^2) = 26.02 dB
    x = torch.full((3, 256, 256), 0.5)
    noise = torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    assert psnr(signed(x + noise), signed(x)) == pytest.approx(26.02, abs=0.05)


def test_gaussian_window_is_normalised_and_symmetric():
    g = gaussian_window()
    assert g.shape == (11, 11) and g.sum().item() == pytest.approx(1.0)
    assert torch.equal(g, g.T) and torch.equal(g, g.flip(0)) and g.argmax().item() == 5 * 11 + 5


def test_ssim_of_identical_images_is_one():
    x = torch.rand(3, 32, 32) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0)


def test_ssim_of_a_constant_offset_on_a_flat_image():
    # flat images: every variance and covariance is 0, so SSIM is the luminance term alone,
    # (2 a b + C1) / (a^2 + b^2 + C1), with a = 0.4, b = 0.6
    c1 = SSIM_K1 ** 2
    expected = (2 * 0.4 * 0.6 + c1) / (0.4 ** 2 + 0.6 ** 2 + c1)
    assert ssim(signed(torch.full((3, 16, 16), 0.4)), signed(torch.full((3, 16, 16), 0.6))) == pytest.approx(expected)


def test_ssim_of_a_constant_offset_on_a_textured_image():
    # y = x + c leaves the variances and covariance unchanged: contrast-structure term is 1 at every position
    x = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(1)) * 0.5
    c1 = SSIM_K1 ** 2
    value = ssim(signed(x + 0.2), signed(x))
    window = gaussian_window().double()
    mu = torch.nn.functional.conv2d(x.double()[None], window[None, None])
    luminance = ((2 * mu * (mu + 0.2) + c1) / (mu ** 2 + (mu + 0.2) ** 2 + c1)).mean().item()
    assert value == pytest.approx(luminance)


def test_ssim_of_known_noise_on_a_flat_image():
    # flat x, y = x + white noise of variance s^2: the luminance term is ~1 and the covariance ~0, so
    # SSIM ~ C2 / (var_y + C2). The window's weighted variance of white noise is s^2 (1 - sum g^2)
    # on average (sum g^2 ~ 1 / (4 pi sigma^2)); averaging the ratio over positions adds a few per cent.
    s = 0.1
    x = torch.full((3, 128, 128), 0.5)
    noise = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(0)) * s
    var_y = s ** 2 * (1 - (gaussian_window() ** 2).sum().item())
    expected = SSIM_K2 ** 2 / (var_y + SSIM_K2 ** 2)
    assert ssim(signed(x + noise), signed(x)) == pytest.approx(expected, rel=0.1)
    assert ssim(signed(x + noise / 2), signed(x)) > ssim(signed(x + noise), signed(x))  # less noise, closer


def test_ssim_is_symmetric_and_averages_channels():
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    y = x.clone()
    y[0] = -y[0]  # only the first channel differs
    per_channel = [ssim(x[c:c + 1], y[c:c + 1]) for c in range(3)]
    assert ssim(x, y) == pytest.approx(ssim(y, x))
    assert ssim(x, y) == pytest.approx(sum(per_channel) / 3)
    assert per_channel[1] == pytest.approx(1.0) and per_channel[0] < 0.5


def test_ssim_equals_the_direct_two_dimensional_window_form():
    """ssim() filters with two 1-D passes; the definition slides the 11 x 11 window. Same numbers."""
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(3, 40, 33, generator=gen) * 2 - 1, torch.rand(3, 40, 33, generator=gen) * 2 - 1
    a, b = ((x.double() + 1) / 2)[:, None], ((y.double() + 1) / 2)[:, None]
    window = gaussian_window()[None, None]

    def mean(z):
        return torch.nn.functional.conv2d(z, window)

    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b, cov = mean(a * a) - mu_a ** 2, mean(b * b) - mu_b ** 2, mean(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    direct = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    assert ssim(x, y) == pytest.approx(direct.mean().item(), abs=1e-12)
