"""The networks, and only the networks: each maps tensors to tensors and knows nothing of noise or files.

    unet_model        the time-embedded residual U-Net, x0_hat = UNet(x_t, t), or UNet(x_t, t, y) for class y
    digit_classifier  the LeNet-style classifier of 28 px digits that judges generated ones

How x_t is made, trained on and denoised lives in the ddpm package; models
imports nothing from it.
"""

from .digit_classifier import DigitClassifier
from .unet_model import UNet, timestep_embedding

__all__ = ["DigitClassifier", "UNet", "timestep_embedding"]
