"""Image quality and closeness: PSNR, SSIM, and how near a sample lies to its nearest training images.

All take images in [-1, 1] (the project's convention) and measure them on
the [0, 1] scale, where the peak value is 1.
"""

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window of Wang et al. 2004: 11 x 11, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(image, reference):
    """Peak signal-to-noise ratio in dB: 10 * log10(1 / MSE), MSE over all pixels and channels.

    Identical images give +inf.
    """
    mse = torch.mean(((image.float() - reference.float()) / 2) ** 2).item()  # /2: [-1, 1] -> [0, 1] scale
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def gaussian_window_1d(size=SSIM_WINDOW, sigma=SSIM_SIGMA):
    """(size,) Gaussian weights summing to 1."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(image, reference):
    """Structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004, eq. 13), in [-1, 1]; 1 means identical.

    Local means, variances and covariance come from an 11 x 11 Gaussian window
    (sigma 1.5) at every position where it fits inside the image; with
    C1 = (0.01 * L)^2 and C2 = (0.03 * L)^2 for the peak L = 1,

        SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    is averaged over positions, computed per channel, and the channels are
    averaged. image, reference: (C, H, W) or (1, C, H, W), at least 11 px a side.
    """
    x = ((image.double() + 1) / 2).reshape(-1, 1, *image.shape[-2:])  # (C, 1, H, W) in [0, 1]
    y = ((reference.double() + 1) / 2).reshape(-1, 1, *reference.shape[-2:])
    channels = x.shape[0]
    # The five local means in one go: stacked along the batch, (5C, 1, H, W) -> (5C, 1, H - 10, W - 10).
    # The 2-D Gaussian is the outer product of a 1-D one, so it is applied as a column pass and a row
    # pass (11 + 11 multiplications per pixel instead of 121); the result is the same.
    g = gaussian_window_1d().to(x.device)
    means = F.conv2d(F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = means.split(channels)
    var_x = mean_xx - mu_x**2
    var_y = mean_yy - mu_y**2
    cov_xy = mean_xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3)).mean().item()  # per channel, then over channels


MEMORIZED_RATIO = 1 / 3  # a sample is a copy when its nearest training image is 3x closer than the second


def nearest_training_images(samples, training, chunk=256):
    """For each sample, how close its nearest training image is, relative to the next nearest.

    Distances are L2 over all pixels and channels on the [0, 1] scale (images in [-1, 1] are
    mapped there). Returns (index of the nearest, d1, d2, ratio = d1 / d2), each of shape (K,).
    A sample that copies a training image has ratio near 0; one halfway between two has 1.
    A sample counts as memorised when ratio < MEMORIZED_RATIO (Yoon et al. 2023, Gu et al. 2023).

    With one training image there is no second neighbour; d2 is then the distance from that
    image to a flat image of its own mean colour: a sample that keeps only the colour scores 1,
    an exact copy 0, and the same threshold applies.

    ``training`` is a (N, C, H, W) tensor or a Dataset of (C, H, W) images, read ``chunk`` at a time.
    """
    flat = signed_to_unit_flat(samples)  # (K, D)
    best = torch.full((len(flat), 2), math.inf, dtype=torch.float64)
    best_index = torch.zeros(len(flat), 2, dtype=torch.long)
    count = len(training)
    for start in range(0, count, chunk):
        part = torch.stack([training[i] for i in range(start, min(start + chunk, count))])
        d = torch.cdist(flat, signed_to_unit_flat(part), compute_mode="donot_use_mm_for_euclid_dist")
        merged = torch.cat([best, d], dim=1)
        merged_index = torch.cat([best_index, torch.arange(start, start + len(part)).expand(len(flat), -1)], dim=1)
        best, order = merged.topk(2, dim=1, largest=False)  # the two smallest so far, in order
        best_index = merged_index.gather(1, order)
    d1, d2 = best[:, 0], best[:, 1]
    if count == 1:
        image = training[0]  # (C, H, W)
        flat_colour = image.mean(dim=(-2, -1), keepdim=True).expand_as(image)  # its mean colour everywhere
        d2 = torch.full_like(d1, float(torch.dist(signed_to_unit_flat(image[None]), signed_to_unit_flat(flat_colour[None]))))
    return best_index[:, 0], d1, d2, d1 / d2


def signed_to_unit_flat(images):
    """(K, C, H, W) in [-1, 1] -> (K, C*H*W) float64 in [0, 1]."""
    return ((images.detach().double().cpu() + 1) / 2).flatten(1)


def cosine_similarity(a, b):
    """Cosine of the angle between paired images, (K, C, H, W) each -> (K,), on the [0, 1] scale.

    On that scale paper is 0 and ink is 1, so the cosine compares the strokes alone: 1 for the same
    strokes (at any brightness), 0 for strokes that never overlap. Kadkhodaie et al. (2024) compare
    two models' samples from the same noise this way.
    """
    return F.cosine_similarity(signed_to_unit_flat(a), signed_to_unit_flat(b), dim=1)


def nearest_cosine_similarity(samples, training, chunk=1024):
    """For each sample, the largest cosine similarity to any training image, (K,): 1 for an exact copy."""
    flat = F.normalize(signed_to_unit_flat(samples), dim=1)  # (K, D), unit length
    best = torch.full((len(flat),), -1.0, dtype=torch.float64)
    for start in range(0, len(training), chunk):
        part = F.normalize(signed_to_unit_flat(training[start : start + chunk]), dim=1)
        best = torch.maximum(best, (flat @ part.T).max(dim=1).values)
    return best
