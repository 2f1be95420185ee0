"""The networks, and only the networks: each maps tensors to tensors and knows nothing of noise or files.

    unet_model  the time-embedded residual U-Net, x0_hat = UNet(x_t, t)

How x_t is made, trained on and denoised lives in the ddpm package; models
imports nothing from it.
"""

from .unet_model import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding"]
