"""Image quality: PSNR against the ground truth."""

import math

import torch


def psnr(image, reference):
    """Peak signal-to-noise ratio in dB of two images in [-1, 1], measured on the [0, 1] scale.

    PSNR = 10 * log10(1 / MSE) with MSE over all pixels and channels of the
    images mapped to [0, 1] (peak value 1). Identical images give +inf.
    """
    mse = torch.mean(((image.float() - reference.float()) / 2) ** 2).item()  # /2: [-1, 1] -> [0, 1] scale
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
