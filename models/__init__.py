"""The library behind ddpm_train.py and ddpm_infer.py.

    unet_model  the network, x0_hat = UNet(x_t, t); knows nothing of the noise
    diffusion   the noise process: w(t), add_noise, the training loss, denoising
    training    the training loop (Adam, warm-up, cosine decay, clipping)
    checkpoint  the self-describing checkpoint file: save (atomic), load (safe)
    imaging     image files <-> tensors in [-1, 1]
    figures     the figures: result triptych, trajectory, noise sweep, training plots
    metrics     PSNR and SSIM
    cli, files, errors   what the two scripts share: flags, safe writes, user errors

Data flows one way: script -> models.* -> torch. Nothing here imports a script.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .diffusion import NUM_TIMESTEPS, NoiseSchedule, denoise, timestep_grid, training_losses
from .errors import UserError
from .imaging import load_image, save_image
from .metrics import psnr, ssim
from .training import train
from .unet_model import UNet, timestep_embedding

__all__ = [
    "NUM_TIMESTEPS", "NoiseSchedule", "UNet", "UserError", "denoise", "load_checkpoint", "timestep_grid",
    "load_image", "psnr", "save_checkpoint", "save_image", "ssim", "timestep_embedding",
    "train", "training_losses",
]
